// Built-in kernel for one Linear (registered by register_builtin_kernels(),
// batch_norm_folding.hpp):
//
//   fusion.linear        Linear, computed by project() (kernels/primitives.hpp)
//   fusion.linear.bf16   the same with the weight and bias in bfloat16 (kernels/bfloat16.hpp)
//
// A CNN's classifier is one Linear on a few rows. LibTorch's linear runs every float32 input as
// a GEMM, and OpenBLAS's GEMM copies the whole weight into its panel layout on each call, where
// its matrix-vector product would read it once; project() takes the GEMV for one row and measures
// the other paths per shape. Nothing is folded: the kernel computes what the module computes, in
// training mode too; a call autograd records replays the module (the kernel has no autograd).
#pragma once

#include <vector>

#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include "fusion/detail/bfloat16.hpp"
#include "fusion/kernels/primitives.hpp"

namespace fusion::kernels {

/// The kernel fusion.linear (and, with `bfloat16`, fusion.linear.bf16) registers.
struct LinearProjection {
  bool bfloat16 = false;  // the ".bf16" variant

  struct State {
    // The module's own weight and bias (float32: no copy), or their bfloat16 copies.
    torch::Tensor weight, bias;
    std::vector<torch::Tensor> tensors() const { return {weight, bias}; }
  };

  State prepare(torch::nn::LinearImpl& linear) const {
    if (!bfloat16) return {linear.weight, linear.bias};
    return {linear.weight.detach().to(torch::kBFloat16),
            linear.bias.defined() ? linear.bias.detach().to(torch::kBFloat16) : torch::Tensor()};
  }

  bool applies(torch::nn::LinearImpl&) const { return !bfloat16 || detail::bfloat16_enabled(); }

  torch::Tensor operator()(const State& s, torch::nn::LinearImpl& linear,
                           const torch::Tensor& input) const {
    if (!bfloat16) return project(input, s.weight, s.bias);
    // Float32 CPU inputs of the weight's width run in bfloat16 and come back float32; any other
    // runs the module's own forward, which raises LibTorch's error where it does.
    if (!input.device().is_cpu() || input.scalar_type() != torch::kFloat32 || input.dim() == 0 ||
        input.size(-1) != s.weight.size(1)) {
      return linear.forward(input);
    }
    return project(input.to(torch::kBFloat16), s.weight, s.bias).to(torch::kFloat32);
  }
};

}  // namespace fusion::kernels
