// Built-in kernels for convolutions (registered by register_builtin_kernels(), with the
// registration functions, fusion/kernels/batch_norm_folding.hpp):
//
//   fusion.conv{1,2,3}d_bn               Conv{1,2,3}d -> BatchNorm{1,2,3}d, folded
//   fusion.conv{1,2,3}d_bn_<activation>  ... -> the activation, in place on the fresh output
//   fusion.conv{1,2,3}d_<activation>     Conv{1,2,3}d -> the activation (the weights as they are)
//   fusion.conv_transpose{1,2,3}d_bn     ConvTranspose{1,2,3}d -> BatchNorm{1,2,3}d, folded
//                                        (conv_transpose_folding.hpp)
//   fusion.conv2d_....bf16               each 2d kernel above, computing in bfloat16
//
// <activation>: relu, relu6, silu, hardswish (fusion::Hardswish), leaky_relu, gelu
// (detail/epilogue.hpp). In eval mode, BatchNorm is the per-channel affine map
// y = x * scale + shift with scale = gamma / sqrt(running_var + eps), shift = beta - mean * scale,
// so conv(x, W, b) followed by it is conv(x, W * scale, b * scale + shift): one pass over the
// activations instead of two, three with the activation (in place, or as the oneDNN post-op of
// LibTorch's prepacked convolution for ReLU, where that is available).
//
// The folded weights are a prepared state: rebuilt when any weight, bias or running statistic
// changes (fusion's staleness rule), computed in float64 and rounded once. Where folding would not
// compute what the modules compute, the chain replays: training mode (batch statistics; the
// options say so), BatchNorm without running statistics (`track_running_stats(false)`, which uses
// batch statistics in eval mode too; the kernel's applies() says no), and gradients.
//
// The bfloat16 variants (KernelOptions::compute_dtype, kernels/bfloat16.hpp) keep the folded
// weights in bfloat16, rounded once from float64 (half the bytes), and run oneDNN's bfloat16
// convolution with float32 accumulation and a float32 bias on float32 CPU inputs: the input is
// reordered into oneDNN's layout in bfloat16, the result back to float32 (or kept blocked, in
// bfloat16, inside a block kernel or between kernels that hand blocked tensors on). Where the CPU
// lacks AVX512_BF16 they decline, and their chains replay in float32.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/types.h>

#include "fusion/detail/bfloat16.hpp"
#include "fusion/detail/blocked_conv_choice.hpp"
#include "fusion/detail/epilogue.hpp"
#include "fusion/detail/folding.hpp"
#include "fusion/detail/onednn_conv.hpp"
#include "fusion/kernel.hpp"
#include "fusion/kernels/conv_transpose_folding.hpp"

namespace fusion::kernels {

/// Conv{D}d -> BatchNorm{D}d, folded, then `Activation` (void: none) in place. Also what the
/// other convolution kernels here run: ConvBatchNormActivation, ConvActivation.
template <std::size_t D, typename ConvImpl, typename BatchNormImpl, typename Activation = void>
struct ConvBatchNorm {
  using Epilogue = detail::Epilogue<Activation>;
  bool bfloat16 = false;  // the ".bf16" variant: weights and activations in bfloat16

