// A kernel for a whole residual block (torchvision's BasicBlock and Bottleneck), for the user's
// own block type, described by a layout: its convolutions, each followed by a BatchNorm, and its
// downsample branch.
//
//   namespace fk = fusion::kernels;
//   fk::register_residual_block("my.basic_block",
//       fk::residual_block(fk::conv_bn(&BasicBlockImpl::conv1, &BasicBlockImpl::bn1),
//                          fk::conv_bn(&BasicBlockImpl::conv2, &BasicBlockImpl::bn2),
//                          fk::downsample(&BasicBlockImpl::downsample)));
//
// The block it computes, as torchvision's: relu(bn(conv(h))) for each stage but the last, then
// bn(conv(h)) + identity, where identity is the downsample branch (a Conv2d -> BatchNorm2d
// Sequential, empty: the input itself), then relu. Every BatchNorm is folded into the convolution
// before it (float64, rounded once; copies of the convolution weights, in `report`'s state bytes).
// On the CPU, for float32, the whole block runs in oneDNN's blocked layout: the input is reordered
// once, the activations stay blocked from one convolution to the next, the residual add and the
// ReLUs run in place on them, and the result is reordered once (kept blocked where the caller
// takes that: fusion::Sequential between two such kernels, detail/blocked_layout.hpp). Elsewhere
// (CUDA, other dtypes) the same folded arithmetic runs densely. Eval mode without gradients;
// otherwise the block's own forward runs. register_residual_block also registers `name + ".bf16"`,
// the block in bfloat16 (conv_folding.hpp says how; kernels/bfloat16.hpp): blocked activations in
// bfloat16 from the input's reorder to the result's.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
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
#include "fusion/kernels/conv_folding.hpp"
#include "fusion/kernels/layouts.hpp"

namespace fusion::kernels {

/// Where a block keeps one convolution and the BatchNorm after it.
template <typename Block>
struct ConvBatchNormLayout {
  std::function<torch::nn::Conv2dImpl&(Block&)> conv;
  std::function<torch::nn::BatchNorm2dImpl&(Block&)> bn;
};

/// Where a block keeps its downsample branch: the Conv2d and BatchNorm2d, or none (nullptrs: the
/// branch is empty, the identity is the input); `why` says what does not fit, empty if it does.
template <typename Block>
struct DownsampleLayout {
  struct Found {
    torch::nn::Conv2dImpl* conv = nullptr;
    torch::nn::BatchNorm2dImpl* bn = nullptr;
    const torch::nn::Module* module = nullptr;  // the branch, for messages
    std::string why;
  };
  std::function<Found(Block&)> find;
};

/// A residual block: stages (a ReLU after each but the last), then the downsample branch.
template <typename Block>
struct ResidualBlockLayout {
  std::vector<ConvBatchNormLayout<Block>> stages;
  DownsampleLayout<Block> downsample;
};

}  // namespace fusion::kernels

namespace fusion::detail {
template <typename Block, typename Member>
auto& module_member(Block& block, Member Block::*member) {
  return *(block.*member);  // a holder, a fusion::Slot or a shared_ptr: the module
}
}  // namespace fusion::detail

namespace fusion::kernels {

/// A convolution member (torch::nn::Conv2d, a fusion::Slot of one) and its BatchNorm2d member.
template <typename Block, typename C, typename B>
ConvBatchNormLayout<Block> conv_bn(C Block::*conv, B Block::*bn) {
  using ConvModule =
      std::remove_reference_t<decltype(detail::module_member(std::declval<Block&>(), conv))>;
  using BatchNormModule =
      std::remove_reference_t<decltype(detail::module_member(std::declval<Block&>(), bn))>;
  static_assert(std::is_same_v<ConvModule, torch::nn::Conv2dImpl>,
                "fusion::kernels::conv_bn: the convolution member must hold a torch::nn::Conv2d");
  static_assert(
      std::is_same_v<BatchNormModule, torch::nn::BatchNorm2dImpl>,
      "fusion::kernels::conv_bn: the BatchNorm member must hold a torch::nn::BatchNorm2d");
  return {
      [conv](Block& block) -> torch::nn::Conv2dImpl& { return detail::module_member(block, conv); },
      [bn](Block& block) -> torch::nn::BatchNorm2dImpl& {
        return detail::module_member(block, bn);
      }};
}

/// A downsample member: a fusion::Sequential or torch::nn::Sequential of a Conv2d and a
/// BatchNorm2d, or empty (no branch: the identity is the block's input).
template <typename Block, typename S>
DownsampleLayout<Block> downsample(S Block::*member) {
  return {[member](Block& block) {
    typename DownsampleLayout<Block>::Found found;
    const auto& holder = block.*member;
    if (holder.is_empty() || holder->size() == 0) return found;
    found.module = holder.get();
    found.conv = dynamic_cast<torch::nn::Conv2dImpl*>(holder->ptr(0).get());
    found.bn = holder->size() == 2 ? dynamic_cast<torch::nn::BatchNorm2dImpl*>(holder->ptr(1).get())
                                   : nullptr;
    if (found.conv == nullptr || found.bn == nullptr) {
      found.why = fmt::format("has {} entries; a downsample branch must be Conv2d, BatchNorm2d",
                              holder->size());
    }
    return found;
  }};
}

/// No downsample branch in any block of this type.
template <typename Block>
DownsampleLayout<Block> no_downsample() {
  return {[](Block&) { return typename DownsampleLayout<Block>::Found{}; }};
}

/// The stages in order, then optionally the downsample branch.
template <typename Block, typename... More>
ResidualBlockLayout<Block> residual_block(ConvBatchNormLayout<Block> first, More... more) {
  ResidualBlockLayout<Block> layout{{std::move(first)}, no_downsample<Block>()};
  const auto add = [&layout](auto part) {
    if constexpr (std::is_same_v<decltype(part), ConvBatchNormLayout<Block>>) {
      layout.stages.push_back(std::move(part));
    } else {
      static_assert(std::is_same_v<decltype(part), DownsampleLayout<Block>>,
                    "fusion::kernels::residual_block: pass conv_bn(...) stages, then optionally "
                    "downsample(...)");
      layout.downsample = std::move(part);
    }
  };
  (add(std::move(more)), ...);
  return layout;
}

/// The kernel register_residual_block registers.
template <typename Block>
struct ResidualBlock {
  using Fold = ConvBatchNorm<2, torch::nn::Conv2dImpl, torch::nn::BatchNorm2dImpl>;
  ResidualBlockLayout<Block> layout;
  bool bfloat16 = false;  // the ".bf16" variant

