// fusion::register_kernel / use_kernel: run a fused kernel in place of a chain's replay.
//
// A kernel is a typed C++ callable over the chain's modules and its free inputs (every parameter
// that no earlier member feeds: a call argument, else a default), returning the last member's
// result:
//
//   struct RMSNormMLP {
//     struct State { torch::Tensor gate_up, down; };          // optional: derived tensors
//     State prepare(RMSNormImpl& norm, MLPImpl& mlp) const;   // runs under NoGradGuard
//     bool applies(RMSNormImpl& norm, MLPImpl& mlp) const;    // optional: false replays
//     torch::Tensor operator()(const State& s, RMSNormImpl& norm, MLPImpl& mlp,
//                              const torch::Tensor& hidden_states) const;
//   };
//   fusion::register_kernel("qwen3.rmsnorm_mlp", RMSNormMLP{});
//   fusion::use_kernel(model, {"model.layers.*.mlp"}, "qwen3.rmsnorm_mlp");
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "fusion/detail/chain.hpp"
#include "fusion/detail/kernel_attach.hpp"
#include "fusion/detail/quiesce.hpp"
#include "fusion/detail/sites.hpp"
#include "fusion/error.hpp"
#include "fusion/match.hpp"
#include "fusion/pattern.hpp"

namespace fusion {

/// Registers `kernel` under `name` for the device types, modes and gradients `options` allows.
/// Call it once per implementation: one name may have a CPU and a CUDA implementation, which
/// must take the same modules and inputs and return the same result. The kernel's operator() is
/// called from every thread that runs the model, at once: it must be thread-safe (const).
///
/// `prepare`, when the kernel has one, builds its state from the member modules under
/// NoGradGuard: once, and again before any call that finds a member's parameter or buffer changed
/// (an in-place write such as an optimizer step, `torch::load`, `to()`), never otherwise. A State
/// with `std::vector<torch::Tensor> tensors() const` has its memory shown by `report`; one that
/// also holds memory no tensor shows (a oneDNN primitive's reordered weights, say) adds
/// `std::uint64_t opaque_bytes() const`, asked on each report.
///
/// `applies`, when the kernel has one, is asked on every call that the options allow, after the
/// device and mode checks: a configuration the kernel cannot compute (a BatchNorm without running
/// statistics, say) returns false, and the chain replays, counted as `replays_declined`.
template <typename Kernel>
void register_kernel(const std::string& name, Kernel kernel, KernelOptions options = {}) {
  detail::KernelRegistry::instance().add(name, std::make_shared<const detail::TypedKernel<Kernel>>(
                                                   std::move(kernel), std::move(options)));
}

/// Runs `registrations` (register_kernel calls) the first time it is called for `group` in this
/// process, and does nothing later: for functions such as register_builtin_kernels() that any
/// code may call before fusing. The record is the registry's, so it holds across shared
/// libraries built with hidden visibility, where a function-local `static` would run once per
/// library and the second library's registrations would fail as duplicates. Returns whether
/// this call ran them.
template <typename Registrations>
bool register_kernels_once(const std::string& group, Registrations&& registrations) {
  return detail::KernelRegistry::instance().once(group, std::forward<Registrations>(registrations));
}

/// The names of the registered kernels, sorted.
inline std::vector<std::string> registered_kernels() {
  return detail::KernelRegistry::instance().names();
}

/// Attaches kernel `kernel` to every fused chain under `root` with a member whose path matches
/// one of `patterns`, replacing any kernel they had; an empty name returns them to the replay.
/// Checks first (the kernel is registered, its module types, free inputs and result fit every
/// selected chain, the patterns select a chain) and throws FusionError, changing nothing, on the
/// first misfit. Returns how many chains.
///
/// While another thread runs one of the chains: with `wait` zero, throws FusionError, changing
/// nothing; with a `wait`, new passes through the chains wait, passes in flight finish, then the
/// kernel is attached (a FusionError, changing nothing, only if that takes longer than `wait`).
template <typename Root>
std::size_t use_kernel(Root& root, const std::vector<std::string>& patterns,
                       const std::string& kernel, KernelPolicy policy = KernelPolicy::fallback,
                       std::chrono::milliseconds wait = std::chrono::milliseconds(0)) {
  const auto sites = detail::sites_under(detail::module_of(root));
  std::vector<std::pair<std::shared_ptr<detail::Chain>, std::shared_ptr<detail::KernelRunner>>>
      changes;
  for (const auto& chain : detail::chains_matching(sites, patterns)) {
    detail::fault_point();
    std::shared_ptr<detail::KernelRunner> runner;
    if (!kernel.empty()) {
      runner = detail::bind_kernel(*chain, detail::info_under(*chain, sites).paths, kernel, policy);
    } else if (chain->size() < 2) {
      detail::fail(
          "fusion::use_kernel: chain [{}] has a single member, which only a kernel justifies; "
          "unfuse it instead of removing its kernel",
          to_string(detail::info_under(*chain, sites)));
    }
    changes.emplace_back(chain, std::move(runner));
  }
  if (changes.empty()) {
    detail::fail("fusion::use_kernel: patterns {} select no fused chain under the root: {}",
                 detail::describe_names(patterns), detail::unfused_matches(sites, patterns));
  }
  std::vector<std::shared_ptr<detail::Chain>> chains;
  for (const auto& change : changes) chains.push_back(change.first);
  const detail::Quiesce quiet(chains, "use_kernel", wait);
  detail::fault_point();  // the last step that may fail
  for (auto& [chain, runner] : changes) chain->set_kernel(std::move(runner));
  return changes.size();
}

/// Makes every kernel under `root` rebuild its prepared state on its next call. The state is
/// rebuilt by itself whenever a member's parameter or buffer was replaced (`set_data`, `to()`,
/// `torch::load`, assignment in a load loop: whatever address the new bytes get) or written in
/// place through the tensor (`copy_`, `mul_`, Adam's step), and after any call that needed
/// gradients (a training step's forward). Call this after a write none of these shows: a write
/// through `.data()` or a raw pointer (LibTorch's SGD steps through `.data()`: gradients set from
/// outside, then `step()`, then a forward without gradients needs it), or an in-place write to an
/// inference tensor (a model built or loaded under InferenceMode; report counts them).
template <typename Root>
void refresh_kernels(Root& root) {
  for (const auto& chain : detail::chains_under(detail::sites_under(detail::module_of(root)))) {
    if (chain->kernel()) chain->kernel()->invalidate();
  }
}

}  // namespace fusion
