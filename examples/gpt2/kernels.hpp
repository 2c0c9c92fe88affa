// GPT-2's kernels: the library's transformer kernels (fusion/kernels/transformer.hpp), declared
// by layout only, no GPT-2-specific kernel code:
//
//   gpt2.ln_attention  ln_1 + attn: LayerNorm, c_attn's GEMM, the attention's own
//                      after_projections (heads, cache, causal attention), then c_proj.
//   gpt2.ln_mlp        ln_2 + mlp: LayerNorm, c_fc, GELU-tanh, c_proj.
//   gpt2.ln_lm_head    ln_f + lm_head: LayerNorm, then the logits (tied: the embedding as is).
//
// Each also as ".folded" (LayerNorm's scale and shift folded into a copy of the next weights).
#pragma once

#include <string>

#include <fusion/fusion.hpp>
#include <fusion/kernels/transformer.hpp>

#include "gpt2.hpp"

namespace gpt2 {

/// Registers the kernels above (CPU and CUDA; eval mode, no autograd). Safe to call more than
/// once.
inline void register_kernels() {
  fusion::register_kernels_once("gpt2", [] {
    namespace fk = fusion::kernels;
    fk::register_norm_projections("gpt2.ln_attention", fk::layer_norm(),
                                  fk::projections(fk::transposed(&AttentionImpl::c_attn)),
                                  &AttentionImpl::after_projections,
                                  fk::transposed(&AttentionImpl::c_proj));
    fk::register_norm_mlp(
        "gpt2.ln_mlp", fk::plain_mlp(fk::transposed(&MLPImpl::c_fc),
                                     fk::transposed(&MLPImpl::c_proj), fk::Activation::gelu_tanh));
    fk::register_norm_lm_head("gpt2.ln_lm_head", fk::layer_norm(), fk::itself<LMHeadImpl>());
  });
}

/// The plan that fuses both chains of every block and ln_f with lm_head, each with its kernel
/// (`folded`: the copying variants).
inline fusion::Plan kernel_plan(bool folded = false) {
  register_kernels();
  const std::string suffix = folded ? ".folded" : "";
  auto with_kernel = [&](const std::string& name) {
    fusion::FuseOptions options;
    options.kernel = name + suffix;
    return options;
  };
  fusion::Plan plan;
  plan.rules.push_back({attention_patterns(), attention_specs(), with_kernel("gpt2.ln_attention")});
  plan.rules.push_back({mlp_patterns(), hidden_specs(), with_kernel("gpt2.ln_mlp")});
  plan.rules.push_back({lm_head_patterns(), hidden_specs(), with_kernel("gpt2.ln_lm_head")});
  return plan;
}

/// Fuses `model` by kernel_plan, all or nothing.
inline void fuse_with_kernels(LMHeadModel& model, bool folded = false) {
  fusion::fuse_modules(model, kernel_plan(folded));
}

}  // namespace gpt2
