// fusion::verify: catches chains that fusion would compute wrongly.
//
// A replay is exact only when the chain's intermediate values flow solely from one member into the
// next: parent code between two members (`mlp(norm(h) * 2)`) or a member's output used twice is
// skipped by the replay, because a collector's placeholder is thrown away. verify finds such chains
// by running the model on sample inputs unfused and then with one chain fused at a time.
#pragma once

#include <algorithm>
#include <cmath>
#include <exception>
#include <iterator>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/ivalue.h>
#include <fmt/format.h>
#include <torch/torch.h>

#include "fusion/detail/boxing.hpp"
#include "fusion/fuse.hpp"

namespace fusion {

struct ChainCheck {
  FusedChain chain;
  double max_abs_diff = 0;  // over every tensor and number the run returned; inf if shapes differ
  std::string error;        // what the fused run threw, if it threw
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
      fmt::format_to(std::back_inserter(text), "{} [{}]: ", check.ok ? "ok  " : "FAIL",
                     fusion::to_string(check.chain));
      if (!check.error.empty()) {
        fmt::format_to(std::back_inserter(text), "threw: {}\n", check.error);
      } else {
        fmt::format_to(std::back_inserter(text), "max abs diff {:g}\n", check.max_abs_diff);
      }
    }
    return text;
  }
};

namespace detail {

/// Largest absolute difference between two results (tensors, numbers, tuples and lists thereof);
/// infinity when their structure, shapes or non-numeric values differ. NaN equals NaN.
inline double max_abs_diff(const c10::IValue& a, const c10::IValue& b) {
  constexpr double mismatch = std::numeric_limits<double>::infinity();
  if (a.isTensor() && b.isTensor()) {
    const at::Tensor& x = a.toTensor();
    const at::Tensor& y = b.toTensor();
    if (!x.defined() || !y.defined()) return x.defined() == y.defined() ? 0 : mismatch;
    if (x.sizes() != y.sizes()) return mismatch;
    if (x.numel() == 0) return 0;
    at::Tensor xd = x.detach().to(at::kCPU, at::kDouble);
    at::Tensor yd = y.detach().to(at::kCPU, at::kDouble);
    at::Tensor diff = (xd - yd).abs().masked_fill(xd.isnan() & yd.isnan(), 0);
    const double worst = diff.max().item<double>();
    return std::isnan(worst) ? mismatch : worst;
  }
  if ((a.isTuple() && b.isTuple()) || (a.isList() && b.isList())) {
    const auto xs = a.isTuple() ? a.toTupleRef().elements().vec() : a.toListRef().vec();
    const auto ys = b.isTuple() ? b.toTupleRef().elements().vec() : b.toListRef().vec();
    if (xs.size() != ys.size()) return mismatch;
    double worst = 0;
    for (std::size_t i = 0; i < xs.size(); ++i) worst = std::max(worst, max_abs_diff(xs[i], ys[i]));
    return worst;
  }
  if ((a.isInt() || a.isDouble()) && (b.isInt() || b.isDouble())) {
    return std::abs(a.toScalar().to<double>() - b.toScalar().to<double>());
  }
  return a == b ? 0 : mismatch;
}

template <typename T>
c10::IValue result_value(T&& result) {
  if constexpr (is_tuple<std::decay_t<T>>::value) {
    std::vector<c10::IValue> elements;
    split(std::forward<T>(result), elements);
    return c10::ivalue::Tuple::create(std::move(elements));
  } else {
    return box(std::forward<T>(result));
  }
}

}  // namespace detail

/// Runs `run()` (one forward over sample inputs, returning its outputs: a tensor, a tuple, ...)
/// with every fused chain under `root` switched off, then once per chain with only that chain on,
/// and reports the chains whose results differ by more than `tolerance` or that threw. Runs without
/// gradients; the fusion state is restored afterwards, also when `run` throws. Put the model in
/// eval() first if it is random in training mode (dropout).
template <typename Root, typename Run>
VerifyReport verify(Root& root, Run&& run, double tolerance = 0.0) {
  torch::NoGradGuard no_grad;
  auto& module = detail::module_of(root);
  auto chains = detail::chains_under(detail::sites_under(module));
  std::vector<bool> was_attached;
  for (auto& chain : chains) was_attached.push_back(chain->attached());

  struct Restore {
    std::vector<std::shared_ptr<detail::Chain>>& chains;
    std::vector<bool>& attached;
    ~Restore() {
      for (std::size_t i = 0; i < chains.size(); ++i) {
        if (attached[i])
          chains[i]->attach();
        else
          chains[i]->detach();
      }
    }
  } restore{chains, was_attached};

  for (auto& chain : chains) chain->detach();
  const c10::IValue reference = detail::result_value(run());

  VerifyReport report;
  for (auto& chain : chains) {
    ChainCheck check;
    check.chain = chain->info();
    chain->attach();
    try {
      check.max_abs_diff = detail::max_abs_diff(reference, detail::result_value(run()));
      check.ok = check.max_abs_diff <= tolerance;
    } catch (const std::exception& error) {
      check.error = error.what();
    }
    chain->detach();
    report.chains.push_back(std::move(check));
  }
  return report;
}

}  // namespace fusion