  struct State {
    torch::Tensor weight, bias;
    bool bfloat16 = false;               // weight in bfloat16 for float32 inputs (bias in float32)
    torch::Tensor weight_channels_last;  // for channels-last inputs (2d and 3d)
    std::shared_ptr<const detail::PrepackedConv2d> prepacked;  // 2d, where LibTorch has the ops
    // 2d: the weight in oneDNN's own layout, for inputs in that layout (`x.to_mkldnn()`, as
    // TorchScript's optimize_for_inference runs a CNN): activations then stay blocked from one
    // convolution to the next instead of being reordered around each one.
    torch::Tensor weight_mkldnn;
#if defined(FUSION_HAS_ONEDNN)
    // 2d: oneDNN's own primitive for blocked inputs (detail/onednn_conv.hpp), in the weight's
    // dtype, with the activation as its post-op where onednn_activation.
    std::shared_ptr<const detail::OneDnnConv2d> onednn;
    bool onednn_activation = false;
#endif
    std::vector<int64_t> stride, padding, dilation;
    std::vector<torch::Tensor> tensors() const { return {weight, bias, weight_channels_last}; }
    /// What report cannot see in tensors(): weight_mkldnn (an opaque oneDNN tensor, with no
    /// storage), and the weights packed or reordered per input shape by `prepacked` and `onednn`,
    /// which grow as the kernel meets new shapes.
    std::uint64_t opaque_bytes() const {
      std::uint64_t bytes = 0;
      if (weight_mkldnn.defined()) {
#if defined(FUSION_HAS_ONEDNN)
        bytes += detail::onednn::memory_of(weight_mkldnn).get_desc().get_size();
#else
        bytes += weight_mkldnn.nbytes();
#endif
      }
      if (prepacked) bytes += prepacked->weight_bytes();
#if defined(FUSION_HAS_ONEDNN)
      if (onednn) bytes += onednn->reordered()->bytes();
#endif
      return bytes;
    }
  };

  State prepare(ConvImpl& conv, BatchNormImpl& bn) const {
    return fold(conv, bn, /*channels_last=*/true, bfloat16);
  }

  /// The state for `conv` with `bn` folded in; see with_weights for `channels_last` and
  /// `bfloat16`.
  static State fold(ConvImpl& conv, BatchNormImpl& bn, bool channels_last = true,
                    bool bfloat16 = false) {
    auto [scale, shift] = detail::batch_norm_affine(bn);
    std::vector<int64_t> per_channel(D + 2, 1);
    per_channel[0] = -1;
    const auto dtype = conv.weight.scalar_type();
    auto bias = conv.bias.defined() ? conv.bias.to(torch::kFloat64) * scale + shift : shift;
    return with_weights(conv,
                        (conv.weight.to(torch::kFloat64) * scale.view(per_channel))
                            .to(bfloat16 ? torch::kBFloat16 : dtype),
                        bias.to(dtype), channels_last, bfloat16);
  }

  /// The state for computing `conv` with `weight` and `bias` (undefined: none); with a
  /// channels-last copy of the weight for channels-last inputs (2d and 3d) where `channels_last`.
  /// With `bfloat16` (2d only), `weight` is rounded to bfloat16 for the bfloat16 convolution of
  /// float32 inputs, and no channels-last copy is made: every CPU input goes through oneDNN.
  static State with_weights(ConvImpl& conv, torch::Tensor weight, torch::Tensor bias,
                            bool channels_last = true, bool bfloat16 = false) {
    State state;
    state.bfloat16 = D == 2 && bfloat16;
    state.weight = state.bfloat16 ? weight.to(torch::kBFloat16) : std::move(weight);
    state.bias = std::move(bias);
    if constexpr (D == 2) {
      if (channels_last && !state.bfloat16) {
        state.weight_channels_last = state.weight.contiguous(torch::MemoryFormat::ChannelsLast);
      }
      const auto& o = conv.options;
      const auto* padding = detail::alternative<torch::ExpandingArray<2>>(o.padding());
      // oneDNN convolves numeric zero padding of float32 (or bfloat16 for float32) on the CPU;
      // other cases go dense.
      const bool onednn =
          padding != nullptr &&
          detail::alternative<torch::enumtype::kZeros>(o.padding_mode()) != nullptr &&
          state.weight.device().is_cpu() &&
          (state.weight.scalar_type() == torch::kFloat32 || state.bfloat16);
      if (onednn) {
        state.stride = detail::as_vector(o.stride());
        state.padding = detail::as_vector(*padding);
        state.dilation = detail::as_vector(o.dilation());
      }
      // LibTorch's prepacked convolution takes float32 only.
      if (onednn && !state.bfloat16 && detail::PrepackedConv2d::available()) {
        state.prepacked = std::make_shared<const detail::PrepackedConv2d>(
            state.weight.contiguous(), state.bias, state.stride, state.padding, state.dilation,
            o.groups(), Epilogue::onednn_post_op);
      }
#if defined(FUSION_HAS_ONEDNN)
      if (onednn && at::hasMKLDNN()) {
        const auto eltwise = detail::onednn_eltwise(static_cast<const Activation*>(nullptr));
        state.onednn_activation = eltwise.has_value();
        state.onednn = std::make_shared<const detail::OneDnnConv2d>(
            state.weight, state.bias, state.stride, state.padding, state.dilation, o.groups(),
            eltwise, /*sum=*/false);
      }
#endif
      if (onednn && at::hasMKLDNN()) {
        state.weight_mkldnn =
            at::mkldnn_reorder_conv2d_weight(state.weight.contiguous().to_mkldnn(), state.padding,
                                             state.stride, state.dilation, o.groups());
      }
    } else if constexpr (D == 3) {
      if (channels_last) {
        state.weight_channels_last = state.weight.contiguous(torch::MemoryFormat::ChannelsLast3d);
      }
    }
    return state;
  }

