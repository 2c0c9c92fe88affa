// A kernel for a whole convolution block of the user's own type, described by a layout
// (kernels/block_layouts.hpp): torchvision's BasicBlock and Bottleneck (residual_block), and
// blocks whose stages carry their own activations, with or without the input added
// (conv_block: MobileNetV2's InvertedResidual and Conv2dNormActivation).
//
//   namespace fk = fusion::kernels;
//   fk::register_residual_block("my.basic_block",
//       fk::residual_block(fk::conv_bn(&BasicBlockImpl::conv1, &BasicBlockImpl::bn1),
//                          fk::conv_bn(&BasicBlockImpl::conv2, &BasicBlockImpl::bn2),
//                          fk::downsample(&BasicBlockImpl::downsample)));
//
// What it computes: each stage's bn(conv(h)) and its activation; then, where the block adds its
// input, + identity (the downsample branch, a Conv2d -> BatchNorm2d Sequential; empty: the input
// itself); then the ReLU residual_block declares. Every BatchNorm is folded into the convolution
// before it (float64, rounded once; copies of the convolution weights, in `report`'s state bytes).
// On the CPU, for float32 inputs, the whole block runs in oneDNN's blocked layout: the input is
// reordered once, the activations stay blocked from one convolution to the next, the add and the
// activations run in place on them (detail/epilogue.hpp) or as oneDNN post-ops of the convolution
// before (oneDNN 2.x builds; each measured per shape), and the result is reordered once (kept
// blocked where the caller takes that: fusion::Sequential or fusion::sequence between two such
// kernels, detail/blocked_layout.hpp). Elsewhere (CUDA, other dtypes) the same folded arithmetic
// runs densely. Eval mode without gradients; otherwise the block's own forward runs.
// register_residual_block also registers `name + ".bf16"`, the block in bfloat16 (conv_folding.hpp
// says how; kernels/bfloat16.hpp): the same, with the activations blocked in bfloat16 from the
// input's reorder to the result's.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/types.h>

#include "fusion/detail/blocked_layout.hpp"
#include "fusion/kernel.hpp"
#include "fusion/kernels/block_layouts.hpp"
#include "fusion/kernels/conv_folding.hpp"
#include "fusion/kernels/layouts.hpp"

namespace fusion::kernels {

/// The kernel register_residual_block registers.
template <typename Block>
struct ResidualBlock {
  using Fold = ConvBatchNorm<2, torch::nn::Conv2dImpl, torch::nn::BatchNorm2dImpl>;
  ResidualBlockLayout<Block> layout;
  bool bfloat16 = false;  // the ".bf16" variant

  struct State {
    std::vector<Fold::State> stages;
    std::shared_ptr<Fold::State> downsample;  // null: the identity
#if defined(FUSION_HAS_ONEDNN)
    // On blocked inputs: each stage's convolution with its activation as oneDNN's
    // post-op (null: none made), and the last convolution with the input (or the downsample
    // branch) added by the sum post-op and the ReLU after it, where the block adds its input
    // after a last stage without an activation (BasicBlock, Bottleneck, InvertedResidual).
    std::vector<std::shared_ptr<const detail::OneDnnConv2d>> fused;
    std::vector<std::string> fused_activation;  // the activation each was made for, by name
    std::shared_ptr<const detail::OneDnnConv2d> last_with_sum;
#endif
    std::vector<torch::Tensor> tensors() const {
      std::vector<torch::Tensor> all;
      for (const auto& s : stages) all.insert(all.end(), {s.weight, s.bias});
      if (downsample) all.insert(all.end(), {downsample->weight, downsample->bias});
      return all;
    }
    std::uint64_t opaque_bytes() const {
      std::uint64_t bytes = downsample ? downsample->opaque_bytes() : 0;
      for (const auto& s : stages) bytes += s.opaque_bytes();
#if defined(FUSION_HAS_ONEDNN)
      // The block's primitives share their stage's reordered weights: counted once.
      std::set<const detail::ReorderedWeights*> counted;
      for (const auto& s : stages) {
        if (s.onednn) counted.insert(s.onednn->reordered().get());
      }
      auto block_primitives = fused;
      block_primitives.push_back(last_with_sum);
      for (const auto& p : block_primitives) {
        if (p && counted.insert(p->reordered().get()).second) bytes += p->reordered()->bytes();
      }
#endif
      return bytes;
    }
  };

