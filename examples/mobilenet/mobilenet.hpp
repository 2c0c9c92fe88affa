// torchvision's mobilenet_v2 in LibTorch C++, with torchvision's module paths and parameter names
// (features.0 .. features.18, classifier.1), so its state_dict loads as exported. Children a user
// may fuse are fusion::Slots, and torchvision's nn.Sequentials `features` and each block's `conv`
// are fusion::Sequential, so that `features.0.0` + `features.0.1` + `features.0.2` (conv,
// BatchNorm, ReLU6) form a chain, and the same inside every block's `conv`.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <fusion/fusion.hpp>
#include <fusion/kernels/batch_norm_folding.hpp>
#include <fusion/kernels/residual_block.hpp>

#include "safetensors.hpp"

namespace mobilenet {

namespace nn = torch::nn;

/// torchvision.ops.Conv2dNormActivation with BatchNorm2d and ReLU6: Conv2d (no bias, padding
/// (kernel - 1) / 2), BatchNorm2d, ReLU6, as children "0", "1", "2" (torchvision's nn.Sequential
/// names them so). A module of its own rather than a fusion::Sequential, whose templated forward
/// cannot be an entry of another one.
struct ConvNormActivationImpl : nn::Cloneable<ConvNormActivationImpl> {
  ConvNormActivationImpl(int64_t in_channels, int64_t out_channels, int64_t kernel_size,
                         int64_t conv_stride, int64_t conv_groups)
      : in(in_channels),
        out(out_channels),
        kernel(kernel_size),
        stride(conv_stride),
        groups(conv_groups) {
    reset();
  }
  void reset() override {
    conv = fusion::register_slot(*this, "0",
                                 nn::Conv2d(nn::Conv2dOptions(in, out, kernel)
                                                .stride(stride)
                                                .padding((kernel - 1) / 2)
                                                .groups(groups)
                                                .bias(false)));
    bn = fusion::register_slot(*this, "1", nn::BatchNorm2d(out));
    relu6 = fusion::register_slot(*this, "2", nn::ReLU6());
  }

  torch::Tensor forward(const torch::Tensor& x) { return relu6(bn(conv(x))); }

  int64_t in, out, kernel, stride, groups;
  fusion::Slot<nn::Conv2d> conv;
  fusion::Slot<nn::BatchNorm2d> bn;
  fusion::Slot<nn::ReLU6> relu6;
};
TORCH_MODULE(ConvNormActivation);

/// torchvision.models.mobilenetv2.InvertedResidual: an expanding 1x1 conv (unless the ratio is 1),
/// a depthwise 3x3 conv, each with BatchNorm and ReLU6, then a linear 1x1 projection with
/// BatchNorm and no activation; the input added where stride 1 keeps the channels.
struct InvertedResidualImpl : nn::Cloneable<InvertedResidualImpl> {
  InvertedResidualImpl(int64_t in_channels, int64_t out_channels, int64_t block_stride,
                       int64_t expand_ratio)
      : in(in_channels), out(out_channels), stride(block_stride), expand(expand_ratio) {
    reset();
  }
  void reset() override {
    const int64_t hidden = in * expand;
    conv = register_module("conv", fusion::Sequential());
    if (expand != 1) conv->push_back(ConvNormActivation(in, hidden, 1, 1, 1));
    conv->push_back(ConvNormActivation(hidden, hidden, 3, stride, hidden));
    conv->push_back(nn::Conv2d(nn::Conv2dOptions(hidden, out, 1).bias(false)));
    conv->push_back(nn::BatchNorm2d(out));
    use_res_connect = stride == 1 && in == out;
  }

  torch::Tensor forward(const torch::Tensor& x) {
    return use_res_connect ? x + conv->forward(x) : conv->forward(x);
  }

  int64_t in, out, stride, expand;
  bool use_res_connect = false;
  fusion::Sequential conv{nullptr};
};
TORCH_MODULE(InvertedResidual);

/// torchvision.models.mobilenet_v2 (width 1.0): the stem, 17 inverted residual blocks, a 1x1 conv
/// to 1280 channels, global average pooling, dropout and the classifier.
struct MobileNetV2Impl : nn::Cloneable<MobileNetV2Impl> {
  explicit MobileNetV2Impl(int64_t classes = 1000) : num_classes(classes) { reset(); }
  void reset() override {
    features = register_module("features", fusion::Sequential());
    features->push_back(ConvNormActivation(3, 32, 3, 2, 1));
    // torchvision's inverted_residual_setting: expansion t, channels c, repeats n, stride s.
    const int64_t settings[7][4] = {{1, 16, 1, 1}, {6, 24, 2, 2},  {6, 32, 3, 2}, {6, 64, 4, 2},
                                    {6, 96, 3, 1}, {6, 160, 3, 2}, {6, 320, 1, 1}};
    int64_t in = 32;
    for (const auto& s : settings) {
      for (int64_t i = 0; i < s[2]; ++i) {
        features->push_back(InvertedResidual(in, s[1], i == 0 ? s[3] : 1, s[0]));
        in = s[1];
      }
    }
    features->push_back(ConvNormActivation(in, 1280, 1, 1, 1));
    classifier = register_module(
        "classifier", fusion::Sequential(nn::Dropout(0.2), nn::Linear(1280, num_classes)));
  }
  int64_t num_classes;

