// Hugging Face Qwen3 model directories: config.json (transformers 4 or 5), generation_config.json,
// and the weights (model.safetensors or a sharded index; read by ../common/safetensors.hpp).
#pragma once

#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "qwen3.hpp"
#include "safetensors.hpp"

namespace qwen3 {

using checkpoint::CheckpointError;

/// transformers 5's Qwen3Config default for a config.json without head_dim.
constexpr int64_t kDefaultHeadDim = 128;

namespace detail {

using nlohmann::json;

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw CheckpointError(fmt::format(format, std::forward<Args>(args)...));
}
using checkpoint::detail::read_json;
/// Whether a JSON value is what Python reads as true: transformers tests `rope_scaling or ...`.
inline bool truthy(const json& value) {
  return !(value.is_null() || (value.is_object() && value.empty()) ||
           (value.is_boolean() && !value.get<bool>()));
}

/// transformers 5's `rope_parameters` or transformers 4's `rope_theta` + `rope_scaling`. As
/// transformers 5.12 (`rope_scaling or rope_parameters`), a non-empty `rope_scaling` wins: then
/// `rope_parameters` is ignored whole, which `notes` says when the two differ.
inline void read_rope(const json& j, Config& c, std::vector<std::string>* notes) {
  json rope = json::object();
  const char* key = "rope_parameters";
  if (j.contains("rope_scaling") && truthy(j["rope_scaling"])) {
    rope = j["rope_scaling"];
    key = "rope_scaling";
    if (notes != nullptr && j.contains("rope_parameters") && truthy(j["rope_parameters"]) &&
        j["rope_parameters"] != rope) {
      notes->push_back(fmt::format(
          "config.json has both rope_scaling {} and rope_parameters {}: using rope_scaling, as "
          "transformers does",
          rope.dump(), j["rope_parameters"].dump()));
    }
  } else if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) {
    rope = j["rope_parameters"];
  }
  if (!rope.is_object()) fail("{} must be an object, not {}", key, rope.dump());
  c.rope_theta = rope.value("rope_theta", j.value("rope_theta", 10000.0));
  RopeScaling& r = c.rope_scaling;
  r.type = rope.value("rope_type", rope.value("type", std::string("default")));
  // Every key the computation of that type reads; any other key would be ignored, so it is refused.
  std::set<std::string> known{"rope_type", "type", "rope_theta"};
  // transformers refuses these types without a factor (a KeyError naming the missing key).
  if ((r.type == "linear" || r.type == "yarn") &&
      (!rope.contains("factor") || rope["factor"].is_null())) {
    fail("{} of rope type '{}' has no 'factor', a required key (transformers refuses it too)", key,
         r.type);
  }
  if (r.type == "linear") {
    known.insert("factor");
    r.factor = rope.at("factor").get<double>();
  } else if (r.type == "yarn") {
    known.insert({"factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
                  "beta_slow", "mscale", "mscale_all_dim", "truncate"});
    const auto optional = [&](const char* key) -> c10::optional<double> {
      if (!rope.contains(key) || rope[key].is_null()) return c10::nullopt;
      return rope[key].get<double>();
    };
    // As transformers 5: the explicit factor (transformers 4.5x replaced it by the ratio of the
    // two lengths whenever original_max_position_embeddings was given). A top-level
    // original_max_position_embeddings (Phi-3 style) wins, as in transformers.
    r.original_max_position_embeddings =
        j.value("original_max_position_embeddings",
                rope.value("original_max_position_embeddings", c.max_position_embeddings));
    r.factor = rope.at("factor").get<double>();
    r.attention_factor = optional("attention_factor");
    r.mscale = optional("mscale");
    r.mscale_all_dim = optional("mscale_all_dim");
    r.beta_fast = optional("beta_fast").value_or(32.0);
    r.beta_slow = optional("beta_slow").value_or(1.0);
    r.truncate = rope.value("truncate", true);
  } else if (r.type != "default") {
    fail("rope type '{}' is not implemented (default, linear and yarn are)", r.type);
  }
  if ((r.type == "linear" || r.type == "yarn") && !(r.factor > 0)) {
    fail("rope factor {} must be positive", r.factor);
  }
  for (const auto& [key, value] : rope.items()) {
    if (known.count(key) == 0) {
      fail("rope parameter '{}' ({}) is not supported for rope type '{}'", key, value.dump(),
           r.type);
    }
  }
}

