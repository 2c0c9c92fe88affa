// What the image classifiers' demos share (resnet_fusion, mobilenet_fusion): the command line, the
// model on seeded random weights or a torchvision state_dict, the input, the comparison of the
// kernel-equipped model with the unfused one and with another implementation's logits.
//
//   <program> [--weights FILE] [--input FILE] [--save-logits FILE] [--batch N]
//             [--channels-last | --mkldnn] [--expect-logits FILE] [--auto [--min-speedup X]]
//             [--dtype float32|bf16]
//
// --auto: fusion::optimize finds the plan on the input instead (printed, and checked to cover
// every chain of the example's plan), and the forward is timed with both plans, interleaved.
// --input: a float32 .npy of shape [N, 3, H, W] (default: seeded random [N, 3, 224, 224]).
// --save-logits: the kernel-equipped model's logits [N, classes] as float32 .npy.
// --expect-logits: another implementation's logits (.npy) the unfused model must match within
// 1e-4 of the largest logit (the torchvision parity tests). Exits non-zero past any tolerance.
// --dtype bf16: the plan's kernels on their bfloat16 variants (fusion::kernels::in_bfloat16),
// compared with the float32 model within bfloat16's default tolerance (5e-2 of the largest logit);
// where bfloat16 is not available (fusion::kernels::bfloat16_supported) the demo says so and runs
// float32.
#pragma once

#include <cstdint>
#include <functional>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>
#include <fusion/fusion.hpp>
#include <fusion/kernels/bfloat16.hpp>
#include <fusion/optimize.hpp>

#include "demo.hpp"
#include "npy.hpp"
#include "safetensors.hpp"

namespace cnn_demo {

struct Options {
  std::string weights, input, save_logits, expect_logits;
  int64_t batch = 1;
  bool channels_last = false;
  bool mkldnn = false;  // the input in oneDNN's layout, as TorchScript's optimize_for_inference
  bool automatic = false;
  bool bfloat16 = false;
  double min_speedup = fusion::OptimizeOptions{}.min_speedup;
};

inline Options parse(int argc, char** argv, const std::string& program) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--weights") {
      options.weights = value();
    } else if (arg == "--input") {
      options.input = value();
    } else if (arg == "--save-logits") {
      options.save_logits = value();
    } else if (arg == "--expect-logits") {
      options.expect_logits = value();
    } else if (arg == "--batch") {
      options.batch = std::stoll(value());
      if (options.batch < 1) throw std::invalid_argument("--batch must be at least 1");
    } else if (arg == "--channels-last") {
      options.channels_last = true;
    } else if (arg == "--mkldnn") {
      options.mkldnn = true;
    } else if (arg == "--auto") {
      options.automatic = true;
    } else if (arg == "--min-speedup") {
      options.min_speedup = std::stod(value());
    } else if (arg == "--dtype") {
      options.bfloat16 = demo::parse_bfloat16(value());
    } else {
      throw std::invalid_argument(
          "unknown option " + arg + "\nusage: " + program +
          " [--weights FILE] [--input FILE] [--save-logits FILE] [--batch N] [--channels-last | "
          "--mkldnn] [--expect-logits FILE] [--auto [--min-speedup X]] [--dtype float32|bf16]");
    }
  }
  return options;
}

/// One example: its model, how it gets random weights, and the plan its demo fuses with.
template <typename Model>
struct Example {
  std::string program;  // for messages
  std::string name;     // "ResNet-18"
  std::function<void(typename Model::ContainedType&, uint64_t)> init_random;
  std::function<fusion::Plan()> plan;  // registers the kernels it names
};

