// How a block kernel (kernels/residual_block.hpp) finds the parts of the user's own block type:
// its convolution stages (a Conv2d, the BatchNorm2d after it, the activation after that), whether
// it adds its input to the result, through which downsample branch, and whether a ReLU follows.
// Two shapes, checked at compile time where the members are named:
//
//   fk::residual_block(fk::conv_bn(&B::conv1, &B::bn1), fk::conv_bn(&B::conv2, &B::bn2),
//                      fk::downsample(&B::downsample))
//       torchvision's BasicBlock and Bottleneck: a ReLU after each stage but the last, the input
//       (or the downsample branch) added, then a ReLU.
//   fk::conv_block(fk::sequential_stages(&B::conv), fk::add_input_if(&B::use_res_connect))
//   fk::conv_block(fk::conv_bn(&C::conv, &C::bn, &C::relu6))
//       the stages as declared, each with its own activation or none; the input added where
//       declared (always, or where a member flag says); no ReLU after. torchvision's
//       InvertedResidual (MobileNetV2) and Conv2dNormActivation.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/types.h>

#include "fusion/kernels/conv_folding.hpp"
#include "fusion/kernels/layouts.hpp"

namespace fusion::kernels {

/// One stage as found in a block: its convolution, the BatchNorm after it, and the activation
/// after that, applied in place to the stage's fresh result (empty: none), with the name of what
/// it computes as in the kernel names ("relu", "relu6", ...: detail/epilogue.hpp), for kernels
/// that fuse it; "" where none or unnamed (then it runs as `activation`).
struct ConvStage {
  torch::nn::Conv2dImpl* conv = nullptr;
  torch::nn::BatchNorm2dImpl* bn = nullptr;
  std::function<torch::Tensor(torch::Tensor)> activation;
  const char* activation_name = "";
};

/// A block's stages, or why they cannot be found (then `why` names the module that does not fit).
struct FoundStages {
  std::vector<ConvStage> stages;
  std::string why;
};

/// Where a block keeps its downsample branch: the Conv2d and BatchNorm2d, or none (nullptrs: the
/// branch is empty, the identity is the input); `why` says what does not fit, empty if it does.
template <typename Block>
struct DownsampleLayout {
  using block_type = Block;
  struct Found {
    torch::nn::Conv2dImpl* conv = nullptr;
    torch::nn::BatchNorm2dImpl* bn = nullptr;
    const torch::nn::Module* module = nullptr;  // the branch, for messages
    std::string why;
  };
  std::function<Found(Block&)> find;
};

/// A block: its stages, whether it adds its input (through the downsample branch, where there is
/// one), and whether a ReLU follows the add.
template <typename Block>
struct ResidualBlockLayout {
  std::function<FoundStages(Block&)> stages;
  DownsampleLayout<Block> downsample;
  std::function<bool(Block&)> adds_input;
  bool relu_after_add = true;
};

/// Where a block keeps one convolution, the BatchNorm after it and, optionally, the activation
/// after that (conv_bn's third member) and its name.
template <typename Block>
struct ConvBatchNormLayout {
  using block_type = Block;
  std::function<torch::nn::Conv2dImpl&(Block&)> conv;
  std::function<torch::nn::BatchNorm2dImpl&(Block&)> bn;
  std::function<std::function<torch::Tensor(torch::Tensor)>(Block&)> activation;  // empty: none
  const char* activation_name = "";
};

/// Stages found at run time, in a Sequential member (sequential_stages).
template <typename Block>
struct SequentialStagesLayout {
  using block_type = Block;
  std::function<FoundStages(Block&)> find;
};

/// The input added where the flag member is true (add_input_if) or always (add_input).
template <typename Block>
struct AddInputLayout {
  using block_type = Block;
  std::function<bool(Block&)> adds;
};

}  // namespace fusion::kernels

