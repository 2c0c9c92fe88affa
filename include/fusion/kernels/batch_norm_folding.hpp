// Built-in kernels that fold a normalisation into the neighbouring linear map, the classic module
// fusion (torch.ao's fuse_modules, TorchScript's freezing):
//
//   fusion.conv{1,2,3}d_bn        Conv{1,2,3}d -> BatchNorm{1,2,3}d
//   fusion.conv{1,2,3}d_bn_relu   Conv{1,2,3}d -> BatchNorm{1,2,3}d -> ReLU
//   fusion.linear_bn              Linear -> BatchNorm1d
//   fusion.layernorm_linear       LayerNorm -> Linear
//
// Register them with fusion::kernels::register_builtin_kernels(), then name them in FuseOptions
// or use_kernel like any kernel. In eval mode, BatchNorm is the per-channel affine map
// y = x * scale + shift with scale = gamma / sqrt(running_var + eps), shift = beta - mean * scale,
// so conv(x, W, b) followed by it is conv(x, W * scale, b * scale + shift): one pass over the
// activations instead of two (three with ReLU, which runs in place on the fresh output, or as the
// oneDNN post-op of LibTorch's prepacked convolution where that is available and faster).
//
// The folded weights are a prepared state: rebuilt when any weight, bias or running statistic
// changes (fusion's staleness rule), computed in float64 and rounded once. Where folding would not
// compute what the modules compute, the chain replays: training mode (batch statistics; the
// options say so), BatchNorm without running statistics (`track_running_stats(false)`, which uses
// batch statistics in eval mode too; the kernel's applies() says no), and gradients.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/nn/functional/padding.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/types.h>

#include "fusion/detail/folding.hpp"
#include "fusion/kernel.hpp"

namespace fusion::kernels {

/// Conv{D}d -> BatchNorm{D}d [-> ReLU], folded.
template <std::size_t D, typename ConvImpl, typename BatchNormImpl, bool Relu = false>
struct ConvBatchNorm {
  struct State {
    torch::Tensor weight, bias;
    torch::Tensor weight_channels_last;  // for channels-last inputs (2d and 3d)
    std::shared_ptr<const detail::PrepackedConv2d> prepacked;  // 2d, where LibTorch has the ops
    // 2d: the weight in oneDNN's own layout, for inputs in that layout (`x.to_mkldnn()`, as
    // TorchScript's optimize_for_inference runs a CNN): activations then stay blocked from one
    // convolution to the next instead of being reordered around each one.
    torch::Tensor weight_mkldnn;
    std::vector<int64_t> stride, padding, dilation;
    // Not weight_mkldnn: an opaque oneDNN tensor has no storage to count (about weight's size).
    std::vector<torch::Tensor> tensors() const { return {weight, bias, weight_channels_last}; }
  };

  State prepare(ConvImpl& conv, BatchNormImpl& bn) const {
    auto [scale, shift] = detail::batch_norm_affine(bn);
    std::vector<int64_t> per_channel(D + 2, 1);
    per_channel[0] = -1;
    const auto dtype = conv.weight.scalar_type();
    State state;
    state.weight = (conv.weight.to(torch::kFloat64) * scale.view(per_channel)).to(dtype);
    state.bias = conv.bias.defined() ? conv.bias.to(torch::kFloat64) * scale + shift : shift;
    state.bias = state.bias.to(dtype);
    if constexpr (D == 2) {
      state.weight_channels_last = state.weight.contiguous(torch::MemoryFormat::ChannelsLast);
      const auto& o = conv.options;
      const auto* padding = detail::alternative<torch::ExpandingArray<2>>(o.padding());
      // oneDNN convolves numeric zero padding of float32 on the CPU; other cases go dense.
      const bool onednn =
          padding != nullptr &&
          detail::alternative<torch::enumtype::kZeros>(o.padding_mode()) != nullptr &&
          state.weight.device().is_cpu() && dtype == torch::kFloat32;
      if (onednn) {
        state.stride = detail::as_vector(o.stride());
        state.padding = detail::as_vector(*padding);
        state.dilation = detail::as_vector(o.dilation());
      }
      if (onednn && detail::PrepackedConv2d::available()) {
        state.prepacked = std::make_shared<const detail::PrepackedConv2d>(
            state.weight.contiguous(), state.bias, state.stride, state.padding, state.dilation,
            o.groups(), Relu ? "relu" : "none");
      }
      if (onednn && at::hasMKLDNN()) {
        state.weight_mkldnn =
            at::mkldnn_reorder_conv2d_weight(state.weight.contiguous().to_mkldnn(), state.padding,
                                             state.stride, state.dilation, o.groups());
      }
    } else if constexpr (D == 3) {
      state.weight_channels_last = state.weight.contiguous(torch::MemoryFormat::ChannelsLast3d);
    }
    return state;
  }

