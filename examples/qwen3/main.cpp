// qwen3_fusion: load a Qwen3 causal LM (or build a tiny random one), fuse
// post_attention_layernorm+mlp and input_layernorm+self_attn in every layer, and check that the
// fused model gives the original logits, then that the unfused one does again; then run both
// chains with their fused kernels (kernels.hpp) and check their logits within a tolerance.
//
//   qwen3_fusion [--model-dir DIR] [--input-ids 1,2,3] [--generate N] [--save-logits FILE]
//                [--save-kernel-logits FILE] [--folded]
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "checkpoint.hpp"
#include "kernels.hpp"
#include "npy.hpp"
#include "qwen3.hpp"

namespace {

struct Options {
  std::string model_dir;
  std::vector<int64_t> input_ids{1, 2, 3, 4, 5, 6, 7, 8};
  int64_t generate = 0;
  std::string save_logits;
  std::string save_kernel_logits;
  bool folded = false;
};

std::vector<int64_t> parse_ids(const std::string& text) {
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

Options parse(int argc, char** argv) {
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
    } else {
      throw std::invalid_argument("unknown option " + arg +
                                  "\nusage: qwen3_fusion [--model-dir DIR] [--input-ids 1,2,3] "
                                  "[--generate N] [--save-logits FILE] [--save-kernel-logits FILE] "
                                  "[--folded]");
    }
  }
  return options;
}

/// The default model: tiny, random, seeded, so the demo runs with nothing downloaded.
qwen3::ForCausalLM tiny_model() {
  qwen3::ForCausalLM model(qwen3::Config{});
  qwen3::init_random(*model, 2024);
  return model;
}

std::vector<int64_t> new_ids(const torch::Tensor& generated, int64_t prompt) {
  const auto tail = generated[0].slice(0, prompt).contiguous();
  return {tail.data_ptr<int64_t>(), tail.data_ptr<int64_t>() + tail.numel()};
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

}  // namespace

int main(int argc, char** argv) try {
  const Options options = parse(argc, argv);
  torch::NoGradGuard no_grad;
  qwen3::ForCausalLM model{nullptr};
  if (options.model_dir.empty()) {
    model = tiny_model();
    std::cout << "Model: tiny random Qwen3 (hidden 64, 4 layers, vocab 1000, seed 2024)\n";
  } else {
    model = qwen3::ForCausalLM(qwen3::load_config(options.model_dir));
    qwen3::load_weights(*model, options.model_dir);
    std::cout << "Model: " << options.model_dir << "\n";
  }
  model->eval();
  const auto ids = torch::tensor(options.input_ids, torch::kInt64).unsqueeze(0);
  std::cout << fmt::format("Input ids: [{}]\n", fmt::join(options.input_ids, ", "));

  const auto original = model(ids);
  torch::Tensor original_generated;
  if (options.generate > 0) original_generated = model->generate(ids, options.generate);

  fusion::fuse_modules(model, qwen3::mlp_patterns(), qwen3::mlp_specs());
  fusion::fuse_modules(model, qwen3::attention_patterns(), qwen3::attention_specs());
  std::cout << fusion::report(model);

  const auto fused = model(ids);
  const double fused_diff = max_diff(fused, original);
  std::cout << "Max diff fused vs original: " << fused_diff << "\n";
  bool ok = fused_diff == 0;
  if (!options.save_logits.empty()) {
    npy::save_float32(options.save_logits, fused[0]);
    std::cout << "Saved fused logits [" << fused.size(1) << ", " << fused.size(2) << "] to "
              << options.save_logits << "\n";
  }
  if (options.generate > 0) {
    const auto generated = model->generate(ids, options.generate);
    const bool same = torch::equal(generated, original_generated);
    const auto prompt = ids.size(1);
    std::cout << fmt::format("Generated ids (original): [{}]\n",
                             fmt::join(new_ids(original_generated, prompt), ", "));
    std::cout << fmt::format("Generated ids (fused):    [{}]  {}\n",
                             fmt::join(new_ids(generated, prompt), ", "),
                             same ? "identical" : "DIFFERENT");
    ok = ok && same;
  }

  fusion::unfuse_modules(model);
  const double unfused_diff = max_diff(model(ids), original);
  std::cout << "Max diff unfused vs original: " << unfused_diff << "\n";
  ok = ok && unfused_diff == 0;

  // Kernels compute with other ops (one GEMM for gate and up, raw loops), so their logits differ
  // by rounding: within 1e-4 of the largest logit in float32, 5e-2 in bf16/f16.
  qwen3::fuse_with_kernels(model, options.folded);
  const auto with_kernels = model(ids);
  const double scale = std::max(1.0, original.abs().max().item<double>());
  const double tolerance = (original.scalar_type() == torch::kFloat32 ? 1e-4 : 5e-2) * scale;
  const double kernel_diff = max_diff(with_kernels, original);
  std::cout << fmt::format("Max diff with kernels vs original: {:g} (tolerance {:g})\n",
                           kernel_diff, tolerance);
  ok = ok && kernel_diff <= tolerance;
  if (!options.save_kernel_logits.empty()) {
    npy::save_float32(options.save_kernel_logits, with_kernels[0]);
    std::cout << "Saved kernel logits [" << with_kernels.size(1) << ", " << with_kernels.size(2)
              << "] to " << options.save_kernel_logits << "\n";
  }
  if (options.generate > 0) {
    const auto generated = model->generate(ids, options.generate);
    const bool same = torch::equal(generated, original_generated);
    std::cout << fmt::format("Generated ids (kernels):  [{}]  {}\n",
                             fmt::join(new_ids(generated, ids.size(1)), ", "),
                             same ? "identical" : "DIFFERENT");
    ok = ok && same;
  }
  std::cout << fusion::report(model);
  std::cout << (ok ? "OK\n" : "FAILED\n");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::cerr << "qwen3_fusion: " << e.what() << "\n";
  return 2;
}
