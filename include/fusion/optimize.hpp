// fusion::optimize: find the chains, pick the kernels, verify and time each on the user's own
// input, keep only what is right and faster, and hand back the plan.
//
//   auto plan = fusion::optimize(model, [&] { return model(sample); });
//   std::cout << plan;                            // kept and rejected, with figures and reasons
//   fusion::save_plan(plan, "model.plan.json");   // fusion/plan_json.hpp
//   fusion::fuse_modules(other, fusion::load_plan("model.plan.json"));  // no re-tuning
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "fusion/detail/call_trace.hpp"
#include "fusion/detail/candidates.hpp"
#include "fusion/detail/generalize.hpp"
#include "fusion/detail/interleaved_timing.hpp"
#include "fusion/fuse.hpp"
#include "fusion/kernels/batch_norm_folding.hpp"
#include "fusion/match.hpp"
#include "fusion/plan.hpp"
#include "fusion/verify.hpp"

namespace fusion {

struct OptimizeOptions {
  /// Passed to verify: unset, the per-dtype default tolerances (see VerifyOptions::tolerance).
  std::optional<double> tolerance = std::nullopt;
  /// A rule is kept only if the whole run with its kernels is at least this much faster than
  /// unfused (0.02: 2%), as the median of interleaved rounds. A rule whose chains are a small
  /// part of the run gains little of the whole: 0 keeps every rule not measured slower.
  double min_speedup = 0.02;
  /// Intra-op threads while optimizing (at::set_num_threads, restored after); 0: as they are.
  int threads = 0;
  /// Time for optimize as a whole; the timing rounds share what tracing and verifying leave, one
  /// share per rule. Each rule still gets at least five rounds of
  /// its three variants, so a slow run can take longer.
  std::chrono::milliseconds time_budget{15000};
  /// Only these kernels (exact names); empty: every registered kernel.
  std::vector<std::string> kernels = {};
};

/// A rule optimize kept, with what it measured on the sample.
struct KeptRule {
  std::size_t rule;    // index in OptimizedPlan::rules
  std::size_t chains;  // how many chains it fuses
  detail::Timing timing;
  double max_abs_diff = 0;        // over its chains, from verify
  std::uint64_t state_bytes = 0;  // the kernels' prepared state beyond the model's tensors
};

/// A chain optimize tried with a kernel and did not keep.
struct Rejection {
  std::vector<std::string> paths;
  std::string kernel;
  std::string reason;
};

/// The plan optimize found (a Plan: fuse_modules and save_plan take it as one), and its account.
struct OptimizedPlan : Plan {
  std::vector<KeptRule> kept;
  std::vector<Rejection> rejected;
  std::vector<std::string> notes;  // Slots not proposed, and why
  double seconds = 0;              // what optimize took
};

inline std::string to_string(const OptimizedPlan& plan) {
  std::string text =
      fmt::format("fusion::optimize: {} rule(s) kept, {} chain(s) rejected, in {:.1f} s\n",
                  plan.rules.size(), plan.rejected.size(), plan.seconds);
  auto out = std::back_inserter(text);
  for (const KeptRule& kept : plan.kept) {
    const Rule& rule = plan.rules[kept.rule];
    const detail::Timing& t = kept.timing;
    fmt::format_to(out,
                   "  kept  {}  kernel {}: {} chain(s); speed-up {:.3f}x over unfused ({:.3f} vs "
                   "{:.3f} ms, +-{:.3f} over {} rounds; replay {:.3f}x); max abs diff {:g}; state "
                   "{} B\n",
                   fmt::join(rule.patterns, " -> "), rule.options.kernel, kept.chains, t.speedup,
                   t.kernel_ms, t.unfused_ms, t.spread, t.rounds, t.replay_speedup,
                   kept.max_abs_diff, kept.state_bytes);
  }
  for (const Rejection& r : plan.rejected) {
    fmt::format_to(out, "  rejected  {}  kernel {}: {}\n", fmt::join(r.paths, " -> "), r.kernel,
                   r.reason);
  }
  for (const std::string& note : plan.notes) fmt::format_to(out, "  not proposed: {}\n", note);
  return text;
}

inline std::ostream& operator<<(std::ostream& stream, const OptimizedPlan& plan) {
  return stream << to_string(plan);
}

namespace detail {

/// A verified chain waiting to be timed, and the rule it will belong to.
struct Survivor {
  Candidate candidate;
  double max_abs_diff;
  std::string group;  // kernel, specs and path shapes: chains that form one rule
};

inline std::string group_key(const Candidate& candidate) {
  std::string key = candidate.kernel;
  for (std::size_t m = 0; m < candidate.members.size(); ++m) {
    key += fmt::format("|{}({})->({})", path_shape(candidate.members[m]->path),
                       fmt::join(candidate.specs[m].inputs, ","),
                       fmt::join(candidate.specs[m].outputs, ","));
  }
  return key;
}

/// One rule for the chains of a group: generalized patterns if they select exactly these chains,
/// else one rule per chain with its own paths.
template <typename Root>
std::vector<Rule> rules_for(Root& root, const std::vector<Candidate>& chains) {
  Rule rule{{}, chains.front().specs, {}, {}};
  rule.options.kernel = chains.front().kernel;
  for (const Site* member : chains.front().members)
    rule.types.push_back(type_name_of(*member->slot));
  std::vector<std::vector<std::string>> paths;
  for (const Candidate& chain : chains) paths.push_back(chain.paths());
  rule.patterns = generalize(paths);
  bool exact = false;
  try {
    std::set<std::vector<std::string>> found;
    for (const FusedChain& chain : match_chains(root, rule.patterns)) found.insert(chain.paths);
    exact = found == std::set<std::vector<std::string>>(paths.begin(), paths.end());
  } catch (const FusionError&) {
  }
  if (exact) return {rule};
  std::vector<Rule> rules;
  for (const auto& chain_paths : paths) {
    Rule single = rule;
    single.patterns = literal_patterns(chain_paths);
    rules.push_back(std::move(single));
  }
  return rules;
}

inline std::string verify_failure(const ChainCheck& check) {
  if (!check.error.empty()) return "verify: the fused run threw: " + check.error;
  if (!check.kernel_ran) return "verify: the kernel did not run on the sample (the chain replayed)";
  if (!check.worst_gradient.empty() && check.max_grad_diff > check.max_abs_diff) {
    return fmt::format("verify: gradients differ by {:g} at {}", check.max_grad_diff,
                       check.worst_gradient);
  }
  return fmt::format("verify: results differ by {:g}, over the tolerance", check.max_abs_diff);
}

}  // namespace detail

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
    explicit Threads(int threads) {
      if (threads > 0) at::set_num_threads(threads);
    }
    ~Threads() { at::set_num_threads(before); }
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