  /// images [batch, 3, H, W] -> logits [batch, classes]
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = features->forward(x);
    // Dense for the classifier: LibTorch's linear does not take oneDNN's layout.
    if (h.is_mkldnn()) h = h.to_dense();
    return classifier->forward(torch::flatten(torch::adaptive_avg_pool2d(h, {1, 1}), 1));
  }

  fusion::Sequential features{nullptr};
  fusion::Sequential classifier{nullptr};
};
TORCH_MODULE(MobileNetV2);

/// The fusion of a torchvision MobileNetV2 with the built-in folding kernels: every conv + bn +
/// ReLU6 (the stem, the last 1x1 conv, and the expanding and depthwise convs of every block) with
/// `fusion.conv2d_bn_relu6`, and every block's projection conv + bn with `fusion.conv2d_bn`. The
/// projection's index in `conv` is 1 in the first block (no expansion) and 2 in the others.
inline fusion::Plan folding_plan() {
  fusion::kernels::register_builtin_kernels();
  const fusion::ModuleSpec tensor{{"x"}, {"x"}};
  fusion::FuseOptions conv_bn, conv_bn_relu6;
  conv_bn.kernel = "fusion.conv2d_bn";
  conv_bn_relu6.kernel = "fusion.conv2d_bn_relu6";
  const std::vector<fusion::ModuleSpec> pair(2, tensor), triple(3, tensor);
  fusion::Plan plan;
  plan.rules = {
      {{"features.*.0", "features.*.1", "features.*.2"}, triple, conv_bn_relu6},
      {{"features.*.conv.*.0", "features.*.conv.*.1", "features.*.conv.*.2"},
       triple,
       conv_bn_relu6},
      {{"features.1.conv.1", "features.1.conv.2"}, pair, conv_bn},
  };
  for (int block = 2; block <= 17; ++block) {
    const std::string path = "features." + std::to_string(block) + ".conv.";
    plan.rules.push_back({{path + "2", path + "3"}, pair, conv_bn});
  }
  return plan;
}

/// Registers the built-in kernels and the example's two block kernels, declared by layout only
/// (once; later calls do nothing): `mobilenet.conv_bn_relu6` for a ConvNormActivation, and
/// `mobilenet.inverted_residual` for an InvertedResidual (its `conv` Sequential's stages, the
/// input added where `use_res_connect`).
inline void register_kernels() {
  fusion::kernels::register_builtin_kernels();
  fusion::register_kernels_once("mobilenet", [] {
    namespace fk = fusion::kernels;
    using Block = InvertedResidualImpl;
    using Stage = ConvNormActivationImpl;
    fk::register_residual_block(
        "mobilenet.conv_bn_relu6",
        fk::conv_block(fk::conv_bn(&Stage::conv, &Stage::bn, &Stage::relu6)));
    fk::register_residual_block("mobilenet.inverted_residual",
                                fk::conv_block(fk::sequential_stages(&Block::conv),
                                               fk::add_input_if(&Block::use_res_connect)));
  });
}

/// The example's plan: every entry of `features` as one chain of one member, the stem and the last
/// 1x1 convolution with `mobilenet.conv_bn_relu6`, the 17 blocks with
/// `mobilenet.inverted_residual`: fusion::Sequential then hands the activations on in oneDNN's
/// blocked layout from the stem to the last convolution; and the classifier's Linear with
/// `fusion.linear`. Registers the kernels it names.
inline fusion::Plan block_plan() {
  register_kernels();
  const fusion::ModuleSpec tensor{{"x"}, {"x"}};
  fusion::FuseOptions stage, block;
  stage.kernel = "mobilenet.conv_bn_relu6";
  block.kernel = "mobilenet.inverted_residual";
  fusion::Plan plan;
  plan.rules = {{{"features.0"}, {tensor}, stage}, {{"features.18"}, {tensor}, stage}};
  for (int index = 1; index <= 17; ++index) {
    plan.rules.push_back({{"features." + std::to_string(index)}, {tensor}, block});
  }
  fusion::FuseOptions linear;
  linear.kernel = "fusion.linear";
  plan.rules.push_back({{"classifier.1"}, {tensor}, linear});
  return plan;
}

/// Loads torchvision's mobilenet_v2 state_dict as saved with safetensors
/// (`save_file(model.state_dict(), "model.safetensors")`, num_batches_tracked included) from a
/// directory.
inline void load_weights(MobileNetV2Impl& model, const std::filesystem::path& dir) {
  checkpoint::load_state(model, checkpoint::index_directory(dir), dir.string());
}

/// Seeded random weights and running statistics (for tests and the demo without a checkpoint):
/// He-normal convolutions (as torchvision's fan-out init), BatchNorm scales around 1.
inline void init_random(MobileNetV2Impl& model, uint64_t seed) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(seed);
  for (auto& module : model.modules(/*include_self=*/false)) {
    if (auto* conv = module->as<nn::Conv2d>()) {
      const auto fan_out = conv->weight.size(0) * conv->weight[0][0].numel();
      conv->weight.normal_(0, std::sqrt(2.0 / static_cast<double>(fan_out)));
    } else if (auto* bn = module->as<nn::BatchNorm2d>()) {
      bn->weight.uniform_(0.5, 1.0);
      bn->bias.uniform_(-0.2, 0.2);
      bn->running_mean.normal_(0, 0.2);
      bn->running_var.uniform_(0.5, 1.5);
    } else if (auto* linear = module->as<nn::Linear>()) {
      linear->weight.normal_(0, 1.0 / std::sqrt(static_cast<double>(linear->weight.size(1))));
      linear->bias.zero_();
    }
  }
}

}  // namespace mobilenet
