// What the built-in folding kernels (kernels/batch_norm_folding.hpp, conv_folding.hpp) compute
// with: BatchNorm's eval-mode map, a module's convolution with other weights, and LibTorch's
// prepacked oneDNN convolution (a LibTorch internal: docs/compatibility.md).
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
#include <torch/types.h>

namespace fusion::detail {

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

/// `x` in oneDNN's blocked layout in `dtype` (float32 or bfloat16): as it is, or reordered once.
/// Blocked tensors handed between kernels may be in either (a bfloat16 kernel's results are).
inline torch::Tensor blocked(const torch::Tensor& x, c10::ScalarType dtype) {
  if (!x.is_mkldnn()) return x.to_mkldnn(dtype);
  return x.scalar_type() == dtype ? x : x.to_dense(torch::kFloat).to_mkldnn(dtype);
}

template <std::size_t D>
std::vector<int64_t> as_vector(const torch::ExpandingArray<D>& values) {
  return {values->begin(), values->end()};
}

/// LibTorch's prepacked oneDNN 2d convolution, the ops TorchScript's freezing uses
/// (`mkldnn_prepacked::conv2d_prepack` and `conv2d_run`, registered by LibTorch builds with
/// oneDNN, Debian's 1.13 among them), reached through the dispatcher. A pack is specific to an
/// input shape: kept per shape, at most kShapes, least recently used out first. Faster than the
/// plain folded convolution on every ResNet-18 3x3 layer shape (docs/performance.md,
/// bench/cnn-bench.cpp), so it is used for every contiguous float32 input on the CPU;
/// channels-last input takes the folded channels-last convolution, faster there.
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

  /// Frees the pack for inputs of `shape`, if one is kept: for the blocked path round_trip when
  /// it lost its shape's measurement. A later input of that shape packs again.
  void release(at::IntArrayRef shape) const {
    std::lock_guard<std::mutex> lock(mutex_);
    packs_.erase(std::remove_if(packs_.begin(), packs_.end(),
                                [&](const auto& pack) { return shape.equals(pack.first); }),
                 packs_.end());
  }

  /// About the bytes the packs made so far hold: each is the weight in oneDNN's layout, whose
  /// exact size (channels padded to its blocks) the pack does not expose; counted as the weight's.
  std::uint64_t weight_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return packs_.size() * weight_.nbytes();
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
    // A convolution without bias (fusion.conv2d_<activation>) passes None, as the op's Tensor?.
    std::vector<c10::IValue> stack{weight_,   bias_.defined() ? c10::IValue(bias_) : c10::IValue(),
                                   stride_,   padding_,
                                   dilation_, groups_,
                                   shape,     post_op_};
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

}  // namespace fusion::detail
