// fusion::optimize: find the chains, pick the kernels, verify and time each on the user's own
// input, keep only what is right and faster, and hand back the plan.
//
//   auto plan = fusion::optimize(model, [&] { return model(sample); });
//   std::cout << plan;                            // kept and rejected, with figures and reasons
//   fusion::save_plan(plan, "model.plan.json");   // fusion/plan_json.hpp
//   fusion::fuse_modules(other, fusion::load_plan("model.plan.json"));  // no re-tuning
#pragma once

#include <chrono>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/nn/module.h>

#include "fusion/detail/call_trace.hpp"
#include "fusion/detail/candidates.hpp"
#include "fusion/detail/plan_search.hpp"
#include "fusion/detail/sites.hpp"
#include "fusion/error.hpp"
#include "fusion/fuse.hpp"
#include "fusion/kernels/batch_norm_folding.hpp"
#include "fusion/optimized_plan.hpp"
#include "fusion/plan.hpp"

namespace fusion {

/// Finds, verifies and times fusions of `root` on the sample `run` (a repeatable forward over
/// sample inputs, returning its outputs, as for verify), and leaves `root` fused by the plan it
/// returns. Steps:
///
/// 1. Traces one run with every Slot recording its calls: the candidates are data-flow chains
///    (each member's result is the next member's argument, used by nothing else that fusion sees,
///    and every member called once per run) whose module types are a registered kernel's, the
///    built-in ones among them. Each gets specs that wire it as it ran.
/// 2. Fuses the candidates with their kernels, longest chains first, and verifies each (see
///    verify; the kernel must compute, not replay): a failure is rejected with its reason.
/// 3. Groups the survivors into rules (same kernel, specs and path shape) and times each rule's
///    chains unfused, replayed and with the kernel, interleaved (detail::time_interleaved); keeps
///    a rule only if it is `min_speedup` faster than unfused.
/// 4. Where a chain was rejected, a shorter candidate or another kernel over its modules gets its
///    turn; one kernel per chain: the first that passes, by length, then kernel name.
/// 5. Writes each rule's patterns generalized over its chains (`layers.*.mlp`) where they select
///    exactly those chains, records the member types, and fuses `root` by the plan.
///
/// Throws FusionError if `root` already has fused chains; rethrows what `run` throws. Either way
/// `root` is left unfused and as it was. Not while another thread runs the model.
template <typename Root, typename Run>
OptimizedPlan optimize(Root& root, Run&& run, const OptimizeOptions& options = {}) {
  const auto started = std::chrono::steady_clock::now();
  kernels::register_builtin_kernels();
  auto& module = detail::module_of(root);
  const auto sites = detail::sites_under(module);
  const auto existing = detail::chains_under(sites);
  if (!existing.empty()) {
    detail::fail(
        "fusion::optimize: the model already has {} fused chain(s), [{}] first; call "
        "unfuse_modules before optimize",
        existing.size(), to_string(detail::info_under(*existing.front(), sites)));
  }
  struct Threads {
    int before = at::get_num_threads();
    bool set;
    explicit Threads(int threads) : set(threads > 0) {
      if (set) at::set_num_threads(threads);
    }
    ~Threads() {
      if (set) at::set_num_threads(before);
    }
  } threads(options.threads);
  struct Unfuse {  // whatever happens, optimize's own trial chains do not outlive it
    torch::nn::Module& module;
    bool done = false;
    ~Unfuse() {
      if (done) return;
      try {
        unfuse_modules(module);
      } catch (...) {  // only another thread running the model, which optimize does not allow
      }
    }
  } cleanup{module};

  OptimizedPlan result;
  std::vector<detail::Candidate> candidates;
  {
    detail::CallTrace trace(sites);
    run();
    candidates = detail::find_candidates(trace, options.kernels, result.notes);
  }
  detail::PlanSearch<std::remove_reference_t<Run>> search(module, sites, run, options, started,
                                                          result);
  search.search(std::move(candidates));
  search.write_plan();
  fuse_modules(module, static_cast<const Plan&>(result));
  cleanup.done = true;
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return result;
}

}  // namespace fusion
