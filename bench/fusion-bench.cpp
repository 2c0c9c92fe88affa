// The cost the library adds to a call: an unfused Slot vs a plain holder call, and a fused pair
// (collector + replay) vs calling the two modules directly.
//
//   build/bench/fusion_bench                             # and, to compare thread settings:
//   OMP_WAIT_POLICY=PASSIVE build/bench/fusion_bench
#include <benchmark/benchmark.h>
#include <fusion/fusion.hpp>
#include <torch/torch.h>

#include "blas_context.hpp"

namespace {

// Identity does no tensor work, so these timings are the call machinery alone.
struct PairImpl : torch::nn::Module {
  PairImpl() {
    first_plain = register_module("first_plain", torch::nn::Identity());
    second_plain = register_module("second_plain", torch::nn::Identity());
    first = fusion::register_slot(*this, "first", torch::nn::Identity());
    second = fusion::register_slot(*this, "second", torch::nn::Identity());
  }
  torch::nn::Identity first_plain{nullptr}, second_plain{nullptr};
  fusion::Slot<torch::nn::Identity> first, second;
};

// A small real pair: RMSNorm-like scaling then a 64x64 linear, on one token.
struct SmallImpl : torch::nn::Module {
  SmallImpl() {
    scale = fusion::register_slot(*this, "scale", torch::nn::LayerNorm(torch::nn::LayerNormOptions({64})));
    proj = fusion::register_slot(*this, "proj", torch::nn::Linear(64, 64));
  }
  torch::Tensor forward(const torch::Tensor& x) { return proj(scale(x)); }
  fusion::Slot<torch::nn::LayerNorm> scale;
  fusion::Slot<torch::nn::Linear> proj;
};

const std::vector<fusion::ModuleSpec> kSpecs{fusion::ModuleSpec{{"x"}, {"x"}},
                                             fusion::ModuleSpec{{"x"}, {"x"}}};

void BM_HolderCall(benchmark::State& state) {
  auto pair = std::make_shared<PairImpl>();
  const auto x = torch::ones({1});
  for (auto _ : state) benchmark::DoNotOptimize(pair->first_plain(x));
}
BENCHMARK(BM_HolderCall);

void BM_SlotCallUnfused(benchmark::State& state) {
  auto pair = std::make_shared<PairImpl>();
  const auto x = torch::ones({1});
  for (auto _ : state) benchmark::DoNotOptimize(pair->first(x));
}
BENCHMARK(BM_SlotCallUnfused);

void BM_PairDirect(benchmark::State& state) {
  auto pair = std::make_shared<PairImpl>();
  const auto x = torch::ones({1});
  for (auto _ : state) benchmark::DoNotOptimize(pair->second_plain(pair->first_plain(x)));
}
BENCHMARK(BM_PairDirect);

void BM_PairFused(benchmark::State& state) {
  auto pair = std::make_shared<PairImpl>();
  fusion::fuse_modules(*pair, {"first", "second"}, kSpecs);
  const auto x = torch::ones({1});
  for (auto _ : state) benchmark::DoNotOptimize(pair->second(pair->first(x)));
}
BENCHMARK(BM_PairFused);

void BM_SmallPair(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  auto model = std::make_shared<SmallImpl>();
  if (state.range(0) == 1) fusion::fuse_modules(*model, {"scale", "proj"}, kSpecs);
  const auto x = torch::randn({1, 64});
  for (auto _ : state) benchmark::DoNotOptimize(model->forward(x));
  state.SetLabel(state.range(0) == 1 ? "fused" : "original");
}
BENCHMARK(BM_SmallPair)->Arg(0)->Arg(1);

}  // namespace

FUSION_BENCHMARK_MAIN();
