// What the demos share: the language models' id lists (qwen3_fusion, gpt2_fusion), the comparison
// of logits, the file in which another implementation (transformers, through the examples'
// make_models.py scripts) records what it computed for a model, and the comparison of a plan
// found by fusion::optimize (--auto) with a hand-written one.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>
#include <fusion/fusion.hpp>
#include <fusion/kernels/bfloat16.hpp>
#include <fusion/optimize.hpp>
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

/// --dtype: "bf16" (true) or "float32" (false); anything else is an error naming it.
inline bool parse_bfloat16(const std::string& dtype) {
  if (dtype != "float32" && dtype != "bf16") {
    throw std::invalid_argument("--dtype takes float32 or bf16, not " + dtype);
  }
  return dtype == "bf16";
}

/// The demos' command line: [--model-dir DIR] [--input-ids 1,2,3] [--generate N]
/// [--save-logits FILE] [--save-kernel-logits FILE] [--folded] [--expect FILE]
/// [--auto [--min-speedup X]] [--dtype float32|bf16].
struct Options {
  std::string model_dir;
  std::vector<int64_t> input_ids{1, 2, 3, 4, 5, 6, 7, 8};
  int64_t generate = 0;
  std::string save_logits;
  std::string save_kernel_logits;
  bool folded = false;
  std::string expect;
  bool automatic = false;  // --auto: the kernels' plan found by fusion::optimize
  double min_speedup = fusion::OptimizeOptions{}.min_speedup;
  bool bfloat16 = false;  // --dtype bf16: the model in bfloat16
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
    } else if (arg == "--auto") {
      options.automatic = true;
    } else if (arg == "--min-speedup") {
      options.min_speedup = std::stod(value());
    } else if (arg == "--dtype") {
      options.bfloat16 = parse_bfloat16(value());
    } else {
      throw std::invalid_argument(
          "unknown option " + arg +
          "\nusage: " + std::filesystem::path(argv[0]).filename().string() +
          " [--model-dir DIR] [--input-ids 1,2,3] [--generate N] [--save-logits FILE] "
          "[--save-kernel-logits FILE] [--folded] [--expect FILE] [--auto [--min-speedup X]] "
          "[--dtype float32|bf16]");
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

/// The bytes of `model`'s parameters and buffers.
inline int64_t tensor_bytes(const torch::nn::Module& model) {
  int64_t bytes = 0;
  for (const auto& tensor : model.parameters()) bytes += tensor.numel() * tensor.element_size();
  for (const auto& tensor : model.buffers()) bytes += tensor.numel() * tensor.element_size();
  return bytes;
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

/// Chains as (member paths, kernel).
using ChainSet = std::set<std::pair<std::vector<std::string>, std::string>>;

/// The chains `plan` would fuse under `model`, which must be unfused.
template <typename Model>
ChainSet planned_chains(Model& model, const fusion::Plan& plan) {
  ChainSet chains;
  for (const auto& rule : plan.rules) {
    for (const auto& chain : fusion::match_chains(model, rule.patterns, rule.options)) {
      chains.emplace(chain.paths, rule.options.kernel);
    }
  }
  return chains;
}

/// The chains fused under `model` now.
template <typename Model>
ChainSet fused_chains(Model& model) {
  ChainSet chains;
  for (const auto& chain : fusion::fused_chains(model)) chains.emplace(chain.paths, chain.kernel);
  return chains;
}

/// Every registered kernel that computes in float32 (no ".bf16" variant), those fusion::optimize
/// tries only where named (fusion.linear) included: what --auto names for a float32 model.
inline std::vector<std::string> float32_kernels() {
  std::vector<std::string> names;
  for (const auto& name : fusion::registered_kernels()) {
    if (!fusion::kernels::is_bfloat16_variant(name)) names.push_back(name);
  }
  return names;
}

/// Whether `found` holds every chain of `wanted`, with the same kernel.
inline bool covers(const ChainSet& found, const ChainSet& wanted) {
  return std::includes(found.begin(), found.end(), wanted.begin(), wanted.end());
}

/// The forward timed with two plans, interleaved round by round (medians, milliseconds).
struct PlanTiming {
  double first_ms, second_ms;
  int rounds;
};

inline std::ostream& operator<<(std::ostream& out, const PlanTiming& t) {
  return out << fmt::format(
             "Forward with the auto plan: {:.3f} ms, with the hand-written plan: {:.3f} ms "
             "(ratio {:.3f}, medians of {} interleaved rounds)\n",
             t.first_ms, t.second_ms, t.first_ms / t.second_ms, t.rounds);
}

/// Times `run` with `model` fused by `first`, then by `second`, in turns; leaves it fused by
/// `first`.
template <typename Model, typename Run>
PlanTiming time_plans(Model& model, const fusion::Plan& first, const fusion::Plan& second, Run run,
                      int rounds = 9) {
  std::vector<double> times[2];
  const auto begin = std::chrono::steady_clock::now();
  run();
  const double once =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - begin).count();
  const int repeats = std::max(1, static_cast<int>(20.0 / std::max(once, 1e-3)));  // ~20 ms each
  for (int round = 0; round < rounds; ++round) {
    for (int p = 0; p < 2; ++p) {
      fusion::unfuse_modules(model);
      fusion::fuse_modules(model, p == 0 ? first : second);
      run();  // prepares the kernels
      const auto start = std::chrono::steady_clock::now();
      for (int r = 0; r < repeats; ++r) run();
      times[p].push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count() /
          repeats);
    }
  }
  fusion::unfuse_modules(model);
  fusion::fuse_modules(model, first);
  for (auto& t : times) std::sort(t.begin(), t.end());
  return {times[0][rounds / 2], times[1][rounds / 2], rounds};
}

/// --auto: fuses `model` by fusion::optimize on `run`, prints the plan, whether it covers every
/// chain of `hand_written` with the same kernel, and the forward timed with both plans; leaves
/// `model` fused by the found plan. Returns whether it covers them.
template <typename Model, typename Run>
bool fuse_automatically(Model& model, const fusion::Plan& hand_written, Run run, double min_speedup,
                        std::vector<std::string> kernels = {}) {
  const auto wanted = planned_chains(model, hand_written);
  fusion::OptimizeOptions options;
  options.min_speedup = min_speedup;
  options.kernels = std::move(kernels);
  const auto plan = fusion::optimize(model, run, options);
  std::cout << plan;
  const bool found = covers(fused_chains(model), wanted);
  std::cout << "Auto plan covers every chain of the hand-written plan, same kernels: "
            << (found ? "yes" : "NO") << "\n";
  std::cout << time_plans(model, plan, hand_written, run);
  return found;
}

}  // namespace demo