namespace fusion::detail {

template <typename Block, typename Member>
auto& module_member(Block& block, Member Block::*member) {
  return *(block.*member);  // a holder, a fusion::Slot or a shared_ptr: the module
}

/// Sets `stage`'s activation to `module`'s applied in place (detail/epilogue.hpp), if it is one of
/// the activation types the convolution kernels take; else leaves it empty.
template <typename... Activations>
void find_activation(kernels::ConvStage& stage, torch::nn::Module& module,
                     std::tuple<Activations...>* /*types*/) {
  const auto try_one = [&](auto* typed) {
    using ActivationModule = std::remove_pointer_t<decltype(typed)>;
    if (stage.activation || typed == nullptr) return;
    stage.activation = [typed](torch::Tensor t) {
      return Epilogue<ActivationModule>::apply(std::move(t), typed);
    };
    stage.activation_name = Epilogue<ActivationModule>::name;
  };
  (try_one(dynamic_cast<Activations*>(&module)), ...);
}

/// The leaves of `module` in registration order (a module without children is its own leaf), as
/// torchvision's nn.Sequential blocks call them.
inline void leaves(const std::shared_ptr<torch::nn::Module>& module,
                   std::vector<std::shared_ptr<torch::nn::Module>>& out) {
  const auto children = module->children();
  if (children.empty()) out.push_back(module);
  for (const auto& child : children) leaves(child, out);
}

/// Groups `modules` (below `owner`, for messages) into stages: Conv2d, BatchNorm2d, then optionally
/// an activation.
inline kernels::FoundStages group_stages(
    const torch::nn::Module& owner,
    const std::vector<std::shared_ptr<torch::nn::Module>>& modules) {
  kernels::FoundStages found;
  ConvActivations* activations = nullptr;
  for (std::size_t i = 0; i < modules.size(); ++i) {
    auto* conv = dynamic_cast<torch::nn::Conv2dImpl*>(modules[i].get());
    auto* bn = i + 1 < modules.size()
                   ? dynamic_cast<torch::nn::BatchNorm2dImpl*>(modules[i + 1].get())
                   : nullptr;
    if (conv == nullptr || bn == nullptr) {
      found.why = fmt::format(
          "member '{}' ({}) is not a Conv2d followed by a BatchNorm2d: a stage is Conv2d, "
          "BatchNorm2d, then optionally one of ReLU, ReLU6, SiLU, Hardswish, LeakyReLU, GELU",
          kernels::child_name(owner, modules[i].get()), modules[i]->name());
      return found;
    }
    kernels::ConvStage stage{conv, bn, {}};
    if (i + 2 < modules.size()) find_activation(stage, *modules[i + 2], activations);
    i += stage.activation ? 2 : 1;
    found.stages.push_back(std::move(stage));
  }
  if (found.stages.empty()) found.why = "no Conv2d -> BatchNorm2d stage";
  return found;
}

/// The stage a conv_bn(...) part declares, in `block`.
template <typename Block>
kernels::ConvStage stage_of(const kernels::ConvBatchNormLayout<Block>& part, Block& block) {
  return {&part.conv(block), &part.bn(block),
          part.activation ? part.activation(block) : std::function<torch::Tensor(torch::Tensor)>(),
          part.activation_name};
}

}  // namespace fusion::detail

