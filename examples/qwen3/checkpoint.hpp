// Hugging Face model directories: config.json plus model.safetensors, or a sharded
// model.safetensors.index.json with its shards. Files are memory-mapped and each tensor is copied
// once, straight from the mapping into its parameter.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "qwen3.hpp"

namespace qwen3 {

/// A checkpoint that cannot be read; the message names the file and, where it applies, the key.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

namespace fs = std::filesystem;
using nlohmann::json;

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw CheckpointError(fmt::format(format, std::forward<Args>(args)...));
}

inline json read_json(const fs::path& path) {
  std::ifstream in(path);
  if (!in) fail("qwen3: cannot open {}", path.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail("qwen3: {} is not valid JSON: {}", path.string(), e.what());
  }
}

inline const std::map<std::string, torch::ScalarType>& dtypes() {
  static const std::map<std::string, torch::ScalarType> table{
      {"F32", torch::kFloat32}, {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16}};
  return table;
}

inline std::string dtype_name(torch::ScalarType type) {
  for (const auto& [name, value] : dtypes()) {
    if (value == type) return name;
  }
  fail("qwen3: cannot save tensors of type {}", c10::toString(type));
}

/// A read-only memory mapping of a whole file.
class MappedFile {
 public:
  explicit MappedFile(const fs::path& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY);
    if (fd_ < 0) fail("qwen3: cannot open {}: {}", path.string(), std::strerror(errno));
    struct stat info {};
    if (::fstat(fd_, &info) != 0) fail("qwen3: cannot stat {}", path.string());
    size_ = static_cast<std::size_t>(info.st_size);
    if (size_ > 0) {
      data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
      if (data_ == MAP_FAILED) fail("qwen3: cannot map {}", path.string());
    }
  }
  ~MappedFile() {
    if (data_ != nullptr && data_ != MAP_FAILED) ::munmap(data_, size_);
    if (fd_ >= 0) ::close(fd_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return static_cast<const uint8_t*>(data_); }
  std::size_t size() const { return size_; }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
  int fd_ = -1;
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

struct TensorEntry {
  std::shared_ptr<MappedFile> file;
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data;
};

/// Parses and checks one .safetensors file's header; adds its tensors to `entries`.
inline void index_safetensors(const fs::path& path, std::map<std::string, TensorEntry>& entries) {
  auto file = std::make_shared<MappedFile>(path);
  const std::string name = path.string();
  if (file->size() < 8)
    fail("qwen3: {}: truncated: {} bytes, too short for a header", name, file->size());
  uint64_t header_size = 0;
  std::memcpy(&header_size, file->data(), 8);  // little-endian, as the format specifies
  if (header_size > file->size() - 8) {
    fail("qwen3: {}: truncated header: it claims {} bytes but the file has {} after the length",
         name, header_size, file->size() - 8);
  }
  json header;
  try {
    header = json::parse(file->data() + 8, file->data() + 8 + header_size);
  } catch (const json::exception& e) {
    fail("qwen3: {}: malformed header: {}", name, e.what());
  }
  if (!header.is_object()) fail("qwen3: {}: malformed header: not a JSON object", name);
  const uint8_t* data_start = file->data() + 8 + header_size;
  const uint64_t data_size = file->size() - 8 - header_size;

  for (const auto& [key, info] : header.items()) {
    if (key == "__metadata__") continue;
    try {
      const std::string dtype = info.at("dtype").get<std::string>();
      auto type = dtypes().find(dtype);
      if (type == dtypes().end()) {
        fail("qwen3: {}: tensor '{}' has dtype {}, not one of F32, F16, BF16", name, key, dtype);
      }
      auto shape = info.at("shape").get<std::vector<int64_t>>();
      auto offsets = info.at("data_offsets").get<std::vector<uint64_t>>();
      if (offsets.size() != 2 || offsets[0] > offsets[1]) {
        fail("qwen3: {}: tensor '{}' has malformed data_offsets", name, key);
      }
      if (offsets[1] > data_size) {
        fail("qwen3: {}: tensor '{}' runs past the end of the file (bytes {}..{} of {})", name, key,
             offsets[0], offsets[1], data_size);
      }
      int64_t numel = 1;
      for (int64_t dim : shape) {
        if (dim < 0) fail("qwen3: {}: tensor '{}' has a negative dimension", name, key);
        numel *= dim;
      }
      const uint64_t expected = static_cast<uint64_t>(numel) * c10::elementSize(type->second);
      if (offsets[1] - offsets[0] != expected) {
        fail("qwen3: {}: tensor '{}' holds {} bytes, but {} of shape [{}] need {}", name, key,
             offsets[1] - offsets[0], dtype, fmt::join(shape, ", "), expected);
      }
      if (!entries.emplace(key, TensorEntry{file, type->second, shape, data_start + offsets[0]})
               .second) {
        fail("qwen3: {}: tensor '{}' appears in more than one file", name, key);
      }
    } catch (const json::exception& e) {
      fail("qwen3: {}: malformed header entry for '{}': {}", name, key, e.what());
    }
  }
}

}  // namespace detail

