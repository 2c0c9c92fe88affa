// Comparing two results of the same computation: verify (unfused vs fused) and a kernel's checks
// (kernel vs replay) use the same rules and the same default tolerances.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <c10/util/Optional.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

namespace fusion::detail {

/// The default tolerance for a result of dtype `type`, relative to the largest magnitude of the
/// reference tensor: what a correct kernel's reordered float arithmetic can change. Integers,
/// booleans and non-tensor values must be equal.
inline double default_relative_tolerance(c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::Double:
    case c10::ScalarType::ComplexDouble:
      return 1e-10;
    case c10::ScalarType::Float:
    case c10::ScalarType::ComplexFloat:
      return 1e-5;
    case c10::ScalarType::Half:
      return 1e-2;
    case c10::ScalarType::BFloat16:
      return 5e-2;
    default:
      return 0;
  }
}

/// How far one result is from a reference: the largest absolute difference, and the largest
/// ratio of a difference to what the tolerance allows there (within tolerance: excess <= 1).
struct Difference {
  double max_abs = 0;
  double excess = 0;
  void merge(const Difference& other) {
    max_abs = std::max(max_abs, other.max_abs);
    excess = std::max(excess, other.excess);
  }
};

/// `result` against `reference`: per tensor, against `absolute` when given, else against the
/// default relative tolerance of the reference's dtype, or of `computed_in` where that is looser
/// (a kernel that computes in bfloat16: KernelOptions::compute_dtype). Structure, shapes, dtypes
/// or non-numeric values that differ give infinity. NaN equals NaN.
inline Difference difference(const c10::IValue& reference, const c10::IValue& result,
                             c10::optional<double> absolute,
                             c10::optional<c10::ScalarType> computed_in = c10::nullopt) {
  constexpr double mismatch = std::numeric_limits<double>::infinity();
  const auto excess = [&](double diff, double allowed) {
    if (diff == 0) return 0.0;
    return allowed > 0 ? diff / allowed : mismatch;
  };
  if (reference.isTensor() && result.isTensor()) {
    const at::Tensor& x = reference.toTensor();
    const at::Tensor& y = result.toTensor();
    if (!x.defined() || !y.defined()) {
      return x.defined() == y.defined() ? Difference{} : Difference{mismatch, mismatch};
    }
    if (x.sizes() != y.sizes() || x.scalar_type() != y.scalar_type()) {
      return {mismatch, mismatch};
    }
    if (x.numel() == 0) return {};
    const at::Tensor xd = (x.is_mkldnn() ? x.to_dense() : x).detach().to(at::kCPU, at::kDouble);
    const at::Tensor yd = (y.is_mkldnn() ? y.to_dense() : y).detach().to(at::kCPU, at::kDouble);
    const at::Tensor diff = (xd - yd).abs().masked_fill(xd.isnan() & yd.isnan(), 0);
    const double worst = diff.max().item<double>();
    if (std::isnan(worst)) return {mismatch, mismatch};
    double relative = default_relative_tolerance(x.scalar_type());
    if (computed_in && relative > 0) {
      relative = std::max(relative, default_relative_tolerance(*computed_in));
    }
    const double allowed =
        absolute ? *absolute : relative * xd.abs().masked_fill(xd.isnan(), 0).max().item<double>();
    return {worst, excess(worst, allowed)};
  }
  if ((reference.isTuple() && result.isTuple()) || (reference.isList() && result.isList())) {
    const auto xs =
        reference.isTuple() ? reference.toTupleRef().elements().vec() : reference.toListRef().vec();
    const auto ys =
        result.isTuple() ? result.toTupleRef().elements().vec() : result.toListRef().vec();
    if (xs.size() != ys.size()) return {mismatch, mismatch};
    Difference worst;
    for (std::size_t i = 0; i < xs.size(); ++i) {
      worst.merge(difference(xs[i], ys[i], absolute, computed_in));
    }
    return worst;
  }
  if (reference.isGenericDict() && result.isGenericDict()) {
    const auto xs = reference.toGenericDict();
    const auto ys = result.toGenericDict();
    if (xs.size() != ys.size()) return {mismatch, mismatch};
    Difference worst;
    for (const auto& entry : xs) {
      auto found = ys.find(entry.key());
      if (found == ys.end()) return {mismatch, mismatch};
      worst.merge(difference(entry.value(), found->value(), absolute, computed_in));
    }
    return worst;
  }
  if ((reference.isInt() || reference.isDouble()) && (result.isInt() || result.isDouble())) {
    const double diff =
        std::abs(reference.toScalar().to<double>() - result.toScalar().to<double>());
    return {diff, excess(diff, absolute.value_or(0))};
  }
  return reference == result ? Difference{} : Difference{mismatch, mismatch};
}

/// What a value is, for messages: "a float tensor of shape [2, 3] on cpu", "None", "int".
inline std::string describe_value(const c10::IValue& value) {
  if (value.isTensor()) {
    const at::Tensor& tensor = value.toTensor();
    if (!tensor.defined()) return "an undefined tensor";
    return fmt::format("a {} tensor of shape [{}] on {}{}", c10::toString(tensor.scalar_type()),
                       fmt::join(tensor.sizes(), ", "), tensor.device().str(),
                       tensor.is_mkldnn() ? " (oneDNN layout)" : "");
  }
  return value.tagKind();
}

/// Whether two results have the same structure, and tensors of the same shape, dtype, device and
/// layout; if not, which output differs and how.
inline c10::optional<std::string> layout_mismatch(const std::vector<c10::IValue>& expected,
                                                  const std::vector<c10::IValue>& got) {
  if (expected.size() != got.size()) {
    return fmt::format("{} output(s) where the replay gives {}", got.size(), expected.size());
  }
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const c10::IValue& a = expected[i];
    const c10::IValue& b = got[i];
    bool same = a.tagKind() == b.tagKind();
    if (same && a.isTensor()) {
      const at::Tensor& x = a.toTensor();
      const at::Tensor& y = b.toTensor();
      same = x.defined() == y.defined() &&
             (!x.defined() || (x.sizes() == y.sizes() && x.scalar_type() == y.scalar_type() &&
                               x.device() == y.device() && x.layout() == y.layout()));
    }
    if (!same) {
      return fmt::format("output #{} is {} where the replay gives {}", i, describe_value(b),
                         describe_value(a));
    }
  }
  return c10::nullopt;
}

}  // namespace fusion::detail
