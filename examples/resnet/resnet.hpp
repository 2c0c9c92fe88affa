// torchvision's resnet18 in LibTorch C++, with torchvision's module paths and parameter names
// (conv1, bn1, relu, maxpool, layer1..4 of BasicBlocks with downsample, avgpool, fc), so its
// state_dict loads as exported. Children a user may fuse are fusion::Slots; the layers and
// downsample branches are fusion::Sequential, so `layer1.0.conv1` + `layer1.0.bn1` and
// `layer2.0.downsample.0` + `layer2.0.downsample.1` form chains.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <fusion/fusion.hpp>
#include <fusion/kernels/batch_norm_folding.hpp>
#include <fusion/kernels/residual_block.hpp>

#include "safetensors.hpp"

namespace resnet {

namespace nn = torch::nn;

inline nn::Conv2d conv3x3(int64_t in, int64_t out, int64_t stride = 1) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(false));
}

/// torchvision.models.resnet.BasicBlock. As there, one ReLU module serves twice: after bn1 and
/// after the residual add.
struct BasicBlockImpl : nn::Cloneable<BasicBlockImpl> {
  BasicBlockImpl(int64_t in_channels, int64_t out_channels, int64_t block_stride)
      : in(in_channels), out(out_channels), stride(block_stride) {
    reset();
  }
  void reset() override {
    conv1 = fusion::register_slot(*this, "conv1", conv3x3(in, out, stride));
    bn1 = fusion::register_slot(*this, "bn1", nn::BatchNorm2d(out));
    relu = fusion::register_slot(*this, "relu", nn::ReLU(nn::ReLUOptions(true)));
    conv2 = fusion::register_slot(*this, "conv2", conv3x3(out, out));
    bn2 = fusion::register_slot(*this, "bn2", nn::BatchNorm2d(out));
    if (stride != 1 || in != out) {
      downsample = register_module(
          "downsample",
          fusion::Sequential(nn::Conv2d(nn::Conv2dOptions(in, out, 1).stride(stride).bias(false)),
                             nn::BatchNorm2d(out)));
    }
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto h = relu(bn1(conv1(x)));
    h = bn2(conv2(h));
    const auto identity = downsample.is_empty() ? x : downsample->forward(x);
    h += identity;  // in place, as torchvision's `out += identity`
    return relu(h);
  }

  int64_t in, out, stride;

  fusion::Slot<nn::Conv2d> conv1, conv2;
  fusion::Slot<nn::BatchNorm2d> bn1, bn2;
  fusion::Slot<nn::ReLU> relu;
  fusion::Sequential downsample{nullptr};
};
TORCH_MODULE(BasicBlock);

/// torchvision.models.resnet18 (BasicBlock, [2, 2, 2, 2]).
struct ResNet18Impl : nn::Cloneable<ResNet18Impl> {
  explicit ResNet18Impl(int64_t classes = 1000) : num_classes(classes) { reset(); }
  void reset() override {
    conv1 = fusion::register_slot(
        *this, "conv1", nn::Conv2d(nn::Conv2dOptions(3, 64, 7).stride(2).padding(3).bias(false)));
    bn1 = fusion::register_slot(*this, "bn1", nn::BatchNorm2d(64));
    relu = fusion::register_slot(*this, "relu", nn::ReLU(nn::ReLUOptions(true)));
    maxpool = fusion::register_slot(*this, "maxpool",
                                    nn::MaxPool2d(nn::MaxPool2dOptions(3).stride(2).padding(1)));
    int64_t in = 64;
    const int64_t widths[] = {64, 128, 256, 512};
    for (int i = 0; i < 4; ++i) {
      const int64_t stride = i == 0 ? 1 : 2;
      layers[i] = register_module("layer" + std::to_string(i + 1),
                                  fusion::Sequential(BasicBlock(in, widths[i], stride),
                                                     BasicBlock(widths[i], widths[i], 1)));
      in = widths[i];
    }
    avgpool = register_module("avgpool", nn::AdaptiveAvgPool2d(1));
    fc = fusion::register_slot(*this, "fc", nn::Linear(512, num_classes));
  }
  int64_t num_classes;

  /// images [batch, 3, H, W] -> logits [batch, classes]
  torch::Tensor forward(const torch::Tensor& x) {
    // torchvision's maxpool(relu(bn1(conv1(x)))), then layer1 .. layer4, as one list: the blocks'
    // kernels hand their results on in oneDNN's layout across the layers too.
    auto h =
        fusion::sequence(x, conv1, bn1, relu, maxpool, layers[0], layers[1], layers[2], layers[3]);
    const auto pooled = torch::flatten(avgpool(h), 1);
    // An input in oneDNN's layout (`x.to_mkldnn()`) stays in it up to here (every op above takes
    // it); LibTorch's linear does not, so the classifier takes it dense.
    return fc(pooled.is_mkldnn() ? pooled.to_dense() : pooled);
  }