/// Reads config.json (the fields the port uses; others are ignored).
inline Config load_config(const std::filesystem::path& dir) {
  const auto path = dir / "config.json";
  const auto j = detail::read_json(path);
  Config c;
  try {
    c.vocab_size = j.at("vocab_size").get<int64_t>();
    c.hidden_size = j.at("hidden_size").get<int64_t>();
    c.intermediate_size = j.at("intermediate_size").get<int64_t>();
    c.num_hidden_layers = j.at("num_hidden_layers").get<int64_t>();
    c.num_attention_heads = j.at("num_attention_heads").get<int64_t>();
    c.num_key_value_heads = j.value("num_key_value_heads", c.num_attention_heads);
    c.head_dim = j.value("head_dim", c.hidden_size / c.num_attention_heads);
    c.rope_theta = j.value("rope_theta", 10000.0);
    c.rms_norm_eps = j.value("rms_norm_eps", 1e-6);
    c.tie_word_embeddings = j.value("tie_word_embeddings", false);
    c.attention_bias = j.value("attention_bias", false);
  } catch (const nlohmann::json::exception& e) {
    detail::fail("qwen3: {}: {}", path.string(), e.what());
  }
  return c;
}

/// Loads the weights of a model directory into `model`, converting F32/F16/BF16 to the model's
/// dtype. Every file, key and shape is checked before any parameter is written, so a failed load
/// leaves the model untouched.
inline void load_weights(torch::nn::Module& model, const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  std::map<std::string, detail::TensorEntry> entries;
  const fs::path single = dir / "model.safetensors";
  const fs::path index = dir / "model.safetensors.index.json";
  std::map<std::string, std::string> expected_file;  // key -> shard, for sharded checkpoints
  if (fs::exists(index)) {
    const auto j = detail::read_json(index);
    if (!j.contains("weight_map") || !j["weight_map"].is_object()) {
      detail::fail("qwen3: {}: no weight_map object", index.string());
    }
    std::set<std::string> shards;
    for (const auto& [key, shard] : j["weight_map"].items()) {
      expected_file[key] = shard.get<std::string>();
      shards.insert(shard.get<std::string>());
    }
    for (const auto& shard : shards) detail::index_safetensors(dir / shard, entries);
    for (const auto& [key, shard] : expected_file) {
      auto it = entries.find(key);
      if (it == entries.end() || it->second.file->path().filename() != shard) {
        detail::fail("qwen3: {}: key '{}' is mapped to {}, which does not hold it", index.string(),
                     key, shard);
      }
    }
  } else if (fs::exists(single)) {
    detail::index_safetensors(single, entries);
  } else {
    detail::fail("qwen3: {} holds neither model.safetensors nor model.safetensors.index.json",
                 dir.string());
  }

  auto params = model.named_parameters();
  std::vector<std::string> missing, unexpected;
  for (const auto& item : params) {
    auto it = entries.find(item.key());
    if (it == entries.end()) {
      missing.push_back(item.key());
    } else if (item.value().sizes() != torch::IntArrayRef(it->second.shape)) {
      detail::fail("qwen3: {}: tensor '{}' has shape [{}], the model expects [{}]",
                   it->second.file->path().string(), item.key(), fmt::join(it->second.shape, ", "),
                   fmt::join(item.value().sizes(), ", "));
    }
  }
  // Some checkpoints of tied models still carry lm_head.weight; like transformers, ignore it.
  const bool tied =
      !params.contains("lm_head.weight") && params.contains("model.embed_tokens.weight");
  for (const auto& [key, entry] : entries) {
    if (!params.contains(key) && !(tied && key == "lm_head.weight")) unexpected.push_back(key);
  }
  if (!missing.empty() || !unexpected.empty()) {
    detail::fail(
        "qwen3: checkpoint in {} does not fit the model: missing keys [{}], unexpected keys [{}]",
        dir.string(), fmt::join(missing, ", "), fmt::join(unexpected, ", "));
  }

  torch::NoGradGuard no_grad;
  for (auto& item : params) {
    const auto& entry = entries.at(item.key());
    // from_blob views the mapping (no copy); copy_ converts into the parameter in one pass.
    auto view = torch::from_blob(const_cast<uint8_t*>(entry.data), entry.shape,
                                 torch::TensorOptions().dtype(entry.dtype));
    item.value().copy_(view);
  }
}

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
                        {"hidden_act", "silu"}};
  std::ofstream(dir / "config.json") << config.dump(2) << "\n";

  nlohmann::json header = nlohmann::json::object();
  std::vector<torch::Tensor> tensors;
  uint64_t offset = 0;
  for (const auto& item : model.named_parameters()) {
    auto t = item.value().detach().contiguous().cpu();
    const uint64_t bytes = t.numel() * t.element_size();
    header[item.key()] = {{"dtype", detail::dtype_name(t.scalar_type())},
                          {"shape", t.sizes().vec()},
                          {"data_offsets", nlohmann::json::array({offset, offset + bytes})}};
    offset += bytes;
    tensors.push_back(t);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  std::ofstream out(dir / "model.safetensors", std::ios::binary);
  const uint64_t size = text.size();
  out.write(reinterpret_cast<const char*>(&size), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& t : tensors) {
    out.write(static_cast<const char*>(t.data_ptr()),
              static_cast<std::streamsize>(t.numel() * t.element_size()));
  }
  if (!out) detail::fail("qwen3: writing {} failed", (dir / "model.safetensors").string());
}

}  // namespace qwen3
