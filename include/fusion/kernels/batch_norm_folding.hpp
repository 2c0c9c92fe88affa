// Built-in kernels that fold a normalisation into the neighbouring linear map, the classic module
// fusion (torch.ao's fuse_modules, TorchScript's freezing), and run an activation in place of its
// own pass:
//
//   fusion.conv{1,2,3}d_bn[_<activation>]   Conv -> BatchNorm [-> activation]  (conv_folding.hpp)
//   fusion.conv{1,2,3}d_<activation>        Conv -> activation                 (conv_folding.hpp)
//   fusion.conv_transpose{1,2,3}d_bn        ConvTranspose -> BatchNorm         (conv_folding.hpp)
//   fusion.conv2d_bn_relu_maxpool2d         Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d
//                                                                              (conv_pooling.hpp)
//   fusion.linear_bn                        Linear -> BatchNorm1d
//   fusion.layernorm_linear                 LayerNorm -> Linear
//   fusion.linear                           Linear alone, by the fastest GEMM   (linear.hpp)
//
// <activation>: relu, relu6, silu, hardswish, leaky_relu, gelu. Register them with
// fusion::kernels::register_builtin_kernels(), then name them in FuseOptions or use_kernel like
// any kernel. Folded weights are prepared states, computed in float64 and rounded once, rebuilt
// when a weight, bias or running statistic changes; where folding would not compute what the
// modules compute (training mode, BatchNorm without running statistics, gradients) the chain
// replays.
#pragma once

#include <string>
#include <vector>

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/types.h>

#include "fusion/detail/folding.hpp"
#include "fusion/kernel.hpp"
#include "fusion/kernels/conv_folding.hpp"
#include "fusion/kernels/conv_pooling.hpp"
#include "fusion/kernels/linear.hpp"

namespace fusion::detail {

/// Registers fusion.<conv>_bn_<activation> and fusion.<conv>_<activation> for each activation,
/// and their ".bf16" variants for 2d.
template <std::size_t D, typename ConvImpl, typename BatchNormImpl, typename... Activations>
void register_conv_activations(const std::string& conv, std::tuple<Activations...>* /*types*/) {
  const KernelOptions eval_only{{c10::DeviceType::CPU, c10::DeviceType::CUDA}};
  KernelOptions any_mode = eval_only;  // nothing folded: training mode computes the same
  any_mode.training = true;
  (register_kernel("fusion." + conv + "_bn_" + Epilogue<Activations>::name,
                   kernels::ConvBatchNormActivation<D, ConvImpl, BatchNormImpl, Activations>{},
                   eval_only),
   ...);
  (register_kernel("fusion." + conv + "_" + Epilogue<Activations>::name,
                   kernels::ConvActivation<D, ConvImpl, Activations>{}, any_mode),
   ...);
  if constexpr (D == 2) {
    (register_kernel(
         "fusion." + conv + "_bn_" + Epilogue<Activations>::name + kBFloat16Suffix,
         kernels::ConvBatchNormActivation<D, ConvImpl, BatchNormImpl, Activations>{true},
         bfloat16_options()),
     ...);
    (register_kernel("fusion." + conv + "_" + Epilogue<Activations>::name + kBFloat16Suffix,
                     kernels::ConvActivation<D, ConvImpl, Activations>{true}, bfloat16_options()),
     ...);
  }
}

/// Registers every kernel of this file.
inline void register_conv_kernels() {
  using namespace torch::nn;
  using namespace fusion::kernels;
  // Folding is plain tensor arithmetic: one implementation serves the CPU and CUDA.
  const KernelOptions eval_only{{c10::DeviceType::CPU, c10::DeviceType::CUDA}};
  register_kernel("fusion.conv1d_bn", ConvBatchNorm<1, Conv1dImpl, BatchNorm1dImpl>{}, eval_only);
  register_kernel("fusion.conv2d_bn", ConvBatchNorm<2, Conv2dImpl, BatchNorm2dImpl>{}, eval_only);
  register_kernel(std::string("fusion.conv2d_bn") + kBFloat16Suffix,
                  ConvBatchNorm<2, Conv2dImpl, BatchNorm2dImpl>{true}, bfloat16_options());
  register_kernel("fusion.conv3d_bn", ConvBatchNorm<3, Conv3dImpl, BatchNorm3dImpl>{}, eval_only);
  ConvActivations* activations = nullptr;
  register_conv_activations<1, Conv1dImpl, BatchNorm1dImpl>("conv1d", activations);
  register_conv_activations<2, Conv2dImpl, BatchNorm2dImpl>("conv2d", activations);
  register_conv_activations<3, Conv3dImpl, BatchNorm3dImpl>("conv3d", activations);
  register_kernel("fusion.conv_transpose1d_bn",
                  ConvTransposeBatchNorm<1, ConvTranspose1dImpl, BatchNorm1dImpl>{}, eval_only);
  register_kernel("fusion.conv_transpose2d_bn",
                  ConvTransposeBatchNorm<2, ConvTranspose2dImpl, BatchNorm2dImpl>{}, eval_only);
  register_kernel("fusion.conv_transpose3d_bn",
                  ConvTransposeBatchNorm<3, ConvTranspose3dImpl, BatchNorm3dImpl>{}, eval_only);
}

}  // namespace fusion::detail

namespace fusion::kernels {

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

/// Registers the built-in kernels above, in conv_folding.hpp, conv_pooling.hpp and linear.hpp
/// (once; later calls do nothing).
inline void register_builtin_kernels() {
  fusion::register_kernels_once("fusion.builtin", [] {
    // Folding is plain tensor arithmetic: one implementation serves the CPU and CUDA.
    const KernelOptions eval_only{{c10::DeviceType::CPU, c10::DeviceType::CUDA}};
    fusion::detail::register_conv_kernels();
    fusion::detail::register_conv_pooling_kernels();
    register_kernel("fusion.linear_bn", LinearBatchNorm{}, eval_only);
    // LayerNorm and Linear compute the same in training mode: the fold applies there too.
    KernelOptions any_mode = eval_only;
    any_mode.training = true;
    register_kernel("fusion.layernorm_linear", LayerNormLinear{}, any_mode);
    // It fits every Linear: fusion::optimize tries it only where named.
    KernelOptions named_only = any_mode;
    named_only.optimize_tries = false;
    register_kernel("fusion.linear", LinearProjection{}, named_only);
    register_kernel(std::string("fusion.linear") + detail::kBFloat16Suffix, LinearProjection{true},
                    detail::bfloat16_options());
  });
}

}  // namespace fusion::kernels