  VerifyOptions verify_options;
  verify_options.tolerance = options.tolerance;
  std::vector<bool> tried(candidates.size(), false);
  std::set<const detail::SlotBase*> taken;
  std::vector<std::pair<std::vector<detail::Candidate>, KeptRule>> kept_groups;
  std::size_t groups_left_estimate = 0;
  while (true) {
    // A round: untried candidates on modules no kept chain and no other candidate of the round
    // has, fused with their kernels.
    std::vector<detail::Candidate> round;
    std::set<const detail::SlotBase*> in_round;
    for (std::size_t c = 0; c < candidates.size(); ++c) {
      const auto& members = candidates[c].members;
      bool free = !tried[c];
      for (const detail::Site* m : members) {
        if (taken.count(m->slot) != 0 || in_round.count(m->slot) != 0) free = false;
      }
      if (!free) continue;
      tried[c] = true;
      FuseOptions fuse;
      fuse.kernel = candidates[c].kernel;
      try {
        fuse_modules(module, detail::literal_patterns(candidates[c].paths()), candidates[c].specs,
                     fuse);
      } catch (const FusionError& error) {
        result.rejected.push_back({candidates[c].paths(), candidates[c].kernel,
                                   std::string("cannot be fused: ") + error.what()});
        continue;
      }
      for (const detail::Site* m : members) in_round.insert(m->slot);
      round.push_back(candidates[c]);
    }
    if (round.empty()) break;

    std::map<std::vector<std::string>, const ChainCheck*> checks;
    const VerifyReport report = verify(module, run, verify_options);
    for (const ChainCheck& check : report.chains) checks[check.chain.paths] = &check;
    std::map<std::string, std::vector<detail::Survivor>> groups;
    std::vector<std::string> group_order;
    for (const detail::Candidate& candidate : round) {
      const ChainCheck& check = *checks.at(candidate.paths());
      if (!check.ok) {
        result.rejected.push_back(
            {candidate.paths(), candidate.kernel, detail::verify_failure(check)});
        unfuse_modules(module, detail::literal_patterns(candidate.paths()));
        continue;
      }
      const std::string key = detail::group_key(candidate);
      if (groups[key].empty()) group_order.push_back(key);
      groups[key].push_back({candidate, check.max_abs_diff, key});
    }

    // Each group timed alone: every other chain off.
    const auto all = detail::chains_under(sites);
    for (const auto& chain : all) chain->detach();
    groups_left_estimate += group_order.size();
    for (const std::string& key : group_order) {
      const auto& survivors = groups[key];
      std::vector<std::string> patterns;
      for (const auto& s : survivors) {
        for (const auto& path : s.candidate.paths())
          patterns.push_back(detail::literal_pattern(path));
      }
      const auto chains = detail::chains_matching(sites, patterns);
      for (const auto& chain : chains) chain->attach();
      const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - started;
      const std::chrono::duration<double> left =
          std::max(std::chrono::duration<double>(0),
                   std::chrono::duration<double>(options.time_budget) - elapsed);
      const std::uint64_t runs_before = chains.front()->kernel()->stats().runs;
      const detail::Timing timing = detail::time_interleaved(
          chains, run, options.min_speedup, left / static_cast<double>(groups_left_estimate));
      --groups_left_estimate;
      for (const auto& chain : chains) chain->detach();
      std::vector<detail::Candidate> members;
      KeptRule kept{0, survivors.size(), timing, 0, 0};
      for (const auto& s : survivors) {
        members.push_back(s.candidate);
        kept.max_abs_diff = std::max(kept.max_abs_diff, s.max_abs_diff);
      }
      for (const auto& chain : chains) kept.state_bytes += chain->kernel()->stats().state_bytes;
      const bool ran = chains.front()->kernel()->stats().runs > runs_before;
      if (ran && timing.speedup >= 1 + options.min_speedup) {
        for (const auto& s : survivors) {
          for (const detail::Site* m : s.candidate.members) taken.insert(m->slot);
        }
        kept_groups.emplace_back(std::move(members), kept);
        continue;
      }
      for (const auto& s : survivors) {
        result.rejected.push_back(
            {s.candidate.paths(), s.candidate.kernel,
             !ran ? std::string("timing: the kernel does not run in the sample's mode (it ran "
                                "only in verify's eval() check); the chain would replay")
                  : fmt::format(
                        "timing: {:.3f}x of unfused (+-{:.3f} over {} rounds; replay {:.3f}x), "
                        "needs {:.3f}x",
                        timing.speedup, timing.spread, timing.rounds, timing.replay_speedup,
                        1 + options.min_speedup)});
        unfuse_modules(module, detail::literal_patterns(s.candidate.paths()));
      }
    }
    for (const auto& chain : detail::chains_under(sites)) chain->attach();
  }

  unfuse_modules(module);
  for (auto& [members, kept] : kept_groups) {
    for (Rule& rule : detail::rules_for(module, members)) {
      kept.rule = result.rules.size();
      kept.chains = match_chains(module, rule.patterns).size();
      result.kept.push_back(kept);
      result.rules.push_back(std::move(rule));
    }
  }
  fuse_modules(module, static_cast<const Plan&>(result));
  cleanup.done = true;
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return result;
}

}  // namespace fusion