/// Fields that change the computation but that this port does not implement: refused by value.
inline void refuse_unsupported(const json& j) {
  const auto refuse = [&](const char* field, const std::string& why) {
    fail("{} = {} is not supported: {}", field, j[field].dump(), why);
  };
  if (j.contains("model_type") && j["model_type"] != "qwen3") {
    refuse("model_type", "this is a Qwen3 port");
  }
  if (j.contains("architectures") && j["architectures"] != json::array({"Qwen3ForCausalLM"})) {
    refuse("architectures", "only Qwen3ForCausalLM is implemented");
  }
  // transformers' ACT2FN maps "swish" to SiLU too.
  if (j.contains("hidden_act") && j["hidden_act"] != "silu" && j["hidden_act"] != "swish") {
    refuse("hidden_act", "the MLP is implemented with silu (swish)");
  }
  if (j.contains("layer_types") && !j["layer_types"].is_null()) {
    for (const auto& type : j["layer_types"]) {
      if (type != "full_attention") {
        refuse("layer_types", "only full_attention layers are implemented");
      }
    }
  } else if (j.value("use_sliding_window", false) &&
             !j.value("sliding_window", json(4096)).is_null() &&
             j.value("num_hidden_layers", 0) > j.value("max_window_layers", 28)) {
    // transformers makes layers max_window_layers.. sliding-window layers.
    refuse("use_sliding_window", "sliding-window attention layers are not implemented");
  }
  if (j.contains("partial_rotary_factor") && j["partial_rotary_factor"] != 1.0) {
    refuse("partial_rotary_factor", "RoPE rotates the whole head");
  }
}

}  // namespace detail

