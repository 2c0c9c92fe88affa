// Fused kernels for Qwen3's chains, written through fusion's public kernel API as a user would:
//
//   qwen3.rmsnorm_mlp        post_attention_layernorm + mlp: RMSNorm in one pass over the rows,
//                            gate and up as one GEMM, SiLU(gate) * up in one pass, then down.
//   qwen3.rmsnorm_attention  input_layernorm + self_attn: RMSNorm in one pass, q, k and v as one
//                            GEMM, then the attention's own q/k norms, RoPE, cache, attention,
//                            and o_proj.
//   qwen3.rmsnorm_lm_head    model.norm + lm_head (untied models): RMSNorm, then the logits.
//
// Every GEMM goes through project(), which picks the fastest of four ways by shape (below).
// By default the kernels keep no second copy of any weight: prepare() moves gate and up (q, k and
// v) into one storage and re-points the module's parameters at views of it (`set_data`), so the
// model, its optimizer and the kernel read the same bytes. The ".folded" variants instead copy
// the weights with the norm's weight folded into their columns (one multiply less per call, one
// copy of those weights more).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/torch.h>
#include <fusion/fusion.hpp>

#include "qwen3.hpp"
#include "simd.hpp"

namespace qwen3 {
namespace kernels {

/// `parts` (row-major 2-D weights of one dtype and device, same column count) as views of one
/// storage, stacked along dim 0. If they already are such views, in order, that storage is
/// returned as is; else it is allocated once, the values moved there, and each tensor re-pointed
/// at its slice. Runs under NoGradGuard (prepare does).
inline torch::Tensor stack_in_place(const std::vector<torch::Tensor>& parts) {
  bool adjacent = true;
  int64_t rows = 0;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    const auto& part = parts[i];
    adjacent = adjacent && part.is_contiguous() && part.storage().is_alias_of(parts[0].storage()) &&
               part.storage_offset() == parts[0].storage_offset() + rows * part.size(1);
    rows += part.size(0);
  }
  const int64_t cols = parts[0].size(1);
  if (adjacent) {
    return torch::empty({0}, parts[0].options())
        .set_(parts[0].storage(), parts[0].storage_offset(), {rows, cols}, {cols, 1});
  }
  auto stacked = torch::cat(parts);
  int64_t offset = 0;
  for (auto part : parts) {
    const int64_t n = part.size(0);
    part.set_data(stacked.narrow(0, offset, n));
    offset += n;
  }
  return stacked;
}

/// RMSNorm of the rows of `x` ([rows, dim], float32, contiguous) into `out`, times `weight` when
/// given, as Qwen3RMSNorm computes it in float32: weight * (x * rsqrt(mean(x^2) + eps)). One pass
/// per row instead of the module's eight tensor ops; eight partial sums keep the loop fast without
/// -ffast-math.
inline void rmsnorm_rows(const float* x, const float* weight, float* out, int64_t rows, int64_t dim,
                         float eps) {
  at::parallel_for(0, rows, /*grain_size=*/std::max<int64_t>(1, 16384 / dim),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const float* row = x + r * dim;
                       float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                       int64_t i = 0;
                       for (; i + 8 <= dim; i += 8) {
                         for (int k = 0; k < 8; ++k) partial[k] += row[i + k] * row[i + k];
                       }
                       float sum = 0;
                       for (; i < dim; ++i) sum += row[i] * row[i];
                       for (float p : partial) sum += p;
                       const float scale = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
                       float* o = out + r * dim;
                       if (weight != nullptr) {
                         for (int64_t j = 0; j < dim; ++j) o[j] = weight[j] * (row[j] * scale);
                       } else {
                         for (int64_t j = 0; j < dim; ++j) o[j] = row[j] * scale;
                       }
                     }
                   });
}

/// The chain's input normalised, as [rows, hidden]: the fast pass for float32, the module's own
/// ops otherwise (bf16 and f16 round between its steps, and that rounding is the reference).
/// With `fold`, the norm's weight is left out (it was folded into the next GEMM's columns).
inline torch::Tensor normalise(const torch::Tensor& x, RMSNormImpl& norm, bool fold) {
  const int64_t dim = x.size(-1);
  if (x.scalar_type() == torch::kFloat32 && x.device().is_cpu() &&
      norm.weight.scalar_type() == torch::kFloat32) {
    const auto input = x.contiguous();
    auto out = torch::empty({input.numel() / dim, dim}, input.options());
    rmsnorm_rows(input.data_ptr<float>(), fold ? nullptr : norm.weight.data_ptr<float>(),
                 out.data_ptr<float>(), out.size(0), dim, static_cast<float>(norm.eps));
    return out;
  }
  if (!fold) return norm.forward(x).reshape({-1, dim});
  auto xf = x.to(torch::kFloat32);
  xf = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + norm.eps);
  return xf.to(x.scalar_type()).reshape({-1, dim});
}

