// A LibTorch port of Hugging Face's GPT2LMHeadModel (eager attention, as transformers 5 computes
// it), whose parameter names are the checkpoint keys: LayerNorm with bias, Conv1D projections
// stored [in, out], the packed c_attn, GELU-tanh ("gelu_new"), learned positions, a tied lm_head,
// a KV cache and greedy generation. The chains fusion may fuse are Slots: ln_1 -> attn,
// ln_2 -> mlp in every block, and ln_f -> lm_head.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>
#include <fusion/fusion.hpp>

namespace gpt2 {

struct Config {
  int64_t vocab_size = 1000;
  int64_t n_positions = 128;
  int64_t n_embd = 64;
  int64_t n_layer = 4;
  int64_t n_head = 4;
  int64_t n_inner = 0;  // 0: 4 * n_embd
  double layer_norm_epsilon = 1e-5;
  bool tie_word_embeddings = true;
  std::string dtype = "float32";  // as stored; the port computes in float32

  int64_t inner() const { return n_inner > 0 ? n_inner : 4 * n_embd; }
};

/// The per-layer keys and values of the tokens seen so far.
struct KVCache {
  std::vector<torch::Tensor> keys, values;  // per layer: [batch, heads, seen, head_dim]

  int64_t seen() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }
  std::pair<torch::Tensor, torch::Tensor> update(std::size_t layer, const torch::Tensor& k,
                                                 const torch::Tensor& v) {
    if (keys.size() <= layer) {
      keys.resize(layer + 1);
      values.resize(layer + 1);
    }
    keys[layer] = keys[layer].defined() ? torch::cat({keys[layer], k}, 2) : k;
    values[layer] = values[layer].defined() ? torch::cat({values[layer], v}, 2) : v;
    return {keys[layer], values[layer]};
  }
};

/// transformers' pytorch_utils.Conv1D: y = x W + b, W stored [in, out].
struct Conv1DImpl : torch::nn::Module {
  Conv1DImpl(int64_t nx, int64_t nf) {
    weight = register_parameter("weight", torch::empty({nx, nf}).normal_(0, 0.02));
    bias = register_parameter("bias", torch::zeros({nf}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto sizes = x.sizes().vec();
    sizes.back() = weight.size(1);
    return torch::addmm(bias, x.reshape({-1, x.size(-1)}), weight).view(sizes);
  }
  torch::Tensor weight, bias;
};
TORCH_MODULE(Conv1D);

/// GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
inline torch::Tensor gelu_new(const torch::Tensor& x) {
  return 0.5 * x * (1.0 + torch::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * torch::pow(x, 3.0))));
}

struct MLPImpl : torch::nn::Module {
  explicit MLPImpl(const Config& c) {
    c_fc = register_module("c_fc", Conv1D(c.n_embd, c.inner()));
    c_proj = register_module("c_proj", Conv1D(c.inner(), c.n_embd));
  }
  torch::Tensor forward(const torch::Tensor& x) { return c_proj(gelu_new(c_fc(x))); }
  Conv1D c_fc{nullptr}, c_proj{nullptr};
};
TORCH_MODULE(MLP);

struct AttentionImpl : torch::nn::Module {
  AttentionImpl(const Config& c, std::size_t layer) : layer_idx(layer), num_heads(c.n_head) {
    c_attn = register_module("c_attn", Conv1D(c.n_embd, 3 * c.n_embd));
    c_proj = register_module("c_proj", Conv1D(c.n_embd, c.n_embd));
  }

  /// hidden_states [batch, seq, n_embd]; the cache holds the tokens before these.
  torch::Tensor forward(const torch::Tensor& hidden_states, KVCache* cache) {
    return c_proj(after_projections({c_attn(hidden_states)}, hidden_states, cache));
  }