  struct State {
    std::vector<Fold::State> stages;
    std::shared_ptr<Fold::State> downsample;  // null: the identity
    std::vector<torch::Tensor> tensors() const {
      std::vector<torch::Tensor> all;
      for (const auto& s : stages) all.insert(all.end(), {s.weight, s.bias});
      if (downsample) all.insert(all.end(), {downsample->weight, downsample->bias});
      return all;
    }
  };

  State prepare(Block& block) const {
    State state;
    for (const auto& stage : layout.stages) {
      state.stages.push_back(Fold::fold(stage.conv(block), stage.bn(block), false, bfloat16));
    }
    const auto branch = layout.downsample.find(block);
    if (branch.conv != nullptr) {
      state.downsample =
          std::make_shared<Fold::State>(Fold::fold(*branch.conv, *branch.bn, false, bfloat16));
    }
    return state;
  }

  bool applies(Block& block) const {
    if (bfloat16 && !detail::bfloat16_enabled()) return false;
    for (const auto& stage : layout.stages) {
      if (!detail::has_running_stats(stage.bn(block))) return false;
    }
    const auto branch = layout.downsample.find(block);
    return branch.bn == nullptr || detail::has_running_stats(*branch.bn);
  }

  /// Checked when attached: each BatchNorm takes its convolution's channels, each convolution
  /// the channels before it, and the identity has the last convolution's channels.
  std::string misfit(Block& block) const {
    int64_t channels = -1;  // the channels the previous stage gives
    int64_t first_in = -1, stride = 1;
    for (const auto& stage : layout.stages) {
      auto& conv = stage.conv(block);
      auto& bn = stage.bn(block);
      const int64_t in = conv.options.in_channels(), out = conv.options.out_channels();
      if (channels >= 0 && in != channels) {
        return fmt::format("member '{}': takes {} channels, the stage before gives {}",
                           child_name(block, &conv), in, channels);
      }
      if (bn.options.num_features() != out) {
        return fmt::format("member '{}': normalises {} channels, its convolution gives {}",
                           child_name(block, &bn), bn.options.num_features(), out);
      }
      if (first_in < 0) first_in = in;
      for (int64_t s : *conv.options.stride()) stride = std::max(stride, s);
      channels = out;
    }
    const auto branch = layout.downsample.find(block);
    const std::string name = child_name(block, branch.module);
    if (!branch.why.empty()) return fmt::format("member '{}': {}", name, branch.why);
    if (branch.conv == nullptr) {
      if (first_in != channels || stride != 1) {
        return fmt::format(
            "the block has no downsample branch, but its stages take {} channels and give {} "
            "(stride {}): the identity would not fit",
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
    const torch::Tensor input =
        onednn ? detail::blocked(x, bfloat16 ? torch::kBFloat16 : torch::kFloat) : x;
    torch::Tensor h = input;
    const std::size_t last = s.stages.size() - 1;
    for (std::size_t i = 0; i < last; ++i) {
      h = Fold::run(s.stages[i], layout.stages[i].conv(block), h, nullptr);
      torch::relu_(h);
    }
    h = Fold::run(s.stages[last], layout.stages[last].conv(block), h, nullptr);
    if (s.downsample) {
      h.add_(Fold::run(*s.downsample, *layout.downsample.find(block).conv, input, nullptr));
    } else {
      h.add_(input);
    }
    torch::relu_(h);
    if (keep_blocked) detail::BlockedHandOff::gave_blocked();
    return x.is_mkldnn() || keep_blocked || !onednn ? h : h.to_dense(torch::kFloat);
  }
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