/// SiLU(gate) * up for gate_up = [rows, 2 * inter], into a new [rows, inter]: one pass over the
/// data (AVX-512, or a scalar loop up to 4096 elements) instead of ATen's two ops and temporary.
inline torch::Tensor silu_mul(const torch::Tensor& gate_up, int64_t inter) {
  const int64_t rows = gate_up.size(0);
  if (gate_up.scalar_type() == torch::kFloat32 && gate_up.device().is_cpu() &&
      gate_up.is_contiguous()) {
    auto out = torch::empty({rows, inter}, gate_up.options());
    const float* in = gate_up.data_ptr<float>();
    float* o = out.data_ptr<float>();
    if (simd_supported()) {
      silu_mul_rows(in, o, rows, inter);
      return out;
    }
    // Past ~4096 elements ATen's vectorised exp wins over the scalar one.
    if (rows * inter <= 4096) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* g = in + r * 2 * inter;
        const float* u = g + inter;
        float* dst = o + r * inter;
        for (int64_t i = 0; i < inter; ++i) dst[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
      }
      return out;
    }
  }
  auto parts = gate_up.chunk(2, -1);
  return torch::silu(parts[0]).mul_(parts[1]);
}

/// x [..., in] times weight [out, in] transposed, plus bias: at::linear's result, computed by
/// whichever GEMM is fastest for the shape. For float32 on the CPU, at::linear hands every shape
/// to the BLAS (OpenBLAS 0.3.21 here, which runs its AVX2 kernels on these AVX-512 machines and
/// packs the whole weight on every call); three paths do better (bench/qwen3-bench.cpp,
/// BM_Projection, measures each against linear, the weights cycled so they come from memory as
/// in a forward):
///   - one row: the matrix-vector product. A decode step is one row per projection.
///   - 2 to 256 rows: small_gemm (AVX-512, the weight read in place), where rows are at least 128
///     long (or 16 rows at most: short rows favour OpenBLAS).
///   - other shapes with 48 rows or more and at least 12M multiply-adds per thread: oneDNN
///     (at::mkldnn_linear, the weight read as it is: no copy).
/// The figures behind these thresholds are in docs/performance.md ("Projections"). Results differ
/// from linear's only by float32 summation order.
inline torch::Tensor project(const torch::Tensor& x, const torch::Tensor& weight,
                             const torch::Tensor& bias = {}) {
  const int64_t in = x.size(-1), out = weight.size(0);
  const int64_t rows = in == 0 ? 0 : x.numel() / in;
  if (rows == 0 || !x.device().is_cpu() || x.scalar_type() != torch::kFloat32 ||
      weight.scalar_type() != torch::kFloat32) {
    return at::linear(x, weight, bias);
  }
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  const auto x2 = x.reshape({rows, in}).contiguous();
  const int threads = at::get_num_threads();
  torch::Tensor y;
  if (rows == 1) {
    y = at::mv(weight, x2.view({in}));
  } else if (rows <= 256 && in % 16 == 0 && (in >= 128 || rows <= 16) && weight.is_contiguous() &&
             simd_supported()) {
    y = torch::empty({rows, out}, x2.options());
    small_gemm(x2.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), rows, in, out);
  } else if (rows >= 48 && static_cast<double>(rows) * in * out >= 12e6 * threads &&
             at::hasMKLDNN()) {
    return at::mkldnn_linear(x2.to_mkldnn(), weight, bias).to_dense().view(sizes);
  } else {
    return at::linear(x2, weight, bias).view(sizes);
  }
  if (bias.defined()) y.add_(bias);
  return y.view(sizes);
}

struct RMSNormMLP {
  bool fold = false;

  struct State {
    torch::Tensor gate_up;  // [2 * inter, hidden]; shares the model's storage unless folded
    std::vector<torch::Tensor> tensors() const { return {gate_up}; }
  };

  State prepare(RMSNormImpl& norm, MLPImpl& mlp) const {
    const auto& gate = mlp.gate_proj->weight;
    const auto& up = mlp.up_proj->weight;
    if (fold) return {torch::cat({gate, up}) * norm.weight};
    return {stack_in_place({gate, up})};
  }

  torch::Tensor operator()(const State& state, RMSNormImpl& norm, MLPImpl& mlp,
                           const torch::Tensor& hidden_states) const {
    const auto normed = normalise(hidden_states, norm, fold);
    const auto gate_up = project(normed, state.gate_up);
    const auto act = silu_mul(gate_up, state.gate_up.size(0) / 2);
    auto out = project(act, mlp.down_proj->weight, mlp.down_proj->bias);
    return out.view(hidden_states.sizes());
  }
};

