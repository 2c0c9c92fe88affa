// Hugging Face / torchvision checkpoints for the examples: a directory with model.safetensors, or
// a sharded model.safetensors.index.json with its shards. Files are memory-mapped; every header,
// key, dtype, shape and byte range is checked before any tensor is written (a checkpoint is
// untrusted input: no out-of-bounds read, no allocation sized by a forged header), and each tensor
// is copied once, straight from the mapping into its parameter or buffer.
#pragma once

#include <algorithm>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

namespace checkpoint {

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

/// Whether `value` is a JSON array of integers. Checked before any get<int>: nlohmann converts a
/// float (1.5, 5e30) by a cast, which truncates, or is undefined past the integer's range (found
/// by the fuzzer).
inline bool is_integer_list(const json& value) {
  return value.is_array() && std::all_of(value.begin(), value.end(),
                                         [](const json& v) { return v.is_number_integer(); });
}

inline json read_json(const fs::path& path) {
  std::ifstream in(path);
  if (!in) fail("cannot open {}", path.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail("{} is not valid JSON: {}", path.string(), e.what());
  }
}

inline const std::map<std::string, torch::ScalarType>& dtypes() {
  static const std::map<std::string, torch::ScalarType> table{{"F64", torch::kFloat64},
                                                              {"F32", torch::kFloat32},
                                                              {"F16", torch::kFloat16},
                                                              {"BF16", torch::kBFloat16},
                                                              {"I64", torch::kInt64}};
  return table;
}

inline std::string dtype_name(torch::ScalarType type) {
  for (const auto& [name, value] : dtypes()) {
    if (value == type) return name;
  }
  fail("cannot save tensors of type {}", c10::toString(type));
}

/// A read-only memory mapping of a whole file.
class MappedFile {
 public:
  explicit MappedFile(const fs::path& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY);
    if (fd_ < 0) fail("cannot open {}: {}", path.string(), std::strerror(errno));
    struct stat info {};
    if (::fstat(fd_, &info) != 0) fail("cannot stat {}", path.string());
    if (!S_ISREG(info.st_mode)) fail("{} is not a regular file", path.string());
    size_ = static_cast<std::size_t>(info.st_size);
    if (size_ > 0) {
      data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
      if (data_ == MAP_FAILED) fail("cannot map {}", path.string());
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

}  // namespace detail

/// One tensor of a checkpoint: where its bytes are in a mapped file, and what they are.
struct TensorEntry {
  std::shared_ptr<detail::MappedFile> file;
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data;
  /// A view of the mapped bytes (no copy); valid while the entry lives.
  torch::Tensor view() const {
    return torch::from_blob(const_cast<uint8_t*>(data), shape, torch::TensorOptions().dtype(dtype));
  }
};
using Entries = std::map<std::string, TensorEntry>;

/// Parses and checks one .safetensors file's header from its bytes; adds its tensors to `entries`.
/// `name` is what messages call the file. The bytes must outlive the entries (they point into
/// them); `file` keeps a mapping alive.
inline void index_safetensors_bytes(const uint8_t* bytes, std::size_t size, const std::string& name,
                                    const std::shared_ptr<detail::MappedFile>& file,
                                    Entries& entries) {
  using detail::fail;
  using detail::json;
  if (size < 8) fail("{}: truncated: {} bytes, too short for a header", name, size);
  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes, 8);  // little-endian, as the format specifies
  if (header_size > size - 8) {
    fail("{}: truncated header: it claims {} bytes but the file has {} after the length", name,
         header_size, size - 8);
  }
  json header;
  try {
    header = json::parse(bytes + 8, bytes + 8 + header_size);
  } catch (const json::exception& e) {
    fail("{}: malformed header: {}", name, e.what());
  }
  if (!header.is_object()) fail("{}: malformed header: not a JSON object", name);
  const uint8_t* data_start = bytes + 8 + header_size;
  const uint64_t data_size = size - 8 - header_size;

