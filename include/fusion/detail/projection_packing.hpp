// The prepared state of the transformer kernels: a norm and the projections that read its output,
// packed into one GEMM where their weights can share a storage, folded on request; and the checks
// made when such a kernel is attached.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "fusion/kernels/layouts.hpp"
#include "fusion/kernels/primitives.hpp"

namespace fusion::detail {

using kernels::NormKind;
using kernels::Projection;
using kernels::WeightLayout;

/// Projections of one input. With `weight` defined, one GEMM whose output columns are the parts
/// in order (`sizes`); else `parts`, one GEMM each.
struct PackedProjections {
  at::Tensor weight, bias;
  WeightLayout layout = WeightLayout::out_in;
  std::vector<int64_t> sizes;
  std::vector<Projection> parts;

  std::vector<at::Tensor> tensors() const {
    std::vector<at::Tensor> all{weight, bias};
    for (const auto& part : parts) all.insert(all.end(), {part.weight, part.bias});
    return all;
  }
};

inline int64_t out_features(const Projection& p) {
  return p.weight.size(p.layout == WeightLayout::out_in ? 0 : 1);
}
inline int64_t in_features(const Projection& p) {
  return p.weight.size(p.layout == WeightLayout::out_in ? 1 : 0);
}

/// The biases of `parts` as one tensor (undefined when none has one): in place when every part
/// has one, else a copy with zeros for the missing (a few floats per output).
inline at::Tensor packed_bias(const std::vector<Projection>& parts, bool in_place) {
  bool any = false, all = true;
  for (const auto& p : parts) {
    any = any || p.bias.defined();
    all = all && p.bias.defined();
  }
  if (!any) return {};
  std::vector<at::Tensor> biases;
  for (const auto& p : parts) {
    biases.push_back(p.bias.defined() ? p.bias : at::zeros({out_features(p)}, p.weight.options()));
  }
  return all && in_place ? kernels::stack_in_place(biases) : at::cat(biases);
}

/// Packs `parts`: the weights of [out, in] parts stacked in place (no copy); one part as it is;
/// [in, out] parts of a group left apart. With `fold`, a copy instead: each weight as [out, in]
/// times the norm's scale along its columns, the norm's shift moved into the bias
/// (b + W shift), computed in float64 and rounded once.
inline PackedProjections pack(std::vector<Projection> parts, bool fold, const at::Tensor& scale,
                              const at::Tensor& shift) {
  PackedProjections packed;
  for (const auto& p : parts) packed.sizes.push_back(out_features(p));
  if (fold) {
    std::vector<at::Tensor> weights, biases;
    for (const auto& p : parts) {
      const auto w = (p.layout == WeightLayout::out_in ? p.weight : p.weight.t()).to(at::kDouble);
      auto b = p.bias.defined() ? p.bias.to(at::kDouble) : at::zeros({w.size(0)}, w.options());
      if (shift.defined()) b = b + at::mv(w, shift.to(at::kDouble));
      weights.push_back(scale.defined() ? w * scale.to(at::kDouble) : w);
      biases.push_back(b);
    }
    const auto dtype = parts[0].weight.scalar_type();
    packed.weight = at::cat(weights).to(dtype).contiguous();
    bool any_bias = shift.defined();
    for (const auto& p : parts) any_bias = any_bias || p.bias.defined();
    if (any_bias) packed.bias = at::cat(biases).to(dtype);
    return packed;
  }
  if (parts.size() == 1) {
    packed.weight = parts[0].weight;
    packed.bias = parts[0].bias;
    packed.layout = parts[0].layout;
    return packed;
  }
  for (const auto& p : parts) {
    if (p.layout != WeightLayout::out_in) {
      packed.parts = std::move(parts);  // [in, out] weights stacked along dim 1 would need a copy
      return packed;
    }
  }
  std::vector<at::Tensor> weights;
  for (const auto& p : parts) weights.push_back(p.weight);
  packed.weight = kernels::stack_in_place(weights);
  packed.bias = packed_bias(parts, /*in_place=*/true);
  return packed;
}

/// Each part's output for `x` [rows, in], as [rows, out_i] (views of one GEMM's output where
/// packed).
inline std::vector<at::Tensor> project_all(const at::Tensor& x, const PackedProjections& packed) {
  std::vector<at::Tensor> outputs;
  if (!packed.weight.defined()) {
    for (const auto& p : packed.parts) {
      outputs.push_back(kernels::project(x, p.weight, p.bias, p.layout));
    }
    return outputs;
  }
  const auto all = kernels::project(x, packed.weight, packed.bias, packed.layout);
  if (packed.sizes.size() == 1) return {all};
  int64_t offset = 0;
  for (int64_t size : packed.sizes) {
    outputs.push_back(all.narrow(-1, offset, size));
    offset += size;
  }
  return outputs;
}

/// The norm's output for x as [rows, dim]; with `fold`, without its scale and shift (folded
/// into the next GEMM).
template <typename Norm>
at::Tensor normalise(const at::Tensor& x, const kernels::NormLayout<Norm>& layout, Norm& norm,
                     bool fold) {
  const at::Tensor weight = fold ? at::Tensor() : layout.weight(norm);
  if (layout.kind == NormKind::rms_norm) return kernels::rms_norm(x, weight, layout.eps(norm));
  const at::Tensor bias = fold || !layout.bias ? at::Tensor() : layout.bias(norm);
  return kernels::layer_norm(x, weight, bias, layout.eps(norm));
}

/// What does not fit in `norm` and the projections reading its output (`parts`, of module
/// `owner`), empty when all does: shapes, dtypes and devices, each message naming the member and
/// the parameter.
template <typename Norm, typename Owner>
std::string projections_misfit(const kernels::NormLayout<Norm>& layout, Norm& norm, Owner& owner,
                               const std::vector<kernels::ProjectionLayout<Owner>>& parts,
                               int64_t* in_features_out = nullptr) {
  const auto name = [&](const kernels::ProjectionLayout<Owner>& part) {
    const auto child = kernels::child_name(owner, part.module(owner));
    return child.empty() ? std::string("the module itself") : "member '" + child + "'";
  };
  if (layout.normalized_shape && layout.normalized_shape(norm).size() != 1) {
    return fmt::format("the norm normalises over {} dimensions {}; the kernel takes one",
                       layout.normalized_shape(norm).size(), layout.normalized_shape(norm));
  }
  const auto first = parts[0].get(owner);
  const int64_t dim = in_features(first);
  if (in_features_out != nullptr) *in_features_out = dim;
  for (const auto& [what, tensor] :
       {std::pair<const char*, at::Tensor>{"weight", layout.weight(norm)},
        {"bias", layout.bias ? layout.bias(norm) : at::Tensor()}}) {
    if (!tensor.defined()) continue;
    if (tensor.dim() != 1 || tensor.size(0) != dim) {
      return fmt::format("the norm's {} has shape {}, but {}'s input has {} features", what,
                         tensor.sizes(), name(parts[0]), dim);
    }
  }
  for (const auto& part : parts) {
    const auto p = part.get(owner);
    if (!p.weight.defined() || p.weight.dim() != 2) {
      return fmt::format("{}: parameter 'weight' is not a matrix", name(part));
    }
    if (in_features(p) != dim) {
      return fmt::format(
          "{}: parameter 'weight' has shape {} ({}), {} input features where {} "
          "has {}",
          name(part), p.weight.sizes(),
          p.layout == WeightLayout::out_in ? "[out, in]" : "[in, out]", in_features(p),
          name(parts[0]), dim);
    }
    if (p.bias.defined() && (p.bias.dim() != 1 || p.bias.size(0) != out_features(p))) {
      return fmt::format("{}: parameter 'bias' has shape {}, expected [{}]", name(part),
                         p.bias.sizes(), out_features(p));
    }
    if (p.weight.scalar_type() != first.weight.scalar_type() ||
        p.weight.device() != first.weight.device()) {
      return fmt::format("{}: parameter 'weight' is {} on {}, {}'s is {} on {}", name(part),
                         c10::toString(p.weight.scalar_type()), p.weight.device().str(),
                         name(parts[0]), c10::toString(first.weight.scalar_type()),
                         first.weight.device().str());
    }
  }
  return {};
}

}  // namespace fusion::detail