struct RMSNormAttention {
  bool fold = false;

  struct State {
    torch::Tensor qkv_weight;  // [(heads + 2 * kv_heads) * head_dim, hidden]
    torch::Tensor qkv_bias;    // undefined without attention_bias
    std::vector<torch::Tensor> tensors() const { return {qkv_weight, qkv_bias}; }
  };

  State prepare(RMSNormImpl& norm, AttentionImpl& attn) const {
    State state;
    const std::vector<torch::Tensor> weights{attn.q_proj->weight, attn.k_proj->weight,
                                             attn.v_proj->weight};
    state.qkv_weight = fold ? torch::cat(weights) * norm.weight : stack_in_place(weights);
    if (attn.q_proj->bias.defined()) {
      state.qkv_bias = torch::cat({attn.q_proj->bias, attn.k_proj->bias, attn.v_proj->bias});
    }
    return state;
  }

  torch::Tensor operator()(const State& state, RMSNormImpl& norm, AttentionImpl& attn,
                           const torch::Tensor& hidden_states,
                           const PositionEmbeddings& position_embeddings,
                           const c10::optional<torch::Tensor>& attention_mask,
                           KVCache* cache) const {
    const auto normed = normalise(hidden_states, norm, fold);
    const auto qkv = project(normed, state.qkv_weight, state.qkv_bias);
    const int64_t q_size = attn.num_heads * attn.head_dim;
    const int64_t kv_size = attn.num_kv_heads * attn.head_dim;
    const auto heads =
        attn.attend_heads(qkv.narrow(-1, 0, q_size), qkv.narrow(-1, q_size, kv_size),
                          qkv.narrow(-1, q_size + kv_size, kv_size), hidden_states.size(0),
                          hidden_states.size(1), position_embeddings, attention_mask, cache);
    return project(heads, attn.o_proj->weight, attn.o_proj->bias);
  }
};

/// model.norm + lm_head: the last hidden states normalised in one pass, then the logits.
struct RMSNormLMHead {
  bool fold = false;

  struct State {
    torch::Tensor folded;  // lm_head's weight with the norm's folded in; undefined unless folded
    std::vector<torch::Tensor> tensors() const { return {folded}; }
  };

  State prepare(RMSNormImpl& norm, torch::nn::LinearImpl& head) const {
    if (!fold) return {};
    return {head.weight * norm.weight};
  }

  torch::Tensor operator()(const State& state, RMSNormImpl& norm, torch::nn::LinearImpl& head,
                           const torch::Tensor& hidden_states) const {
    auto sizes = hidden_states.sizes().vec();
    sizes.back() = head.weight.size(0);
    const auto normed = normalise(hidden_states, norm, fold);
    return project(normed, fold ? state.folded : head.weight, head.bias).view(sizes);
  }
};

}  // namespace kernels

/// Registers qwen3.rmsnorm_mlp, qwen3.rmsnorm_attention and their ".folded" variants (CPU and,
/// as the ops are ATen's, CUDA; eval mode, no autograd). Safe to call more than once.
inline void register_kernels() {
  static const bool registered = [] {
    const fusion::KernelOptions options{{c10::DeviceType::CPU, c10::DeviceType::CUDA}};
    fusion::register_kernel("qwen3.rmsnorm_mlp", kernels::RMSNormMLP{false}, options);
    fusion::register_kernel("qwen3.rmsnorm_mlp.folded", kernels::RMSNormMLP{true}, options);
    fusion::register_kernel("qwen3.rmsnorm_attention", kernels::RMSNormAttention{false}, options);
    fusion::register_kernel("qwen3.rmsnorm_attention.folded", kernels::RMSNormAttention{true},
                            options);
    fusion::register_kernel("qwen3.rmsnorm_lm_head", kernels::RMSNormLMHead{false}, options);
    fusion::register_kernel("qwen3.rmsnorm_lm_head.folded", kernels::RMSNormLMHead{true}, options);
    return true;
  }();
  (void)registered;
}

/// The plan that fuses both chains of every layer, and the final norm with lm_head where the
/// model has one (not with tied embeddings), each with its kernel (`folded`: the copying
/// variants).
inline fusion::Plan kernel_plan(const Config& config, bool folded = false) {
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
  if (!config.tie_word_embeddings) {
    plan.rules.push_back(
        {lm_head_patterns(), lm_head_specs(), with_kernel("qwen3.rmsnorm_lm_head")});
  }
  return plan;
}

/// Fuses `model` by kernel_plan, all or nothing.
inline void fuse_with_kernels(ForCausalLM& model, bool folded = false) {
  fusion::fuse_modules(model, kernel_plan(model->config, folded));
}

}  // namespace qwen3