  bool applies(ConvImpl&, BatchNormImpl& bn) const { return detail::has_running_stats(bn); }

  torch::Tensor operator()(const State& s, ConvImpl& conv, BatchNormImpl& bn,
                           const torch::Tensor& input) const {
    // An unbatched input runs through the modules: the convolution accepts it, the BatchNorm
    // then refuses it or normalises another axis; either way the modules decide.
    if (input.dim() != D + 2 && !input.is_mkldnn()) return bn.forward(conv.forward(input));
    return run(s, conv, input);
  }

  /// The folded convolution, and ReLU when Relu (fused into the prepacked op, else in place).
  static torch::Tensor run(const State& s, ConvImpl& conv, const torch::Tensor& input) {
    if constexpr (D == 2) {
      if (input.is_mkldnn()) {
        // A padding mode oneDNN lacks, or an input the convolution refuses (ATen's error then).
        if (!s.weight_mkldnn.defined() || !fits_prepacked(s, conv, input)) {
          return run(s, conv, input.to_dense()).to_mkldnn();
        }
        auto output = at::mkldnn_convolution(input, s.weight_mkldnn, s.bias, s.padding, s.stride,
                                             s.dilation, conv.options.groups());
        return Relu ? output.relu_() : output;
      }
      if (s.prepacked && input.is_contiguous() && input.device().is_cpu() &&
          input.scalar_type() == torch::kFloat32 && fits_prepacked(s, conv, input)) {
        return (*s.prepacked)(input);
      }
    }
    auto output = detail::convolve<D>(conv, input, weight_for(s, input), s.bias);
    return Relu ? output.relu_() : output;
  }

  /// Whether oneDNN's convolution computes this input as ATen's would: a non-empty batch of the
  /// weight's input channels, each spatial size at least the dilated kernel after padding. Else
  /// the dense convolution runs and raises ATen's own error, as the module would.
  static bool fits_prepacked(const State& s, ConvImpl& conv, const torch::Tensor& input) {
    const auto& o = conv.options;
    const auto* padding = detail::alternative<torch::ExpandingArray<2>>(o.padding());
    if (input.dim() != 4 || input.numel() == 0 || padding == nullptr ||
        input.size(1) != s.weight.size(1) * o.groups()) {
      return false;
    }
    for (int64_t d = 0; d < 2; ++d) {
      const int64_t span = (*o.dilation())[d] * (s.weight.size(2 + d) - 1) + 1;
      if (input.size(2 + d) + 2 * (**padding)[d] < span) return false;
    }
    return true;
  }

  /// The weight in the input's memory format: the output keeps it (channels-last in and out).
  static const torch::Tensor& weight_for(const State& s, const torch::Tensor& input) {
    if constexpr (D == 2) {
      if (input.dim() == 4 && !input.is_contiguous() &&
          input.is_contiguous(torch::MemoryFormat::ChannelsLast)) {
        return s.weight_channels_last;
      }
    } else if constexpr (D == 3) {
      if (input.dim() == 5 && !input.is_contiguous() &&
          input.is_contiguous(torch::MemoryFormat::ChannelsLast3d)) {
        return s.weight_channels_last;
      }
    }
    return s.weight;
  }
};

template <std::size_t D, typename ConvImpl, typename BatchNormImpl>
struct ConvBatchNormReLU {
  using Folded = ConvBatchNorm<D, ConvImpl, BatchNormImpl, /*Relu=*/true>;
  using State = typename Folded::State;