  bool applies(ConvImpl&, BatchNormImpl& bn) const {
    return detail::has_running_stats(bn) && (!bfloat16 || detail::bfloat16_enabled());
  }

  torch::Tensor operator()(const State& s, ConvImpl& conv, BatchNormImpl& bn,
                           const torch::Tensor& input) const {
    // An unbatched input runs through the modules: the convolution accepts it, the BatchNorm
    // then refuses it or normalises another axis; either way the modules decide.
    if (input.dim() != D + 2 && !input.is_mkldnn()) return bn.forward(conv.forward(input));
    return run(s, conv, input, nullptr);
  }

  /// The convolution with the state's weights, then the activation (the module's options).
  /// A blocked input gives a blocked result, in the state's compute dtype.
  static torch::Tensor run(const State& s, ConvImpl& conv, const torch::Tensor& input,
                           const Activation* activation) {
    if constexpr (D == 2) {
      if (s.bfloat16) return run_bfloat16(s, conv, input, activation);
      if (input.is_mkldnn()) {
        const auto round_trip = [&] {
          return run(s, conv, input.to_dense(torch::kFloat), activation).to_mkldnn();
        };
        // A padding mode oneDNN lacks, or an input the convolution refuses (ATen's error then).
        if (!s.weight_mkldnn.defined() || !fits_prepacked(s, conv, input)) return round_trip();
        const auto blocked = [&] {
          return Epilogue::apply(
              at::mkldnn_convolution(detail::blocked(input, torch::kFloat), s.weight_mkldnn, s.bias,
                                     s.padding, s.stride, s.dilation, conv.options.groups()),
              activation);
        };
        // Which is faster depends on how LibTorch packs the weight, and on the shape
        // (detail/blocked_conv_choice.hpp).
        const auto key = detail::blocked_conv_key(s.weight.sizes(), s.stride, s.padding, s.dilation,
                                                  conv.options.groups(), input);
        using Path = BlockedConvPath;
        // A path that lost the measurement frees what it made for this shape.
        const auto release_lost = [&](Path lost) {
          if (lost == Path::round_trip && s.prepacked) s.prepacked->release(input.sizes());
#if defined(FUSION_HAS_ONEDNN)
          if (s.onednn) detail::release_lost(*s.onednn, input, lost);
#endif
        };
#if defined(FUSION_HAS_ONEDNN)
        if (s.onednn && input.scalar_type() == torch::kFloat32) {
          using Algorithm = detail::OneDnnConv2d::Algorithm;
          std::vector<Path> offered{Path::blocked};
          if (s.onednn->offers(input, Algorithm::direct)) offered.push_back(Path::onednn);
          if (s.prepacked) offered.push_back(Path::round_trip);
          if (s.onednn->offers(input, Algorithm::winograd)) offered.push_back(Path::winograd);
          return detail::run_blocked_conv(
              key, offered,
              [&](Path path, bool /*measuring*/) {
                if (path == Path::blocked) return blocked();
                if (path == Path::round_trip) return round_trip();
                auto output = (*s.onednn)(
                    input, path == Path::winograd ? Algorithm::winograd : Algorithm::direct);
                return s.onednn_activation ? output : Epilogue::apply(output, activation);
              },
              release_lost);
        }
#endif
        if (!s.prepacked) return blocked();
        return detail::run_blocked_conv(
            key, {Path::blocked, Path::round_trip},
            [&](Path path, bool /*measuring*/) {
              return path == Path::blocked ? blocked() : round_trip();
            },
            release_lost);
      }
      if (s.prepacked && input.is_contiguous() && input.device().is_cpu() &&
          input.scalar_type() == torch::kFloat32 && fits_prepacked(s, conv, input)) {
        auto output = (*s.prepacked)(input);
        // The prepacked op ran the activation as its post-op, or none.
        if constexpr (std::string_view(Epilogue::onednn_post_op) != "none") {
          return output;
        } else {
          return Epilogue::apply(output, activation);
        }
      }
    }
    return Epilogue::apply(detail::convolve<D>(conv, input, weight_for(s, input), s.bias),
                           activation);
  }

