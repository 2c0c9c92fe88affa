// resnet_fusion: a torchvision ResNet-18 (loaded from a safetensors state_dict, or seeded random),
// fused with the built-in folding kernels (conv+bn+relu in the stem, conv+bn in every block and
// downsample), checked against the unfused model, contiguous and channels-last.
//
//   resnet_fusion [--model-dir DIR] [--expect FILE]
//
// --expect FILE (written by torchvision/make_model.py) gives the input images and torchvision's
// logits for them; the unfused C++ model must match within 1e-4 of the largest logit.
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "resnet.hpp"

namespace {

torch::Tensor read_f32(const std::filesystem::path& file, const std::vector<int64_t>& shape) {
  auto tensor = torch::empty(shape, torch::kFloat32);
  std::ifstream data(file, std::ios::binary);
  data.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(tensor.nbytes()));
  if (!data || data.peek() != EOF) {
    throw std::runtime_error(
        fmt::format("{}: not [{}] float32", file.string(), fmt::join(shape, ", ")));
  }
  return tensor;
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

}  // namespace

int main(int argc, char** argv) try {
  std::string model_dir, expect;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--model-dir" || arg == "--expect") && i + 1 < argc) {
      (arg == "--model-dir" ? model_dir : expect) = argv[++i];
    } else {
      throw std::invalid_argument("unknown option " + arg +
                                  "\nusage: resnet_fusion [--model-dir DIR] [--expect FILE]");
    }
  }
  torch::NoGradGuard no_grad;
  resnet::ResNet18 model;
  if (model_dir.empty()) {
    resnet::init_random(*model, 2024);
    std::cout << "Model: ResNet-18, seeded random weights and statistics\n";
  } else {
    resnet::load_weights(*model, model_dir);
    std::cout << "Model: ResNet-18 from " << model_dir << "\n";
  }
  model->eval();
  torch::Tensor images =
      torch::randn({2, 3, 64, 64}, torch::Generator(at::detail::createCPUGenerator(7)));
  torch::Tensor expected;
  if (!expect.empty()) {
    std::ifstream in(expect);
    if (!in) throw std::runtime_error("cannot open " + expect);
    const auto j = nlohmann::json::parse(in);
    const auto dir = std::filesystem::path(expect).parent_path();
    images = read_f32(dir / j.at("input").at("file").get<std::string>(),
                      j.at("input").at("shape").get<std::vector<int64_t>>());
    expected = read_f32(dir / j.at("logits").at("file").get<std::string>(),
                        j.at("logits").at("shape").get<std::vector<int64_t>>());
  }
  std::cout << fmt::format("Input: [{}]\n", fmt::join(images.sizes(), ", "));

  const auto original = model(images);
  const double scale = std::max(1.0, original.abs().max().item<double>());
  const double tolerance = 1e-4 * scale;
  bool ok = true;
  if (expected.defined()) {
    const double diff = max_diff(original, expected);
    std::cout << fmt::format("Max diff original vs torchvision: {:g} (tolerance {:g})\n", diff,
                             tolerance);
    ok = diff <= tolerance;
  }

  fusion::kernels::register_builtin_kernels();
  const auto chains = fusion::fuse_modules(model, resnet::folding_plan());
  std::cout << fmt::format("Fused {} chains with folding kernels\n", chains.size());
  const auto fused = model(images);
  const double fused_diff = max_diff(fused, original);
  std::cout << fmt::format("Max diff with kernels vs original: {:g} (tolerance {:g})\n", fused_diff,
                           tolerance);
  ok = ok && fused_diff <= tolerance;
  const auto channels_last = model(images.contiguous(torch::MemoryFormat::ChannelsLast));
  const double channels_last_diff = max_diff(channels_last, original);
  std::cout << fmt::format("Max diff with kernels, channels-last input: {:g}\n",
                           channels_last_diff);
  ok = ok && channels_last_diff <= tolerance;
  std::uint64_t runs = 0, replays = 0;
  for (const auto& chain : fusion::fused_chains(model)) {
    runs += chain.stats.runs;
    replays += chain.stats.replays_device + chain.stats.replays_training +
               chain.stats.replays_grad + chain.stats.replays_modes + chain.stats.replays_declined;
  }
  std::cout << fmt::format("Kernel runs: {}, replays: {}\n", runs, replays);
  ok = ok && replays == 0 && runs == 2 * chains.size();
  const auto top = original.argmax(1).contiguous(), fused_top = fused.argmax(1).contiguous();
  const auto* first = top.data_ptr<int64_t>();
  const auto* fused_first = fused_top.data_ptr<int64_t>();
  std::cout << fmt::format("Top class per image: [{}] (with kernels: [{}])\n",
                           fmt::join(first, first + top.numel(), ", "),
                           fmt::join(fused_first, fused_first + fused_top.numel(), ", "));
  std::cout << (ok ? "OK\n" : "FAILED\n");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::cerr << "resnet_fusion: " << e.what() << "\n";
  return 2;
}