  State prepare(Block& block) const {
    State state;
    for (const auto& stage : layout.stages(block).stages) {
      state.stages.push_back(Fold::fold(*stage.conv, *stage.bn, false, bfloat16));
    }
    const auto branch = layout.downsample.find(block);
    if (branch.conv != nullptr) {
      state.downsample =
          std::make_shared<Fold::State>(Fold::fold(*branch.conv, *branch.bn, false, bfloat16));
    }
#if defined(FUSION_HAS_ONEDNN)
    prepare_onednn(state, block);
#endif
    return state;
  }

  bool applies(Block& block) const {
    if (bfloat16 && !detail::bfloat16_enabled()) return false;
    for (const auto& stage : layout.stages(block).stages) {
      if (!detail::has_running_stats(*stage.bn)) return false;
    }
    const auto branch = layout.downsample.find(block);
    return branch.bn == nullptr || detail::has_running_stats(*branch.bn);
  }

  /// Checked when attached: the stages are found, each BatchNorm takes its convolution's
  /// channels, each convolution the channels before it, and an added input has the last
  /// convolution's channels.
  std::string misfit(Block& block) const {
    const auto found = layout.stages(block);
    if (!found.why.empty()) return fmt::format("its stages: {}", found.why);
    int64_t channels = -1;  // the channels the previous stage gives
    int64_t first_in = -1, stride = 1;
    for (const auto& stage : found.stages) {
      const int64_t in = stage.conv->options.in_channels();
      const int64_t out = stage.conv->options.out_channels();
      if (channels >= 0 && in != channels) {
        return fmt::format("member '{}': takes {} channels, the stage before gives {}",
                           child_name(block, stage.conv), in, channels);
      }
      if (stage.bn->options.num_features() != out) {
        return fmt::format("member '{}': normalises {} channels, its convolution gives {}",
                           child_name(block, stage.bn), stage.bn->options.num_features(), out);
      }
      if (first_in < 0) first_in = in;
      for (int64_t s : *stage.conv->options.stride()) stride = std::max(stride, s);
      channels = out;
    }
    const auto branch = layout.downsample.find(block);
    const std::string name = child_name(block, branch.module);
    if (!branch.why.empty()) return fmt::format("member '{}': {}", name, branch.why);
    if (!layout.adds_input(block)) return {};
    if (branch.conv == nullptr) {
      if (first_in != channels || stride != 1) {
        return fmt::format(
            "the block adds its input without a downsample branch, but its stages take {} "
            "channels and give {} (stride {}): the input would not fit",
            first_in, channels, stride);
      }
      return {};
    }
    if (branch.conv->options.in_channels() != first_in ||
        branch.conv->options.out_channels() != channels ||
        branch.bn->options.num_features() != channels) {
      return fmt::format("member '{}': maps {} channels to {}, the stages {} to {}", name,
                         branch.conv->options.in_channels(), branch.bn->options.num_features(),
                         first_in, channels);
    }
    return {};
  }

  torch::Tensor operator()(const State& s, Block& block, const torch::Tensor& x) const {
    // An unbatched input: the block's own code decides (its BatchNorm2d refuses it).
    if (x.dim() != 4 && !x.is_mkldnn()) return block.forward(x);
    const bool onednn =
        x.is_mkldnn() || (s.stages[0].weight_mkldnn.defined() && x.device().is_cpu() &&
                          x.scalar_type() == torch::kFloat32 && x.numel() > 0);
    // Taken first: the grant is for this call, not for a module the block's code would call.
    const bool keep_blocked = detail::BlockedHandOff::take_grant() && onednn && !x.is_mkldnn();
    const torch::Tensor input = onednn ? detail::blocked(x, dtype()) : x;
    const auto found = layout.stages(block);
    // The block changed shape since prepare without a parameter changing: its own forward runs.
    if (found.stages.size() != s.stages.size()) {
      return block.forward(x.is_mkldnn() ? x.to_dense(torch::kFloat) : x);
    }
    torch::Tensor h = input;
    for (std::size_t i = 0; i < found.stages.size(); ++i) {
      const ConvStage& stage = found.stages[i];
#if defined(FUSION_HAS_ONEDNN)
      if (i + 1 == found.stages.size() && !stage.activation) {
        // The input owns its blocked copy where the block reordered it.
        auto output = add_in_last(s, block, *stage.conv, h, input, !x.is_mkldnn());
        if (output.defined()) return finish(std::move(output), x, keep_blocked, onednn);
      }
#endif
      h = run_stage(s, i, stage, h);
    }
    if (layout.adds_input(block)) {
      if (s.downsample) {
        h.add_(Fold::run(*s.downsample, *layout.downsample.find(block).conv, input, nullptr));
      } else {
        h.add_(input);
      }
    }
    if (layout.relu_after_add) torch::relu_(h);
    return finish(std::move(h), x, keep_blocked, onednn);
  }