namespace fusion::kernels {

/// A convolution member (torch::nn::Conv2d, a fusion::Slot of one) and its BatchNorm2d member,
/// optionally the activation member after them (ReLU, ReLU6, SiLU, fusion::Hardswish, LeakyReLU,
/// GELU; its options are read on every call).
template <typename Block, typename C, typename B, typename... A>
ConvBatchNormLayout<Block> conv_bn(C Block::*conv, B Block::*bn, A Block::*... activation) {
  static_assert(sizeof...(A) <= 1, "fusion::kernels::conv_bn: at most one activation member");
  using ConvModule =
      std::remove_reference_t<decltype(detail::module_member(std::declval<Block&>(), conv))>;
  using BatchNormModule =
      std::remove_reference_t<decltype(detail::module_member(std::declval<Block&>(), bn))>;
  static_assert(std::is_same_v<ConvModule, torch::nn::Conv2dImpl>,
                "fusion::kernels::conv_bn: the convolution member must hold a torch::nn::Conv2d");
  static_assert(
      std::is_same_v<BatchNormModule, torch::nn::BatchNorm2dImpl>,
      "fusion::kernels::conv_bn: the BatchNorm member must hold a torch::nn::BatchNorm2d");
  ConvBatchNormLayout<Block> layout{
      [conv](Block& block) -> torch::nn::Conv2dImpl& { return detail::module_member(block, conv); },
      [bn](Block& block) -> torch::nn::BatchNorm2dImpl& {
        return detail::module_member(block, bn);
      },
      {}};
  if constexpr (sizeof...(A) == 1) {
    using ActivationModule = std::remove_reference_t<decltype(detail::module_member(
        std::declval<Block&>(), activation...))>;
    // Compiles only for the activation types of detail/epilogue.hpp.
    using Epilogue = detail::Epilogue<ActivationModule>;
    layout.activation = [activation...](Block& block) {
      auto* typed = &detail::module_member(block, activation...);
      return std::function<torch::Tensor(torch::Tensor)>(
          [typed](torch::Tensor t) { return Epilogue::apply(t, typed); });
    };
    layout.activation_name = Epilogue::name;
  }
  return layout;
}

/// A Sequential member (fusion::Sequential or torch::nn::Sequential) whose modules, in order and
/// flattened (an entry with children counts as its children: torchvision's Conv2dNormActivation),
/// are stages: Conv2d, BatchNorm2d, then optionally one activation module.
template <typename Block, typename S>
SequentialStagesLayout<Block> sequential_stages(S Block::*member) {
  return {[member](Block& block) {
    const auto& holder = block.*member;
    if (holder.is_empty()) return FoundStages{{}, "its Sequential member is empty (nullptr)"};
    std::vector<std::shared_ptr<torch::nn::Module>> modules;
    for (std::size_t i = 0; i < holder->size(); ++i) detail::leaves(holder->ptr(i), modules);
    return detail::group_stages(block, modules);
  }};
}

/// The block adds its input to its result where `flag` is true (torchvision's InvertedResidual:
/// `use_res_connect`).
template <typename Block>
AddInputLayout<Block> add_input_if(bool Block::*flag) {
  return {[flag](Block& block) { return block.*flag; }};
}
/// The block always adds its input to its result.
template <typename Block>
AddInputLayout<Block> add_input() {
  return {[](Block&) { return true; }};
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

/// torchvision's BasicBlock and Bottleneck: the stages in order (a ReLU after each but the last,
/// unless conv_bn names another activation), then optionally the downsample branch; the input (or
/// the branch) added to the last stage's result, then a ReLU.
template <typename Block, typename... More>
ResidualBlockLayout<Block> residual_block(ConvBatchNormLayout<Block> first, More... more) {
  std::vector<ConvBatchNormLayout<Block>> parts{std::move(first)};
  ResidualBlockLayout<Block> layout{{}, no_downsample<Block>(), add_input<Block>().adds, true};
  const auto add = [&](auto part) {
    if constexpr (std::is_same_v<decltype(part), ConvBatchNormLayout<Block>>) {
      parts.push_back(std::move(part));
    } else {
      static_assert(std::is_same_v<decltype(part), DownsampleLayout<Block>>,
                    "fusion::kernels::residual_block: pass conv_bn(...) stages, then optionally "
                    "downsample(...)");
      layout.downsample = std::move(part);
    }
  };
  (add(std::move(more)), ...);
  layout.stages = [parts](Block& block) {
    FoundStages found;
    for (std::size_t i = 0; i < parts.size(); ++i) {
      found.stages.push_back(detail::stage_of(parts[i], block));
      if (!found.stages.back().activation && i + 1 < parts.size()) {
        found.stages.back().activation = [](torch::Tensor t) { return t.relu_(); };
        found.stages.back().activation_name = detail::Epilogue<torch::nn::ReLUImpl>::name;
      }
    }
    return found;
  };
  return layout;
}

/// A block of stages as declared (conv_bn(...) members and sequential_stages(...), in order; each
/// stage's activation as declared, or none), optionally adding its input (add_input_if(...),
/// add_input(); through downsample(...) where given); no ReLU after the add.
template <typename First, typename... Parts, typename Block = typename First::block_type>
ResidualBlockLayout<Block> conv_block(First first, Parts... parts) {
  std::vector<std::function<FoundStages(Block&)>> finders;
  ResidualBlockLayout<Block> layout{
      {}, no_downsample<Block>(), [](Block&) { return false; }, false};
  const auto add = [&](auto part) {
    using Part = decltype(part);
    if constexpr (std::is_same_v<Part, ConvBatchNormLayout<Block>>) {
      finders.push_back([part](Block& block) {
        return FoundStages{{detail::stage_of(part, block)}, {}};
      });
    } else if constexpr (std::is_same_v<Part, SequentialStagesLayout<Block>>) {
      finders.push_back(part.find);
    } else if constexpr (std::is_same_v<Part, AddInputLayout<Block>>) {
      layout.adds_input = part.adds;
    } else {
      static_assert(std::is_same_v<Part, DownsampleLayout<Block>>,
                    "fusion::kernels::conv_block: pass conv_bn(...) and sequential_stages(...) "
                    "stages, optionally add_input_if(...) or add_input(), and downsample(...)");
      layout.downsample = std::move(part);
    }
  };
  add(std::move(first));
  (add(std::move(parts)), ...);
  layout.stages = [finders](Block& block) {
    FoundStages all;
    for (const auto& find : finders) {
      auto found = find(block);
      if (!found.why.empty()) return found;
      for (auto& stage : found.stages) all.stages.push_back(std::move(stage));
    }
    return all;
  };
  return layout;
}

}  // namespace fusion::kernels
