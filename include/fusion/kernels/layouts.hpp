// Layouts: how a user's own norm, MLP and attention modules hold the tensors a transformer kernel
// needs, declared once with member pointers and checked at compile time, so that the library's
// kernels (fusion/kernels/transformer.hpp) attach to module types they have never seen:
//
//   namespace fk = fusion::kernels;
//   fk::rms_norm(&MyRMSNormImpl::weight, &MyRMSNormImpl::eps)
//   fk::gated_mlp(&MyMLPImpl::gate_proj, &MyMLPImpl::up_proj, &MyMLPImpl::down_proj,
//                 fk::Activation::silu)
//   fk::plain_mlp(fk::transposed(&GPT2MLPImpl::c_fc), fk::transposed(&GPT2MLPImpl::c_proj),
//                 fk::Activation::gelu_tanh)
//
// A projection member is a torch::nn::Linear, a fusion::Slot of one, or any module holder,
// Slot or shared_ptr of a module with `weight` and `bias` tensor members (bias undefined when
// it has none): [out, in] by default, [in, out] through fk::transposed (GPT-2's Conv1D).
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/normalization.h>

#include "fusion/kernels/primitives.hpp"

namespace fusion::kernels {

enum class NormKind { rms_norm, layer_norm };

/// Where a norm module of type Norm keeps its weight, bias and epsilon.
template <typename Norm>
struct NormLayout {
  NormKind kind;
  std::function<at::Tensor(Norm&)> weight;  // undefined tensor: no scale
  std::function<at::Tensor(Norm&)> bias;    // undefined tensor: no shift (always for RMSNorm)
  std::function<double(Norm&)> eps;
  /// The sizes it normalises over, when the module says (torch::nn::LayerNorm); empty: the last.
  std::function<std::vector<int64_t>(Norm&)> normalized_shape;
};

}  // namespace fusion::kernels

namespace fusion::detail {
template <typename Norm, typename Eps>
std::function<double(Norm&)> read_eps(Eps Norm::*eps) {
  static_assert(std::is_arithmetic_v<Eps>, "fusion::kernels: a norm's epsilon must be a number");
  return [eps](Norm& norm) { return static_cast<double>(norm.*eps); };
}
template <typename Norm>
std::function<at::Tensor(Norm&)> read_tensor(at::Tensor Norm::*member) {
  return [member](Norm& norm) { return norm.*member; };
}
}  // namespace fusion::detail

namespace fusion::kernels {

/// RMSNorm as Llama, Qwen and Mistral compute it: weight * (x * rsqrt(mean(x^2) + eps)), the
/// normalisation in float32 and cast back before the weight.
template <typename Norm, typename Eps>
NormLayout<Norm> rms_norm(at::Tensor Norm::*weight, Eps Norm::*eps) {
  return {NormKind::rms_norm, detail::read_tensor(weight), {}, detail::read_eps(eps), {}};
}

/// LayerNorm over the last dimension (at::layer_norm), weight and bias members each optional
/// (an undefined tensor: none).
template <typename Norm, typename Eps>
NormLayout<Norm> layer_norm(at::Tensor Norm::*weight, at::Tensor Norm::*bias, Eps Norm::*eps) {
  return {NormKind::layer_norm,
          detail::read_tensor(weight),
          detail::read_tensor(bias),
          detail::read_eps(eps),
          {}};
}

/// torch::nn::LayerNorm: its weight, bias, eps and normalized_shape (one size: the last).
inline NormLayout<torch::nn::LayerNormImpl> layer_norm() {
  using Impl = torch::nn::LayerNormImpl;
  return {NormKind::layer_norm, detail::read_tensor(&Impl::weight),
          detail::read_tensor(&Impl::bias), [](Impl& norm) { return norm.options.eps(); },
          [](Impl& norm) { return norm.options.normalized_shape(); }};
}

/// The layout a norm type has without being told: only torch::nn::LayerNorm has one.
template <typename Norm>
NormLayout<Norm> default_norm_layout() {
  static_assert(std::is_same_v<Norm, torch::nn::LayerNormImpl>,
                "fusion::kernels: this norm type has no default layout; pass "
                "fusion::kernels::rms_norm(&Norm::weight, &Norm::eps) or layer_norm(...)");
  return layer_norm();
}

/// A projection's weight and bias, read from a module, with how the weight is stored.
struct Projection {
  at::Tensor weight, bias;
  WeightLayout layout = WeightLayout::out_in;
};

/// Where a module of type Owner keeps one projection: `get` reads it, `module` finds the
/// projection's module (for messages naming it).
template <typename Owner>
struct ProjectionLayout {
  WeightLayout layout = WeightLayout::out_in;
  std::function<Projection(Owner&)> get;
  std::function<const torch::nn::Module*(Owner&)> module;
};

}  // namespace fusion::kernels