  for (const auto& [key, info] : header.items()) {
    if (key == "__metadata__") continue;
    try {
      const std::string dtype = info.at("dtype").get<std::string>();
      auto type = detail::dtypes().find(dtype);
      if (type == detail::dtypes().end()) {
        std::vector<std::string> known;
        for (const auto& item : detail::dtypes()) known.push_back(item.first);
        fail("{}: tensor '{}' has dtype {}, not one of {}", name, key, dtype,
             fmt::join(known, ", "));
      }
      for (const char* field : {"shape", "data_offsets"}) {
        const auto& list = info.at(field);
        if (!detail::is_integer_list(list)) {
          fail("{}: tensor '{}' has a {} that is not a list of integers: {}", name, key, field,
               list.dump());
        }
      }
      auto shape = info.at("shape").get<std::vector<int64_t>>();
      auto offsets = info.at("data_offsets").get<std::vector<uint64_t>>();
      if (offsets.size() != 2 || offsets[0] > offsets[1]) {
        fail("{}: tensor '{}' has malformed data_offsets", name, key);
      }
      if (offsets[1] > data_size) {
        fail("{}: tensor '{}' runs past the end of the file (bytes {}..{} of {})", name, key,
             offsets[0], offsets[1], data_size);
      }
      // The element count, checked for overflow: a forged shape must not wrap around to match.
      uint64_t expected = c10::elementSize(type->second);
      for (int64_t dim : shape) {
        if (dim < 0) fail("{}: tensor '{}' has a negative dimension", name, key);
        if (__builtin_mul_overflow(expected, static_cast<uint64_t>(dim), &expected)) {
          fail("{}: tensor '{}' has a shape [{}] too large to exist", name, key,
               fmt::join(shape, ", "));
        }
      }
      if (offsets[1] - offsets[0] != expected) {
        fail("{}: tensor '{}' holds {} bytes, but {} of shape [{}] need {}", name, key,
             offsets[1] - offsets[0], dtype, fmt::join(shape, ", "), expected);
      }
      if (!entries.emplace(key, TensorEntry{file, type->second, shape, data_start + offsets[0]})
               .second) {
        fail("{}: tensor '{}' appears in more than one file", name, key);
      }
    } catch (const json::exception& e) {
      fail("{}: malformed header entry for '{}': {}", name, key, e.what());
    }
  }
}

/// Maps and indexes one .safetensors file.
inline void index_safetensors(const std::filesystem::path& path, Entries& entries) {
  auto file = std::make_shared<detail::MappedFile>(path);
  index_safetensors_bytes(file->data(), file->size(), path.string(), file, entries);
}

/// Indexes a model directory: model.safetensors, or model.safetensors.index.json and its shards
/// (each key must be in the shard the index names).
inline Entries index_directory(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  Entries entries;
  const fs::path single = dir / "model.safetensors";
  const fs::path index = dir / "model.safetensors.index.json";
  if (fs::exists(index)) {
    const auto j = detail::read_json(index);
    if (!j.contains("weight_map") || !j["weight_map"].is_object()) {
      detail::fail("{}: no weight_map object", index.string());
    }
    std::map<std::string, std::string> expected_file;
    std::set<std::string> shards;
    for (const auto& [key, shard] : j["weight_map"].items()) {
      if (!shard.is_string())
        detail::fail("{}: key '{}' maps to {}", index.string(), key, shard.dump());
      const auto file = shard.get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos) {
        detail::fail("{}: key '{}' maps to '{}', not a file in the directory", index.string(), key,
                     file);
      }
      expected_file[key] = file;
      shards.insert(file);
    }
    for (const auto& shard : shards) index_safetensors(dir / shard, entries);
    for (const auto& [key, shard] : expected_file) {
      auto it = entries.find(key);
      if (it == entries.end() || it->second.file->path().filename() != shard) {
        detail::fail("{}: key '{}' is mapped to {}, which does not hold it", index.string(), key,
                     shard);
      }
    }
  } else if (fs::exists(single)) {
    index_safetensors(single, entries);
  } else {
    detail::fail("{} holds neither model.safetensors nor model.safetensors.index.json",
                 dir.string());
  }
  return entries;
}

/// Copies `entries` into `module`'s parameters and buffers of the same names, converting dtypes.
/// Every key and shape is checked first, so a failed load leaves the module untouched. Keys in
/// `ignored` may be in the checkpoint without being in the module; `where` names the checkpoint.
inline void load_state(torch::nn::Module& module, const Entries& entries, const std::string& where,
                       const std::set<std::string>& ignored = {}) {
  std::vector<std::pair<std::string, torch::Tensor>> targets;
  for (const auto& item : module.named_parameters()) targets.emplace_back(item.key(), item.value());
  for (const auto& item : module.named_buffers()) targets.emplace_back(item.key(), item.value());
  std::set<std::string> names;
  std::vector<std::string> missing, unexpected;
  for (const auto& [name, tensor] : targets) {
    names.insert(name);
    auto it = entries.find(name);
    if (it == entries.end()) {
      missing.push_back(name);
    } else if (tensor.sizes() != torch::IntArrayRef(it->second.shape)) {
      detail::fail("{}: tensor '{}' has shape [{}], the model expects [{}]",
                   it->second.file->path().string(), name, fmt::join(it->second.shape, ", "),
                   fmt::join(tensor.sizes(), ", "));
    }
  }
  for (const auto& [key, entry] : entries) {
    if (names.count(key) == 0 && ignored.count(key) == 0) unexpected.push_back(key);
  }
  if (!missing.empty() || !unexpected.empty()) {
    detail::fail("checkpoint in {} does not fit the model: missing keys [{}], unexpected keys [{}]",
                 where, fmt::join(missing, ", "), fmt::join(unexpected, ", "));
  }
  torch::NoGradGuard no_grad;
  for (auto& [name, tensor] : targets) tensor.copy_(entries.at(name).view());
}

/// Writes `tensors` (name -> tensor) as one .safetensors file, data 8-byte aligned.
inline void save_safetensors(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                             const std::filesystem::path& path) {
  nlohmann::json header = nlohmann::json::object();
  std::vector<torch::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    auto t = tensor.detach().contiguous().cpu();
    const uint64_t bytes = t.numel() * t.element_size();
    header[name] = {{"dtype", detail::dtype_name(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", nlohmann::json::array({offset, offset + bytes})}};
    offset += bytes;
    contiguous.push_back(t);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::ofstream out(path, std::ios::binary);
  const uint64_t size = text.size();
  out.write(reinterpret_cast<const char*>(&size), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& t : contiguous) {
    out.write(static_cast<const char*>(t.data_ptr()),
              static_cast<std::streamsize>(t.numel() * t.element_size()));
  }
  if (!out) detail::fail("writing {} failed", path.string());
}

}  // namespace checkpoint