 private:
  /// The dtype of the blocked activations.
  torch::ScalarType dtype() const { return bfloat16 ? torch::kBFloat16 : torch::kFloat32; }

  static torch::Tensor finish(torch::Tensor h, const torch::Tensor& x, bool keep_blocked,
                              bool onednn) {
    if (keep_blocked) detail::BlockedHandOff::gave_blocked();
    return x.is_mkldnn() || keep_blocked || !onednn ? h : h.to_dense(torch::kFloat);
  }

  /// Stage `i` of `h`: its convolution, then its activation.
  torch::Tensor run_stage(const State& s, std::size_t i, const ConvStage& stage,
                          const torch::Tensor& h) const {
    const auto as_declared = [&] {
      auto output = Fold::run(s.stages[i], *stage.conv, h, nullptr);
      return stage.activation ? stage.activation(std::move(output)) : output;
    };
#if defined(FUSION_HAS_ONEDNN)
    const auto* fused = i < s.fused.size() ? s.fused[i].get() : nullptr;
    // A stage whose activation module was replaced by another type since: as declared.
    if (fused != nullptr && s.fused_activation[i] == stage.activation_name && h.is_mkldnn() &&
        h.scalar_type() == dtype() && Fold::fits_prepacked(s.stages[i], *stage.conv, h)) {
      using Path = BlockedConvPath;
      using Algorithm = detail::OneDnnConv2d::Algorithm;
      const auto& folded = s.stages[i];
      const auto key = detail::blocked_conv_key(
          folded.weight.sizes(), folded.stride, folded.padding, folded.dilation,
          stage.conv->options.groups(), h,
          /*variant=*/2 + int64_t{fused->has_eltwise()} + 2 * int64_t{fused->keeps(h)});
      // The stage as declared is offered first: a primitive is kept only where it is faster.
      std::vector<Path> offered{Path::blocked};
      if (fused->offers(h, Algorithm::direct)) offered.push_back(Path::onednn);
      if (fused->offers(h, Algorithm::winograd)) offered.push_back(Path::winograd);
      return detail::run_blocked_conv(
          key, offered,
          [&](Path path, bool /*measuring*/) {
            if (path == Path::blocked) return as_declared();
            auto output =
                (*fused)(h, path == Path::winograd ? Algorithm::winograd : Algorithm::direct);
            return fused->has_eltwise() || !stage.activation ? output
                                                             : stage.activation(std::move(output));
          },
          [&](Path lost) { detail::release_lost(*fused, h, lost); });
    }
#endif
    return as_declared();
  }

#if defined(FUSION_HAS_ONEDNN)
  /// The library's oneDNN primitives for the block (State::fused, last_with_sum). They give
  /// results in layouts of their own choosing, which LibTorch's grouped (depthwise) convolution
  /// then reorders on every call: in a block with one, they keep their input's layout instead,
  /// and the folded convolutions run LibTorch's (Fold's primitives are dropped).
  void prepare_onednn(State& state, Block& block) const {
    using detail::OneDnnConv2d;
    const auto found = layout.stages(block);
    const auto branch = layout.downsample.find(block);
    bool grouped = branch.conv != nullptr && branch.conv->options.groups() > 1;
    for (const auto& stage : found.stages) grouped = grouped || stage.conv->options.groups() > 1;
    const auto where = grouped ? OneDnnConv2d::Layout::input : OneDnnConv2d::Layout::chosen;
    const auto make = [&](const Fold::State& folded, const ConvStage& stage,
                          std::optional<detail::OneDnnEltwise> eltwise, bool sum) {
      return std::make_shared<const OneDnnConv2d>(
          folded.weight, folded.bias, folded.stride, folded.padding, folded.dilation,
          stage.conv->options.groups(), eltwise, sum, where, folded.onednn->reordered());
    };
    state.fused.resize(state.stages.size());
    state.fused_activation.resize(state.stages.size());
    for (std::size_t i = 0; i < state.stages.size() && i < found.stages.size(); ++i) {
      state.fused_activation[i] = found.stages[i].activation_name;
      const auto eltwise = detail::onednn_eltwise_named(found.stages[i].activation_name);
      // Without a post-op, in the layout of its choice, it is one of Fold::run's own paths.
      if (state.stages[i].onednn && (eltwise || grouped)) {
        state.fused[i] = make(state.stages[i], found.stages[i], eltwise, /*sum=*/false);
      }
    }
    if (layout.adds_input(block) && found.stages.size() == state.stages.size() &&
        !found.stages.empty() && !found.stages.back().activation && state.stages.back().onednn) {
      state.last_with_sum =
          make(state.stages.back(), found.stages.back(),
               layout.relu_after_add
                   ? std::optional<detail::OneDnnEltwise>({dnnl::algorithm::eltwise_relu})
                   : std::nullopt,
               /*sum=*/true);
    }
    if (grouped) {
      for (auto& stage : state.stages) stage.onednn = nullptr;
      if (state.downsample) state.downsample->onednn = nullptr;
    }
  }

