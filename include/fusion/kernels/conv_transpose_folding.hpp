// ConvTranspose{1,2,3}d -> BatchNorm{1,2,3}d folded into one transposed convolution: the kernel
// behind fusion.conv_transpose{1,2,3}d_bn, registered with the other convolution kernels
// (conv_folding.hpp, register_builtin_kernels()).
#pragma once

#include <cstdint>
#include <vector>

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/types.h>

#include "fusion/detail/folding.hpp"

namespace fusion::kernels {

/// ConvTranspose{D}d -> BatchNorm{D}d, folded: the weight is [in, out / groups, k...], so the
/// per-output-channel scale runs along its second dimension, group by group.
template <std::size_t D, typename ConvImpl, typename BatchNormImpl>
struct ConvTransposeBatchNorm {
  struct State {
    torch::Tensor weight, bias;
    std::vector<torch::Tensor> tensors() const { return {weight, bias}; }
  };

  State prepare(ConvImpl& conv, BatchNormImpl& bn) const {
    auto [scale, shift] = detail::batch_norm_affine(bn);
    const int64_t groups = conv.options.groups();
    const auto& w = conv.weight;
    std::vector<int64_t> grouped{groups, w.size(0) / groups, w.size(1)};
    std::vector<int64_t> per_channel{groups, 1, w.size(1)};
    for (std::size_t d = 0; d < D; ++d) {
      grouped.push_back(w.size(2 + d));
      per_channel.push_back(1);
    }
    const auto dtype = w.scalar_type();
    auto weight = w.to(torch::kFloat64).view(grouped) * scale.view(per_channel);
    auto bias = conv.bias.defined() ? conv.bias.to(torch::kFloat64) * scale + shift : shift;
    return {weight.view(w.sizes()).to(dtype), bias.to(dtype)};
  }

  /// Zero padding only: ConvTranspose refuses the others, and then the modules raise that error.
  bool applies(ConvImpl& conv, BatchNormImpl& bn) const {
    return detail::has_running_stats(bn) &&
           detail::alternative<torch::enumtype::kZeros>(conv.options.padding_mode()) != nullptr;
  }

  /// Folded where the module's forward gets no `output_size` (its output_padding option then);
  /// with one, or an unbatched input, the modules compute it.
  torch::Tensor operator()(const State& s, ConvImpl& conv, BatchNormImpl& bn,
                           const torch::Tensor& input,
                           const c10::optional<at::IntArrayRef>& output_size) const {
    if (input.dim() != D + 2 || output_size.has_value()) {
      return bn.forward(conv.forward(input, output_size));
    }
    const auto& o = conv.options;
    const auto* padding = detail::alternative<torch::ExpandingArray<D>>(o.padding());
    if (padding == nullptr) return bn.forward(conv.forward(input));  // the module's error
    if constexpr (D == 1) {
      return torch::conv_transpose1d(input, s.weight, s.bias, o.stride(), *padding,
                                     o.output_padding(), o.groups(), o.dilation());
    } else if constexpr (D == 2) {
      return torch::conv_transpose2d(input, s.weight, s.bias, o.stride(), *padding,
                                     o.output_padding(), o.groups(), o.dilation());
    } else {
      return torch::conv_transpose3d(input, s.weight, s.bias, o.stride(), *padding,
                                     o.output_padding(), o.groups(), o.dilation());
    }
  }
};

}  // namespace fusion::kernels
