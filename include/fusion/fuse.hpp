// fusion::fuse_modules / unfuse_modules: find chains of Slots by path patterns and fuse them.
#pragma once

#include <chrono>
#include <cstddef>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "fusion/detail/chain.hpp"
#include "fusion/detail/chain_roles.hpp"
#include "fusion/detail/quiesce.hpp"
#include "fusion/detail/sites.hpp"
#include "fusion/error.hpp"
#include "fusion/fused_chain.hpp"
#include "fusion/kernel.hpp"
#include "fusion/match.hpp"
#include "fusion/pattern.hpp"
#include "fusion/slot.hpp"
#include "fusion/spec.hpp"

namespace fusion {

/// Fuses every chain the patterns find under `root` (a torch::nn::Module or any ModuleHolder).
///
/// Patterns are dotted paths relative to `root` (see Pattern); one spec per pattern, same order.
/// Matches whose wildcards took the same values form one chain, members in pattern order. Every
/// member but the last becomes a Collector (captures its call arguments, returns a
/// placeholder); the last becomes a FusedModule that replays the chain's original modules from
/// the captures, wiring inputs to outputs by the names in the specs. Parameters, buffers and
/// children_ are untouched. Returns one FusedChain per chain, in module order.
///
/// Throws FusionError, naming the culprit, and leaves the model unchanged, if a pattern is
/// malformed or matches nothing, a chain is incomplete, a match is not a Slot, a module is already
/// fused or would be in two chains, or a spec does not fit its module's forward(). Fusing,
/// unfusing and attaching kernels while another thread runs the model: fusing never waits for
/// it (a pass that began before finishes unfused); see unfuse_modules and use_kernel.
template <typename Root>
std::vector<FusedChain> fuse_modules(Root& root, const std::vector<std::string>& patterns,
                                     const std::vector<ModuleSpec>& specs,
                                     const FuseOptions& options = {}) {
  return detail::fuse_all(detail::build_chains(detail::module_of(root), patterns, specs, options));
}

namespace detail {
inline std::size_t unfuse(const std::vector<std::shared_ptr<Chain>>& chains,
                          std::chrono::milliseconds wait) {
  const Quiesce quiet(chains, "unfuse_modules", wait);
  fault_point();  // the last step that may fail
  for (const auto& chain : chains) Chain::unfuse(chain);
  return chains.size();
}
}  // namespace detail

/// Puts the original modules back in every fused chain under `root`. Returns how many chains.
///
/// While another thread runs one of them: with `wait` zero, throws FusionError, changing nothing;
/// with a `wait`, new passes through the chains wait, passes in flight finish, then the chains
/// are unfused (a FusionError, changing nothing, only if that takes longer than `wait`). Either
/// way no forward on another thread fails or sees a half-made change.
template <typename Root>
std::size_t unfuse_modules(Root& root,
                           std::chrono::milliseconds wait = std::chrono::milliseconds(0)) {
  return detail::unfuse(detail::chains_under(detail::sites_under(detail::module_of(root))), wait);
}

/// Unfuses only the chains with a member whose path under `root` matches one of `patterns`.
template <typename Root>
std::size_t unfuse_modules(Root& root, const std::vector<std::string>& patterns,
                           std::chrono::milliseconds wait = std::chrono::milliseconds(0)) {
  return detail::unfuse(
      detail::chains_matching(detail::sites_under(detail::module_of(root)), patterns), wait);
}

/// The fused chains with a member under `root`, in module order, with paths relative to `root`.
template <typename Root>
std::vector<FusedChain> fused_chains(Root& root) {
  std::vector<FusedChain> infos;
  const auto sites = detail::sites_under(detail::module_of(root));
  for (const auto& chain : detail::chains_under(sites)) {
    infos.push_back(detail::info_under(*chain, sites));
  }
  return infos;
}

/// A readable account of the fused chains under `root`: members, their wiring and roles, and each
/// kernel with its counters and the memory its prepared state holds.
template <typename Root>
std::string report(Root& root) {
  const auto chains = fused_chains(root);
  std::string text =
      fmt::format("{} fused chain{}\n", chains.size(), chains.size() == 1 ? "" : "s");
  for (std::size_t c = 0; c < chains.size(); ++c) {
    const FusedChain& chain = chains[c];
    fmt::format_to(std::back_inserter(text), "[{}] {}  (binding {})\n", c, to_string(chain),
                   detail::describe_names(chain.binding));
    if (!chain.kernel.empty()) {
      const KernelStats& k = chain.stats;
      fmt::format_to(std::back_inserter(text),
                     "    kernel {}{}: {} run(s), {} exception(s), {} checked; replays: device "
                     "{}, training {}, grad {}, modes {}, declined {}; {} prepare(s); state {} B "
                     "own, {} B shared with the model\n",
                     chain.kernel,
                     chain.kernel_dtype.empty() ? "" : " (computes in " + chain.kernel_dtype + ")",
                     k.runs, k.exceptions, k.checks, k.replays_device, k.replays_training,
                     k.replays_grad, k.replays_modes, k.replays_declined, k.prepares, k.state_bytes,
                     k.shared_state_bytes);
      if (k.unversioned_tensors > 0) {
        fmt::format_to(std::back_inserter(text),
                       "    note: {} member tensor(s) are inference tensors: in-place writes to "
                       "them are not seen; call fusion::refresh_kernels after one\n",
                       k.unversioned_tensors);
      }
    }
    for (std::size_t m = 0; m < chain.paths.size(); ++m) {
      fmt::format_to(std::back_inserter(text), "    {:<14} {}: ({}) -> ({})\n",
                     m + 1 == chain.paths.size() ? "FusedModule" : "Collector", chain.paths[m],
                     fmt::join(chain.specs[m].inputs, ", "),
                     fmt::join(chain.specs[m].outputs, ", "));
    }
  }
  return text;
}

}  // namespace fusion