  State prepare(ConvImpl& conv, BatchNormImpl& bn, torch::nn::ReLUImpl&) const {
    return Folded().prepare(conv, bn);
  }
  bool applies(ConvImpl&, BatchNormImpl& bn, torch::nn::ReLUImpl&) const {
    return detail::has_running_stats(bn);
  }
  torch::Tensor operator()(const State& s, ConvImpl& conv, BatchNormImpl& bn,
                           torch::nn::ReLUImpl& relu, const torch::Tensor& input) const {
    if (input.dim() != D + 2 && !input.is_mkldnn()) {
      return relu.forward(bn.forward(conv.forward(input)));  // as in ConvBatchNorm
    }
    return Folded::run(s, conv, input);
  }
};

/// Linear -> BatchNorm1d on [batch, features] (the only shape where both act on the same axis;
/// on [batch, channels, length] BatchNorm1d normalises dim 1 while Linear maps the last: computed
/// as the modules do).
struct LinearBatchNorm {
  struct State {
    torch::Tensor weight, bias;
    std::vector<torch::Tensor> tensors() const { return {weight, bias}; }
  };
  State prepare(torch::nn::LinearImpl& linear, torch::nn::BatchNorm1dImpl& bn) const {
    auto [scale, shift] = detail::batch_norm_affine(bn);
    const auto dtype = linear.weight.scalar_type();
    State state;
    state.weight = (linear.weight.to(torch::kFloat64) * scale.unsqueeze(1)).to(dtype);
    state.bias = linear.bias.defined() ? linear.bias.to(torch::kFloat64) * scale + shift : shift;
    state.bias = state.bias.to(dtype);
    return state;
  }
  bool applies(torch::nn::LinearImpl& linear, torch::nn::BatchNorm1dImpl& bn) const {
    return detail::has_running_stats(bn) &&
           linear.options.out_features() == bn.options.num_features();
  }
  torch::Tensor operator()(const State& s, torch::nn::LinearImpl& linear,
                           torch::nn::BatchNorm1dImpl& bn, const torch::Tensor& input) const {
    if (input.dim() != 2) return bn.forward(linear.forward(input));
    return torch::linear(input, s.weight, s.bias);
  }
};

/// LayerNorm -> Linear, the norm's scale and shift folded into the linear map:
/// (n * g + beta) W^T + b = n (W g)^T + (W beta + b), n the normalised input.
struct LayerNormLinear {
  struct State {
    torch::Tensor weight, bias;
    std::vector<torch::Tensor> tensors() const { return {weight, bias}; }
  };
  State prepare(torch::nn::LayerNormImpl& norm, torch::nn::LinearImpl& linear) const {
    const auto dtype = linear.weight.scalar_type();
    auto weight = linear.weight.to(torch::kFloat64);
    auto bias = linear.bias.defined() ? linear.bias.to(torch::kFloat64)
                                      : torch::zeros({weight.size(0)}, weight.options());
    if (norm.options.elementwise_affine()) {
      bias = bias + torch::mv(weight, norm.bias.to(torch::kFloat64));
      weight = weight * norm.weight.to(torch::kFloat64).unsqueeze(0);
    }
    return {weight.to(dtype), bias.to(dtype)};
  }
  /// Only a norm over the linear's input features can be folded into it.
  bool applies(torch::nn::LayerNormImpl& norm, torch::nn::LinearImpl& linear) const {
    const auto& shape = norm.options.normalized_shape();
    return shape.size() == 1 && shape[0] == linear.options.in_features();
  }
  torch::Tensor operator()(const State& s, torch::nn::LayerNormImpl& norm, torch::nn::LinearImpl&,
                           const torch::Tensor& input) const {
    const auto normalized =
        torch::layer_norm(input, norm.options.normalized_shape(), {}, {}, norm.options.eps());
    return torch::linear(normalized, s.weight, s.bias);
  }
};

/// Registers the built-in kernels above (once; later calls do nothing).
inline void register_builtin_kernels() {
  fusion::register_kernels_once("fusion.builtin", [] {
    using namespace torch::nn;
    // Folding is plain tensor arithmetic: one implementation serves the CPU and CUDA.
    const KernelOptions eval_only{{c10::DeviceType::CPU, c10::DeviceType::CUDA}};
    register_kernel("fusion.conv1d_bn", ConvBatchNorm<1, Conv1dImpl, BatchNorm1dImpl>{}, eval_only);
    register_kernel("fusion.conv2d_bn", ConvBatchNorm<2, Conv2dImpl, BatchNorm2dImpl>{}, eval_only);
    register_kernel("fusion.conv3d_bn", ConvBatchNorm<3, Conv3dImpl, BatchNorm3dImpl>{}, eval_only);
    register_kernel("fusion.conv1d_bn_relu", ConvBatchNormReLU<1, Conv1dImpl, BatchNorm1dImpl>{},
                    eval_only);
    register_kernel("fusion.conv2d_bn_relu", ConvBatchNormReLU<2, Conv2dImpl, BatchNorm2dImpl>{},
                    eval_only);
    register_kernel("fusion.conv3d_bn_relu", ConvBatchNormReLU<3, Conv3dImpl, BatchNorm3dImpl>{},
                    eval_only);
    register_kernel("fusion.linear_bn", LinearBatchNorm{}, eval_only);
    // LayerNorm and Linear compute the same in training mode: the fold applies there too.
    KernelOptions any_mode = eval_only;
    any_mode.training = true;
    register_kernel("fusion.layernorm_linear", LayerNormLinear{}, any_mode);
  });
}

}  // namespace fusion::kernels
