// The library's transformer kernels, for the user's own module types described by layouts
// (fusion/kernels/layouts.hpp):
//
//   register_norm_mlp          norm -> MLP: the norm in one pass, gate and up as one GEMM (gated)
//                              or fc (plain), the activation [times up] in one pass, then down.
//   register_norm_projections  norm -> attention: the norm, the attention's projections of its
//                              input (q, k, v; or GPT-2's packed c_attn) as one GEMM, then the
//                              attention's own code after its projections (a member function the
//                              model's forward also calls), then its output projection.
//   register_norm_lm_head      final norm -> lm_head (tied or untied).
//
//   namespace fk = fusion::kernels;
//   fk::register_norm_mlp("my.norm_mlp", fk::rms_norm(&MyRMSNormImpl::weight, &MyRMSNormImpl::eps),
//                         fk::gated_mlp(&MyMLPImpl::gate_proj, &MyMLPImpl::up_proj,
//                                       &MyMLPImpl::down_proj, fk::Activation::silu));
//
// Each registers two kernels: `name`, which keeps no second copy of any weight (the projections
// of one input are moved into one storage and the module's parameters re-pointed at views of it,
// so the model, its optimizer, torch::save and the kernel share the same bytes), and
// `name.folded`, which copies the projections' weights with the norm's scale (and shift) folded
// in: one multiply less per call, one copy of those weights more (report shows its bytes).
// Both run on the CPU (fast paths for float32: fusion/kernels/primitives.hpp) and on CUDA
// (ATen's ops), in eval mode without gradients; otherwise the chain replays. Attaching one
// checks the shapes, dtypes and devices of every tensor it reads, naming the member and the
// parameter that does not fit.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/modules/linear.h>

#include "fusion/detail/projection_packing.hpp"
#include "fusion/kernel.hpp"
#include "fusion/kernels/layouts.hpp"

namespace fusion::detail {
template <typename T>
struct identity {  // std::type_identity (C++20): keeps a parameter out of deduction
  using type = T;
};
}  // namespace fusion::detail

namespace fusion::kernels {

/// The scale and shift of the norm that a folded kernel moves into its GEMM.
template <typename Norm>
std::pair<at::Tensor, at::Tensor> norm_affine(const NormLayout<Norm>& layout, Norm& norm) {
  return {layout.weight(norm), layout.bias ? layout.bias(norm) : at::Tensor()};
}

/// norm -> MLP; see register_norm_mlp.
template <typename Norm, typename MLP>
struct NormMLP {
  NormLayout<Norm> norm_layout;
  MLPLayout<MLP> mlp_layout;
  bool fold = false;

  struct State {
    detail::PackedProjections first;  // gate and up, or fc
    std::vector<at::Tensor> tensors() const { return first.tensors(); }
  };

  std::vector<ProjectionLayout<MLP>> first_parts() const {
    if (mlp_layout.gate) return {*mlp_layout.gate, mlp_layout.up};
    return {mlp_layout.up};
  }

  State prepare(Norm& norm, MLP& mlp) const {
    std::vector<Projection> parts;
    for (const auto& part : first_parts()) parts.push_back(part.get(mlp));
    const auto [scale, shift] = norm_affine(norm_layout, norm);
    return {detail::pack(std::move(parts), fold, scale, shift)};
  }

  std::string misfit(Norm& norm, MLP& mlp) const {
    const auto parts = first_parts();
    auto why = detail::projections_misfit(norm_layout, norm, mlp, parts);
    if (!why.empty()) return why;
    const auto first = parts[0].get(mlp);
    if (mlp_layout.gate &&
        detail::out_features(first) != detail::out_features(mlp_layout.up.get(mlp))) {
      return fmt::format("the gate and up projections give {} and {} features",
                         detail::out_features(first), detail::out_features(mlp_layout.up.get(mlp)));
    }
    const auto down = mlp_layout.down.get(mlp);
    if (!down.weight.defined() || down.weight.dim() != 2 ||
        detail::in_features(down) != detail::out_features(mlp_layout.up.get(mlp))) {
      return fmt::format(
          "member '{}': parameter 'weight' has shape {}, which does not take the {} "
          "features of the layer before",
          child_name(mlp, mlp_layout.down.module(mlp)),
          down.weight.defined() ? down.weight.sizes() : at::IntArrayRef{},
          detail::out_features(mlp_layout.up.get(mlp)));
    }
    return {};
  }

  at::Tensor operator()(const State& state, Norm& norm, MLP& mlp, const at::Tensor& x) const {
    const auto normed = detail::normalise(x, norm_layout, norm, fold);
    const auto first = detail::project_all(normed, state.first);
    const auto hidden = mlp_layout.gate ? activation_mul(first[0], first[1], mlp_layout.activation)
                                        : activate(first[0], mlp_layout.activation);
    const auto down = mlp_layout.down.get(mlp);
    const auto out = project(hidden, down.weight, down.bias, down.layout);
    auto sizes = x.sizes().vec();
    sizes.back() = out.size(-1);
    return out.view(sizes);
  }
};

/// norm -> attention; see register_norm_projections. `Rest...`: the attention's parameters
/// after its input, passed through to `after`.
template <typename Norm, typename Attention, typename... Rest>
struct NormProjections {
  using After = at::Tensor (Attention::*)(const std::vector<at::Tensor>&, const at::Tensor&,
                                          Rest...);
  NormLayout<Norm> norm_layout;
  ProjectionGroup<Attention> group;
  After after;
  std::optional<ProjectionLayout<Attention>> output;
  bool fold = false;

