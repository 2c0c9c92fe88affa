// What the language-model demos (qwen3_fusion, gpt2_fusion) share: their id lists, the
// comparison of logits, and the file in which another implementation (transformers, through the
// examples' make_models.py scripts) records what it computed for a model.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

namespace demo {

/// "1,2,3" -> {1, 2, 3}; anything else is an error naming the item.
inline std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    std::size_t used = 0;
    const long long id = std::stoll(item, &used);
    if (used != item.size()) throw std::invalid_argument("bad input id '" + item + "'");
    ids.push_back(id);
  }
  if (ids.empty()) throw std::invalid_argument("--input-ids needs at least one id");
  return ids;
}

/// The demos' command line: [--model-dir DIR] [--input-ids 1,2,3] [--generate N]
/// [--save-logits FILE] [--save-kernel-logits FILE] [--folded] [--expect FILE].
struct Options {
  std::string model_dir;
  std::vector<int64_t> input_ids{1, 2, 3, 4, 5, 6, 7, 8};
  int64_t generate = 0;
  std::string save_logits;
  std::string save_kernel_logits;
  bool folded = false;
  std::string expect;
};

inline Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--model-dir") {
      options.model_dir = value();
    } else if (arg == "--input-ids") {
      options.input_ids = parse_ids(value());
    } else if (arg == "--generate") {
      options.generate = std::stoll(value());
    } else if (arg == "--save-logits") {
      options.save_logits = value();
    } else if (arg == "--save-kernel-logits") {
      options.save_kernel_logits = value();
    } else if (arg == "--folded") {
      options.folded = true;
    } else if (arg == "--expect") {
      options.expect = value();
    } else {
      throw std::invalid_argument(
          "unknown option " + arg +
          "\nusage: " + std::filesystem::path(argv[0]).filename().string() +
          " [--model-dir DIR] [--input-ids 1,2,3] [--generate N] [--save-logits FILE] "
          "[--save-kernel-logits FILE] [--folded] [--expect FILE]");
    }
  }
  return options;
}

/// The ids generated after a prompt of `prompt` ids, for printing.
inline std::vector<int64_t> new_ids(const torch::Tensor& generated, int64_t prompt) {
  const auto tail = generated[0].slice(0, prompt).contiguous();
  return {tail.data_ptr<int64_t>(), tail.data_ptr<int64_t>() + tail.numel()};
}

inline double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

/// What another implementation computed for the same model.
struct Expected {
  std::vector<int64_t> input_ids;
  int64_t max_new_tokens = 0;
  torch::Tensor logits;  // [seq, vocab], float32
  torch::Tensor ids;     // [1, prompt + generated]
  std::string refusal;   // else: what loading must be refused with
};

/// Reads expected.json: {"input_ids", "max_new_tokens", "logits": {"file", "shape"},
/// "generated_ids"} with the logits as raw little-endian float32 beside it, or {"refusal"}.
inline Expected read_expected(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  const auto j = nlohmann::json::parse(in);
  Expected expected;
  if (j.contains("refusal")) {
    expected.refusal = j.at("refusal").get<std::string>();
    return expected;
  }
  expected.input_ids = j.at("input_ids").get<std::vector<int64_t>>();
  expected.max_new_tokens = j.at("max_new_tokens").get<int64_t>();
  const auto shape = j.at("logits").at("shape").get<std::vector<int64_t>>();
  const auto file =
      std::filesystem::path(path).parent_path() / j.at("logits").at("file").get<std::string>();
  expected.logits = torch::empty(shape, torch::kFloat32);
  std::ifstream data(file, std::ios::binary);
  data.read(static_cast<char*>(expected.logits.data_ptr()),
            static_cast<std::streamsize>(expected.logits.nbytes()));
  if (!data || data.peek() != EOF) {
    throw std::runtime_error(file.string() + ": not " +
                             fmt::format("[{}] float32", fmt::join(shape, ", ")));
  }
  expected.ids = torch::tensor(j.at("generated_ids").get<std::vector<int64_t>>()).unsqueeze(0);
  return expected;
}

}  // namespace demo