  /// The bfloat16 state's convolution: oneDNN's for blocked and float32 CPU inputs. Otherwise
  /// (other padding modes, which LibTorch 1.13 cannot pad in bfloat16; inputs oneDNN refuses,
  /// which then get ATen's error) the dense convolution in the input's dtype with the bfloat16
  /// weight.
  static torch::Tensor run_bfloat16(const State& s, ConvImpl& conv, const torch::Tensor& input,
                                    const Activation* activation) {
    const bool onednn =
        s.weight_mkldnn.defined() && fits_prepacked(s, conv, input) &&
        (input.is_mkldnn() || (input.device().is_cpu() && input.scalar_type() == torch::kFloat32));
    if (!onednn) {
      const auto dense = input.is_mkldnn() ? input.to_dense(torch::kFloat) : input;
      auto output = detail::convolve<D>(conv, dense, s.weight.to(dense.dtype()), s.bias);
      output = Epilogue::apply(output, activation);
      return input.is_mkldnn() ? output.to_mkldnn(torch::kBFloat16) : output;
    }
    const auto h = detail::blocked(input, torch::kBFloat16);
    const auto libtorch = [&] {
      return at::mkldnn_convolution(h, s.weight_mkldnn, s.bias, s.padding, s.stride, s.dilation,
                                    conv.options.groups());
    };
    if (input.is_mkldnn()) {
#if defined(FUSION_HAS_ONEDNN)
      // As for float32 (run): LibTorch's convolution, or the primitive with the activation as
      // its post-op, whichever measured faster for the shape.
      using Algorithm = detail::OneDnnConv2d::Algorithm;
      if (s.onednn && s.onednn->offers(h, Algorithm::direct)) {
        using Path = BlockedConvPath;
        const auto key = detail::blocked_conv_key(s.weight.sizes(), s.stride, s.padding, s.dilation,
                                                  conv.options.groups(), h);
        return detail::run_blocked_conv(
            key, {Path::blocked, Path::onednn},
            [&](Path path, bool /*measuring*/) {
              if (path == Path::blocked) return Epilogue::apply(libtorch(), activation);
              auto output = (*s.onednn)(h, Algorithm::direct);
              return s.onednn_activation ? output : Epilogue::apply(output, activation);
            },
            [&](Path lost) { detail::release_lost(*s.onednn, h, lost); });
      }
#endif
      return Epilogue::apply(libtorch(), activation);
    }
    auto output = libtorch();
    output = output.to_dense(torch::kFloat);  // the activation then runs on float32, in place
    if (!input.is_contiguous() && input.is_contiguous(torch::MemoryFormat::ChannelsLast)) {
      output = output.contiguous(torch::MemoryFormat::ChannelsLast);  // as the module's output
    }
    return Epilogue::apply(output, activation);
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

  /// The weight in the input's memory format, where the state has it: the output keeps the
  /// input's (channels-last in and out) either way.
  static const torch::Tensor& weight_for(const State& s, const torch::Tensor& input) {
    // Only 2d and 3d states have the copy.
    const auto format =
        D == 2 ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::ChannelsLast3d;
    const bool channels_last = s.weight_channels_last.defined() && input.dim() == D + 2 &&
                               !input.is_contiguous() && input.is_contiguous(format);
    return channels_last ? s.weight_channels_last : s.weight;
  }
};

/// Conv{D}d -> BatchNorm{D}d -> Activation: folded, the activation in place.
template <std::size_t D, typename ConvImpl, typename BatchNormImpl, typename Activation>
struct ConvBatchNormActivation {
  using Folded = ConvBatchNorm<D, ConvImpl, BatchNormImpl, Activation>;
  using State = typename Folded::State;

