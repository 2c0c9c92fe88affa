// A LibTorch port of Hugging Face's Qwen3ForCausalLM (transformers' modeling_qwen3.py), with every
// child a user might fuse declared as a fusion::Slot. Parameter names are the checkpoint keys
// ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight", ...).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>
#include <fusion/fusion.hpp>

namespace qwen3 {

/// RoPE scaling (transformers' `rope_parameters`, formerly `rope_scaling`), as transformers'
/// modeling_rope_utils computes it. load_config refuses the types not implemented here.
struct RopeScaling {
  std::string type = "default";  // "default", "linear" or "yarn"
  double factor = 1.0;           // linear and yarn: how much longer the context is made
  // yarn only
  int64_t original_max_position_embeddings = 32768;
  c10::optional<double> attention_factor, mscale, mscale_all_dim;
  double beta_fast = 32.0, beta_slow = 1.0;
  bool truncate = true;
};

struct Config {
  int64_t vocab_size = 1000;
  int64_t hidden_size = 64;
  int64_t intermediate_size = 192;
  int64_t num_hidden_layers = 4;
  int64_t num_attention_heads = 8;
  int64_t num_key_value_heads = 4;
  int64_t head_dim = 16;
  double rope_theta = 1e6;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 32768;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  std::string dtype = "float32";  // the checkpoint's (`dtype`, formerly `torch_dtype`)
};

/// What greedy decoding reads of transformers' GenerationConfig (see load_generation_config):
/// the fields that change which ids greedy decoding picks or where it stops.
struct GenerationConfig {
  std::vector<int64_t> eos_token_ids;   // stop once every row produced one (kept in the output)
  c10::optional<int64_t> pad_token_id;  // pads finished rows; default: the first eos id
  double repetition_penalty =
      1.0;                     // the score of every id seen so far: / p if positive, * p if not
  int64_t min_new_tokens = 0;  // eos ids are masked until this many new ids (needs eos ids)
  int64_t min_length = 0;      // eos ids are masked until the sequence is this long (likewise)
};

/// Inverse frequencies [head_dim / 2] and the factor cos and sin are scaled by, for `c`'s RoPE.
inline std::pair<torch::Tensor, double> rope_frequencies(const Config& c) {
  const int64_t d = c.head_dim;
  const double base = c.rope_theta;
  const auto exponents = torch::arange(0, d, 2, torch::kInt64).to(torch::kFloat32) / d;
  const auto inv_freq = 1.0 / torch::pow(base, exponents);
  const RopeScaling& r = c.rope_scaling;
  if (r.type == "default") return {inv_freq, 1.0};
  if (r.type == "linear") return {inv_freq / r.factor, 1.0};
  // yarn: interpolate the low frequencies, keep the high ones, blend linearly in between.
  const auto mscale = [](double scale, double m) {
    return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0;
  };
  double attention = 0;
  if (r.attention_factor.has_value()) {
    attention = *r.attention_factor;
  } else if (r.mscale.value_or(0) != 0 && r.mscale_all_dim.value_or(0) != 0) {
    attention = mscale(r.factor, *r.mscale) / mscale(r.factor, *r.mscale_all_dim);
  } else {
    attention = mscale(r.factor, 1.0);
  }
  const auto original = static_cast<double>(r.original_max_position_embeddings);
  const auto correction_dim = [&](double rotations) {
    return (d * std::log(original / (rotations * 2 * M_PI))) / (2 * std::log(base));
  };
  double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
  if (r.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(d - 1));
  if (low == high) high += 0.001;  // as transformers: no division by zero
  const auto ramp = ((torch::arange(d / 2, torch::kFloat32) - low) / (high - low)).clamp(0, 1);
  const auto extrapolation = 1 - ramp;
  const auto interpolated = inv_freq / r.factor;
  return {interpolated * (1 - extrapolation) + inv_freq * extrapolation, attention};
}

/// The per-layer keys and values of the tokens seen so far. Passed through forward() as a plain
/// pointer: a user type that fused chains carry in a capsule.
struct KVCache {
  std::vector<torch::Tensor> keys, values;  // per layer: [batch, kv_heads, seen, head_dim]

