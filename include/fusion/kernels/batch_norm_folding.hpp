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

#include "fusion/kernel.hpp"

namespace fusion::kernels {

namespace detail {

/// BatchNorm's eval-mode map as per-channel (scale, shift), in float64.
template <typename BatchNormImpl>
std::pair<torch::Tensor, torch::Tensor> batch_norm_affine(BatchNormImpl& bn) {
  const auto mean = bn.running_mean.to(torch::kFloat64);
  const auto var = bn.running_var.to(torch::kFloat64);
  auto scale = (var + bn.options.eps()).rsqrt();
  auto shift = -mean * scale;
  if (bn.options.affine()) {
    const auto gamma = bn.weight.to(torch::kFloat64);
    scale = scale * gamma;
    shift = shift * gamma + bn.bias.to(torch::kFloat64);
  }
  return {scale, shift};
}

/// Whether the folded map is what the BatchNorm computes in eval mode.
template <typename BatchNormImpl>
bool has_running_stats(BatchNormImpl& bn) {
  return bn.options.track_running_stats() && bn.running_mean.defined() && bn.running_var.defined();
}

/// The alternative `T` of a LibTorch options variant, or null: c10::variant on 1.13, std::variant
/// on 2.x; argument-dependent lookup finds the matching get_if.
template <typename T, typename Variant>
const T* alternative(const Variant& variant) {
  using std::get_if;
  return get_if<T>(&variant);
}

/// The convolution a ConvNdImpl computes, with another weight and bias: its stride, dilation,
/// groups, padding (numbers, "valid" or "same") and padding mode.
template <std::size_t D, typename ConvImpl>
torch::Tensor convolve(const ConvImpl& conv, const torch::Tensor& input,
                       const torch::Tensor& weight, const torch::Tensor& bias) {
  const auto& o = conv.options;
  const auto run = [&](const torch::Tensor& x, auto padding) {
    if constexpr (D == 1) {
      return torch::conv1d(x, weight, bias, o.stride(), padding, o.dilation(), o.groups());
    } else if constexpr (D == 2) {
      return torch::conv2d(x, weight, bias, o.stride(), padding, o.dilation(), o.groups());
    } else {
      return torch::conv3d(x, weight, bias, o.stride(), padding, o.dilation(), o.groups());
    }
  };
  if (const auto* numbers = alternative<torch::ExpandingArray<D>>(o.padding())) {
    if (alternative<torch::enumtype::kZeros>(o.padding_mode()) != nullptr) {
      return run(input, c10::IntArrayRef(*numbers));
    }
    // As ConvNdImpl: pad explicitly in the padding mode, then convolve without padding.
    std::vector<int64_t> pad;
    for (std::size_t d = D; d-- > 0;) pad.insert(pad.end(), 2, (**numbers)[d]);
    namespace F = torch::nn::functional;
    F::PadFuncOptions::mode_t mode = torch::kConstant;
    if (alternative<torch::enumtype::kReflect>(o.padding_mode())) mode = torch::kReflect;
    if (alternative<torch::enumtype::kReplicate>(o.padding_mode())) mode = torch::kReplicate;
    if (alternative<torch::enumtype::kCircular>(o.padding_mode())) mode = torch::kCircular;
    return run(F::pad(input, F::PadFuncOptions(pad).mode(mode)), std::vector<int64_t>(D, 0));
  }
  const bool same = alternative<torch::enumtype::kSame>(o.padding()) != nullptr;
  return run(input, c10::string_view(same ? "same" : "valid"));
}

template <std::size_t D>
std::vector<int64_t> as_vector(const torch::ExpandingArray<D>& values) {
  return {values->begin(), values->end()};
}

/// LibTorch's prepacked oneDNN 2d convolution, the ops TorchScript's freezing uses
/// (`mkldnn_prepacked::conv2d_prepack` and `conv2d_run`, registered by LibTorch builds with
/// oneDNN, Debian's 1.13 among them), reached through the dispatcher. A pack is specific to an
/// input shape: kept per shape, at most kShapes, least recently used out first. Measured against
/// the plain folded convolution on ResNet-18's 3x3 layers (bench/cnn-bench.cpp, one thread):
/// 0.98x at 64x56x56, 0.96x at 128x28x28, 0.91x at 256x14x14, 0.71x at 512x7x7, so it is used for
/// every contiguous float32 input on the CPU; channels-last input takes the folded channels-last
/// convolution, faster there.
class PrepackedConv2d {
 public:
  static constexpr std::size_t kShapes = 8;

  static bool available() {
    static const bool found = op("mkldnn_prepacked::conv2d_prepack").has_value() &&
                              op("mkldnn_prepacked::conv2d_run").has_value();
    return found;
  }

  PrepackedConv2d(torch::Tensor weight, torch::Tensor bias, std::vector<int64_t> stride,
                  std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                  std::string post_op)
      : weight_(std::move(weight)),
        bias_(std::move(bias)),
        stride_(std::move(stride)),
        padding_(std::move(padding)),
        dilation_(std::move(dilation)),
        groups_(groups),
        post_op_(std::move(post_op)) {}

  torch::Tensor operator()(const torch::Tensor& input) const {
    static const c10::OperatorHandle run = *op("mkldnn_prepacked::conv2d_run");
    std::vector<c10::IValue> stack{input, pack_for(input.sizes().vec())};
    run.callBoxed(&stack);
    return stack[0].toTensor();
  }

 private:
  static c10::optional<c10::OperatorHandle> op(const char* name) {
    return c10::Dispatcher::singleton().findSchema({name, ""});
  }