  struct State {
    detail::PackedProjections packed;
    std::vector<at::Tensor> tensors() const { return packed.tensors(); }
  };

  State prepare(Norm& norm, Attention& attention) const {
    std::vector<Projection> parts;
    for (const auto& part : group.parts) parts.push_back(part.get(attention));
    const auto [scale, shift] = norm_affine(norm_layout, norm);
    return {detail::pack(std::move(parts), fold, scale, shift)};
  }

  std::string misfit(Norm& norm, Attention& attention) const {
    return detail::projections_misfit(norm_layout, norm, attention, group.parts);
  }

  at::Tensor operator()(const State& state, Norm& norm, Attention& attention, const at::Tensor& x,
                        Rest... rest) const {
    const auto normed = detail::normalise(x, norm_layout, norm, fold);
    auto projected = detail::project_all(normed, state.packed);
    for (auto& p : projected) {
      auto sizes = x.sizes().vec();
      sizes.back() = p.size(-1);
      p = p.view(sizes);
    }
    auto result = (attention.*after)(projected, x, std::forward<Rest>(rest)...);
    if (!output) return result;
    const auto o = output->get(attention);
    return project(result, o.weight, o.bias, o.layout);
  }
};

/// final norm -> lm_head; see register_norm_lm_head.
template <typename Norm, typename Head>
struct NormLMHead {
  NormLayout<Norm> norm_layout;
  ProjectionLayout<Head> head_layout;
  bool fold = false;

  struct State {
    detail::PackedProjections folded;  // empty unless folded: the head's weight is read in place
    std::vector<at::Tensor> tensors() const { return folded.tensors(); }
  };

  State prepare(Norm& norm, Head& head) const {
    if (!fold) return {};
    const auto [scale, shift] = norm_affine(norm_layout, norm);
    return {detail::pack({head_layout.get(head)}, true, scale, shift)};
  }

  std::string misfit(Norm& norm, Head& head) const {
    return detail::projections_misfit(norm_layout, norm, head, {head_layout});
  }

  at::Tensor operator()(const State& state, Norm& norm, Head& head, const at::Tensor& x) const {
    const auto normed = detail::normalise(x, norm_layout, norm, fold);
    const auto out = fold ? detail::project_all(normed, state.folded)[0] : [&] {
      const auto p = head_layout.get(head);
      return project(normed, p.weight, p.bias, p.layout);
    }();
    auto sizes = x.sizes().vec();
    sizes.back() = out.size(-1);
    return out.view(sizes);
  }
};

/// The device types the transformer kernels are registered for by default.
inline KernelOptions transformer_kernel_options() {
  return KernelOptions{{c10::DeviceType::CPU, c10::DeviceType::CUDA}};
}

/// Registers kernels `name` and `name.folded` for chains norm (type Norm) -> MLP (type MLP).
template <typename Norm, typename MLP>
void register_norm_mlp(const std::string& name, NormLayout<Norm> norm, MLPLayout<MLP> mlp,
                       KernelOptions options = transformer_kernel_options()) {
  register_kernel(name, NormMLP<Norm, MLP>{norm, mlp, false}, options);
  register_kernel(name + ".folded", NormMLP<Norm, MLP>{norm, mlp, true}, options);
}

/// The same for torch::nn::LayerNorm, whose layout needs no declaring.
template <typename MLP>
void register_norm_mlp(const std::string& name, MLPLayout<MLP> mlp,
                       KernelOptions options = transformer_kernel_options()) {
  register_norm_mlp(name, layer_norm(), std::move(mlp), std::move(options));
}

/// Registers kernels `name` and `name.folded` for chains norm (type Norm) -> attention (type
/// Attention): `group` names the attention's projections of its input, `after` is its own code
/// after them, a member function `at::Tensor after(const std::vector<at::Tensor>& projected,
/// const at::Tensor& input, Rest... rest)` taking the projections' outputs (shaped like the
/// input, each with its own last size), the attention's input and the rest of its forward's
/// parameters; `output`, when given, is the projection applied to after's result (o_proj).
/// The attention's forward is then best written as output(after({q(x), k(x), v(x)}, x, rest...)),
/// so that both share the code.
template <typename Norm, typename Attention, typename... Rest>
void register_norm_projections(
    const std::string& name, NormLayout<Norm> norm, ProjectionGroup<Attention> group,
    at::Tensor (Attention::*after)(const std::vector<at::Tensor>&, const at::Tensor&, Rest...),
    typename detail::identity<std::optional<ProjectionLayout<Attention>>>::type output =
        std::nullopt,
    KernelOptions options = transformer_kernel_options()) {
  using Kernel = NormProjections<Norm, Attention, Rest...>;
  register_kernel(name, Kernel{norm, group, after, output, false}, options);
  register_kernel(name + ".folded", Kernel{norm, group, after, output, true}, options);
}

/// Registers kernels `name` and `name.folded` for chains norm (type Norm) -> head (type Head,
/// itself the projection unless `head` says otherwise: torch::nn::LinearImpl by default).
template <typename Norm, typename Head = torch::nn::LinearImpl>
void register_norm_lm_head(const std::string& name, NormLayout<Norm> norm,
                           ProjectionLayout<Head> head = itself<Head>(),
                           KernelOptions options = transformer_kernel_options()) {
  register_kernel(name, NormLMHead<Norm, Head>{norm, head, false}, options);
  register_kernel(name + ".folded", NormLMHead<Norm, Head>{norm, head, true}, options);
}

}  // namespace fusion::kernels