  int64_t seen() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }
  std::pair<torch::Tensor, torch::Tensor> update(std::size_t layer, torch::Tensor k,
                                                 torch::Tensor v) {
    if (keys.size() <= layer) {
      keys.resize(layer + 1);
      values.resize(layer + 1);
    }
    keys[layer] = keys[layer].defined() ? torch::cat({keys[layer], k}, 2) : k;
    values[layer] = values[layer].defined() ? torch::cat({values[layer], v}, 2) : v;
    return {keys[layer], values[layer]};
  }
};

/// cos and sin of the rotary embedding for the positions of this forward, [batch, seq, head_dim].
struct PositionEmbeddings {
  torch::Tensor cos, sin;
};

inline torch::nn::Linear linear(int64_t in, int64_t out, bool bias) {
  return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
}

/// Qwen3RMSNorm: computed in float32, cast back, times weight.
struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t dim, double eps) : eps(eps) {
    weight = register_parameter("weight", torch::ones({dim}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto xf = x.to(torch::kFloat32);
    xf = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
    return weight * xf.to(x.scalar_type());
  }
  double eps;
  torch::Tensor weight;
};
TORCH_MODULE(RMSNorm);

struct MLPImpl : torch::nn::Module {
  explicit MLPImpl(const Config& c) {
    gate_proj = fusion::register_slot(*this, "gate_proj",
                                      linear(c.hidden_size, c.intermediate_size, false));
    up_proj =
        fusion::register_slot(*this, "up_proj", linear(c.hidden_size, c.intermediate_size, false));
    down_proj = fusion::register_slot(*this, "down_proj",
                                      linear(c.intermediate_size, c.hidden_size, false));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return down_proj(torch::silu(gate_proj(x)) * up_proj(x));
  }
  fusion::Slot<torch::nn::Linear> gate_proj, up_proj, down_proj;
};
TORCH_MODULE(MLP);

inline torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return torch::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

struct AttentionImpl : torch::nn::Module {
  AttentionImpl(const Config& c, std::size_t layer_idx)
      : layer_idx(layer_idx),
        num_heads(c.num_attention_heads),
        num_kv_heads(c.num_key_value_heads),
        head_dim(c.head_dim),
        scaling(1.0 / std::sqrt(static_cast<double>(c.head_dim))) {
    q_proj = fusion::register_slot(*this, "q_proj",
                                   linear(c.hidden_size, num_heads * head_dim, c.attention_bias));
    k_proj = fusion::register_slot(
        *this, "k_proj", linear(c.hidden_size, num_kv_heads * head_dim, c.attention_bias));
    v_proj = fusion::register_slot(
        *this, "v_proj", linear(c.hidden_size, num_kv_heads * head_dim, c.attention_bias));
    o_proj = fusion::register_slot(*this, "o_proj",
                                   linear(num_heads * head_dim, c.hidden_size, c.attention_bias));
    q_norm = fusion::register_slot(*this, "q_norm", RMSNorm(head_dim, c.rms_norm_eps));
    k_norm = fusion::register_slot(*this, "k_norm", RMSNorm(head_dim, c.rms_norm_eps));
  }

  /// hidden_states [batch, seq, hidden]; attention_mask additive [1, 1, seq, seen + seq] or none.
  torch::Tensor forward(const torch::Tensor& hidden_states,
                        const PositionEmbeddings& position_embeddings,
                        const c10::optional<torch::Tensor>& attention_mask, KVCache* cache) {
    return o_proj(
        after_projections({q_proj(hidden_states), k_proj(hidden_states), v_proj(hidden_states)},
                          hidden_states, position_embeddings, attention_mask, cache));
  }

  /// The attention between its q, k and v projections (`qkv`, each [batch, seq, heads *
  /// head_dim]) and o_proj. The library's norm -> projections kernel computes the three
  /// projections as one GEMM and calls this (examples/qwen3/kernels.hpp).
  torch::Tensor after_projections(const std::vector<torch::Tensor>& qkv,
                                  const torch::Tensor& hidden_states,
                                  const PositionEmbeddings& position_embeddings,
                                  const c10::optional<torch::Tensor>& attention_mask,
                                  KVCache* cache) {
    return attend_heads(qkv[0], qkv[1], qkv[2], hidden_states.size(0), hidden_states.size(1),
                        position_embeddings, attention_mask, cache);
  }

  /// Per-head q/k norms, rotary embedding, cache, attention, for the projections q_lin, k_lin,
  /// v_lin ([batch, seq, heads * head_dim]); returns the heads concatenated, [batch, seq,
  /// heads * head_dim], contiguous.
  torch::Tensor attend_heads(const torch::Tensor& q_lin, const torch::Tensor& k_lin,
                             const torch::Tensor& v_lin, int64_t b, int64_t s,
                             const PositionEmbeddings& position_embeddings,
                             const c10::optional<torch::Tensor>& attention_mask, KVCache* cache) {
    auto q = q_norm(q_lin.view({b, s, -1, head_dim})).transpose(1, 2);
    auto k = k_norm(k_lin.view({b, s, -1, head_dim})).transpose(1, 2);
    auto v = v_lin.view({b, s, -1, head_dim}).transpose(1, 2);

    const auto cos = position_embeddings.cos.unsqueeze(1),
               sin = position_embeddings.sin.unsqueeze(1);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
    if (cache != nullptr) std::tie(k, v) = cache->update(layer_idx, k, v);

    // Grouped-query attention as transformers' repeat_kv computes it (query head h reads
    // key/value head h / n_rep), without repeating the cache: each key/value head's n_rep query
    // heads are the rows of one product with it. The same dot products, without copying the
    // whole cache twice per layer and step.
    const int64_t n_rep = num_heads / num_kv_heads, seen = k.size(2);
    const auto grouped = [&](const torch::Tensor& t) {
      return t.reshape({b, num_kv_heads, n_rep * s, t.size(-1)});
    };
    auto weights =
        torch::matmul(grouped(q), k.transpose(2, 3)).view({b, num_heads, s, seen}) * scaling;
    if (attention_mask.has_value()) weights = weights + *attention_mask;
    weights = torch::softmax(weights, -1, torch::kFloat32).to(q.scalar_type());
    return torch::matmul(grouped(weights), v)
        .view({b, num_heads, s, head_dim})
        .transpose(1, 2)
        .reshape({b, s, -1})
        .contiguous();
  }

  std::size_t layer_idx;
  int64_t num_heads, num_kv_heads, head_dim;
  double scaling;
  fusion::Slot<torch::nn::Linear> q_proj, k_proj, v_proj, o_proj;
  fusion::Slot<RMSNorm> q_norm, k_norm;
};
TORCH_MODULE(Attention);

struct DecoderLayerImpl : torch::nn::Module {
  DecoderLayerImpl(const Config& c, std::size_t layer_idx) {
    self_attn = fusion::register_slot(*this, "self_attn", Attention(c, layer_idx));
    mlp = fusion::register_slot(*this, "mlp", MLP(c));
    input_layernorm =
        fusion::register_slot(*this, "input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
    post_attention_layernorm = fusion::register_slot(*this, "post_attention_layernorm",
                                                     RMSNorm(c.hidden_size, c.rms_norm_eps));
  }
  torch::Tensor forward(torch::Tensor h, const PositionEmbeddings& position_embeddings,
                        const c10::optional<torch::Tensor>& attention_mask, KVCache* cache) {
    h = h + self_attn(input_layernorm(h), position_embeddings, attention_mask, cache);
    return h + mlp(post_attention_layernorm(h));
  }
  fusion::Slot<Attention> self_attn;
  fusion::Slot<MLP> mlp;
  fusion::Slot<RMSNorm> input_layernorm, post_attention_layernorm;
};
TORCH_MODULE(DecoderLayer);

struct ModelImpl : torch::nn::Module {
  explicit ModelImpl(const Config& c) : config(c) {
    embed_tokens =
        register_module("embed_tokens", torch::nn::Embedding(c.vocab_size, c.hidden_size));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(DecoderLayer(c, i));
    norm = fusion::register_slot(*this, "norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  }

  /// input_ids [batch, seq] -> last hidden states [batch, seq, hidden]
  torch::Tensor forward(const torch::Tensor& input_ids, KVCache* cache = nullptr) {
    const int64_t seen = cache != nullptr ? cache->seen() : 0;
    const int64_t s = input_ids.size(1);
    auto h = embed_tokens(input_ids);
    const auto on_device = torch::TensorOptions(torch::kFloat32).device(input_ids.device());
    const auto positions = torch::arange(seen, seen + s, on_device).unsqueeze(0);
    const auto embeddings = rotary(positions, h.scalar_type());
    c10::optional<torch::Tensor> mask;
    if (s > 1) {
      // Query i (at position seen + i) sees keys 0..seen + i.
      mask = torch::full({s, seen + s}, -std::numeric_limits<float>::infinity(), on_device)
                 .triu(seen + 1)
                 .to(h.scalar_type())
                 .view({1, 1, s, seen + s});
    }
    for (const auto& layer : *layers) {
      h = layer->as<DecoderLayerImpl>()->forward(h, embeddings, mask, cache);
    }
    return norm(h);
  }

  /// Rotary cos/sin in float32 for positions [batch, seq], cast to the hidden dtype.
  PositionEmbeddings rotary(const torch::Tensor& positions, torch::ScalarType dtype) const {
    const auto& [inv_freq, scale] = frequencies;
    // inv_freq is no buffer (it is in no checkpoint), so to(device) leaves it on the CPU.
    const auto freqs = positions.unsqueeze(-1) * inv_freq.to(positions.device());  // [b, s, d/2]
    const auto emb = torch::cat({freqs, freqs}, -1);
    if (scale == 1.0) return {emb.cos().to(dtype), emb.sin().to(dtype)};
    return {(emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)};
  }

  Config config;
  std::pair<torch::Tensor, double> frequencies = rope_frequencies(config);
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  fusion::Slot<RMSNorm> norm;
};
TORCH_MODULE(Model);

/// The logits' projection, bias-free. Tied, its weight is the embedding's parameter itself and no
/// second one is registered: there is no lm_head.weight, as in the checkpoints, and the final
/// norm -> lm_head chain fuses as for an untied model.
struct LMHeadImpl : torch::nn::Module {
  LMHeadImpl(const torch::Tensor& tied, int64_t vocab, int64_t hidden, bool tie) {
    weight =
        tie ? tied : register_parameter("weight", linear(hidden, vocab, false)->weight.detach());
  }
  torch::Tensor forward(const torch::Tensor& x) { return torch::linear(x, weight); }
  torch::Tensor weight, bias;  // bias: none (undefined)
};
TORCH_MODULE(LMHead);

struct ForCausalLMImpl : torch::nn::Module {
  explicit ForCausalLMImpl(const Config& c) : config(c) {
    model = register_module("model", Model(c));
    lm_head = fusion::register_slot(
        *this, "lm_head",
        LMHead(model->embed_tokens->weight, c.vocab_size, c.hidden_size, c.tie_word_embeddings));
  }

  /// input_ids [batch, seq] (int64) -> logits [batch, seq, vocab]
  torch::Tensor forward(const torch::Tensor& input_ids, KVCache* cache = nullptr) {
    auto max_id = input_ids.numel() > 0 ? input_ids.max().item<int64_t>() : 0;
    auto min_id = input_ids.numel() > 0 ? input_ids.min().item<int64_t>() : 0;
    if (min_id < 0 || max_id >= config.vocab_size) {
      throw std::out_of_range("qwen3: input id " + std::to_string(min_id < 0 ? min_id : max_id) +
                              " is outside the vocabulary [0, " +
                              std::to_string(config.vocab_size) + ")");
    }
    return lm_head(model->forward(input_ids, cache));
  }

  /// Greedy decoding as transformers' generate(do_sample=False): the prompt's ids followed by up
  /// to max_new_tokens generated ids, [batch, seq + new]. The last position's logits are taken
  /// in float32 and processed as transformers' logits processors do, in their order (repetition
  /// penalty, then minimum lengths), before the argmax. Generation stops once every row has
  /// produced one of the eos ids (kept in the output); a row that finished early is padded.
  torch::Tensor generate(const torch::Tensor& input_ids, int64_t max_new_tokens,
                         const GenerationConfig& g = {}) {
    torch::NoGradGuard no_grad;
    KVCache cache;
    auto ids = input_ids;
    auto next_input = input_ids;
    const auto& eos_token_ids = g.eos_token_ids;
    const auto eos = torch::tensor(eos_token_ids, torch::kInt64).to(input_ids.device());
    const int64_t pad = g.pad_token_id.value_or(eos_token_ids.empty() ? 0 : eos_token_ids[0]);
    auto unfinished = torch::ones({input_ids.size(0), 1}, input_ids.options().dtype(torch::kBool));
    for (int64_t i = 0; i < max_new_tokens; ++i) {
      auto scores = forward(next_input, &cache).select(1, -1).to(torch::kFloat32);
      if (g.repetition_penalty != 1.0) {
        const auto seen = scores.gather(1, ids);
        scores.scatter_(
            1, ids,
            torch::where(seen < 0, seen * g.repetition_penalty, seen / g.repetition_penalty));
      }
      if (!eos_token_ids.empty() && (ids.size(1) < g.min_length || i < g.min_new_tokens)) {
        scores.index_fill_(1, eos, -std::numeric_limits<float>::infinity());
      }
      next_input = scores.argmax(-1, /*keepdim=*/true);
      if (eos_token_ids.empty()) {
        ids = torch::cat({ids, next_input}, 1);
        continue;
      }
      next_input = torch::where(unfinished, next_input, torch::full_like(next_input, pad));
      ids = torch::cat({ids, next_input}, 1);
      unfinished = unfinished & ~torch::isin(next_input, eos);
      if (!unfinished.any().item<bool>()) break;
    }
    return ids;
  }

  Config config;
  Model model{nullptr};
  fusion::Slot<LMHead> lm_head;
};
TORCH_MODULE(ForCausalLM);

/// The chains the demo and tests fuse.
inline std::vector<std::string> mlp_patterns() {
  return {"model.layers.*.post_attention_layernorm", "model.layers.*.mlp"};
}
inline std::vector<fusion::ModuleSpec> mlp_specs() {
  return {fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}},
          fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}}};
}
inline std::vector<std::string> attention_patterns() {
  return {"model.layers.*.input_layernorm", "model.layers.*.self_attn"};
}
inline std::vector<fusion::ModuleSpec> attention_specs() {
  return {fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}},
          fusion::ModuleSpec{
              {"hidden_states", "position_embeddings", "attention_mask", "past_key_values"},
              {"hidden_states"}}};
}

/// The final norm and lm_head.
inline std::vector<std::string> lm_head_patterns() { return {"model.norm", "lm_head"}; }
inline std::vector<fusion::ModuleSpec> lm_head_specs() {
  return {fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}},
          fusion::ModuleSpec{{"hidden_states"}, {"logits"}}};
}

/// Seeded random weights at a scale that gives varied logits (the tiny default model).
inline void init_random(ForCausalLMImpl& model, uint64_t seed) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(seed);
  for (auto& item : model.named_parameters()) {
    if (item.key().find("norm") != std::string::npos) {
      item.value().uniform_(0.8, 1.2);
    } else {
      item.value().normal_(0.0, 0.08);
    }
  }
}

}  // namespace qwen3
