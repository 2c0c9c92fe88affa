// A full Qwen3 forward (hidden 512, intermediate 1536, 4 layers, 8/4 heads, head_dim 64, vocab
// 4096) at 16 and 128 tokens: the original model vs a model with both chains of every layer fused
// (replay), computing with the very same weight tensors. Each iteration runs both, alternating
// which goes first, so that machine noise hits both alike; the counters give each one's mean time
// and the fused overhead in percent.
//
//   build/bench/qwen3_bench
//   OMP_WAIT_POLICY=PASSIVE build/bench/qwen3_bench
#include <benchmark/benchmark.h>

#include "bench_support.hpp"
#include "qwen3.hpp"

namespace {

qwen3::ForCausalLM bench_model() {
  qwen3::Config c;
  c.vocab_size = 4096;
  c.hidden_size = 512;
  c.intermediate_size = 1536;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = 64;
  qwen3::ForCausalLM model(c);
  qwen3::init_random(*model, 0);
  model->eval();
  return model;
}

void BM_Qwen3ForwardFusedVsOriginal(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  auto original = bench_model();
  auto fused = bench_model();
  share_parameters(*fused, *original);
  fusion::fuse_modules(fused, qwen3::mlp_patterns(), qwen3::mlp_specs());
  fusion::fuse_modules(fused, qwen3::attention_patterns(), qwen3::attention_specs());
  const auto ids = torch::randint(0, 4096, {1, state.range(0)}, torch::kInt64);
  if (!torch::equal(original(ids), fused(ids))) state.SkipWithError("fused logits differ");

  time_interleaved(
      state, [&] { benchmark::DoNotOptimize(original(ids)); },
      [&] { benchmark::DoNotOptimize(fused(ids)); }, "ms", 1e3);
}
BENCHMARK(BM_Qwen3ForwardFusedVsOriginal)
    ->Arg(16)
    ->Arg(128)
    ->Unit(benchmark::kMillisecond)
    ->MinTime(5.0);

}  // namespace

FUSION_BENCHMARK_MAIN();
