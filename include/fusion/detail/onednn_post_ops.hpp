// The activations the library's oneDNN primitives apply as eltwise post-ops
// (detail/onednn_conv.hpp), by module type and by the name the kernel names use.
#pragma once

#if defined(FUSION_HAS_ONEDNN)

#include <optional>
#include <string_view>
#include <type_traits>

#include <torch/nn/modules/activation.h>

#include "fusion/detail/epilogue.hpp"
#include "fusion/detail/onednn.hpp"
#include "fusion/hardswish.hpp"

namespace fusion::detail {

/// An activation oneDNN applies as an eltwise post-op.
struct OneDnnEltwise {
  dnnl::algorithm algorithm;
  float alpha = 0.f, beta = 0.f;
};

/// The post-op for an activation type, where one computes what the module computes whatever its
/// options: ReLU, ReLU6, SiLU, Hardswish. Others (none; LeakyReLU and GELU, whose options may
/// change after the state is made) run after the convolution (detail/epilogue.hpp).
template <typename Activation>
std::optional<OneDnnEltwise> onednn_eltwise(const Activation* /*type*/) {
  return std::nullopt;
}
inline std::optional<OneDnnEltwise> onednn_eltwise(const torch::nn::ReLUImpl*) {
  return OneDnnEltwise{dnnl::algorithm::eltwise_relu};
}
inline std::optional<OneDnnEltwise> onednn_eltwise(const torch::nn::ReLU6Impl*) {
  return OneDnnEltwise{dnnl::algorithm::eltwise_clip, 0.f, 6.f};
}
inline std::optional<OneDnnEltwise> onednn_eltwise(const torch::nn::SiLUImpl*) {
  return OneDnnEltwise{dnnl::algorithm::eltwise_swish, 1.f};
}
inline std::optional<OneDnnEltwise> onednn_eltwise(const HardswishImpl*) {
  // x * min(max(alpha x + beta, 0), 1): oneDNN 3 reads alpha and beta, 2.x ignores them.
  return OneDnnEltwise{dnnl::algorithm::eltwise_hardswish, 1.f / 6.f, 0.5f};
}

/// The post-op for the activation named `name` as in the kernel names (Epilogue<A>::name);
/// nullopt for "" (none) and for the others.
inline std::optional<OneDnnEltwise> onednn_eltwise_named(std::string_view name) {
  std::optional<OneDnnEltwise> found;
  const auto try_one = [&](auto* type) {
    using Activation = std::remove_const_t<std::remove_pointer_t<decltype(type)>>;
    if (!found && name == Epilogue<Activation>::name) found = onednn_eltwise(type);
  };
  try_one(static_cast<const torch::nn::ReLUImpl*>(nullptr));
  try_one(static_cast<const torch::nn::ReLU6Impl*>(nullptr));
  try_one(static_cast<const torch::nn::SiLUImpl*>(nullptr));
  try_one(static_cast<const HardswishImpl*>(nullptr));
  return found;
}

}  // namespace fusion::detail

#endif
