// The activations a convolution kernel applies to its own fresh output, in place: one pass over
// the activations instead of the module's pass that reads one tensor and writes another. Each
// computes what its module's forward computes, with the module's options (LeakyReLU's slope,
// GELU's approximation).
#pragma once

#include <string>
#include <utility>

#include <torch/nn/modules/activation.h>
#include <torch/types.h>

#include "fusion/detail/blocked_eltwise.hpp"
#include "fusion/hardswish.hpp"

namespace fusion::detail {

/// For an activation module type: `name` (as in the kernel names), `onednn_post_op` (what
/// LibTorch's prepacked convolution can fuse itself, else "none") and `apply(output, module)`.
/// Undefined for other types: a kernel over an unknown activation does not compile.
template <typename Activation>
struct Epilogue;

/// Applies `op_` in place; an output in oneDNN's layout, where ATen has no such op, goes through
/// the dense layout and back, unless `blocked_op_` (detail/blocked_eltwise.hpp) runs it in place.
template <typename Op>
torch::Tensor in_place(torch::Tensor output, Op op_, bool (*blocked_op_)(const torch::Tensor&)) {
  if (!output.is_mkldnn()) return op_(output);
  if (blocked_op_ != nullptr && blocked_op_(output)) return output;
  auto dense = output.to_dense();
  return op_(dense).to_mkldnn();
}
template <typename Op>
torch::Tensor in_place(torch::Tensor output, Op op_) {
  return in_place(std::move(output), op_, nullptr);
}

/// No activation.
template <>
struct Epilogue<void> {
  static constexpr const char* name = "";
  static constexpr const char* onednn_post_op = "none";
  static torch::Tensor apply(torch::Tensor output, const void*) { return output; }
};

template <>
struct Epilogue<torch::nn::ReLUImpl> {
  static constexpr const char* name = "relu";
  static constexpr const char* onednn_post_op = "relu";
  // relu_ has a oneDNN-layout implementation.
  static torch::Tensor apply(torch::Tensor output, const torch::nn::ReLUImpl*) {
    return output.relu_();
  }
};

template <>
struct Epilogue<torch::nn::ReLU6Impl> {
  static constexpr const char* name = "relu6";
  static constexpr const char* onednn_post_op = "none";
  static torch::Tensor apply(torch::Tensor output, const torch::nn::ReLU6Impl*) {
    return in_place(
        output, [](torch::Tensor& t) { return torch::hardtanh_(t, 0.0, 6.0); },
        &BlockedEltwise::relu6_);
  }
};

template <>
struct Epilogue<torch::nn::SiLUImpl> {
  static constexpr const char* name = "silu";
  static constexpr const char* onednn_post_op = "none";
  static torch::Tensor apply(torch::Tensor output, const torch::nn::SiLUImpl*) {
    return in_place(output, [](torch::Tensor& t) { return torch::silu_(t); });
  }
};

template <>
struct Epilogue<HardswishImpl> {
  static constexpr const char* name = "hardswish";
  static constexpr const char* onednn_post_op = "none";
  static torch::Tensor apply(torch::Tensor output, const HardswishImpl*) {
    return in_place(
        output, [](torch::Tensor& t) { return torch::hardswish_(t); }, &BlockedEltwise::hardswish_);
  }
};

template <>
struct Epilogue<torch::nn::LeakyReLUImpl> {
  static constexpr const char* name = "leaky_relu";
  static constexpr const char* onednn_post_op = "none";
  static torch::Tensor apply(torch::Tensor output, const torch::nn::LeakyReLUImpl* module) {
    const double slope = module->options.negative_slope();
    return in_place(output, [slope](torch::Tensor& t) { return torch::leaky_relu_(t, slope); });
  }
};

template <>
struct Epilogue<torch::nn::GELUImpl> {
  static constexpr const char* name = "gelu";
  static constexpr const char* onednn_post_op = "none";
  static torch::Tensor apply(torch::Tensor output, const torch::nn::GELUImpl* module) {
    const std::string& approximate = module->options.approximate();  // no copy per call
    return in_place(output, [&](torch::Tensor& t) { return torch::gelu_(t, approximate); });
  }
};

}  // namespace fusion::detail
