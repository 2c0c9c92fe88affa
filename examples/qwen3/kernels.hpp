// Qwen3's kernels: the library's transformer kernels (fusion/kernels/transformer.hpp), declared
// by layout only:
//
//   qwen3.rmsnorm_mlp        post_attention_layernorm + mlp: RMSNorm in one pass, gate and up as
//                            one GEMM, SiLU(gate) * up in one pass, then down.
//   qwen3.rmsnorm_attention  input_layernorm + self_attn: RMSNorm in one pass, q, k and v as one
//                            GEMM, then the attention's own after_projections (q/k norms, RoPE,
//                            cache, attention), then o_proj.
//   qwen3.rmsnorm_lm_head    model.norm + lm_head: RMSNorm, then the logits (tied: the
//                            embedding as it is).
//
// Each also as ".folded" (the norm's weight folded into a copy of the next weights).
#pragma once

#include <string>

#include <fusion/fusion.hpp>
#include <fusion/kernels/transformer.hpp>

#include "qwen3.hpp"

namespace qwen3 {

/// Registers the kernels above (CPU and CUDA; eval mode, no autograd). Safe to call more than
/// once.
inline void register_kernels() {
  fusion::register_kernels_once("qwen3", [] {
    namespace fk = fusion::kernels;
    const auto norm = fk::rms_norm(&RMSNormImpl::weight, &RMSNormImpl::eps);
    fk::register_norm_mlp("qwen3.rmsnorm_mlp", norm,
                          fk::gated_mlp(&MLPImpl::gate_proj, &MLPImpl::up_proj, &MLPImpl::down_proj,
                                        fk::Activation::silu));
    fk::register_norm_projections(
        "qwen3.rmsnorm_attention", norm,
        fk::projections(&AttentionImpl::q_proj, &AttentionImpl::k_proj, &AttentionImpl::v_proj),
        &AttentionImpl::after_projections, fk::linear(&AttentionImpl::o_proj));
    fk::register_norm_lm_head("qwen3.rmsnorm_lm_head", norm, fk::itself<LMHeadImpl>());
  });
}

/// The plan that fuses both chains of every layer, and the final norm with lm_head, each with
/// its kernel (`folded`: the copying variants).
inline fusion::Plan kernel_plan(bool folded = false) {
  register_kernels();
  const std::string suffix = folded ? ".folded" : "";
  auto with_kernel = [&](const std::string& name) {
    fusion::FuseOptions options;
    options.kernel = name + suffix;
    return options;
  };
  fusion::Plan plan;
  plan.rules.push_back({mlp_patterns(), mlp_specs(), with_kernel("qwen3.rmsnorm_mlp")});
  plan.rules.push_back(
      {attention_patterns(), attention_specs(), with_kernel("qwen3.rmsnorm_attention")});
  plan.rules.push_back({lm_head_patterns(), lm_head_specs(), with_kernel("qwen3.rmsnorm_lm_head")});
  return plan;
}

/// Fuses `model` by kernel_plan, all or nothing.
inline void fuse_with_kernels(ForCausalLM& model, bool folded = false) {
  fusion::fuse_modules(model, kernel_plan(folded));
}

}  // namespace qwen3
