// Built-in kernel for a CNN's stem (registered by register_builtin_kernels(),
// fusion/kernels/batch_norm_folding.hpp):
//
//   fusion.conv2d_bn_relu_maxpool2d   Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d (torchvision's
//                                     ResNet stem)
//
// The convolution with the BatchNorm folded (as fusion.conv2d_bn_relu), then the ReLU and the max
// pooling, on the CPU for float32 in oneDNN's blocked layout: the input is reordered once and the
// pooled result once (or kept blocked where fusion::Sequential or fusion::sequence hands it to a
// kernel that takes it, detail/blocked_layout.hpp). A max pooling on a dense NCHW tensor is far
// slower than on blocked activations in LibTorch (docs/performance.md), so this chain is where the
// layout pays most. Elsewhere (CUDA, other dtypes, dilated or index-returning pooling) the folded
// convolution runs as in fusion.conv2d_bn_relu and the module pools.
// fusion.conv2d_bn_relu_maxpool2d.bf16 is the same in bfloat16 (conv_folding.hpp says how).
#pragma once

#include <string>

#include <ATen/ATen.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/pooling.h>
#include <torch/types.h>

#include "fusion/detail/blocked_layout.hpp"
#include "fusion/kernel.hpp"
#include "fusion/kernels/conv_folding.hpp"

namespace fusion::kernels {

/// Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d; see the file's comment.
struct ConvBatchNormReLUMaxPool {
  using Folded =
      ConvBatchNorm<2, torch::nn::Conv2dImpl, torch::nn::BatchNorm2dImpl, torch::nn::ReLUImpl>;
  using State = Folded::State;
  bool bfloat16 = false;  // the ".bf16" variant

  State prepare(torch::nn::Conv2dImpl& conv, torch::nn::BatchNorm2dImpl& bn, torch::nn::ReLUImpl&,
                torch::nn::MaxPool2dImpl&) const {
    return Folded::fold(conv, bn, /*channels_last=*/false, bfloat16);
  }
  bool applies(torch::nn::Conv2dImpl& conv, torch::nn::BatchNorm2dImpl& bn, torch::nn::ReLUImpl&,
               torch::nn::MaxPool2dImpl&) const {
    return Folded{bfloat16}.applies(conv, bn);
  }

  torch::Tensor operator()(const State& s, torch::nn::Conv2dImpl& conv,
                           torch::nn::BatchNorm2dImpl& bn, torch::nn::ReLUImpl& relu,
                           torch::nn::MaxPool2dImpl& pool, const torch::Tensor& input) const {
    if (input.dim() != 4 && !input.is_mkldnn()) {
      return pool.forward(relu.forward(bn.forward(conv.forward(input))));  // the modules decide
    }
    bool undilated = true;
    for (int64_t d : *pool.options.dilation()) undilated = undilated && d == 1;
    // oneDNN's pooling has no dilation; the module computes those.
    const bool onednn =
        undilated && s.weight_mkldnn.defined() &&
        (input.is_mkldnn() ||
         (input.device().is_cpu() && input.scalar_type() == torch::kFloat32 && input.numel() > 0));
    // Taken first: the grant is for this call, not for a module called below.
    const bool keep_blocked = detail::BlockedHandOff::take_grant() && onednn && !input.is_mkldnn();
    if (!onednn) return pool.forward(Folded::run(s, conv, input, &relu));
    const torch::Tensor blocked =
        detail::blocked(input, s.bfloat16 ? torch::kBFloat16 : torch::kFloat);
    const auto& o = pool.options;
    // ATen's oneDNN pooling itself: LibTorch 2.x dispatches max_pool2d on oneDNN tensors only in
    // InferenceMode, whose tensors 1.13 cannot reorder outside it.
    const torch::Tensor pooled =
        at::mkldnn_max_pool2d(Folded::run(s, conv, blocked, &relu), *o.kernel_size(), *o.stride(),
                              *o.padding(), *o.dilation(), o.ceil_mode());
    if (input.is_mkldnn()) return pooled;
    if (keep_blocked) {
      detail::BlockedHandOff::gave_blocked();
      return pooled;
    }
    return pooled.to_dense(torch::kFloat);
  }
};

}  // namespace fusion::kernels

namespace fusion::detail {

inline void register_conv_pooling_kernels() {
  KernelOptions options{{c10::DeviceType::CPU, c10::DeviceType::CUDA}};
  options.blocked_layout = true;
  register_kernel("fusion.conv2d_bn_relu_maxpool2d", kernels::ConvBatchNormReLUMaxPool{}, options);
  register_kernel(std::string("fusion.conv2d_bn_relu_maxpool2d") + kBFloat16Suffix,
                  kernels::ConvBatchNormReLUMaxPool{true},
                  bfloat16_options(/*blocked_layout=*/true));
}

}  // namespace fusion::detail