  /// The last convolution of `h` with the block's residual added by its sum post-op (and the ReLU
  /// after), where the state has it and the block adds its input now; else undefined, and the
  /// caller computes the block as declared. `input` is overwritten only where `input_owned`.
  torch::Tensor add_in_last(const State& s, Block& block, torch::nn::Conv2dImpl& conv,
                            const torch::Tensor& h, const torch::Tensor& input,
                            bool input_owned) const {
    if (!s.last_with_sum || !layout.adds_input(block) || !h.is_mkldnn() ||
        h.scalar_type() != dtype() || !Fold::fits_prepacked(s.stages.back(), conv, h)) {
      return {};
    }
    torch::Tensor residual = input;
    bool owned = input_owned && !h.is_same(input);  // a one-stage block reads it too
    if (s.downsample) {
      residual = Fold::run(*s.downsample, *layout.downsample.find(block).conv, input, nullptr);
      owned = true;
    }
    // A residual of other sizes: the add as declared raises ATen's error.
    if (!residual.is_mkldnn() || residual.scalar_type() != dtype() ||
        residual.sizes() != c10::IntArrayRef(s.last_with_sum->output_sizes(h))) {
      return {};
    }
    using Path = BlockedConvPath;
    using Algorithm = detail::OneDnnConv2d::Algorithm;
    const auto& last = s.stages.back();
    const auto key = detail::blocked_conv_key(
        last.weight.sizes(), last.stride, last.padding, last.dilation, conv.options.groups(), h,
        /*variant=*/1 + 5 * int64_t{s.last_with_sum->keeps(h)});
    // The block as declared is offered first: the post-op is kept only where it is faster.
    std::vector<Path> offered{Path::blocked};
    if (s.last_with_sum->offers(h, Algorithm::direct)) offered.push_back(Path::onednn);
    if (s.last_with_sum->offers(h, Algorithm::winograd)) offered.push_back(Path::winograd);
    return detail::run_blocked_conv(
        key, offered,
        [&](Path path, bool measuring) {
          if (path == Path::blocked) {
            auto output = Fold::run(s.stages.back(), conv, h, nullptr);
            output.add_(residual);
            return layout.relu_after_add ? output.relu_() : output;
          }
          // Measured runs may not overwrite the residual: the kept run adds it.
          return (*s.last_with_sum)(
              h, path == Path::winograd ? Algorithm::winograd : Algorithm::direct, residual,
              owned && !measuring);
        },
        [&](Path lost) { detail::release_lost(*s.last_with_sum, h, lost); });
  }
#endif
};

/// Registers kernel `name` for one-member chains on blocks of type Block (a residual block's
/// path, e.g. "layer*.*"), eval mode only (BatchNorm folds only with running statistics).
/// Also registers `name + ".bf16"`, the block in bfloat16 on the CPU.
template <typename Block>
void register_residual_block(const std::string& name, ResidualBlockLayout<Block> layout) {
  KernelOptions options{{c10::DeviceType::CPU, c10::DeviceType::CUDA}};
  options.blocked_layout = true;
  register_kernel(name, ResidualBlock<Block>{layout, false}, options);
  register_kernel(name + detail::kBFloat16Suffix, ResidualBlock<Block>{std::move(layout), true},
                  detail::bfloat16_options(/*blocked_layout=*/true));
}

}  // namespace fusion::kernels
