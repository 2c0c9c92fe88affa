// CNN fusion: ResNet-18 with the built-in folding kernels against the unfused network, and one
// conv+bn+relu layer computed four ways (unfused, folded dense, folded channels-last, LibTorch
// 1.13's prepacked oneDNN convolution with a fused ReLU), every variant timed in one run,
// rotating which goes first (bench_support.hpp); with FUSION_RESNET_TORCHSCRIPT=DIR, also the
// network against TorchScript's frozen and optimized version of it (BM_ResNet18AgainstTorchScript),
// and with FUSION_MOBILENET_TORCHSCRIPT=DIR the same for MobileNetV2
// (BM_MobileNetV2AgainstTorchScript); and the memory of ResNet-18's block kernels
// (BM_ResNet18KernelMemory, run alone: --benchmark_filter=Memory).
//
//   build/bench/cnn_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <malloc.h>
#include <iostream>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/script.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <fusion/hardswish.hpp>
#include <fusion/kernels/bfloat16.hpp>
#include <fusion/optimize.hpp>

#include "bench_support.hpp"
#include "demo.hpp"
#include "mobilenet.hpp"
#include "resnet.hpp"

namespace {

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

resnet::ResNet18 model_with(uint64_t seed) {
  resnet::ResNet18 model;
  resnet::init_random(*model, seed);
  model->eval();
  return model;
}

/// The whole network, batch x 3 x size x size, contiguous and channels-last.
void BM_ResNet18Folding(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t batch = state.range(0), size = state.range(1);
  // Separate copies of the same weights: shared ones would be warm in cache for whichever runs
  // second.
  auto original = model_with(3), folded = model_with(3);
  fusion::kernels::register_builtin_kernels();
  fusion::fuse_modules(folded, resnet::folding_plan());
  const auto images = torch::randn({batch, 3, size, size});
  const auto channels_last = images.contiguous(torch::MemoryFormat::ChannelsLast);
  const auto expected = original(images);
  const double diff = std::max(max_diff(folded(images), expected),
                               max_diff(folded(channels_last).contiguous(), expected));
  if (diff > 1e-3 * std::max(1.0, expected.abs().max().item<double>())) {
    state.SkipWithError("folded logits differ");
  }
  time_rotating(state,
                {{"original", [&] { benchmark::DoNotOptimize(original(images)); }},
                 {"folded", [&] { benchmark::DoNotOptimize(folded(images)); }},
                 {"original_cl", [&] { benchmark::DoNotOptimize(original(channels_last)); }},
                 {"folded_cl", [&] { benchmark::DoNotOptimize(folded(channels_last)); }}},
                "ms", 1e3);
  state.counters["max_diff"] = diff;
}
BENCHMARK(BM_ResNet18Folding)
    ->ArgNames({"batch", "size"})
    ->Args({1, 224})
    ->Args({8, 112})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(3.0);

/// fusion::optimize on ResNet-18 at batch range(0), 224 x 224: its time (optimize_s), whether
/// its plan covers every chain of resnet::block_plan with the same kernels (covers = 1), and the
/// forward with the found plan against the hand-written one in one run. Fixed iterations:
/// optimize runs once per repetition.
void BM_ResNet18AutoPlan(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  auto hand_written = model_with(3), found = model_with(3);
  const auto images = torch::randn({state.range(0), 3, 224, 224});
  const auto wanted = demo::planned_chains(hand_written, resnet::block_plan());
  fusion::fuse_modules(hand_written, resnet::block_plan());
  fusion::OptimizeOptions options;
  options.kernels = demo::float32_kernels();  // fusion.linear (the classifier's) included
  const auto plan = fusion::optimize(
      found, [&] { return found(images); }, options);
  state.counters["optimize_s"] = plan.seconds;
  std::cerr << plan;  // what was kept and rejected, with its figures
  state.counters["covers"] = demo::covers(demo::fused_chains(found), wanted) ? 1 : 0;
  time_rotating(state,
                {{"hand_written", [&] { benchmark::DoNotOptimize(hand_written(images)); }},
                 {"auto", [&] { benchmark::DoNotOptimize(found(images)); }}},
                "ms", 1e3);
}
BENCHMARK(BM_ResNet18AutoPlan)->Arg(1)->Iterations(40)->Unit(benchmark::kMillisecond);

/// The layers of MobileNet-style CNNs: conv + bn + an activation other than ReLU, unfused against
/// fusion.conv2d_bn_<activation> (the activation in place on the kernel's output), batch 1.
/// depthwise 0: pointwise 1x1, channels -> channels; 1: depthwise 3x3 (groups = channels).
void BM_ConvBatchNormActivation(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  namespace nn = torch::nn;
  const bool depthwise = state.range(0) == 1;
  const int64_t channels = state.range(1), size = state.range(2);
  auto options = depthwise ? nn::Conv2dOptions(channels, channels, 3).padding(1).groups(channels)
                           : nn::Conv2dOptions(channels, channels, 1);
  const nn::Conv2d conv(options.bias(false));
  const nn::BatchNorm2d bn(channels);
  const std::string names[] = {"relu6", "silu", "hardswish", "gelu"};
  const std::string& name = names[state.range(3)];
  fusion::Sequential unfused = state.range(3) == 0   ? fusion::Sequential(conv, bn, nn::ReLU6())
                               : state.range(3) == 1 ? fusion::Sequential(conv, bn, nn::SiLU())
                               : state.range(3) == 2
                                   ? fusion::Sequential(conv, bn, fusion::Hardswish())
                                   : fusion::Sequential(conv, bn, nn::GELU());
  bn->running_mean.normal_(0, 0.2);
  bn->running_var.uniform_(0.5, 1.5);
  unfused->eval();
  auto fused = std::dynamic_pointer_cast<fusion::SequentialImpl>(unfused->clone());
  fusion::kernels::register_builtin_kernels();
  fusion::FuseOptions fuse;
  fuse.kernel = "fusion.conv2d_bn_" + name;
  fusion::fuse_modules(*fused, {"0", "1", "2"},
                       std::vector<fusion::ModuleSpec>(3, fusion::ModuleSpec{{"x"}, {"x"}}), fuse);
  const auto x = torch::randn({1, channels, size, size});
  state.counters["max_diff"] = max_diff(fused->forward(x), unfused->forward(x));
  state.SetLabel(name + (depthwise ? ", depthwise 3x3" : ", pointwise 1x1"));
  time_rotating(state,
                {{"unfused", [&] { benchmark::DoNotOptimize(unfused->forward(x)); }},
                 {"kernel", [&] { benchmark::DoNotOptimize(fused->forward(x)); }}},
                "us", 1e6);
}
BENCHMARK(BM_ConvBatchNormActivation)
    ->ArgNames({"depthwise", "channels", "size", "activation"})
    ->ArgsProduct({{0, 1}, {96}, {56}, {0, 1, 2, 3}})
    ->ArgsProduct({{0, 1}, {576}, {14}, {0, 1, 2, 3}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(1.0);

/// One conv(3x3, pad 1) + bn + relu layer of ResNet-18: channels x size x size, batch 1.
void BM_ConvBatchNormReLU(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t channels = state.range(0), size = state.range(1);
  namespace nn = torch::nn;
  fusion::Sequential unfused(nn::Conv2d(nn::Conv2dOptions(channels, channels, 3).padding(1)),
                             nn::BatchNorm2d(channels), nn::ReLU());
  {
    auto& bn = unfused->at<nn::BatchNorm2dImpl>(1);
    bn.running_mean.normal_(0, 0.2);
    bn.running_var.uniform_(0.5, 1.5);
  }
  unfused->eval();
  auto folded = std::dynamic_pointer_cast<fusion::SequentialImpl>(unfused->clone());
  fusion::kernels::register_builtin_kernels();
  fusion::FuseOptions options;
  options.kernel = "fusion.conv2d_bn_relu";
  fusion::fuse_modules(*folded, {"0", "1", "2"},
                       std::vector<fusion::ModuleSpec>(3, fusion::ModuleSpec{{"x"}, {"x"}}),
                       options);
  const auto x = torch::randn({1, channels, size, size});
  const auto x_cl = x.contiguous(torch::MemoryFormat::ChannelsLast);
  const auto expected = unfused->forward(x);
  folded->forward(x);  // prepares the folded weight

  // The prepacked oneDNN op TorchScript's freezing uses on LibTorch 1.13: folded weight and bias,
  // ReLU as a post-op, packed once for this input shape.
  const auto& conv = unfused->at<nn::Conv2dImpl>(0);
  auto [scale, shift] = fusion::detail::batch_norm_affine(unfused->at<nn::BatchNorm2dImpl>(1));
  const auto weight = (conv.weight * scale.view({-1, 1, 1, 1}).to(torch::kFloat32)).contiguous();
  const auto bias = (conv.bias * scale + shift).to(torch::kFloat32);
  auto& dispatcher = c10::Dispatcher::singleton();
  auto prepack = dispatcher.findSchema({"mkldnn_prepacked::conv2d_prepack", ""});
  auto run = dispatcher.findSchema({"mkldnn_prepacked::conv2d_run", ""});
  c10::IValue context;
  if (prepack && run) {
    std::vector<c10::IValue> stack{weight,
                                   bias,
                                   std::vector<int64_t>{1, 1},
                                   std::vector<int64_t>{1, 1},
                                   std::vector<int64_t>{1, 1},
                                   int64_t{1},
                                   x.sizes().vec(),
                                   std::string("relu")};
    prepack->callBoxed(&stack);
    context = stack[0];
  }
  const auto prepacked = [&] {
    std::vector<c10::IValue> stack{x, context};
    run->callBoxed(&stack);
    return stack[0].toTensor();
  };
  double diff = std::max(max_diff(folded->forward(x), expected),
                         max_diff(folded->forward(x_cl).contiguous(), expected));
  if (prepack && run) diff = std::max(diff, max_diff(prepacked(), expected));
  std::vector<std::pair<std::string, std::function<void()>>> runs{
      {"unfused", [&] { benchmark::DoNotOptimize(unfused->forward(x)); }},
      {"folded", [&] { benchmark::DoNotOptimize(folded->forward(x)); }},
      {"folded_cl", [&] { benchmark::DoNotOptimize(folded->forward(x_cl)); }}};
  if (prepack && run) {
    runs.emplace_back("prepacked", [&] { benchmark::DoNotOptimize(prepacked()); });
  } else {
    state.SetLabel("mkldnn_prepacked ops not registered in this LibTorch");
  }
  time_rotating(state, runs, "us", 1e6);
  state.counters["max_diff"] = diff;
}
BENCHMARK(BM_ConvBatchNormReLU)
    ->ArgNames({"channels", "size"})
    ->Args({64, 56})
    ->Args({128, 28})
    ->Args({256, 14})
    ->Args({512, 7})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(2.0);

/// One way of running the ported model: a forward on inputs prepared outside the timing.
struct Variant {
  std::string name;
  std::function<torch::Tensor()> forward;
  bool bfloat16 = false;  // kernels in bfloat16: checked within bfloat16's tolerance
};

/// The ported model's variants, checked against `expected` (the unfused port's float32 logits),
/// then timed with TorchScript's version of the same model, rotating: `dir/model.pt` traced by
/// torch, then torch::jit::freeze and optimize_for_inference (what PyTorch offers for inference on
/// the CPU: batch norm folded, oneDNN convolutions with fused ReLU, layouts kept blocked).
/// Counters: max_diff (float32 variants and TorchScript), max_diff_bf16 (bfloat16 variants), both
/// absolute, and the largest logit.
void time_against_torchscript(benchmark::State& state, const std::string& dir,
                              const torch::Tensor& images, const torch::Tensor& expected,
                              const std::vector<Variant>& variants) {
  auto traced = torch::jit::load(dir + "/model.pt");
  traced.eval();
  auto frozen = torch::jit::freeze(traced);
  auto optimized = torch::jit::optimize_for_inference(frozen);
  // LibTorch 2.x runs the graph's max_pool2d on oneDNN tensors only in InferenceMode (else an
  // internal assert: kernels registered to both CompositeImplicitAutograd and a backend).
  const auto torchscript = [&] {
    c10::InferenceMode inference;
    return optimized.forward({images}).toTensor();
  };
  for (int warm = 0; warm < 3; ++warm) torchscript();  // the profiling executor's first runs
  double diff = max_diff(torchscript(), expected), diff_bf16 = 0;
  for (const auto& variant : variants) {
    double& worst = variant.bfloat16 ? diff_bf16 : diff;
    // A fused model's first call is checked (fusion::Sequential hands dense tensors on); its
    // later ones hand blocked tensors on, whose first calls make the primitives for their layouts:
    // warmed as TorchScript is, and checked too.
    for (int call = 0; call < 3; ++call) {
      worst = std::max(worst, max_diff(variant.forward().contiguous(), expected));
    }
  }
  const double largest = std::max(1.0, expected.abs().max().item<double>());
  if (diff > 1e-3 * largest || diff_bf16 > fusion::default_tolerance(torch::kBFloat16) * largest) {
    state.SkipWithError("logits differ");
  }
  std::vector<std::pair<std::string, std::function<void()>>> runs{
      {"torchscript", [&] { benchmark::DoNotOptimize(torchscript()); }}};
  for (const auto& variant : variants) {
    runs.emplace_back(variant.name,
                      [&forward = variant.forward] { benchmark::DoNotOptimize(forward()); });
  }
  time_rotating(state, runs, "ms", 1e3);
  state.counters["max_diff"] = diff;
  state.counters["max_diff_bf16"] = diff_bf16;
  state.counters["largest_logit"] = largest;
}

/// The bfloat16 variant, where this CPU computes it (else a label says why it is missing).
void add_bfloat16(benchmark::State& state, std::vector<Variant>& variants, std::string name,
                  std::function<torch::Tensor()> forward) {
  if (!fusion::kernels::bfloat16_supported()) {
    state.SetLabel("no AVX512_BF16 (or oneDNN) here: no bfloat16 variants");
    return;
  }
  variants.push_back({std::move(name), std::move(forward), true});
}

/// ResNet-18 against TorchScript: the port unfused, folded per member (folding_plan: dense,
/// channels-last, and with the input in oneDNN's layout by hand) and with block_plan (dense
/// input). Runs only with FUSION_RESNET_TORCHSCRIPT=DIR, a directory
/// `examples/common/torchvision-model.py resnet18 DIR --torchscript` wrote.
void BM_ResNet18AgainstTorchScript(benchmark::State& state, const std::string& dir) {
  torch::NoGradGuard no_grad;
  const int64_t batch = state.range(0), size = state.range(1);
  resnet::ResNet18 original, folded, blocks, blocks_bf16;
  for (auto* model : {&original, &folded, &blocks, &blocks_bf16}) {
    resnet::load_weights(**model, dir);
    (*model)->eval();
  }
  fusion::kernels::register_builtin_kernels();
  fusion::fuse_modules(folded, resnet::folding_plan());
  fusion::fuse_modules(blocks, resnet::block_plan());
  fusion::fuse_modules(blocks_bf16, fusion::kernels::in_bfloat16(resnet::block_plan()));
  const auto images = torch::randn({batch, 3, size, size});
  const auto channels_last = images.contiguous(torch::MemoryFormat::ChannelsLast);
  std::vector<Variant> variants{
      {"original", [&] { return original(images); }},
      {"folded", [&] { return folded(images); }},
      {"folded_cl", [&] { return folded(channels_last); }},
      // As TorchScript runs it: the input reordered into oneDNN's layout once, activations kept
      // so (LibTorch 2.x pools oneDNN tensors only in InferenceMode).
      {"folded_mkldnn",
       [&]() -> torch::Tensor {
         c10::InferenceMode inference;
         return folded(images.to_mkldnn());
       }},
      {"blocks", [&] { return blocks(images); }}};
  add_bfloat16(state, variants, "blocks_bf16", [&] { return blocks_bf16(images); });
  time_against_torchscript(state, dir, images, original(images), variants);
}

/// MobileNetV2 against TorchScript: the port unfused, folded per member (folding_plan) and with
/// block_plan (dense input; in float32 and in bfloat16). Runs only with
/// FUSION_MOBILENET_TORCHSCRIPT=DIR, a directory
/// `examples/common/torchvision-model.py mobilenet_v2 DIR --torchscript` wrote.
void BM_MobileNetV2AgainstTorchScript(benchmark::State& state, const std::string& dir) {
  torch::NoGradGuard no_grad;
  const int64_t batch = state.range(0), size = state.range(1);
  mobilenet::MobileNetV2 original, folded, blocks, blocks_bf16;
  for (auto* model : {&original, &folded, &blocks, &blocks_bf16}) {
    mobilenet::load_weights(**model, dir);
    (*model)->eval();
  }
  fusion::fuse_modules(folded, mobilenet::folding_plan());
  fusion::fuse_modules(blocks, mobilenet::block_plan());
  fusion::fuse_modules(blocks_bf16, fusion::kernels::in_bfloat16(mobilenet::block_plan()));
  const auto images = torch::randn({batch, 3, size, size});
  std::vector<Variant> variants{{"original", [&] { return original(images); }},
                                {"folded", [&] { return folded(images); }},
                                {"blocks", [&] { return blocks(images); }}};
  add_bfloat16(state, variants, "blocks_bf16", [&] { return blocks_bf16(images); });
  time_against_torchscript(state, dir, images, original(images), variants);
}

/// Memory of ResNet-18 with block_plan(), in float32 and in bfloat16, against the unfused model:
/// resident growth of a freshly built model over three forwards at batch 1 and three at batch 8
/// (the kernels' states grow with the input shapes they meet), and the kernels' own state bytes as
/// `report` counts them. Fixed iterations; run it alone (--benchmark_filter=Memory): it lowers
/// malloc's mmap threshold, as BM_Qwen3KernelMemory does, so that freed memory is returned.
void BM_ResNet18KernelMemory(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  ::mallopt(M_MMAP_THRESHOLD, 128 * 1024);
  auto resident_of = [&](const std::optional<fusion::Plan>& plan) {
    ::malloc_trim(0);
    const double before = resident_bytes();
    auto model = model_with(0);
    if (plan) fusion::fuse_modules(model, *plan);
    for (const int64_t batch : {1, 8}) {
      for (int call = 0; call < 3; ++call) model(torch::randn({batch, 3, 224, 224}));
    }
    std::uint64_t own = 0;
    for (const auto& chain : fusion::fused_chains(model)) own += chain.stats.state_bytes;
    return std::make_tuple(model, (resident_bytes() - before) / (1 << 20),
                           static_cast<double>(own) / (1 << 20));
  };
  const auto original = resident_of(std::nullopt);
  const auto blocks = resident_of(resnet::block_plan());
  const auto blocks_bf16 = resident_of(fusion::kernels::in_bfloat16(resnet::block_plan()));
  double growth = std::get<1>(original);
  for (auto _ : state) benchmark::DoNotOptimize(growth);
  std::uint64_t parameters = 0;
  for (const auto& p : std::get<0>(original)->parameters()) parameters += p.nbytes();
  state.counters["parameters_MiB"] = static_cast<double>(parameters) / (1 << 20);
  state.counters["original_rss_MiB"] = std::get<1>(original);
  state.counters["blocks_rss_MiB"] = std::get<1>(blocks);
  state.counters["blocks_bf16_rss_MiB"] = std::get<1>(blocks_bf16);
  state.counters["blocks_state_MiB"] = std::get<2>(blocks);
  state.counters["blocks_bf16_state_MiB"] = std::get<2>(blocks_bf16);
}
BENCHMARK(BM_ResNet18KernelMemory)->Iterations(1);

/// Registers `function` as `name` when the environment variable `variable` names a directory.
bool register_against_torchscript(const char* variable, const char* name,
                                  void (*function)(benchmark::State&, const std::string&)) {
  const char* dir = std::getenv(variable);
  if (dir == nullptr) return false;
  benchmark::RegisterBenchmark(name, function, std::string(dir))
      ->ArgNames({"batch", "size"})
      ->Args({1, 224})
      ->Args({8, 224})
      ->Unit(benchmark::kMillisecond)
      ->MinTime(3.0);
  return true;
}
const bool resnet_registered = register_against_torchscript(
    "FUSION_RESNET_TORCHSCRIPT", "BM_ResNet18AgainstTorchScript", BM_ResNet18AgainstTorchScript);
const bool mobilenet_registered =
    register_against_torchscript("FUSION_MOBILENET_TORCHSCRIPT", "BM_MobileNetV2AgainstTorchScript",
                                 BM_MobileNetV2AgainstTorchScript);

}  // namespace

FUSION_BENCHMARK_MAIN();
