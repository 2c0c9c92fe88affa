// Qwen3 with fusion: the full forward (hidden 512, intermediate 1536, 4 layers, 8/4 heads,
// head_dim 64, vocab 4096), original vs replay and vs kernels; and the norm + MLP chain alone at
// hidden 64 and 512 with 1, 16 and 128 tokens, in five variants; decode in float32 and bfloat16,
// also at Qwen3-0.6B's shapes. Every benchmark times its
// variants in one run on the very same weights, rotating which goes first, so that machine noise
// hits them alike; counters give each variant's mean time and its ratio (_x) to the first.
//
//   build/bench/qwen3_bench
//   OMP_NUM_THREADS=2 build/bench/qwen3_bench
#include <benchmark/benchmark.h>

#include <malloc.h>
#include <iostream>

#include <fusion/kernels/bfloat16.hpp>
#include <fusion/optimize.hpp>

#include "bench_support.hpp"
#include "demo.hpp"
#include "kernels.hpp"
#include "qwen3.hpp"

namespace {

qwen3::Config bench_config(int64_t hidden = 512) {
  qwen3::Config c;
  c.vocab_size = 4096;
  c.hidden_size = hidden;
  c.intermediate_size = 3 * hidden;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = 64;
  return c;
}

/// Qwen3-0.6B's shapes (its config.json: 28 layers, hidden 1024, 16/8 heads of 128, vocab 151936,
/// tied embeddings). With random weights, since no checkpoint may be downloaded: 3.0 GB in float32,
/// 1.5 GB in bfloat16, more than any L3, as a real checkpoint's weights are.
qwen3::Config qwen3_0_6b_config() {
  qwen3::Config c;
  c.vocab_size = 151936;
  c.hidden_size = 1024;
  c.intermediate_size = 3072;
  c.num_hidden_layers = 28;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.tie_word_embeddings = true;
  return c;
}

qwen3::ForCausalLM bench_model(const qwen3::Config& config) {
  qwen3::ForCausalLM model(config);
  qwen3::init_random(*model, 0);
  model->eval();
  return model;
}

qwen3::ForCausalLM bench_model(int64_t hidden = 512) { return bench_model(bench_config(hidden)); }

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
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

/// Original vs both chains of every layer with kernels (default: no weight copy; folded), for
/// `tokens` new tokens after `cached` tokens in the KV cache (0: a prompt forward). Where this CPU
/// computes bfloat16 (AVX512_BF16), also the model in bfloat16 with the same kernels
/// (kernels_bf16; max_diff_bf16 against the float32 logits; mib and mib_bf16: the bytes of the
/// models' parameters and buffers).
void BM_Qwen3ForwardKernels(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t tokens = state.range(0), cached = state.range(1);
  // Separate models with the same weights (see BM_NormMLPChain on sharing).
  auto original = bench_model(), kernels = bench_model(), folded = bench_model();
  auto kernels_bf16 = bench_model();
  kernels_bf16->to(torch::kBFloat16);
  qwen3::fuse_with_kernels(kernels, /*folded=*/false);
  qwen3::fuse_with_kernels(folded, /*folded=*/true);
  qwen3::fuse_with_kernels(kernels_bf16, /*folded=*/false);

  torch::manual_seed(1);
  const auto prompt = torch::randint(0, 4096, {1, cached}, torch::kInt64);
  const auto ids = torch::randint(0, 4096, {1, tokens}, torch::kInt64);
  qwen3::KVCache base, base_bf16;  // the cache holds the model's dtype
  if (cached > 0) {
    original->forward(prompt, &base);
    kernels_bf16->forward(prompt, &base_bf16);
  }
  auto run = [&](qwen3::ForCausalLM model) {
    // Tensor handles: the base cache is never written.
    qwen3::KVCache cache = model.get() == kernels_bf16.get() ? base_bf16 : base;
    return model->forward(ids, cached > 0 ? &cache : nullptr);
  };
  const auto expected = run(original);
  const double diff = std::max(max_diff(run(kernels), expected), max_diff(run(folded), expected));
  if (diff > 1e-3) state.SkipWithError("kernel logits differ");

  std::vector<std::pair<std::string, std::function<void()>>> variants{
      {"original", [&] { benchmark::DoNotOptimize(run(original)); }},
      {"kernels", [&] { benchmark::DoNotOptimize(run(kernels)); }},
      {"folded", [&] { benchmark::DoNotOptimize(run(folded)); }}};
  if (fusion::kernels::bfloat16_supported()) {
    const double diff_bf16 = max_diff(run(kernels_bf16).to(torch::kFloat32), expected);
    if (diff_bf16 > fusion::default_tolerance(torch::kBFloat16) *
                        std::max(1.0, expected.abs().max().item<double>())) {
      state.SkipWithError("bfloat16 kernel logits differ");
    }
    variants.emplace_back("kernels_bf16", [&] { benchmark::DoNotOptimize(run(kernels_bf16)); });
    state.counters["max_diff_bf16"] = diff_bf16;
  } else {
    state.SetLabel("no AVX512_BF16 (or oneDNN) here: no bfloat16 variant");
  }
  time_rotating(state, variants, "ms", 1e3);
  state.counters["max_diff"] = diff;
  state.counters["mib"] = static_cast<double>(demo::tensor_bytes(*kernels)) / 1048576.0;
  state.counters["mib_bf16"] = static_cast<double>(demo::tensor_bytes(*kernels_bf16)) / 1048576.0;
}
BENCHMARK(BM_Qwen3ForwardKernels)
    ->ArgNames({"tokens", "cached"})
    ->Args({1, 64})
    ->Args({16, 0})
    ->Args({128, 0})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(5.0);

/// Decode as generation runs it: `steps` tokens one after another on one model, its KV cache
/// growing from 64 prompt tokens; the float32 kernels against the model in bfloat16 under the same
/// kernels, interleaved per `steps` tokens (ms counters: per token). Unlike BM_Qwen3ForwardKernels,
/// where every single token follows another model's, a model's weights stay in the caches from one
/// token to the next as far as they fit, as in a generation loop; the bfloat16 model's, half the
/// bytes, fit better. range(1): 0 the bench model (58 MB of float32 weights, which a large L3
/// holds whole), 1 Qwen3-0.6B's shapes (qwen3_0_6b_config: every step reads its weights from
/// memory, as a real checkpoint's decode does).
void BM_Qwen3Decode(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t steps = state.range(0);
  if (!fusion::kernels::bfloat16_supported()) {
    state.SkipWithError("no AVX512_BF16 (or oneDNN) here: no bfloat16 variant");
    return;
  }
  const auto config = state.range(1) == 1 ? qwen3_0_6b_config() : bench_config();
  auto kernels = bench_model(config), kernels_bf16 = bench_model(config);
  kernels_bf16->to(torch::kBFloat16);
  qwen3::fuse_with_kernels(kernels, /*folded=*/false);
  qwen3::fuse_with_kernels(kernels_bf16, /*folded=*/false);
  torch::manual_seed(1);
  const auto prompt = torch::randint(0, config.vocab_size, {1, 64}, torch::kInt64);
  const auto next = torch::randint(0, config.vocab_size, {steps, 1, 1}, torch::kInt64);
  qwen3::KVCache base, base_bf16;
  kernels->forward(prompt, &base);
  kernels_bf16->forward(prompt, &base_bf16);
  const auto generate = [&](qwen3::ForCausalLM& model, const qwen3::KVCache& from) {
    qwen3::KVCache cache = from;  // tensor handles: `from` is never written
    for (int64_t i = 0; i < steps; ++i) benchmark::DoNotOptimize(model->forward(next[i], &cache));
  };
  time_rotating(state,
                {{"kernels", [&] { generate(kernels, base); }},
                 {"kernels_bf16", [&] { generate(kernels_bf16, base_bf16); }}},
                "ms", 1e3 / static_cast<double>(steps));
}
BENCHMARK(BM_Qwen3Decode)
    ->ArgNames({"steps", "qwen3_0_6b"})
    ->Args({16, 0})
    ->Args({16, 1})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(5.0);

/// One kind of chain fused in every layer (range(2): 0 post_attention_layernorm -> mlp; 1
/// input_layernorm -> self_attn, the packed q/k/v; 2 norm -> lm_head, untied here), with the
/// library kernel against the same chains replayed and the unfused model, at hidden range(0)
/// (Llama shapes: 8 heads of hidden / 8, intermediate 3 x hidden), range(1) tokens. Whole
/// forwards: the difference is the chains', the ratios are diluted by the rest.
void BM_Qwen3ChainKernels(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t hidden = state.range(0), tokens = state.range(1);
  auto config = bench_config(hidden);
  config.head_dim = hidden / 8;
  config.tie_word_embeddings = false;
  const auto kernel_rule = qwen3::kernel_plan().rules.at(static_cast<std::size_t>(state.range(2)));
  auto replay_rule = kernel_rule;
  replay_rule.options.kernel.clear();
  auto make = [&] {
    qwen3::ForCausalLM model(config);
    qwen3::init_random(*model, 0);
    model->eval();
    return model;
  };
  auto unfused = make(), replay = make(), kernel = make();
  fusion::fuse_modules(replay, fusion::Plan{{replay_rule}});
  fusion::fuse_modules(kernel, fusion::Plan{{kernel_rule}});
  state.SetLabel(kernel_rule.options.kernel);
  torch::manual_seed(1);
  const auto ids = torch::randint(0, 4096, {1, tokens}, torch::kInt64);
  time_chain_variants(state, unfused, replay, kernel, ids);
}
BENCHMARK(BM_Qwen3ChainKernels)
    ->ArgNames({"hidden", "tokens", "chain"})
    ->ArgsProduct({{64, 512}, {1, 16, 128}, {0, 1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);

/// fusion::optimize on the bench model (untied lm_head) with range(0) tokens: its time
/// (optimize_s), whether its plan covers every chain of qwen3::kernel_plan with the same kernels
/// (covers = 1), and the forward with the found plan against the hand-written one in one run.
/// Fixed iterations: optimize runs once per repetition.
void BM_Qwen3AutoPlan(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  auto hand_written = bench_model(), found = bench_model();
  torch::manual_seed(1);
  const auto ids = torch::randint(0, 4096, {1, state.range(0)}, torch::kInt64);
  const auto wanted = demo::planned_chains(hand_written, qwen3::kernel_plan());
  qwen3::fuse_with_kernels(hand_written);
  const auto plan = fusion::optimize(found, [&] { return found(ids); });
  state.counters["optimize_s"] = plan.seconds;
  std::cerr << plan;  // what was kept and rejected, with its figures
  state.counters["covers"] = demo::covers(demo::fused_chains(found), wanted) ? 1 : 0;
  if (max_diff(found(ids), hand_written(ids)) > 1e-3) state.SkipWithError("logits differ");
  time_rotating(state,
                {{"hand_written", [&] { benchmark::DoNotOptimize(hand_written(ids)); }},
                 {"auto", [&] { benchmark::DoNotOptimize(found(ids)); }}},
                "ms", 1e3);
}
BENCHMARK(BM_Qwen3AutoPlan)->Arg(16)->Arg(128)->Iterations(60)->Unit(benchmark::kMillisecond);

/// What bounds the forward: the same model's GEMMs alone (q/k/v, o, gate/up, down per layer, and
/// lm_head) at the forward's shapes, beside the original forward.
void BM_Qwen3GemmShare(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t tokens = state.range(0);
  auto model = bench_model();
  const auto ids = torch::randint(0, 4096, {1, tokens}, torch::kInt64);
  std::vector<torch::Tensor> weights;
  for (const auto& item : model->named_parameters()) {
    if (item.value().dim() == 2 && item.key().find("embed") == std::string::npos) {
      weights.push_back(item.value());
    }
  }
  const auto h = torch::randn({tokens, 512});
  const auto act = torch::randn({tokens, 1536});
  time_rotating(state,
                {{"forward", [&] { benchmark::DoNotOptimize(model(ids)); }},
                 {"gemms",
                  [&] {
                    for (const auto& w : weights) {
                      benchmark::DoNotOptimize(torch::linear(w.size(1) == 512 ? h : act, w));
                    }
                  }}},
                "ms", 1e3);
}
BENCHMARK(BM_Qwen3GemmShare)->Arg(1)->Arg(16)->Arg(128)->Unit(benchmark::kMillisecond);

/// The norm + MLP chain of one layer, as a parent calls it.
struct NormMLPImpl : torch::nn::Module {
  explicit NormMLPImpl(const qwen3::Config& c) {
    norm = fusion::register_slot(*this, "norm", qwen3::RMSNorm(c.hidden_size, c.rms_norm_eps));
    mlp = fusion::register_slot(*this, "mlp", qwen3::MLP(c));
  }
  torch::Tensor forward(const torch::Tensor& x) { return mlp(norm(x)); }
  fusion::Slot<qwen3::RMSNorm> norm;
  fusion::Slot<qwen3::MLP> mlp;
};

std::shared_ptr<NormMLPImpl> norm_mlp(const qwen3::Config& c) {
  torch::manual_seed(0);
  auto module = std::make_shared<NormMLPImpl>(c);
  torch::NoGradGuard no_grad;
  for (auto& p : module->parameters()) p.normal_(0.0, 0.08);
  module->norm->weight.uniform_(0.8, 1.2);
  module->eval();
  return module;
}

/// unfused pair, replay, a naive ATen fusion (gate and up concatenated, silu(g).mul_(u)), the
/// kernel (no weight copy) and the folded kernel, at hidden = range(0), tokens = range(1).
void BM_NormMLPChain(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  qwen3::Config c;
  c.hidden_size = state.range(0);
  c.intermediate_size = 3 * c.hidden_size;
  // Each variant has its own copy of the same weights: shared weights would be warm in cache for
  // whichever variant runs right after another that read them, a bias at hidden 512.
  auto unfused = norm_mlp(c), replay = norm_mlp(c), kernel = norm_mlp(c), folded = norm_mlp(c),
       plain = norm_mlp(c);
  const std::vector<fusion::ModuleSpec> specs{fusion::ModuleSpec{{"x"}, {"x"}},
                                              fusion::ModuleSpec{{"x"}, {"x"}}};
  qwen3::register_kernels();
  fusion::fuse_modules(*replay, {"norm", "mlp"}, specs);
  fusion::FuseOptions options;
  options.kernel = "qwen3.rmsnorm_mlp";
  fusion::fuse_modules(*kernel, {"norm", "mlp"}, specs, options);
  options.kernel = "qwen3.rmsnorm_mlp.folded";
  fusion::fuse_modules(*folded, {"norm", "mlp"}, specs, options);
  const auto gate_up = torch::cat({plain->mlp->gate_proj->weight, plain->mlp->up_proj->weight});
  auto naive = [&](const torch::Tensor& x) {
    auto parts = torch::linear(plain->norm->forward(x), gate_up).chunk(2, -1);
    return plain->mlp->down_proj(torch::silu(parts[0]).mul_(parts[1]));
  };
  const auto x = torch::randn({1, state.range(1), c.hidden_size});
  const auto expected = unfused->forward(x);
  const double diff =
      std::max({max_diff(kernel->forward(x), expected), max_diff(folded->forward(x), expected),
                max_diff(naive(x), expected)});
  if (diff > 1e-4) state.SkipWithError("fused results differ");

  time_rotating(state,
                {{"unfused", [&] { benchmark::DoNotOptimize(unfused->forward(x)); }},
                 {"replay", [&] { benchmark::DoNotOptimize(replay->forward(x)); }},
                 {"naive", [&] { benchmark::DoNotOptimize(naive(x)); }},
                 {"kernel", [&] { benchmark::DoNotOptimize(kernel->forward(x)); }},
                 {"folded", [&] { benchmark::DoNotOptimize(folded->forward(x)); }}},
                "us", 1e6);
}
BENCHMARK(BM_NormMLPChain)
    ->ArgNames({"hidden", "tokens"})
    ->ArgsProduct({{64, 512}, {1, 16, 128}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(1.0);

/// One projection of `rows` rows through an [out, in] float32 weight: at::linear against
/// fusion::kernels::project (the path measured fastest for the shape).
/// The weights are cycled through copies that together exceed the L3 cache, so that each call
/// reads its weight from memory, as a forward through several layers does.
void BM_Projection(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t rows = state.range(0), in = state.range(1), out = state.range(2);
  const int64_t copies = std::max<int64_t>(2, (64 << 20) / (in * out * 4));
  std::vector<torch::Tensor> weights;
  for (int64_t i = 0; i < copies; ++i) weights.push_back(torch::randn({out, in}) * 0.05);
  const auto x = torch::randn({1, rows, in});
  if (max_diff(fusion::kernels::project(x, weights[0]), torch::linear(x, weights[0])) > 1e-4) {
    state.SkipWithError("project differs from linear");
  }
  std::size_t next_linear = 0, next_project = 0;
  time_rotating(
      state,
      {{"linear",
        [&] {
          benchmark::DoNotOptimize(torch::linear(x, weights[next_linear++ % weights.size()]));
        }},
       {"project",
        [&] {
          benchmark::DoNotOptimize(
              fusion::kernels::project(x, weights[next_project++ % weights.size()]));
        }}},
      "us", 1e6);
}
BENCHMARK(BM_Projection)
    ->ArgNames({"rows", "in", "out"})
    ->ArgsProduct({{1, 16, 64, 128}, {512}, {3072}})
    ->ArgsProduct({{1, 16, 64, 128}, {1536}, {512}})
    ->ArgsProduct({{16, 128}, {64}, {384}})
    ->ArgsProduct({{16, 128}, {192}, {64}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.5);

/// Memory, not time: the resident memory each model adds once built and (kernel-equipped ones)
/// fused and prepared, and the bytes their prepared states hold beyond the model's tensors.
/// Registered last: it fixes glibc's mmap threshold (the adaptive one would serve a later model
/// from freed heap memory, and its growth would read as zero), which makes large temporaries
/// page-fault on every allocation and would slow every benchmark run after it.
void BM_Qwen3KernelMemory(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  ::mallopt(M_MMAP_THRESHOLD, 128 * 1024);
  const auto ids = torch::zeros({1, 1}, torch::kInt64);
  auto resident_of = [&](bool kernels, bool folded) {
    ::malloc_trim(0);  // freed memory a model could reuse would not count as resident growth
    const double before = resident_bytes();
    auto model = bench_model();
    if (kernels) qwen3::fuse_with_kernels(model, folded);
    model(ids);
    std::uint64_t own = 0;
    for (const auto& chain : fusion::fused_chains(model)) own += chain.stats.state_bytes;
    return std::make_tuple(model, (resident_bytes() - before) / (1 << 20),
                           static_cast<double>(own) / (1 << 20));
  };
  const auto original = resident_of(false, false);
  const auto kernels = resident_of(true, false);
  const auto folded = resident_of(true, true);
  double growth = std::get<1>(original);
  for (auto _ : state) benchmark::DoNotOptimize(growth);
  state.counters["original_rss_MiB"] = std::get<1>(original);
  state.counters["kernels_rss_MiB"] = std::get<1>(kernels);
  state.counters["folded_rss_MiB"] = std::get<1>(folded);
  state.counters["kernels_state_MiB"] = std::get<2>(kernels);
  state.counters["folded_state_MiB"] = std::get<2>(folded);
}
BENCHMARK(BM_Qwen3KernelMemory)->Iterations(1);

}  // namespace

FUSION_BENCHMARK_MAIN();
