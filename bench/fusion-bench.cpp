// The cost the library adds to a call: an unfused Slot vs a plain holder call, and a fused pair
// (collector + replay) vs calling the two modules directly.
//
//   build/bench/fusion_bench                             # and, to compare thread settings:
//   OMP_WAIT_POLICY=PASSIVE build/bench/fusion_bench
#include <chrono>

#include <benchmark/benchmark.h>
#include <torch/torch.h>
#include <fusion/fusion.hpp>

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

// A small real pair: LayerNorm then a 64x64 linear, on one token.
struct SmallImpl : torch::nn::Module {
  SmallImpl() {
    scale = fusion::register_slot(*this, "scale",
                                  torch::nn::LayerNorm(torch::nn::LayerNormOptions({64})));
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

// Each iteration times the original and the fused model back to back, alternating the order, on
// the same weights, so that noise hits both alike.
void BM_SmallPairFusedVsOriginal(benchmark::State& state) {
  using Clock = std::chrono::steady_clock;
  torch::NoGradGuard no_grad;
  auto original = std::make_shared<SmallImpl>();
  auto fused = std::make_shared<SmallImpl>();
  share_parameters(*fused, *original);
  fusion::fuse_modules(*fused, {"scale", "proj"}, kSpecs);
  const auto x = torch::randn({1, 64});
  double original_s = 0, fused_s = 0;
  auto timed = [&](SmallImpl& model) {
    const auto start = Clock::now();
    benchmark::DoNotOptimize(model.forward(x));
    return std::chrono::duration<double>(Clock::now() - start).count();
  };
  bool original_first = true;
  for (auto _ : state) {
    if (original_first) original_s += timed(*original);
    fused_s += timed(*fused);
    if (!original_first) original_s += timed(*original);
    original_first = !original_first;
  }
  const double n = static_cast<double>(state.iterations());
  state.counters["original_ns"] = 1e9 * original_s / n;
  state.counters["fused_ns"] = 1e9 * fused_s / n;
  state.counters["overhead_pct"] = 100.0 * (fused_s / original_s - 1.0);
}
BENCHMARK(BM_SmallPairFusedVsOriginal);

}  // namespace

FUSION_BENCHMARK_MAIN();