  /// The attention between c_attn (`qkv[0]`, [batch, seq, 3 n_embd]) and c_proj: causal
  /// scaled dot-product attention over the cached and new keys. The library's norm ->
  /// projections kernel computes c_attn its own way and calls this (kernels.hpp).
  torch::Tensor after_projections(const std::vector<torch::Tensor>& qkv,
                                  const torch::Tensor& hidden_states, KVCache* cache) {
    const int64_t b = hidden_states.size(0), s = hidden_states.size(1);
    const int64_t embd = hidden_states.size(2), head_dim = embd / num_heads;
    const auto parts = qkv[0].split(embd, -1);
    auto heads = [&](const torch::Tensor& t) {
      return t.reshape({b, s, num_heads, head_dim}).transpose(1, 2);
    };
    auto q = heads(parts[0]), k = heads(parts[1]), v = heads(parts[2]);
    if (cache != nullptr) std::tie(k, v) = cache->update(layer_idx, k, v);
    const int64_t total = k.size(2);
    auto weights = torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(head_dim));
    if (s > 1) {
      // Query i (at position total - s + i) sees keys 0..total - s + i.
      const auto masked = torch::ones({s, total}, torch::kBool).triu(total - s + 1);
      weights =
          weights.masked_fill(masked.to(weights.device()), std::numeric_limits<float>::lowest());
    }
    weights = torch::softmax(weights, -1);
    return torch::matmul(weights, v).transpose(1, 2).reshape({b, s, embd});
  }

  std::size_t layer_idx;
  int64_t num_heads;
  Conv1D c_attn{nullptr}, c_proj{nullptr};
};
TORCH_MODULE(Attention);

struct BlockImpl : torch::nn::Module {
  BlockImpl(const Config& c, std::size_t layer) {
    auto norm = [&] {
      return torch::nn::LayerNorm(
          torch::nn::LayerNormOptions({c.n_embd}).eps(c.layer_norm_epsilon));
    };
    ln_1 = fusion::register_slot(*this, "ln_1", norm());
    attn = fusion::register_slot(*this, "attn", Attention(c, layer));
    ln_2 = fusion::register_slot(*this, "ln_2", norm());
    mlp = fusion::register_slot(*this, "mlp", MLP(c));
  }
  torch::Tensor forward(torch::Tensor h, KVCache* cache) {
    h = h + attn(ln_1(h), cache);
    return h + mlp(ln_2(h));
  }
  fusion::Slot<torch::nn::LayerNorm> ln_1, ln_2;
  fusion::Slot<Attention> attn;
  fusion::Slot<MLP> mlp;
};
TORCH_MODULE(Block);

struct ModelImpl : torch::nn::Module {
  explicit ModelImpl(const Config& c) {
    wte = register_module("wte", torch::nn::Embedding(c.vocab_size, c.n_embd));
    wpe = register_module("wpe", torch::nn::Embedding(c.n_positions, c.n_embd));
    h = register_module("h", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.n_layer; ++i) h->push_back(Block(c, i));
    ln_f = fusion::register_slot(
        *this, "ln_f",
        torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.n_embd}).eps(c.layer_norm_epsilon)));
  }
  torch::Tensor forward(const torch::Tensor& input_ids, KVCache* cache) {
    const int64_t seen = cache != nullptr ? cache->seen() : 0;
    const auto positions =
        torch::arange(seen, seen + input_ids.size(1), input_ids.options()).unsqueeze(0);
    auto x = wte(input_ids) + wpe(positions);
    for (const auto& block : *h) x = block->as<BlockImpl>()->forward(x, cache);
    return ln_f(x);
  }
  torch::nn::Embedding wte{nullptr}, wpe{nullptr};
  torch::nn::ModuleList h{nullptr};
  fusion::Slot<torch::nn::LayerNorm> ln_f;
};
TORCH_MODULE(Model);