  c10::IValue pack_for(std::vector<int64_t> shape) const {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = packs_.begin(); it != packs_.end(); ++it) {
      if (it->first == shape) {
        std::rotate(it, it + 1, packs_.end());  // most recently used last
        return packs_.back().second;
      }
    }
    static const c10::OperatorHandle prepack = *op("mkldnn_prepacked::conv2d_prepack");
    std::vector<c10::IValue> stack{weight_,   bias_,   stride_, padding_,
                                   dilation_, groups_, shape,   post_op_};
    prepack.callBoxed(&stack);
    if (packs_.size() == kShapes) packs_.erase(packs_.begin());
    packs_.emplace_back(std::move(shape), stack[0]);
    return packs_.back().second;
  }

  torch::Tensor weight_, bias_;
  std::vector<int64_t> stride_, padding_, dilation_;
  int64_t groups_;
  std::string post_op_;
  mutable std::mutex mutex_;
  mutable std::vector<std::pair<std::vector<int64_t>, c10::IValue>> packs_;
};

/// Conv{D}d -> BatchNorm{D}d [-> ReLU], folded.
template <std::size_t D, typename ConvImpl, typename BatchNormImpl, bool Relu = false>
struct ConvBatchNorm {
  struct State {
    torch::Tensor weight, bias;
    torch::Tensor weight_channels_last;                // for channels-last inputs (2d and 3d)
    std::shared_ptr<const PrepackedConv2d> prepacked;  // 2d, where LibTorch has the ops
    // 2d: the weight in oneDNN's own layout, for inputs in that layout (`x.to_mkldnn()`, as
    // TorchScript's optimize_for_inference runs a CNN): activations then stay blocked from one
    // convolution to the next instead of being reordered around each one.
    torch::Tensor weight_mkldnn;
    std::vector<int64_t> stride, padding, dilation;
    // Not weight_mkldnn: an opaque oneDNN tensor has no storage to count (about weight's size).
    std::vector<torch::Tensor> tensors() const { return {weight, bias, weight_channels_last}; }
  };

  State prepare(ConvImpl& conv, BatchNormImpl& bn) const {
    auto [scale, shift] = batch_norm_affine(bn);
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
      const auto* padding = alternative<torch::ExpandingArray<2>>(o.padding());
      if (PrepackedConv2d::available() && padding != nullptr &&
          alternative<torch::enumtype::kZeros>(o.padding_mode()) != nullptr &&
          state.weight.device().is_cpu() && dtype == torch::kFloat32) {
        state.prepacked = std::make_shared<const PrepackedConv2d>(
            state.weight.contiguous(), state.bias, as_vector(o.stride()), as_vector(*padding),
            as_vector(o.dilation()), o.groups(), Relu ? "relu" : "none");
      }
      if (at::hasMKLDNN() && padding != nullptr &&
          alternative<torch::enumtype::kZeros>(o.padding_mode()) != nullptr &&
          state.weight.device().is_cpu() && dtype == torch::kFloat32) {
        state.stride = as_vector(o.stride());
        state.padding = as_vector(*padding);
        state.dilation = as_vector(o.dilation());
        state.weight_mkldnn =
            at::mkldnn_reorder_conv2d_weight(state.weight.contiguous().to_mkldnn(), state.padding,
                                             state.stride, state.dilation, o.groups());
      }
    } else if constexpr (D == 3) {
      state.weight_channels_last = state.weight.contiguous(torch::MemoryFormat::ChannelsLast3d);
    }
    return state;
  }

  bool applies(ConvImpl&, BatchNormImpl& bn) const { return has_running_stats(bn); }

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
    auto output = convolve<D>(conv, input, weight_for(s, input), s.bias);
    return Relu ? output.relu_() : output;
  }

  /// Whether oneDNN's convolution computes this input as ATen's would: a non-empty batch of the
  /// weight's input channels, each spatial size at least the dilated kernel after padding. Else
  /// the dense convolution runs and raises ATen's own error, as the module would.
  static bool fits_prepacked(const State& s, ConvImpl& conv, const torch::Tensor& input) {
    const auto& o = conv.options;
    const auto* padding = alternative<torch::ExpandingArray<2>>(o.padding());
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
    return has_running_stats(bn);
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
    auto [scale, shift] = batch_norm_affine(bn);
    const auto dtype = linear.weight.scalar_type();
    State state;
    state.weight = (linear.weight.to(torch::kFloat64) * scale.unsqueeze(1)).to(dtype);
    state.bias = linear.bias.defined() ? linear.bias.to(torch::kFloat64) * scale + shift : shift;
    state.bias = state.bias.to(dtype);
    return state;
  }
  bool applies(torch::nn::LinearImpl& linear, torch::nn::BatchNorm1dImpl& bn) const {
    return has_running_stats(bn) && linear.options.out_features() == bn.options.num_features();
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

}  // namespace detail

/// Registers the built-in kernels above (once; later calls do nothing).
inline void register_builtin_kernels() {
  static const bool once = [] {
    using namespace torch::nn;
    using detail::ConvBatchNorm;
    using detail::ConvBatchNormReLU;
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
    register_kernel("fusion.linear_bn", detail::LinearBatchNorm{}, eval_only);
    // LayerNorm and Linear compute the same in training mode: the fold applies there too.
    KernelOptions any_mode = eval_only;
    any_mode.training = true;
    register_kernel("fusion.layernorm_linear", detail::LayerNormLinear{}, any_mode);
    return true;
  }();
  (void)once;
}

}  // namespace fusion::kernels