  fusion::Slot<nn::Conv2d> conv1;
  fusion::Slot<nn::BatchNorm2d> bn1;
  fusion::Slot<nn::ReLU> relu;
  fusion::Slot<nn::MaxPool2d> maxpool;
  fusion::Sequential layers[4] = {nullptr, nullptr, nullptr, nullptr};
  nn::AdaptiveAvgPool2d avgpool{nullptr};
  fusion::Slot<nn::Linear> fc;
};
TORCH_MODULE(ResNet18);

inline fusion::ModuleSpec tensor_spec() { return fusion::ModuleSpec{{"x"}, {"x"}}; }

/// The correct fusion of a torchvision ResNet-18 with the built-in folding kernels: the stem's
/// conv+bn+relu, and in every block conv1+bn1, conv2+bn2 and the downsample's conv+bn. A block's
/// relu is not fused: the block calls it twice, and a chain's members are called once per pass.
inline fusion::Plan folding_plan() {
  const auto pair = std::vector<fusion::ModuleSpec>{tensor_spec(), tensor_spec()};
  fusion::FuseOptions conv_bn, conv_bn_relu;
  conv_bn.kernel = "fusion.conv2d_bn";
  conv_bn_relu.kernel = "fusion.conv2d_bn_relu";
  fusion::Plan plan;
  plan.rules = {
      {{"conv1", "bn1", "relu"}, {tensor_spec(), tensor_spec(), tensor_spec()}, conv_bn_relu},
      {{"layer*.*.conv1", "layer*.*.bn1"}, pair, conv_bn},
      {{"layer*.*.conv2", "layer*.*.bn2"}, pair, conv_bn},
      {{"layer*.*.downsample.0", "layer*.*.downsample.1"}, pair, conv_bn},
  };
  return plan;
}

/// Registers the built-in kernels and `resnet.basic_block`, the library's residual block kernel
/// for BasicBlock, declared by its layout (once; later calls do nothing).
inline void register_kernels() {
  fusion::kernels::register_builtin_kernels();
  fusion::register_kernels_once("resnet", [] {
    namespace fk = fusion::kernels;
    using Block = BasicBlockImpl;
    fk::register_residual_block("resnet.basic_block",
                                fk::residual_block(fk::conv_bn(&Block::conv1, &Block::bn1),
                                                   fk::conv_bn(&Block::conv2, &Block::bn2),
                                                   fk::downsample(&Block::downsample)));
  });
}

/// The example's plan: the stem's conv+bn+relu+maxpool (`fusion.conv2d_bn_relu_maxpool2d`), and
/// every BasicBlock as one chain of one member with `resnet.basic_block` (folded, in oneDNN's
/// layout from block to block within a layer, the residual add and the ReLUs in place), and the
/// classifier `fc` with `fusion.linear`. Registers the kernels it names.
inline fusion::Plan block_plan() {
  register_kernels();
  fusion::FuseOptions block, stem, linear;
  block.kernel = "resnet.basic_block";
  stem.kernel = "fusion.conv2d_bn_relu_maxpool2d";
  linear.kernel = "fusion.linear";
  fusion::Plan plan;
  plan.rules = {
      {{"conv1", "bn1", "relu", "maxpool"},
       std::vector<fusion::ModuleSpec>(4, tensor_spec()),
       stem},
      {{"layer*.*"}, {tensor_spec()}, block},
      {{"fc"}, {tensor_spec()}, linear},
  };
  return plan;
}

/// Loads torchvision's resnet18 state_dict as saved with safetensors
/// (`save_file(model.state_dict(), "model.safetensors")`, num_batches_tracked included) from a
/// directory.
inline void load_weights(ResNet18Impl& model, const std::filesystem::path& dir) {
  checkpoint::load_state(model, checkpoint::index_directory(dir), dir.string());
}

/// Seeded random weights and running statistics (for tests and the demo without a checkpoint).
inline void init_random(ResNet18Impl& model, uint64_t seed) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(seed);
  for (auto& item : model.named_parameters()) {
    const auto& name = item.key();
    if (name.find("bn") != std::string::npos || name.find("downsample.1") != std::string::npos) {
      item.value().uniform_(name.find("weight") != std::string::npos ? 0.5 : -0.2, 0.5);
    } else {
      item.value().normal_(0, std::sqrt(2.0 / static_cast<double>(item.value()[0].numel())));
    }
  }
  for (auto& item : model.named_buffers()) {
    if (item.key().find("running_mean") != std::string::npos) item.value().normal_(0, 0.2);
    if (item.key().find("running_var") != std::string::npos) item.value().uniform_(0.5, 1.5);
  }
}

}  // namespace resnet