/// The demo: exits 0 when the kernels match the unfused model, ran as kernels (no replay), and the
/// unfused model matches --expect-logits.
template <typename Model>
int run(int argc, char** argv, const Example<Model>& example) try {
  const Options options = parse(argc, argv, example.program);
  torch::NoGradGuard no_grad;
  // oneDNN tensors: LibTorch 2.x runs max_pool2d on them only in InferenceMode.
  c10::optional<c10::InferenceMode> inference;
  if (options.mkldnn) inference.emplace();
  Model model;
  if (options.weights.empty()) {
    example.init_random(*model, 2024);
    std::cout << "Model: " << example.name << ", seeded random weights and BatchNorm statistics\n";
  } else {
    checkpoint::Entries entries;
    checkpoint::index_safetensors(options.weights, entries);
    checkpoint::load_state(*model, entries, options.weights);
    std::cout << "Model: " << example.name << " from " << options.weights << "\n";
  }
  model->eval();
  auto images = options.input.empty()
                    ? torch::randn({options.batch, 3, 224, 224},
                                   torch::Generator(at::detail::createCPUGenerator(7)))
                    : npy::load_float32(options.input);
  if (images.dim() != 4 || images.size(1) != 3) {
    throw std::invalid_argument(
        fmt::format("input of shape [{}], expected [N, 3, H, W]", fmt::join(images.sizes(), ", ")));
  }
  if (options.channels_last) images = images.contiguous(torch::MemoryFormat::ChannelsLast);
  if (options.mkldnn) images = images.to_mkldnn();
  std::cout << fmt::format("Input: [{}]{}\n", fmt::join(images.sizes(), ", "),
                           options.channels_last ? ", channels-last"
                           : options.mkldnn      ? ", oneDNN layout"
                                                 : "");

  const torch::Tensor original = model(images);
  const double tolerance = 1e-4 * std::max(1.0, original.abs().max().item<double>());
  bool ok = true;
  if (!options.expect_logits.empty()) {
    const double diff = demo::max_diff(original, npy::load_float32(options.expect_logits));
    std::cout << fmt::format("Max diff original vs expected logits: {:g} (tolerance {:g})\n", diff,
                             tolerance);
    ok = diff <= tolerance;
  }

  fusion::Plan plan = example.plan();
  double kernel_tolerance = tolerance;
  std::vector<std::string> kernels = demo::float32_kernels();  // for --auto
  if (options.bfloat16 && !fusion::kernels::bfloat16_supported()) {
    std::cout << "bf16: not available here (no AVX512_BF16, no oneDNN, or FUSION_NO_BFLOAT16): "
                 "running float32\n";
  } else if (options.bfloat16) {
    plan = fusion::kernels::in_bfloat16(plan);
    kernels.clear();
    for (const auto& rule : plan.rules) kernels.push_back(rule.options.kernel);
    kernel_tolerance =
        fusion::default_tolerance(torch::kBFloat16) * original.abs().max().item<double>();
    std::cout << "Kernels in bfloat16 (float32 accumulation)\n";
  }
  std::vector<fusion::FusedChain> chains;
  if (options.automatic) {
    ok = demo::fuse_automatically(
             model, plan, [&] { return model(images); }, options.min_speedup, kernels) &&
         ok;
    chains = fusion::fused_chains(model);
  } else {
    chains = fusion::fuse_modules(model, plan);
  }
  std::cout << fmt::format("Fused {} chains with kernels\n", chains.size());
  const torch::Tensor with_kernels = model(images);
  const double diff = demo::max_diff(with_kernels, original);
  std::cout << fmt::format("Max diff with kernels vs original: {:g} (tolerance {:g})\n", diff,
                           kernel_tolerance);
  ok = ok && diff <= kernel_tolerance;
  std::uint64_t runs = 0, replays = 0;
  for (const auto& chain : fusion::fused_chains(model)) {
    const auto& k = chain.stats;
    runs += k.runs;
    replays += k.replays_device + k.replays_training + k.replays_grad + k.replays_modes +
               k.replays_declined;
  }
  std::cout << fmt::format("Kernel runs: {}, replays: {}\n", runs, replays);
  ok = ok && replays == 0 && runs == chains.size();
  const auto top = original.argmax(1).contiguous(), fused_top = with_kernels.argmax(1).contiguous();
  std::cout << fmt::format(
      "Top class per image: [{}] (with kernels: [{}])\n",
      fmt::join(top.data_ptr<int64_t>(), top.data_ptr<int64_t>() + top.numel(), ", "),
      fmt::join(fused_top.data_ptr<int64_t>(), fused_top.data_ptr<int64_t>() + fused_top.numel(),
                ", "));
  if (!options.save_logits.empty()) {
    npy::save_float32(options.save_logits, with_kernels);
    std::cout << fmt::format("Saved kernel logits [{}] to {}\n",
                             fmt::join(with_kernels.sizes(), ", "), options.save_logits);
  }
  std::cout << (ok ? "OK\n" : "FAILED\n");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::cerr << example.program << ": " << e.what() << "\n";
  return 2;
}

}  // namespace cnn_demo
