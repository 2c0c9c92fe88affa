// fusion::verify: catches chains that fusion would compute wrongly.
//
// A replay is exact only when the chain's intermediate values flow solely from one member into the
// next: parent code between two members (`mlp(norm(h) * 2)`) or a member's output used twice is
// skipped by the replay, because a collector's placeholder is thrown away. verify finds such chains
// by running the model on sample inputs unfused and then with one chain fused at a time, comparing
// results and, with gradients on, every parameter's gradient.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/ivalue.h>
#include <fmt/format.h>
#include <torch/torch.h>

#include "fusion/detail/boxing.hpp"
#include "fusion/detail/compare.hpp"
#include "fusion/detail/quiesce.hpp"
#include "fusion/detail/verify_runs.hpp"
#include "fusion/fuse.hpp"

namespace fusion {

struct VerifyOptions {
  /// The largest absolute difference accepted, for results and gradients alike. Unset, each
  /// tensor is compared within a tolerance relative to its largest magnitude in the unfused run,
  /// by dtype: 1e-10 for float64, 1e-5 for float32, 1e-2 for float16, 5e-2 for bfloat16; integer
  /// and boolean tensors and other values must be equal. A replay is exact (it runs the same ops);
  /// the defaults are for kernels, whose arithmetic is reordered. A chain whose kernel computes in
  /// a lower precision (KernelOptions::compute_dtype) is compared within that dtype's default
  /// where it is looser: a bfloat16 kernel on a float32 model within 5e-2.
  std::optional<double> tolerance = std::nullopt;
  /// With grad mode on: backpropagate a fixed random projection of the result and compare the
  /// gradients of every parameter under the root and of `inputs`.
  bool gradients = true;
  /// Tensor inputs (leaves that require grad) whose gradients to compare as well.
  std::vector<at::Tensor> inputs = {};
  /// A chain with a kernel passes only if its kernel computed a run: one that replayed compares
  /// the replay with itself. When the kernel does not apply as `run` is called (grad mode on and
  /// no autograd, training mode and not registered for training), verify checks it on a second
  /// pair of runs in eval() under NoGradGuard. False: a chain whose kernel never ran passes on
  /// its replay's result.
  bool require_kernel_run = true;
};

/// The tolerance verify uses by default for tensors of `dtype`, relative to the largest magnitude
/// of the unfused result (see VerifyOptions::tolerance).
inline double default_tolerance(c10::ScalarType dtype) {
  return detail::default_relative_tolerance(dtype);
}

struct ChainCheck {
  FusedChain chain;
  double max_abs_diff = 0;   // over every tensor and number the run returned; inf if shapes differ
  double max_grad_diff = 0;  // over every gradient compared; inf if one exists on one side only
  std::string worst_gradient;   // the parameter or input where max_grad_diff was found
  std::string error;            // what the fused run threw, if it threw
  bool kernel_ran = false;      // with a kernel (chain.kernel): whether it computed the fused run
  bool kernel_in_eval = false;  // it ran only in the second check, in eval() under NoGradGuard
  bool ok = false;
};

struct VerifyReport {
  std::vector<ChainCheck> chains;