  bool bfloat16 = false;  // the ".bf16" variant

  State prepare(ConvImpl& conv, BatchNormImpl& bn, Activation&) const {
    return Folded::fold(conv, bn, /*channels_last=*/true, bfloat16);
  }
  bool applies(ConvImpl& conv, BatchNormImpl& bn, Activation&) const {
    return Folded{bfloat16}.applies(conv, bn);
  }
  torch::Tensor operator()(const State& s, ConvImpl& conv, BatchNormImpl& bn,
                           Activation& activation, const torch::Tensor& input) const {
    if (input.dim() != D + 2 && !input.is_mkldnn()) {
      return activation.forward(bn.forward(conv.forward(input)));  // as in ConvBatchNorm
    }
    return Folded::run(s, conv, input, &activation);
  }
};

/// Conv{D}d -> Activation: the convolution's own weights (no copy, none for channels-last either:
/// the module has none; the 2d oneDNN forms are prepared from them), the activation in place.
/// Runs in training mode too: nothing is folded.
template <std::size_t D, typename ConvImpl, typename Activation>
struct ConvActivation {
  // The batch norm type is not used: ConvBatchNorm's state and run, without the fold.
  using Runner = ConvBatchNorm<D, ConvImpl, torch::nn::BatchNorm2dImpl, Activation>;
  using State = typename Runner::State;
  bool bfloat16 = false;  // the ".bf16" variant (a bfloat16 copy of the weight)

  State prepare(ConvImpl& conv, Activation&) const {
    return Runner::with_weights(conv, conv.weight.detach(),
                                conv.bias.defined() ? conv.bias.detach() : torch::Tensor(),
                                /*channels_last=*/false, bfloat16);
  }
  bool applies(ConvImpl&, Activation&) const { return !bfloat16 || detail::bfloat16_enabled(); }
  torch::Tensor operator()(const State& s, ConvImpl& conv, Activation& activation,
                           const torch::Tensor& input) const {
    if (input.dim() != D + 2 && !input.is_mkldnn()) {
      return activation.forward(conv.forward(input));
    }
    return Runner::run(s, conv, input, &activation);
  }
};

}  // namespace fusion::kernels

namespace fusion::detail {

/// The activation module types the convolution kernels take (detail/epilogue.hpp).
using ConvActivations =
    std::tuple<torch::nn::ReLUImpl, torch::nn::ReLU6Impl, torch::nn::SiLUImpl,
               fusion::HardswishImpl, torch::nn::LeakyReLUImpl, torch::nn::GELUImpl>;

}  // namespace fusion::detail
