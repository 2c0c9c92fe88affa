// GPT-2 with the library's transformer kernels (declared by layout in examples/gpt2/kernels.hpp):
// the full forward (n_embd 512, 4 layers, 8 heads, vocab 4096), original vs kernels (in place
// and folded), for a decode step after 64 cached tokens, 16 and 128 tokens; and the LayerNorm +
// plain-MLP chain alone at hidden 64 and 512 with 1, 16 and 128 tokens: unfused, replay, kernel,
// folded. Each benchmark times its variants in one run, rotating which goes first; counters give
// each variant's mean time and its ratio (_x) to the first.
//
//   build/bench/gpt2_bench
//   OMP_NUM_THREADS=2 build/bench/gpt2_bench
//   FUSION_NO_AVX512=1 build/bench/gpt2_bench   # the paths of a CPU without AVX-512
#include <benchmark/benchmark.h>

#include "bench_support.hpp"
#include "gpt2.hpp"
#include "kernels.hpp"

namespace {

gpt2::Config bench_config(int64_t embd = 512) {
  gpt2::Config c;
  c.vocab_size = 4096;
  c.n_positions = 256;
  c.n_embd = embd;
  c.n_layer = 4;
  c.n_head = 8;
  return c;
}

gpt2::LMHeadModel bench_model(int64_t embd = 512) {
  gpt2::LMHeadModel model(bench_config(embd));
  gpt2::init_random(*model, 0);
  model->eval();
  return model;
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

/// Original vs every chain with a kernel (in place; folded), for `tokens` new tokens after
/// `cached` tokens in the KV cache (0: a prompt forward).
void BM_GPT2ForwardKernels(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t tokens = state.range(0), cached = state.range(1);
  // Separate models with the same weights: shared weights would be warm in cache for whichever
  // variant runs right after another that read them.
  auto original = bench_model(), kernels = bench_model(), folded = bench_model();
  gpt2::fuse_with_kernels(kernels, /*folded=*/false);
  gpt2::fuse_with_kernels(folded, /*folded=*/true);
  torch::manual_seed(1);
  const auto prompt = torch::randint(0, 4096, {1, cached}, torch::kInt64);
  const auto ids = torch::randint(0, 4096, {1, tokens}, torch::kInt64);
  gpt2::KVCache base;
  if (cached > 0) original->forward(prompt, &base);
  auto run = [&](gpt2::LMHeadModel model) {
    gpt2::KVCache cache = base;  // tensor handles: the base cache is never written
    return model->forward(ids, cached > 0 ? &cache : nullptr);
  };
  const auto expected = run(original);
  const double diff = std::max(max_diff(run(kernels), expected), max_diff(run(folded), expected));
  if (diff > 1e-3) state.SkipWithError("kernel logits differ");
  time_rotating(state,
                {{"original", [&] { benchmark::DoNotOptimize(run(original)); }},
                 {"kernels", [&] { benchmark::DoNotOptimize(run(kernels)); }},
                 {"folded", [&] { benchmark::DoNotOptimize(run(folded)); }}},
                "ms", 1e3);
  state.counters["max_diff"] = diff;
}
BENCHMARK(BM_GPT2ForwardKernels)
    ->ArgNames({"tokens", "cached"})
    ->Args({1, 64})
    ->Args({16, 0})
    ->Args({128, 0})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(3.0);

/// One kind of chain fused in every block (range(2): 0 ln_1 -> attn, the packed projections;
/// 1 ln_2 -> mlp; 2 ln_f -> lm_head), with the library kernel against the same chains replayed
/// and the unfused model, at n_embd range(0), range(1) tokens (a prompt forward). Whole forwards:
/// the difference is the chains', the ratios are diluted by the rest.
void BM_GPT2ChainKernels(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t embd = state.range(0), tokens = state.range(1);
  const auto kernel_rule = gpt2::kernel_plan().rules.at(static_cast<std::size_t>(state.range(2)));
  auto replay_rule = kernel_rule;
  replay_rule.options.kernel.clear();
  auto unfused = bench_model(embd), replay = bench_model(embd), kernel = bench_model(embd);
  fusion::fuse_modules(replay, fusion::Plan{{replay_rule}});
  fusion::fuse_modules(kernel, fusion::Plan{{kernel_rule}});
  state.SetLabel(kernel_rule.options.kernel);
  torch::manual_seed(1);
  const auto ids = torch::randint(0, 4096, {1, tokens}, torch::kInt64);
  time_chain_variants(state, unfused, replay, kernel, ids);
}
BENCHMARK(BM_GPT2ChainKernels)
    ->ArgNames({"hidden", "tokens", "chain"})
    ->ArgsProduct({{64, 512}, {1, 16, 128}, {0, 1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);

/// ln_2 + mlp of one block, as the block calls them.
struct NormMLPImpl : torch::nn::Module {
  explicit NormMLPImpl(const gpt2::Config& c) {
    norm = fusion::register_slot(*this, "norm",
                                 torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.n_embd})));
    mlp = fusion::register_slot(*this, "mlp", gpt2::MLP(c));
  }
  torch::Tensor forward(const torch::Tensor& x) { return mlp(norm(x)); }
  fusion::Slot<torch::nn::LayerNorm> norm;
  fusion::Slot<gpt2::MLP> mlp;
};

std::shared_ptr<NormMLPImpl> norm_mlp(const gpt2::Config& c) {
  torch::manual_seed(0);
  auto module = std::make_shared<NormMLPImpl>(c);
  torch::NoGradGuard no_grad;
  for (auto& p : module->parameters()) p.normal_(0.0, 0.08);
  module->norm->weight.uniform_(0.8, 1.2);
  module->eval();
  return module;
}

/// unfused pair, replay, the library kernel (no weight copy) and the folded kernel, at hidden =
/// range(0), tokens = range(1).
void BM_GPT2NormMLPChain(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const auto c = bench_config(state.range(0));
  auto unfused = norm_mlp(c), replay = norm_mlp(c), kernel = norm_mlp(c), folded = norm_mlp(c);
  const std::vector<fusion::ModuleSpec> specs{fusion::ModuleSpec{{"x"}, {"x"}},
                                              fusion::ModuleSpec{{"x"}, {"x"}}};
  gpt2::register_kernels();
  fusion::fuse_modules(*replay, {"norm", "mlp"}, specs);
  fusion::FuseOptions options;
  options.kernel = "gpt2.ln_mlp";
  fusion::fuse_modules(*kernel, {"norm", "mlp"}, specs, options);
  options.kernel = "gpt2.ln_mlp.folded";
  fusion::fuse_modules(*folded, {"norm", "mlp"}, specs, options);
  const auto x = torch::randn({1, state.range(1), c.n_embd});
  const auto expected = unfused->forward(x);
  if (std::max(max_diff(kernel->forward(x), expected), max_diff(folded->forward(x), expected)) >
      1e-4) {
    state.SkipWithError("fused results differ");
  }
  time_rotating(state,
                {{"unfused", [&] { benchmark::DoNotOptimize(unfused->forward(x)); }},
                 {"replay", [&] { benchmark::DoNotOptimize(replay->forward(x)); }},
                 {"kernel", [&] { benchmark::DoNotOptimize(kernel->forward(x)); }},
                 {"folded", [&] { benchmark::DoNotOptimize(folded->forward(x)); }}},
                "us", 1e6);
}
BENCHMARK(BM_GPT2NormMLPChain)
    ->ArgNames({"hidden", "tokens"})
    ->ArgsProduct({{64, 512}, {1, 16, 128}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(1.0);

}  // namespace

FUSION_BENCHMARK_MAIN();
