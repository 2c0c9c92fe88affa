// The cost the library adds to a call: an unfused Slot vs a plain holder call, and a fused pair
// (collector + replay) vs calling the two modules directly.
//
//   build/bench/fusion_bench                             # and, to compare thread settings:
//   OMP_WAIT_POLICY=PASSIVE build/bench/fusion_bench
#include <benchmark/benchmark.h>
#include <torch/torch.h>
#include <fusion/fusion.hpp>

#include "bench_support.hpp"

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

// Original and fused model on the same weights, timed interleaved (see time_interleaved).
void BM_SmallPairFusedVsOriginal(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  auto original = std::make_shared<SmallImpl>();
  auto fused = std::make_shared<SmallImpl>();
  share_parameters(*fused, *original);
  fusion::fuse_modules(*fused, {"scale", "proj"}, kSpecs);
  const auto x = torch::randn({1, 64});
  time_interleaved(
      state, [&] { benchmark::DoNotOptimize(original->forward(x)); },
      [&] { benchmark::DoNotOptimize(fused->forward(x)); }, "ns", 1e9);
}
BENCHMARK(BM_SmallPairFusedVsOriginal);

// Kernel dispatch: the per-call applicability and staleness checks. A module whose forward
// returns its input but that holds 4 parameters, so that a pair has 8 source tensors to stamp.
struct HoldsFourImpl : torch::nn::Module {
  HoldsFourImpl() {
    for (const char* name : {"a", "b", "c", "d"}) register_parameter(name, torch::ones({1}));
  }
  torch::Tensor forward(const torch::Tensor& x) { return x; }
};
TORCH_MODULE(HoldsFour);

struct FourPairImpl : torch::nn::Module {
  FourPairImpl() {
    first = fusion::register_slot(*this, "first", HoldsFour());
    second = fusion::register_slot(*this, "second", HoldsFour());
  }
  fusion::Slot<HoldsFour> first, second;
};

struct TrivialIdentityKernel {
  torch::Tensor operator()(torch::nn::IdentityImpl&, torch::nn::IdentityImpl&,
                           const torch::Tensor& x) const {
    return x;
  }
};
struct TrivialStatefulKernel {  // with prepare: every call checks the 8 stamps
  struct State {};
  State prepare(HoldsFourImpl&, HoldsFourImpl&) const { return {}; }
  torch::Tensor operator()(const State&, HoldsFourImpl&, HoldsFourImpl&,
                           const torch::Tensor& x) const {
    return x;
  }
};

/// The same chain replaying and with a trivial kernel, interleaved: kernel_ns - replay_ns is
/// what choosing and checking the kernel costs beyond calling the members (counter checks_ns).
template <typename Pair, typename Kernel>
void kernel_vs_replay(benchmark::State& state, const std::string& name, Kernel kernel) {
  static const bool registered = [&] {
    fusion::register_kernel(name, kernel);
    return true;
  }();
  (void)registered;
  torch::NoGradGuard no_grad;
  auto replay = std::make_shared<Pair>(), with_kernel = std::make_shared<Pair>();
  replay->eval();
  with_kernel->eval();
  fusion::fuse_modules(*replay, {"first", "second"}, kSpecs);
  fusion::FuseOptions options;
  options.kernel = name;
  fusion::fuse_modules(*with_kernel, {"first", "second"}, kSpecs, options);
  const auto x = torch::ones({1});
  time_rotating(
      state,
      {{"replay", [&] { benchmark::DoNotOptimize(replay->second(replay->first(x))); }},
       {"kernel", [&] { benchmark::DoNotOptimize(with_kernel->second(with_kernel->first(x))); }}},
      "ns", 1e9);
  state.counters["checks_ns"] = state.counters["kernel_ns"] - state.counters["replay_ns"];
  if (fusion::fused_chains(*with_kernel)[0].stats.runs == 0) state.SkipWithError("no kernel run");
}

void BM_KernelDispatchIdentityPair(benchmark::State& state) {
  kernel_vs_replay<PairImpl>(state, "bench.identity", TrivialIdentityKernel{});
}
BENCHMARK(BM_KernelDispatchIdentityPair);

void BM_KernelDispatch8Sources(benchmark::State& state) {
  kernel_vs_replay<FourPairImpl>(state, "bench.stateful", TrivialStatefulKernel{});
}
BENCHMARK(BM_KernelDispatch8Sources);

}  // namespace

FUSION_BENCHMARK_MAIN();