  bool ok() const {
    for (const ChainCheck& check : chains) {
      if (!check.ok) return false;
    }
    return true;
  }
  /// One line per chain: "ok" or what went wrong.
  std::string to_string() const {
    std::string text;
    for (const ChainCheck& check : chains) {
      fmt::format_to(std::back_inserter(text), "{} [{}]", check.ok ? "ok  " : "FAIL",
                     fusion::to_string(check.chain));
      if (!check.chain.kernel.empty()) {
        fmt::format_to(std::back_inserter(text), " kernel '{}'{}", check.chain.kernel,
                       !check.kernel_ran      ? " (did not run: not checked)"
                       : check.kernel_in_eval ? " (checked in eval() under NoGradGuard)"
                                              : "");
      }
      text += ": ";
      if (!check.error.empty()) {
        fmt::format_to(std::back_inserter(text), "threw: {}\n", check.error);
        continue;
      }
      fmt::format_to(std::back_inserter(text), "max abs diff {:g}", check.max_abs_diff);
      if (!check.worst_gradient.empty()) {
        fmt::format_to(std::back_inserter(text), ", gradients: max abs diff {:g} at {}",
                       check.max_grad_diff, check.worst_gradient);
      }
      text += '\n';
    }
    return text;
  }
};

namespace detail {

// GCC 13 reports the optional tolerance below as maybe uninitialised once inlined (a false
// positive of its middle end, as in detail/simd.hpp); -Werror builds of users would fail on it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
/// Compares a fused run with the unfused one into `check` (results, then each gradient).
/// Without a tolerance, within the defaults of each tensor's dtype or `computed_in`, the looser.
inline void compare_runs(ChainCheck& check, const RunOutcome& reference, const RunOutcome& fused,
                         const std::vector<std::string>& names, std::optional<double> tolerance,
                         c10::optional<c10::ScalarType> computed_in) {
  const c10::optional<double> absolute =
      tolerance ? c10::optional<double>(*tolerance) : c10::nullopt;
  const Difference result = difference(reference.result, fused.result, absolute, computed_in);
  check.max_abs_diff = result.max_abs;
  double excess = result.excess;
  const bool compare = !reference.gradients.empty() || !fused.gradients.empty();
  for (std::size_t g = 0; compare && g < names.size(); ++g) {
    const at::Tensor none;
    const at::Tensor& a = g < reference.gradients.size() ? reference.gradients[g] : none;
    const at::Tensor& b = g < fused.gradients.size() ? fused.gradients[g] : none;
    const Difference diff = difference(a, b, absolute, computed_in);
    excess = std::max(excess, diff.excess);
    if (check.worst_gradient.empty() || diff.max_abs > check.max_grad_diff) {
      check.max_grad_diff = diff.max_abs;
      check.worst_gradient = names[g];
      if (a.defined() != b.defined()) {
        check.worst_gradient +=
            a.defined() ? " (a gradient unfused, none fused)" : " (a gradient fused, none unfused)";
      }
    }
  }
  check.ok = excess <= 1;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// The unfused runs a chain is compared with: as `run` is called, and, made when first needed,
/// in eval() under NoGradGuard, where kernels without training or autograd apply.
struct References {
  RunOutcome as_called;
  std::optional<RunOutcome> in_eval;
};

/// One chain on, the others off: its run compared with the unfused one. A kernel that did not run
/// as `run` is called is checked again in eval() under NoGradGuard (results only).
template <typename Run>
ChainCheck check_chain(Chain& chain, FusedChain info, Run& run, SavedState& state,
                       TrainingFlags& flags, References& references, const VerifyOptions& options) {
  ChainCheck check;
  check.chain = std::move(info);
  const auto& kernel = chain.kernel();
  const auto runs = [&] { return kernel ? kernel->stats().runs : 0; };
  chain.attach();
  try {
    std::uint64_t before = runs();
    const auto computed_in = kernel ? kernel->compute_dtype() : c10::nullopt;
    compare_runs(check, references.as_called, run_once(run, state, options.gradients),
                 state.gradient_names(), options.tolerance, computed_in);
    check.kernel_ran = runs() > before;
    if (kernel && !check.kernel_ran && (torch::GradMode::is_enabled() || flags.any_training())) {
      const torch::NoGradGuard no_grad;
      flags.all_eval();
      if (!references.in_eval) {
        chain.detach();
        references.in_eval = run_once(run, state, false);
        chain.attach();
      }
      before = runs();
      ChainCheck in_eval;
      in_eval.chain = std::move(check.chain);
      check = std::move(in_eval);
      compare_runs(check, *references.in_eval, run_once(run, state, false), {}, options.tolerance,
                   computed_in);
      check.kernel_ran = check.kernel_in_eval = runs() > before;
    }
    if (kernel && !check.kernel_ran && options.require_kernel_run) check.ok = false;
  } catch (const std::exception& error) {
    check.error = error.what();
    check.ok = false;
  }
  flags.restore();
  chain.detach();
  return check;
}

}  // namespace detail

/// Runs `run()` (one forward over sample inputs, returning its outputs: a tensor, a tuple, a
/// vector, a map, ...) with every fused chain under `root` switched off, then once per chain with
/// only that chain on, and reports the chains whose results differ by more than the tolerance or
/// that threw. In grad mode it also backpropagates a fixed random projection of each result and
/// compares the gradient of every parameter under `root` (and of `options.inputs`): a chain that
/// changes only gradients fails too. Run it under NoGradGuard to compare results only.
///
/// A chain with a kernel is checked with its kernel: as `run` is called when the kernel applies
/// there, else on a second pair of runs in eval() under NoGradGuard (results only); a kernel that
/// runs in neither fails the check (see VerifyOptions::require_kernel_run). The default
/// tolerances are per dtype (see VerifyOptions::tolerance).
///
/// Each run starts from the state verify found, and verify leaves it so: parameter and buffer
/// values (BatchNorm statistics move in training mode), gradients, the default random generators,
/// and the fusion state, also when `run` throws. It holds a copy of the parameters and buffers
/// while it runs. Check in the mode the model will be used in: in training mode, random draws
/// between chain members (dropout in a collector, `randn_like` in the parent) happen in another
/// order when fused, and verify reports that as a difference.
template <typename Root, typename Run>
VerifyReport verify(Root& root, Run&& run, const VerifyOptions& options) {
  auto& module = detail::module_of(root);
  const auto sites = detail::sites_under(module);
  auto chains = detail::chains_under(sites);
  std::vector<bool> was_attached;
  for (auto& chain : chains) was_attached.push_back(chain->attached());
  detail::SavedState state(module, options.inputs);
  detail::TrainingFlags flags(module);

  struct Restore {
    std::vector<std::shared_ptr<detail::Chain>>& chains;
    std::vector<bool>& attached;
    detail::SavedState& state;
    detail::TrainingFlags& flags;
    ~Restore() {
      for (std::size_t i = 0; i < chains.size(); ++i) {
        if (attached[i])
          chains[i]->attach();
        else
          chains[i]->detach();
      }
      flags.restore();
      state.restore();
    }
  } restore{chains, was_attached, state, flags};

  {
    // verify switches chains on and off between its runs: refused while another thread runs one.
    const detail::Quiesce quiet(chains, "verify");
    for (auto& chain : chains) chain->detach();
  }
  detail::References references{detail::run_once(run, state, options.gradients), {}};
  VerifyReport report;
  for (auto& chain : chains) {
    report.chains.push_back(detail::check_chain(*chain, detail::info_under(*chain, sites), run,
                                                state, flags, references, options));
  }
  return report;
}

/// verify with the default options (the default tolerances).
template <typename Root, typename Run>
VerifyReport verify(Root& root, Run&& run) {
  return verify(root, std::forward<Run>(run), VerifyOptions{});
}

/// verify with an absolute tolerance and the default options otherwise.
template <typename Root, typename Run>
VerifyReport verify(Root& root, Run&& run, double tolerance) {
  VerifyOptions options;
  options.tolerance = tolerance;
  return verify(root, std::forward<Run>(run), options);
}

}  // namespace fusion