/// The logits' projection, [vocab, n_embd]: the token embedding itself when tied (then not a
/// parameter of its own, as checkpoints have no lm_head.weight), else a parameter.
struct LMHeadImpl : torch::nn::Module {
  LMHeadImpl(const torch::Tensor& tied, int64_t vocab, int64_t embd, bool tie) {
    weight =
        tie ? tied : register_parameter("weight", torch::empty({vocab, embd}).normal_(0, 0.02));
  }
  torch::Tensor forward(const torch::Tensor& x) { return torch::linear(x, weight); }
  torch::Tensor weight, bias;  // bias: none (undefined)
};
TORCH_MODULE(LMHead);

struct LMHeadModelImpl : torch::nn::Module {
  explicit LMHeadModelImpl(const Config& c) : config(c) {
    transformer = register_module("transformer", Model(c));
    lm_head = fusion::register_slot(
        *this, "lm_head",
        LMHead(transformer->wte->weight, c.vocab_size, c.n_embd, c.tie_word_embeddings));
  }

  /// input_ids [batch, seq] (int64) -> logits [batch, seq, vocab]
  torch::Tensor forward(const torch::Tensor& input_ids, KVCache* cache = nullptr) {
    const int64_t seen = cache != nullptr ? cache->seen() : 0;
    if (input_ids.numel() > 0) {
      const auto max_id = input_ids.max().item<int64_t>(), min_id = input_ids.min().item<int64_t>();
      if (min_id < 0 || max_id >= config.vocab_size) {
        throw std::out_of_range("gpt2: input id " + std::to_string(min_id < 0 ? min_id : max_id) +
                                " is outside the vocabulary [0, " +
                                std::to_string(config.vocab_size) + ")");
      }
    }
    if (seen + input_ids.size(1) > config.n_positions) {
      throw std::out_of_range("gpt2: " + std::to_string(seen + input_ids.size(1)) +
                              " positions, past n_positions " + std::to_string(config.n_positions));
    }
    return lm_head(transformer->forward(input_ids, cache));
  }

  /// Greedy decoding as transformers' generate(do_sample=False) without eos ids: the prompt
  /// followed by max_new_tokens ids, [batch, seq + new].
  torch::Tensor generate(const torch::Tensor& input_ids, int64_t max_new_tokens) {
    torch::NoGradGuard no_grad;
    KVCache cache;
    auto ids = input_ids;
    auto next = input_ids;
    for (int64_t i = 0; i < max_new_tokens; ++i) {
      next = forward(next, &cache).select(1, -1).argmax(-1, /*keepdim=*/true);
      ids = torch::cat({ids, next}, 1);
    }
    return ids;
  }

  Config config;
  Model transformer{nullptr};
  fusion::Slot<LMHead> lm_head;
};
TORCH_MODULE(LMHeadModel);

/// The chains the demo and tests fuse, and the spec each member takes.
inline std::vector<std::string> attention_patterns() {
  return {"transformer.h.*.ln_1", "transformer.h.*.attn"};
}
inline std::vector<fusion::ModuleSpec> attention_specs() {
  return {fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}},
          fusion::ModuleSpec{{"hidden_states", "cache"}, {"hidden_states"}}};
}
inline std::vector<std::string> mlp_patterns() {
  return {"transformer.h.*.ln_2", "transformer.h.*.mlp"};
}
inline std::vector<std::string> lm_head_patterns() { return {"transformer.ln_f", "lm_head"}; }
inline std::vector<fusion::ModuleSpec> hidden_specs() {
  return {fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}},
          fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}}};
}

/// Seeded random weights at a scale that gives varied logits (the tiny default model).
inline void init_random(LMHeadModelImpl& model, uint64_t seed) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(seed);
  for (auto& item : model.named_parameters()) {
    if (item.key().find("ln_") != std::string::npos) {
      item.value().uniform_(item.key().find("bias") != std::string::npos ? -0.1 : 0.8,
                            item.key().find("bias") != std::string::npos ? 0.1 : 1.2);
    } else {
      item.value().normal_(0.0, 0.08);
    }
  }
}

}  // namespace gpt2
