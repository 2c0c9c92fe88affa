// GPT-2 model directories as transformers writes them: config.json, and model.safetensors or a
// sharded model.safetensors.index.json, read through the examples' shared reader
// (examples/common/safetensors.hpp).
#pragma once

#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "gpt2.hpp"
#include "safetensors.hpp"

namespace gpt2 {

using checkpoint::CheckpointError;

/// Reads a GPT-2 config.json with transformers 5's defaults. Fields that would change the
/// computation in a way this port does not implement (another architecture or activation,
/// scaled or reordered attention) are refused with a CheckpointError naming them.
inline Config load_config(const std::filesystem::path& dir) {
  const auto path = dir / "config.json";
  const auto j = checkpoint::detail::read_json(path);
  Config c;
  try {
    if (!j.is_object()) checkpoint::detail::fail("not a JSON object");
    if (j.value("model_type", std::string("gpt2")) != "gpt2") {
      checkpoint::detail::fail("model_type '{}' is not gpt2", j["model_type"].get<std::string>());
    }
    const std::string activation = j.value("activation_function", std::string("gelu_new"));
    if (activation != "gelu_new" && activation != "gelu_pytorch_tanh") {
      checkpoint::detail::fail("activation_function '{}' is not supported (gelu_new is)",
                               activation);
    }
    for (const char* key : {"scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"}) {
      if (j.value(key, false)) checkpoint::detail::fail("'{}' true is not supported", key);
    }
    if (!j.value("scale_attn_weights", true)) {
      checkpoint::detail::fail("'scale_attn_weights' false is not supported");
    }
    const auto size = [&](const char* key, int64_t fallback) -> int64_t {
      if (!j.contains(key) || j[key].is_null()) return fallback;
      const auto& value = j.at(key);
      if (!value.is_number_integer() || value.get<int64_t>() < 1) {
        checkpoint::detail::fail("'{}' must be a positive integer, not {}", key, value.dump());
      }
      return value.get<int64_t>();
    };
    c.vocab_size = size("vocab_size", 50257);
    c.n_positions = size("n_positions", 1024);
    c.n_embd = size("n_embd", 768);
    c.n_layer = size("n_layer", 12);
    c.n_head = size("n_head", 12);
    c.n_inner = size("n_inner", 0);
    if (c.n_embd % c.n_head != 0) {
      checkpoint::detail::fail("n_embd ({}) must be a multiple of n_head ({})", c.n_embd, c.n_head);
    }
    c.layer_norm_epsilon = j.value("layer_norm_epsilon", 1e-5);
    c.tie_word_embeddings = j.value("tie_word_embeddings", true);
    c.dtype = j.value("dtype", j.value("torch_dtype", std::string("float32")));
  } catch (const nlohmann::json::exception& e) {
    checkpoint::detail::fail("{}: {}", path.string(), e.what());
  } catch (const CheckpointError& e) {
    checkpoint::detail::fail("{}: {}", path.string(), e.what());
  }
  return c;
}

/// Loads the weights of a model directory into `model`, converting F32/F16/BF16. Keys as
/// GPT2LMHeadModel saves them (`transformer.h.0...`) or as GPT2Model does (`h.0...`, the original
/// OpenAI checkpoints). The causal-mask buffers of older exports (`attn.bias`, `attn.masked_bias`)
/// are ignored, as transformers ignores them; so is an lm_head.weight of a tied model. Every key
/// and shape is checked before any parameter is written.
inline void load_weights(LMHeadModelImpl& model, const std::filesystem::path& dir) {
  auto entries = checkpoint::index_directory(dir);
  bool prefixed = false;
  for (const auto& entry : entries)
    prefixed = prefixed || entry.first.rfind("transformer.", 0) == 0;
  if (!prefixed) {
    checkpoint::Entries renamed;
    for (auto& [key, value] : entries) {
      renamed.emplace(key == "lm_head.weight" ? key : "transformer." + key, std::move(value));
    }
    entries = std::move(renamed);
  }
  std::set<std::string> ignored;
  for (const auto& entry : entries) {
    const auto& key = entry.first;
    for (const std::string suffix : {".attn.bias", ".attn.masked_bias"}) {
      if (key.size() > suffix.size() &&
          key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0) {
        ignored.insert(key);
      }
    }
  }
  if (model.config.tie_word_embeddings) ignored.insert("lm_head.weight");
  checkpoint::load_state(model, entries, dir.string(), ignored);
}

/// Writes config.json and model.safetensors (float32), loadable by load_config/load_weights and by
/// transformers.
inline void save_pretrained(LMHeadModelImpl& model, const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  const Config& c = model.config;
  nlohmann::json config{{"architectures", nlohmann::json::array({"GPT2LMHeadModel"})},
                        {"model_type", "gpt2"},
                        {"vocab_size", c.vocab_size},
                        {"n_positions", c.n_positions},
                        {"n_embd", c.n_embd},
                        {"n_layer", c.n_layer},
                        {"n_head", c.n_head},
                        {"layer_norm_epsilon", c.layer_norm_epsilon},
                        {"activation_function", "gelu_new"},
                        {"tie_word_embeddings", c.tie_word_embeddings},
                        {"dtype", "float32"}};
  if (c.n_inner > 0) config["n_inner"] = c.n_inner;
  std::ofstream(dir / "config.json") << config.dump(2) << "\n";
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& item : model.named_parameters()) tensors.emplace_back(item.key(), item.value());
  checkpoint::save_safetensors(tensors, dir / "model.safetensors");
}

}  // namespace gpt2