/// Reads a Qwen3 config.json as transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) or
/// transformers 5 (`rope_parameters`, `dtype`) writes it, with transformers 5.12's defaults and
/// precedence (head_dim 128 when absent; rope_scaling over rope_parameters). A field that would
/// change the computation in a way this port does not implement (another architecture,
/// activation, RoPE type, sliding-window layers) is refused with a CheckpointError naming it;
/// none is ignored. What a reader should know of the choices made goes to `notes`.
inline Config load_config(const std::filesystem::path& dir,
                          std::vector<std::string>* notes = nullptr) {
  const auto path = dir / "config.json";
  const auto j = detail::read_json(path);
  Config c;
  try {
    if (!j.is_object()) detail::fail("not a JSON object");
    detail::refuse_unsupported(j);
    // Sizes must be positive JSON integers (see is_integer_list); a zero head count would divide
    // by zero below.
    const auto size = [&](const char* key, c10::optional<int64_t> fallback) -> int64_t {
      if ((!j.contains(key) || j[key].is_null()) && fallback) return *fallback;
      const auto& value = j.at(key);
      if (!value.is_number_integer() || value.get<int64_t>() < 1) {
        detail::fail("'{}' must be a positive integer, not {}", key, value.dump());
      }
      return value.get<int64_t>();
    };
    c.vocab_size = size("vocab_size", c10::nullopt);
    c.hidden_size = size("hidden_size", c10::nullopt);
    c.intermediate_size = size("intermediate_size", c10::nullopt);
    c.num_hidden_layers = size("num_hidden_layers", c10::nullopt);
    c.num_attention_heads = size("num_attention_heads", c10::nullopt);
    c.num_key_value_heads = size("num_key_value_heads", c.num_attention_heads);
    if (c.num_attention_heads % c.num_key_value_heads != 0) {
      detail::fail("num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                   c.num_attention_heads, c.num_key_value_heads);
    }
    c.head_dim = size("head_dim", kDefaultHeadDim);
    c.max_position_embeddings = size("max_position_embeddings", c.max_position_embeddings);
    detail::read_rope(j, c, notes);
    c.rms_norm_eps = j.value("rms_norm_eps", 1e-6);
    c.tie_word_embeddings = j.value("tie_word_embeddings", false);
    c.attention_bias = j.value("attention_bias", false);
    c.dtype = j.value("dtype", j.value("torch_dtype", std::string("float32")));
  } catch (const nlohmann::json::exception& e) {
    detail::fail("{}: {}", path.string(), e.what());
  } catch (const CheckpointError& e) {
    detail::fail("{}: {}", path.string(), e.what());
  }
  return c;
}

/// The generation settings of a model directory, as transformers 5.12 reads them: from
/// generation_config.json when the directory has one (then config.json's eos_token_id and the like
/// are not read, however they differ), else from config.json. The fields that change greedy
/// decoding are read (see GenerationConfig); those this port does not implement are refused,
/// naming them; sampling fields, which greedy decoding ignores, are said so in `notes`.
inline GenerationConfig load_generation_config(const std::filesystem::path& dir,
                                               std::vector<std::string>* notes = nullptr) {
  GenerationConfig g;
  auto path = dir / "generation_config.json";
  if (!std::filesystem::exists(path)) path = dir / "config.json";
  if (!std::filesystem::exists(path)) return g;
  const auto j = detail::read_json(path);
  try {
    const auto present = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
    // Ids must be JSON integers (see is_integer_list).
    const auto ids_of = [&](const char* key) -> const nlohmann::json& {
      const auto& value = j[key];
      if (!value.is_number_integer() && !checkpoint::detail::is_integer_list(value)) {
        detail::fail("'{}' must be an integer id or a list of them, not {}", key, value.dump());
      }
      return value;
    };
    const auto count = [&](const char* key) -> int64_t {
      if (!j[key].is_number_integer() || j[key].get<int64_t>() < 0) {
        detail::fail("'{}' must be a non-negative integer, not {}", key, j[key].dump());
      }
      return j[key].get<int64_t>();
    };
    if (present("eos_token_id")) {
      const auto& eos = ids_of("eos_token_id");
      g.eos_token_ids = eos.is_array() ? eos.get<std::vector<int64_t>>()
                                       : std::vector<int64_t>{eos.get<int64_t>()};
    }
    if (present("pad_token_id")) g.pad_token_id = ids_of("pad_token_id").get<int64_t>();
    if (present("repetition_penalty")) {
      if (!j["repetition_penalty"].is_number() || !(j["repetition_penalty"].get<double>() > 0)) {
        detail::fail("'repetition_penalty' must be a positive number, not {}",
                     j["repetition_penalty"].dump());
      }
      g.repetition_penalty = j["repetition_penalty"].get<double>();
    }
    if (present("min_new_tokens")) g.min_new_tokens = count("min_new_tokens");
    if (present("min_length")) g.min_length = count("min_length");
    // Fields that change what greedy decoding picks, as transformers applies them, when set to
    // anything but their neutral value: not implemented here, so refused.
    const auto refuse_unless = [&](const char* key, const nlohmann::json& neutral) {
      if (present(key) && j[key] != neutral) {
        detail::fail(
            "{} = {} is not supported: it changes greedy decoding in transformers, and "
            "this port does not implement it",
            key, j[key].dump());
      }
    };
    refuse_unless("num_beams", 1);
    refuse_unless("num_beam_groups", 1);
    refuse_unless("no_repeat_ngram_size", 0);
    refuse_unless("guidance_scale", 1.0);
    for (const char* key : {"bad_words_ids", "sequence_bias", "suppress_tokens",
                            "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
                            "exponential_decay_length_penalty", "penalty_alpha"}) {
      refuse_unless(key, nullptr);
    }
    if (j.value("do_sample", false) && notes != nullptr) {
      std::vector<std::string> set;
      for (const char* key : {"temperature", "top_k", "top_p", "typical_p", "min_p"}) {
        if (present(key)) set.push_back(fmt::format("{} = {}", key, j[key].dump()));
      }
      notes->push_back(fmt::format(
          "{} sets do_sample{}{}: this port decodes greedily, as generate(do_sample=False), and "
          "ignores them",
          path.filename().string(), set.empty() ? "" : ", ", fmt::join(set, ", ")));
    }
  } catch (const nlohmann::json::exception& e) {
    detail::fail("{}: {}", path.string(), e.what());
  } catch (const CheckpointError& e) {
    detail::fail("{}: {}", path.string(), e.what());
  }
  return g;
}

/// Keys of older exports that hold no parameter (the rotary embedding's inverse frequencies,
/// recomputed from the config): transformers ignores them, and so does load_weights.
inline bool is_non_parameter_key(const std::string& key) {
  const std::string suffix = "rotary_emb.inv_freq";
  return key.size() >= suffix.size() &&
         key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// As transformers 5.12 for a config that ties the word embeddings: a checkpoint that also holds
/// an lm_head.weight different from its model.embed_tokens.weight is loaded untied (transformers
/// warns and does not tie). Clears `config.tie_word_embeddings` then, and says so in `notes`.
inline void untie_if_checkpoint_differs(Config& config, const std::filesystem::path& dir,
                                        std::vector<std::string>* notes = nullptr) {
  if (!config.tie_word_embeddings) return;
  const auto entries = checkpoint::index_directory(dir);
  const auto head = entries.find("lm_head.weight");
  const auto embed = entries.find("model.embed_tokens.weight");
  if (head == entries.end() || embed == entries.end()) return;
  if (torch::equal(head->second.view().to(torch::kFloat64),
                   embed->second.view().to(torch::kFloat64))) {
    return;
  }
  config.tie_word_embeddings = false;
  if (notes != nullptr) {
    notes->push_back(
        "config.json ties the word embeddings, but the checkpoint holds an lm_head.weight that "
        "differs from model.embed_tokens.weight: loaded untied, as transformers does");
  }
}

/// Loads the weights of a model directory into `model`, converting F32/F16/BF16 to the model's
/// dtype. Every file, key and shape is checked before any parameter is written, so a failed load
/// leaves the model untouched. For a tied model, as transformers: an lm_head.weight beside the
/// embedding is ignored (equal to it: see untie_if_checkpoint_differs), and one alone is the
/// embedding.
inline void load_weights(torch::nn::Module& model, const std::filesystem::path& dir) {
  auto entries = checkpoint::index_directory(dir);
  const auto params = model.named_parameters();
  const bool tied =
      !params.contains("lm_head.weight") && params.contains("model.embed_tokens.weight");
  std::set<std::string> ignored;
  for (const auto& entry : entries) {
    if (is_non_parameter_key(entry.first)) ignored.insert(entry.first);
  }
  if (tied && entries.count("lm_head.weight") != 0) {
    if (entries.count("model.embed_tokens.weight") == 0) {
      entries.emplace("model.embed_tokens.weight", entries.at("lm_head.weight"));
    }
    ignored.insert("lm_head.weight");
  }
  try {
    checkpoint::load_state(model, entries, dir.string(), ignored);
  } catch (const CheckpointError& e) {
    const std::string what = e.what();
    if (what.find("self_attn.") == std::string::npos ||
        what.find("has shape") == std::string::npos) {
      throw;
    }
    throw CheckpointError(fmt::format(
        "{} (the attention's shapes follow config.json's head_dim, {} when the key is absent, "
        "as in transformers 5)",
        what, kDefaultHeadDim));
  }
}

namespace detail {
/// The dtype of `model`'s parameters as transformers names it in config.json.
inline std::string dtype_name(torch::nn::Module& model) {
  const auto params = model.parameters();
  const auto type = params.empty() ? torch::kFloat32 : params[0].scalar_type();
  if (type == torch::kBFloat16) return "bfloat16";
  if (type == torch::kFloat16) return "float16";
  return "float32";
}
}  // namespace detail

/// Writes config.json and model.safetensors (tensors in the model's dtype), loadable by
/// load_config/load_weights and by Hugging Face transformers.
inline void save_pretrained(torch::nn::Module& model, const Config& c,
                            const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  nlohmann::json config{{"architectures", nlohmann::json::array({"Qwen3ForCausalLM"})},
                        {"model_type", "qwen3"},
                        {"vocab_size", c.vocab_size},
                        {"hidden_size", c.hidden_size},
                        {"intermediate_size", c.intermediate_size},
                        {"num_hidden_layers", c.num_hidden_layers},
                        {"num_attention_heads", c.num_attention_heads},
                        {"num_key_value_heads", c.num_key_value_heads},
                        {"head_dim", c.head_dim},
                        {"rope_theta", c.rope_theta},
                        {"rms_norm_eps", c.rms_norm_eps},
                        {"tie_word_embeddings", c.tie_word_embeddings},
                        {"attention_bias", c.attention_bias},
                        {"hidden_act", "silu"},
                        {"max_position_embeddings", c.max_position_embeddings},
                        {"dtype", detail::dtype_name(model)}};
  // transformers 5 reads rope_parameters; transformers 4 rope_theta and rope_scaling.
  const RopeScaling& r = c.rope_scaling;
  nlohmann::json rope{{"rope_type", r.type}, {"rope_theta", c.rope_theta}};
  if (r.type != "default") rope["factor"] = r.factor;
  if (r.type == "yarn") {
    rope["original_max_position_embeddings"] = r.original_max_position_embeddings;
    rope["beta_fast"] = r.beta_fast;
    rope["beta_slow"] = r.beta_slow;
    rope["truncate"] = r.truncate;
    if (r.attention_factor) rope["attention_factor"] = *r.attention_factor;
    if (r.mscale) rope["mscale"] = *r.mscale;
    if (r.mscale_all_dim) rope["mscale_all_dim"] = *r.mscale_all_dim;
  }
  config["rope_parameters"] = rope;
  if (r.type != "default") config["rope_scaling"] = rope;
  std::ofstream(dir / "config.json") << config.dump(2) << "\n";

  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& item : model.named_parameters()) tensors.emplace_back(item.key(), item.value());
  checkpoint::save_safetensors(tensors, dir / "model.safetensors");
}

}  // namespace qwen3
