// fusion::Hardswish: the activation of MobileNetV3 and EfficientNet-style CNNs, as a module.
// LibTorch's C++ API has torch::hardswish but no module for it (PyTorch's torch.nn.Hardswish);
// this one computes the same, so that a model can declare it as a child, load torchvision's
// state_dict unchanged (it has no parameters), and be fused with a convolution
// (fusion.conv2d_bn_hardswish and the others in fusion/kernels/conv_folding.hpp).
#pragma once

#include <ostream>

#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

namespace fusion {

/// x * relu6(x + 3) / 6, elementwise.
class HardswishImpl : public torch::nn::Cloneable<HardswishImpl> {
 public:
  HardswishImpl() = default;
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& input) { return torch::hardswish(input); }
  void pretty_print(std::ostream& stream) const override { stream << "fusion::Hardswish()"; }
};
TORCH_MODULE(Hardswish);

}  // namespace fusion