namespace fusion::detail {
using kernels::Projection;
using kernels::ProjectionLayout;
using kernels::WeightLayout;

template <typename Owner, typename Member>
using projection_module_t =
    std::remove_reference_t<decltype(*(std::declval<Owner&>().*std::declval<Member Owner::*>()))>;

template <typename Owner, typename Member>
ProjectionLayout<Owner> projection(Member Owner::*member, WeightLayout layout) {
  using Module = projection_module_t<Owner, Member>;
  static_assert(std::is_base_of_v<torch::nn::Module, Module>,
                "fusion::kernels: a projection member must hold a module (torch::nn::Linear, a "
                "fusion::Slot of one, or a holder of a module with weight and bias)");
  static_assert(
      std::is_same_v<std::decay_t<decltype(std::declval<Module&>().weight)>, at::Tensor> &&
          std::is_same_v<std::decay_t<decltype(std::declval<Module&>().bias)>, at::Tensor>,
      "fusion::kernels: a projection's module needs `weight` and `bias` tensor members");
  return {layout,
          [member, layout](Owner& owner) {
            Module& m = *(owner.*member);
            return Projection{m.weight, m.bias, layout};
          },
          [member](Owner& owner) -> const torch::nn::Module* { return &*(owner.*member); }};
}
}  // namespace fusion::detail

namespace fusion::kernels {

/// A projection member with its weight stored [out, in] (torch::nn::Linear).
template <typename Owner, typename Member>
ProjectionLayout<Owner> linear(Member Owner::*member) {
  return detail::projection(member, WeightLayout::out_in);
}

/// A projection member with its weight stored [in, out] (GPT-2's Conv1D).
template <typename Owner, typename Member>
ProjectionLayout<Owner> transposed(Member Owner::*member) {
  return detail::projection(member, WeightLayout::in_out);
}

/// The module itself as the projection (an lm_head that is a torch::nn::Linear), [out, in].
template <typename Module>
ProjectionLayout<Module> itself(WeightLayout layout = WeightLayout::out_in) {
  return {layout,
          [layout](Module& m) {
            return Projection{m.weight, m.bias, layout};
          },
          [](Module& m) -> const torch::nn::Module* { return &m; }};
}

}  // namespace fusion::kernels

namespace fusion::detail {
template <typename Owner>
ProjectionLayout<Owner> as_projection(ProjectionLayout<Owner> layout) {
  return layout;
}
template <typename Owner, typename Member>
ProjectionLayout<Owner> as_projection(Member Owner::*member) {
  return kernels::linear(member);
}
template <typename P>
struct owner_of;
template <typename Owner>
struct owner_of<ProjectionLayout<Owner>> {
  using type = Owner;
};
template <typename Owner, typename Member>
struct owner_of<Member Owner::*> {
  using type = Owner;
};
template <typename P>
using owner_of_t = typename owner_of<std::decay_t<P>>::type;
}  // namespace fusion::detail

namespace fusion::kernels {

/// An MLP: up (fc) -> activation [* gate] -> down; `gate` set: gated (SwiGLU, GeGLU).
template <typename MLP>
struct MLPLayout {
  std::optional<ProjectionLayout<MLP>> gate;
  ProjectionLayout<MLP> up, down;
  Activation activation;
};

/// down(activation(gate(x)) * up(x)): Llama, Qwen, Mistral (SiLU), Gemma (GELU-tanh).
template <typename G, typename U, typename D>
auto gated_mlp(G gate, U up, D down, Activation activation) {
  using MLP = detail::owner_of_t<G>;
  return MLPLayout<MLP>{detail::as_projection<MLP>(gate), detail::as_projection<MLP>(up),
                        detail::as_projection<MLP>(down), activation};
}

/// proj(activation(fc(x))): GPT-2, BERT.
template <typename F, typename P>
auto plain_mlp(F fc, P proj, Activation activation) {
  using MLP = detail::owner_of_t<F>;
  return MLPLayout<MLP>{std::nullopt, detail::as_projection<MLP>(fc),
                        detail::as_projection<MLP>(proj), activation};
}

/// Projections of one input, computed as one GEMM where their weights can share a storage.
template <typename Owner>
struct ProjectionGroup {
  std::vector<ProjectionLayout<Owner>> parts;
};

template <typename... P>
auto projections(P... parts) {
  using Owner = detail::owner_of_t<std::tuple_element_t<0, std::tuple<P...>>>;
  return ProjectionGroup<Owner>{{detail::as_projection<Owner>(parts)...}};
}

/// The path of `child` below `owner` ("conv1", "conv.0.0"; "?" if none), for messages.
inline std::string child_name(const torch::nn::Module& owner, const torch::nn::Module* child) {
  if (child == &owner) return "";
  for (const auto& item : owner.named_modules("", /*include_self=*/false)) {
    if (item.value().get() == child) return item.key();
  }
  return "?";
}

}  // namespace fusion::kernels
