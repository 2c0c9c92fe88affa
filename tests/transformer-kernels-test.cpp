// The library's transformer kernels (fusion/kernels/transformer.hpp) on module types it has never
// seen, declared by layout: a Llama-style norm -> MLP (the test models' RMSNorm and MLP, plain
// torch::nn::Linear members), and a GPT-2-style block (torch::nn::LayerNorm, Conv1D weights
// stored [in, out], a packed c_attn, GELU-tanh, a tied lm_head); and the CPU primitives behind
// them, on the AVX-512 paths and with those turned off.
#include "catch_compat.hpp"

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <fusion/kernels/transformer.hpp>

#include "forward_runners.hpp"
#include "models.hpp"

using fusion_test::Contains;
namespace fk = fusion::kernels;

namespace {

/// Kernel results differ from the modules' only by float32 summation order: within 1e-5 of the
/// largest magnitude of the expected values (the values are O(1)).
void require_close(const torch::Tensor& got, const torch::Tensor& expected) {
  REQUIRE(got.sizes() == expected.sizes());
  REQUIRE(got.scalar_type() == expected.scalar_type());
  const double diff = (got - expected).abs().max().item<double>();
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  INFO("max abs diff " << diff << ", tolerance " << 1e-5 * scale);
  REQUIRE(diff <= 1e-5 * scale);
}

/// Runs `body` with the AVX-512 loops on (where the CPU has them) and off.
template <typename Body>
void with_and_without_avx512(Body body) {
  for (const bool avx512 : {true, false}) {
    const bool before = fk::set_avx512(avx512);
    INFO("AVX-512 loops " << (fk::avx512_enabled() ? "on" : "off"));
    body();
    fk::set_avx512(before);
  }
}

// --- GPT-2 as transformers writes it, reduced to what the kernels read ---------------------------

/// transformers' Conv1D: y = x W + b with W stored [in, out].
struct Conv1DImpl : torch::nn::Module {
  Conv1DImpl(int64_t nx, int64_t nf) {
    weight = register_parameter("weight", torch::randn({nx, nf}) * 0.2);
    bias = register_parameter("bias", torch::randn({nf}) * 0.1);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto sizes = x.sizes().vec();
    sizes.back() = weight.size(1);
    return torch::addmm(bias, x.reshape({-1, x.size(-1)}), weight).view(sizes);
  }
  torch::Tensor weight, bias;
};
TORCH_MODULE(Conv1D);

struct GPTMLPImpl : torch::nn::Module {
  explicit GPTMLPImpl(int64_t hidden) {
    c_fc = register_module("c_fc", Conv1D(hidden, 4 * hidden));
    c_proj = register_module("c_proj", Conv1D(4 * hidden, hidden));
  }
  torch::Tensor forward(const torch::Tensor& x) { return c_proj(torch::gelu(c_fc(x), "tanh")); }
  Conv1D c_fc{nullptr}, c_proj{nullptr};
};
TORCH_MODULE(GPTMLP);

struct GPTAttentionImpl : torch::nn::Module {
  GPTAttentionImpl(int64_t hidden, int64_t heads) : num_heads(heads) {
    c_attn = register_module("c_attn", Conv1D(hidden, 3 * hidden));
    c_proj = register_module("c_proj", Conv1D(hidden, hidden));
  }
  torch::Tensor forward(const torch::Tensor& x, const c10::optional<torch::Tensor>& mask) {
    return c_proj(after_projections({c_attn(x)}, x, mask));
  }
  /// Causal attention over the packed q, k, v; the heads concatenated, before c_proj.
  torch::Tensor after_projections(const std::vector<torch::Tensor>& qkv, const torch::Tensor& x,
                                  const c10::optional<torch::Tensor>& mask) {
    const int64_t b = x.size(0), s = x.size(1), hidden = x.size(2);
    auto split = qkv[0].split(hidden, -1);
    auto heads = [&](const torch::Tensor& t) {
      return t.reshape({b, s, num_heads, -1}).transpose(1, 2);
    };
    auto q = heads(split[0]), k = heads(split[1]), v = heads(split[2]);
    auto scores = torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(double(hidden / num_heads));
    scores = scores + torch::full({s, s}, -1e9).triu(1);
    if (mask) scores = scores + *mask;
    return torch::matmul(torch::softmax(scores, -1), v).transpose(1, 2).reshape({b, s, hidden});
  }
  int64_t num_heads;
  Conv1D c_attn{nullptr}, c_proj{nullptr};
};
TORCH_MODULE(GPTAttention);

struct GPTBlockImpl : torch::nn::Module {
  GPTBlockImpl(int64_t hidden, int64_t heads) {
    auto ln = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({hidden}).eps(1e-5)); };
    ln_1 = fusion::register_slot(*this, "ln_1", ln());
    attn = fusion::register_slot(*this, "attn", GPTAttention(hidden, heads));
    ln_2 = fusion::register_slot(*this, "ln_2", ln());
    mlp = fusion::register_slot(*this, "mlp", GPTMLP(hidden));
  }
  torch::Tensor forward(torch::Tensor h, const c10::optional<torch::Tensor>& mask) {
    h = h + attn(ln_1(h), mask);
    return h + mlp(ln_2(h));
  }
  fusion::Slot<torch::nn::LayerNorm> ln_1, ln_2;
  fusion::Slot<GPTAttention> attn;
  fusion::Slot<GPTMLP> mlp;
};
TORCH_MODULE(GPTBlock);

struct GPTImpl : torch::nn::Module {
  explicit GPTImpl(int64_t hidden = 32, int64_t heads = 4, int64_t vocab = 50, int64_t layers = 2) {
    wte = register_module("wte", torch::nn::Embedding(vocab, hidden));
    h = register_module("h", torch::nn::ModuleList());
    for (int64_t i = 0; i < layers; ++i) h->push_back(GPTBlock(hidden, heads));
    ln_f = fusion::register_slot(*this, "ln_f",
                                 torch::nn::LayerNorm(torch::nn::LayerNormOptions({hidden})));
    lm_head = fusion::register_slot(
        *this, "lm_head", torch::nn::Linear(torch::nn::LinearOptions(hidden, vocab).bias(false)));
    lm_head->weight = wte->weight;  // tied, as GPT-2's
    // LayerNorm starts at weight 1, bias 0: random ones test the fold.
    torch::NoGradGuard no_grad;
    for (auto& p : named_parameters()) {
      if (p.key().find("ln_") != std::string::npos) p.value().uniform_(0.5, 1.5);
    }
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    auto x = wte(ids);
    for (const auto& block : *h) x = block->as<GPTBlockImpl>()->forward(x, c10::nullopt);
    return lm_head(ln_f(x));
  }
  torch::nn::Embedding wte{nullptr};
  torch::nn::ModuleList h{nullptr};
  fusion::Slot<torch::nn::LayerNorm> ln_f;
  fusion::Slot<torch::nn::Linear> lm_head;
};
TORCH_MODULE(GPT);

void register_gpt_kernels() {
  fusion::register_kernels_once("test.gpt", [] {
    fk::register_norm_mlp("test.gpt.ln_mlp", fk::plain_mlp(fk::transposed(&GPTMLPImpl::c_fc),
                                                           fk::transposed(&GPTMLPImpl::c_proj),
                                                           fk::Activation::gelu_tanh));
    fk::register_norm_projections("test.gpt.ln_attention", fk::layer_norm(),
                                  fk::projections(fk::transposed(&GPTAttentionImpl::c_attn)),
                                  &GPTAttentionImpl::after_projections,
                                  fk::transposed(&GPTAttentionImpl::c_proj));
    fk::register_norm_lm_head("test.gpt.ln_lm_head", fk::layer_norm());
  });
}

fusion::Plan gpt_plan(bool folded) {
  register_gpt_kernels();
  const std::string suffix = folded ? ".folded" : "";
  auto kernel = [&](const std::string& name) {
    fusion::FuseOptions options;
    options.kernel = name + suffix;
    return options;
  };
  const fusion::ModuleSpec hidden{{"hidden_states"}, {"hidden_states"}};
  fusion::Plan plan;
  plan.rules.push_back({{"h.*.ln_1", "h.*.attn"},
                        {hidden, fusion::ModuleSpec{{"hidden_states", "mask"}, {"hidden_states"}}},
                        kernel("test.gpt.ln_attention")});
  plan.rules.push_back({{"h.*.ln_2", "h.*.mlp"}, {hidden, hidden}, kernel("test.gpt.ln_mlp")});
  plan.rules.push_back({{"ln_f", "lm_head"}, {hidden, hidden}, kernel("test.gpt.ln_lm_head")});
  return plan;
}

// --- Llama-style: the test models' RMSNorm -> MLP (gate, up, down as torch::nn::Linear) ----------

void register_llama_kernels() {
  fusion::register_kernels_once("test.llama", [] {
    using models::MLPImpl;
    using models::RMSNormImpl;
    fk::register_norm_mlp("test.llama.rmsnorm_mlp",
                          fk::rms_norm(&RMSNormImpl::weight, &RMSNormImpl::eps),
                          fk::gated_mlp(&MLPImpl::gate_proj, &MLPImpl::up_proj, &MLPImpl::down_proj,
                                        fk::Activation::silu));
  });
}

fusion::Plan llama_plan(bool folded) {
  register_llama_kernels();
  fusion::FuseOptions options;
  options.kernel = folded ? "test.llama.rmsnorm_mlp.folded" : "test.llama.rmsnorm_mlp";
  const fusion::ModuleSpec hidden{{"hidden_states"}, {"hidden_states"}};
  fusion::Plan plan;
  plan.rules.push_back(
      {{"layers.*.post_attention_layernorm", "layers.*.mlp"}, {hidden, hidden}, options});
  return plan;
}

}  // namespace

TEST_CASE(
    "a Llama-style norm -> MLP gets the library kernel from its layout, without a weight copy") {
  torch::NoGradGuard no_grad;
  const bool folded = GENERATE(false, true);
  INFO((folded ? "folded" : "default (no weight copy)"));
  torch::manual_seed(1);
  models::Stack model(2, 128, 192);
  model->eval();
  auto reference = std::dynamic_pointer_cast<models::StackImpl>(model->clone());
  const auto x = torch::randn({2, 5, 128});
  const auto original = model(x);
  fusion::fuse_modules(model, llama_plan(folded));
  with_and_without_avx512([&] { require_close(model(x), original); });
  for (const auto& chain : fusion::fused_chains(model)) {
    CHECK(chain.stats.runs == 2);
    CHECK(chain.stats.prepares == 1);
    // The default's state is the model's own storage; the folded copy is the state's own bytes.
    CHECK(chain.stats.state_bytes == (folded ? 2 * 192 * 128 * sizeof(float) : 0));
    CHECK((chain.stats.shared_state_bytes > 0) == !folded);
  }
  auto& mlp = *model->block(0).mlp;
  CHECK(mlp.gate_proj->weight.storage().is_alias_of(mlp.up_proj->weight.storage()) == !folded);

  SECTION("decode-sized and long inputs") {
    for (int64_t rows : {1, 3, 64, 300}) {
      const auto input = torch::randn({1, rows, 128});
      reference->eval();
      require_close(model(input), reference->forward(input));
    }
  }
  SECTION("torch::save, then torch::load of other weights into the fused model") {
    const std::string path = "transformer-kernels-save.pt";
    torch::save(model, path);
    models::Stack saved(2, 128, 192);
    saved->eval();
    torch::load(saved, path);
    require_close(saved(x), original);  // the packed views saved as the parameters they are
    torch::manual_seed(2);
    models::Stack other(2, 128, 192);
    other->eval();
    torch::save(other, path);
    torch::load(model, path);
    require_close(model(x), other(x));
    std::remove(path.c_str());
  }
  SECTION("to(kDouble) and back") {
    model->to(torch::kDouble);
    reference->to(torch::kDouble);
    require_close(model(x.to(torch::kDouble)), reference->forward(x.to(torch::kDouble)));
    model->to(torch::kFloat);
    require_close(model(x), original);
  }
  SECTION("an optimizer step on the packed parameters") {
    for (auto* m : std::vector<models::StackImpl*>{model.get(), reference.get()}) {
      torch::AutoGradMode grad(true);
      m->train();
      torch::optim::SGD sgd(m->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
      for (int step = 0; step < 2; ++step) {
        sgd.zero_grad();
        m->forward(x).pow(2).mean().backward();
        sgd.step();
      }
      m->eval();
    }
    require_close(model(x), reference->forward(x));
    CHECK_FALSE(torch::allclose(model(x), original));
  }
  SECTION("a clone has its own weights") {
    auto copy = std::dynamic_pointer_cast<models::StackImpl>(model->clone());
    require_close(copy->forward(x), original);
    copy->block(0).mlp->up_proj->weight.mul_(2);
    require_close(model(x), original);
  }
}

TEST_CASE("a GPT-2-style model: LayerNorm, [in, out] weights, packed c_attn, tied lm_head") {
  torch::NoGradGuard no_grad;
  const bool folded = GENERATE(false, true);
  INFO((folded ? "folded" : "default (no weight copy)"));
  torch::manual_seed(3);
  GPT model;
  model->eval();
  const auto ids = torch::randint(50, {2, 7});
  const auto original = model(ids);
  fusion::fuse_modules(model, gpt_plan(folded));
  REQUIRE(fusion::fused_chains(model).size() == 5);
  with_and_without_avx512([&] {
    require_close(model(ids), original);
    require_close(model(ids.narrow(1, 0, 1)), model(ids.narrow(1, 0, 1)));
  });
  for (const auto& chain : fusion::fused_chains(model)) {
    INFO(fusion::to_string(chain) << " " << chain.kernel);
    CHECK(chain.stats.runs > 0);
    CHECK((chain.stats.state_bytes > 0) == folded);
  }
  CHECK(model->lm_head->weight.is_same(model->wte->weight));  // still tied
  const auto report = fusion::verify(model, [&] { return model(ids); });
  INFO(report.to_string());
  CHECK(report.ok());
}

TEST_CASE(
    "4 threads run a Llama-style model with kernels from the first call: prepare and the "
    "measured GEMM choice race, every forward within tolerance",
    "[threads]") {
  torch::manual_seed(7);
  models::Stack model(2, 128, 192);
  model->eval();
  std::vector<torch::Tensor> inputs, expected;
  {
    torch::NoGradGuard no_grad;
    for (int64_t rows : {1, 2, 16, 40, 128}) {
      inputs.push_back(torch::randn({1, rows, 128}));
      expected.push_back(model(inputs.back()));
    }
  }
  fk::reset_gemm_choices();  // every shape is measured while the threads call it
  fusion::fuse_modules(model, llama_plan(/*folded=*/false));
  fusion_test::ForwardRunners<models::Stack> runners(model, inputs, expected, 1e-4, 1e-5);
  while (runners.forwards < 200) std::this_thread::yield();
  runners.stop();
  CHECK(runners.wrong == 0);
  CHECK(runners.failed == 0);
  for (const auto& chain : fusion::fused_chains(model)) CHECK(chain.stats.prepares == 1);
}

TEST_CASE("attaching a layout kernel checks every tensor it reads, naming member and parameter") {
  torch::NoGradGuard no_grad;
  models::Stack model(2, 128, 192);
  auto& block = model->block(1);
  auto fails = [&](const std::string& message) {
    const auto before = fusion::report(model);
    CHECK_THROWS_WITH(fusion::fuse_modules(model, llama_plan(false)),
                      Contains("kernel 'test.llama.rmsnorm_mlp' on chain "
                               "[layers.1.post_attention_layernorm -> layers.1.mlp]") &&
                          Contains(message));
    CHECK(fusion::fused_chains(model).empty());
    CHECK(fusion::report(model) == before);
  };
  SECTION("the norm's weight") {
    block.post_attention_layernorm->weight.set_data(torch::ones({64}));
    fails("the norm's weight has shape [64], but member 'gate_proj''s input has 128 features");
  }
  SECTION("gate and up") {
    block.mlp->up_proj->weight.set_data(torch::randn({100, 128}));
    fails("the gate and up projections give 192 and 100 features");
  }
  SECTION("down") {
    block.mlp->down_proj->weight.set_data(torch::randn({128, 100}));
    fails(
        "member 'down_proj': parameter 'weight' has shape [128, 100], which does not take the "
        "192 features");
  }
  SECTION("a dtype") {
    block.mlp->up_proj->weight.set_data(torch::randn({192, 128}, torch::kDouble));
    fails(
        "member 'up_proj': parameter 'weight' is Double on cpu, member 'gate_proj''s is Float "
        "on cpu");
  }
  SECTION("an input size") {
    block.mlp->up_proj->weight.set_data(torch::randn({192, 64}));
    fails(
        "member 'up_proj': parameter 'weight' has shape [192, 64] ([out, in]), 64 input "
        "features where member 'gate_proj' has 128");
  }
}

TEST_CASE("project equals linear (addmm for [in, out] weights) on every path it takes") {
  // project() takes, per shape, the path measured fastest here: the BLAS (one row of an
  // [out, in] weight: the matrix-vector product), the hand-written AVX-512 loops (1-256 rows; odd
  // row and column counts exercise their remainders), oneDNN (48 rows or more) or BLIS (2 rows or
  // more, where libblis is installed: scripts/setup.sh installs it) or libxsmm (where the build
  // found libxsmm-dev, which scripts/setup.sh installs). Each path is forced in turn,
  // and measured choice too; with the AVX-512 loops off, the paths of a CPU without them.
  // Tolerance: float32 summation order, 1e-5 of the largest sum of term magnitudes
  // (|x| |W|^T + |b|): relative to the output itself it fails where the terms cancel.
  torch::NoGradGuard no_grad;
  const int threads = at::get_num_threads();
  using fk::GemmPath;
  for (const auto path :
       {std::optional<GemmPath>(), std::optional<GemmPath>(GemmPath::blas),
        std::optional<GemmPath>(GemmPath::hand_written), std::optional<GemmPath>(GemmPath::onednn),
        std::optional<GemmPath>(GemmPath::blis), std::optional<GemmPath>(GemmPath::libxsmm)}) {
    const auto before = fk::force_gemm_path(path);
    UNSCOPED_INFO("BLIS " << fusion::detail::Blis::instance().version << ", libxsmm "
                          << fusion::detail::libxsmm_available());
    INFO("path " << (path ? static_cast<int>(*path) : -1));
    with_and_without_avx512([&] {
      for (int use_threads : {1, 2}) {
        at::set_num_threads(use_threads);
        for (int64_t rows : {1, 2, 3, 5, 16, 17, 64, 130, 300}) {
          for (int64_t in : {64, 80, 128, 512}) {
            for (int64_t out : {1, 3, 130, 512}) {
              const bool with_bias = (rows + out) % 2 == 1;
              const auto x = torch::randn({1, rows, in});
              const auto weight = torch::randn({out, in});
              const auto bias = with_bias ? torch::randn({out}) : torch::Tensor();
              const auto expected = torch::linear(x, weight, bias);
              INFO("threads " << use_threads << ", rows " << rows << ", in " << in << ", out "
                              << out << (with_bias ? ", bias" : ""));
              auto magnitude = torch::linear(x.abs(), weight.abs());
              if (with_bias) magnitude = magnitude + bias.abs();
              const double tolerance = 1e-5 * magnitude.max().item<double>();
              const auto got = fk::project(x, weight, bias);
              REQUIRE(got.sizes() == expected.sizes());
              CHECK((got - expected).abs().max().item<double>() <= tolerance);
              const auto transposed = weight.t().contiguous();
              const auto got_in_out = fk::project(x, transposed, bias, fk::WeightLayout::in_out);
              REQUIRE(got_in_out.sizes() == expected.sizes());
              CHECK((got_in_out - expected).abs().max().item<double>() <= tolerance);
            }
          }
        }
      }
    });
    fk::force_gemm_path(before);
  }
  at::set_num_threads(threads);
  // Inputs that are views: transposed, and a slice of a wider tensor.
  const auto weight = torch::randn({64, 128});
  const auto wide = torch::randn({8, 256});
  for (const auto& x : {torch::randn({128, 8}).t(), wide.narrow(1, 64, 128)}) {
    CHECK((fk::project(x, weight) - torch::linear(x, weight)).abs().max().item<double>() < 1e-3);
  }
  // A bias that is a view with a stride (added by ATen, not the loop).
  const auto x2 = torch::randn({3, 128});
  const auto strided_bias = torch::randn({128}).slice(0, 0, 128, 2);
  CHECK((fk::project(x2, weight, strided_bias) - torch::linear(x2, weight, strided_bias))
            .abs()
            .max()
            .item<double>() < 1e-3);
  // A weight or bias on another device than x (meta: no data) goes to linear, which gives what
  // it gives for them; the loops would read the pointer as host memory.
  for (const auto& [w, b] : {std::pair<torch::Tensor, torch::Tensor>{weight.to(torch::kMeta), {}},
                             {weight, torch::zeros({64}, torch::kMeta)}}) {
    const auto got = fk::project(x2, w, b);
    const auto expected = torch::linear(x2, w, b);
    CHECK(got.device() == expected.device());
    CHECK(got.sizes() == expected.sizes());
  }
  // After a shape's path is chosen, a weight or bias of another shape raises linear's error (the
  // loops would read past it).
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    const auto x = torch::randn({1, 64}).to(dtype);
    fk::project(x, torch::randn({32, 64}).to(dtype));
    CHECK_THROWS_AS(fk::project(x, torch::randn({32, 48}).to(dtype)), c10::Error);
    CHECK_THROWS_AS(fk::project(x, torch::randn({32, 64}).to(dtype), torch::randn({31}).to(dtype)),
                    c10::Error);
  }
}

TEST_CASE("project equals linear in bfloat16 on both paths it takes") {
  // A bfloat16 projection runs linear (oneDNN) or, for 1-4 rows of an [out, in] weight with rows
  // a multiple of 32 long, the AVX512_BF16 dot-product loops (where the CPU has them; elsewhere,
  // and with the AVX-512 loops off, linear). Each is forced in turn, and measured choice too.
  // Tolerance: the float32 product of the same bfloat16 values, rounded once to bfloat16, and
  // float32 summation order: 2^-8 of the output plus 1e-5 of the largest sum of term magnitudes.
  torch::NoGradGuard no_grad;
  using fk::GemmPath;
  UNSCOPED_INFO("AVX512_BF16 " << fusion::detail::cpu_has_avx512_bf16());
  for (const auto path : {std::optional<GemmPath>(), std::optional<GemmPath>(GemmPath::blas),
                          std::optional<GemmPath>(GemmPath::hand_written)}) {
    const auto before = fk::force_gemm_path(path);
    INFO("path " << (path ? static_cast<int>(*path) : -1));
    with_and_without_avx512([&] {
      for (int64_t rows : {1, 2, 3, 4, 5, 16}) {
        for (int64_t in : {32, 80, 512}) {
          for (int64_t out : {1, 3, 130, 512}) {
            const bool with_bias = (rows + out) % 2 == 1;
            const auto x = torch::randn({1, rows, in}).to(torch::kBFloat16);
            const auto weight = torch::randn({out, in}).to(torch::kBFloat16);
            const auto bias =
                with_bias ? torch::randn({out}).to(torch::kBFloat16) : torch::Tensor();
            const auto as_float = [](const torch::Tensor& t) {
              return t.defined() ? t.to(torch::kFloat) : t;
            };
            const auto exact = torch::linear(as_float(x), as_float(weight), as_float(bias));
            auto magnitude = torch::linear(as_float(x).abs(), as_float(weight).abs());
            if (with_bias) magnitude = magnitude + as_float(bias).abs();
            const auto tolerance = exact.abs() * std::ldexp(1.0, -8) + 1e-5 * magnitude.max();
            INFO("rows " << rows << ", in " << in << ", out " << out
                         << (with_bias ? ", bias" : ""));
            const auto got = fk::project(x, weight, bias);
            REQUIRE(got.scalar_type() == torch::kBFloat16);
            REQUIRE(got.sizes() == exact.sizes());
            CHECK(((got.to(torch::kFloat) - exact).abs() <= tolerance).all().item<bool>());
          }
        }
      }
    });
    fk::force_gemm_path(before);
  }
}

TEST_CASE("activation_mul equals activation(gate) * up, for packed and separate halves") {
  // SiLU in float32: vectorised (AVX-512: a polynomial exp, 16 lanes and a masked remainder) or
  // scalar; the other activations and dtypes: ATen's ops. Tolerance: 1e-6 relative plus 1e-30
  // absolute.
  with_and_without_avx512([&] {
    for (const auto activation : {fk::Activation::silu, fk::Activation::gelu,
                                  fk::Activation::gelu_tanh, fk::Activation::relu}) {
      for (int64_t rows : {1, 3, 128}) {
        for (int64_t inter : {1, 15, 16, 17, 192, 1536}) {
          auto gate_up = torch::randn({rows, 2 * inter}) * 6;
          gate_up[0][0] = 100.0f;  // the saturated ends
          if (inter > 1) gate_up[0][1] = -100.0f;
          const auto parts = gate_up.chunk(2, -1);
          const auto expected = fk::activate(parts[0], activation) * parts[1];
          INFO(fk::to_string(activation) << ", rows " << rows << ", inter " << inter);
          CHECK(torch::allclose(fk::activation_mul(parts[0], parts[1], activation), expected, 1e-6,
                                1e-30));
          // ATen's vectorised paths differ in the last bits between strided and contiguous inputs.
          const auto gate = parts[0].contiguous(), up = parts[1].contiguous();
          CHECK(torch::allclose(fk::activation_mul(gate, up, activation),
                                fk::activate(gate, activation) * up, 1e-6, 1e-30));
        }
      }
    }
    auto with_nan = torch::randn({2, 34});
    with_nan[1][3] = std::numeric_limits<float>::quiet_NaN();
    const auto halves = with_nan.chunk(2, -1);
    CHECK(std::isnan(
        fk::activation_mul(halves[0], halves[1], fk::Activation::silu)[1][3].item<float>()));
  });
  CHECK(torch::allclose(fk::activate(torch::tensor({-1.0, 0.5}), fk::Activation::gelu_tanh),
                        torch::gelu(torch::tensor({-1.0, 0.5}), "tanh")));
}

TEST_CASE("activation_mul in bfloat16 is within two bfloat16 roundings of the exact product") {
  // The AVX-512 loop rounds SiLU's float32 result to bfloat16 and then the product, as two ATen
  // ops store them: each rounding is within 2^-8 of the value, so 2^-7 of the product of the same
  // bfloat16 inputs computed in float64. ATen's own bfloat16 SiLU (the path without the loops)
  // rounds its intermediates too: it is held to 2^-6.
  with_and_without_avx512([&] {
    for (int64_t rows : {1, 3, 128}) {
      for (int64_t inter : {1, 15, 16, 17, 1536}) {
        auto gate_up = (torch::randn({rows, 2 * inter}) * 6).to(torch::kBFloat16);
        gate_up[0][0] = 100.0f;
        if (inter > 1) gate_up[0][1] = -100.0f;
        const auto parts = gate_up.chunk(2, -1);
        const auto exact = torch::silu(parts[0].to(torch::kDouble)) * parts[1].to(torch::kDouble);
        INFO("rows " << rows << ", inter " << inter);
        const auto got = fk::activation_mul(parts[0], parts[1], fk::Activation::silu);
        REQUIRE(got.scalar_type() == torch::kBFloat16);
        const double tolerance = std::ldexp(1.0, fk::avx512_enabled() ? -7 : -6);
        CHECK(torch::allclose(got.to(torch::kDouble), exact, tolerance, 1e-30));
      }
    }
    auto with_nan = torch::randn({2, 34}).to(torch::kBFloat16);
    with_nan[1][3] = std::numeric_limits<float>::quiet_NaN();
    const auto halves = with_nan.chunk(2, -1);
    CHECK(std::isnan(
        fk::activation_mul(halves[0], halves[1], fk::Activation::silu)[1][3].item<float>()));
  });
}

TEST_CASE("rms_norm equals the module's formula in float32 and bf16") {
  // Bfloat16 with the AVX-512 loops on rounds where the module rounds; only the float32
  // summation order of the mean differs. That can move the normalised value across a bfloat16
  // rounding boundary (one unit in the last place, 2^-7 relative at most), and the product with
  // the weight rounds once more: two units, a relative tolerance of 2^-6. Seeded: LibTorch seeds
  // its default generator differently in each process.
  torch::manual_seed(19);
  const double bf16_tolerance = std::ldexp(1.0, -6);
  with_and_without_avx512([&] {
    for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
      for (int64_t dim : {1, 7, 8, 64, 1000}) {
        const auto x = (torch::randn({3, 5, dim}) * 3).to(dtype);
        const auto weight = (torch::rand({dim}) + 0.5).to(dtype);
        auto xf = x.to(torch::kFloat);
        xf = xf * torch::rsqrt(xf.pow(2).mean(-1, true) + 1e-6);
        const auto expected = (weight * xf.to(dtype)).reshape({-1, dim});
        const auto got = fk::rms_norm(x, weight, 1e-6);
        INFO(dtype << ", dim " << dim);
        REQUIRE(got.scalar_type() == dtype);
        CHECK(torch::allclose(got.to(torch::kFloat), expected.to(torch::kFloat),
                              dtype == torch::kFloat ? 1e-5 : bf16_tolerance, 1e-6));
        CHECK(torch::allclose(fk::rms_norm(x, {}, 1e-6).to(torch::kFloat),
                              xf.to(dtype).reshape({-1, dim}).to(torch::kFloat),
                              dtype == torch::kFloat ? 1e-5 : bf16_tolerance, 1e-6));
      }
      // A weight of another shape: ATen's broadcasting, or its error, as the module's
      // `weight * x`.
      const auto x = torch::randn({2, 8}).to(dtype);
      CHECK_THROWS_AS(fk::rms_norm(x, torch::ones({9}).to(dtype), 1e-6), c10::Error);
      CHECK(torch::allclose(fk::rms_norm(x, torch::full({1}, 2.0).to(dtype), 1e-6),
                            2 * fk::rms_norm(x, {}, 1e-6),
                            dtype == torch::kFloat ? 1e-5 : bf16_tolerance));
    }
  });
}

TEST_CASE("layer_norm equals at::layer_norm, with and without weight and bias") {
  // Float32 on the CPU runs the library's row loop; the result differs from ATen's only by the
  // float32 summation order of the mean and variance: 1e-5 relative. Other dtypes, and a weight
  // or bias of another shape, go to at::layer_norm (same result, or its error).
  torch::manual_seed(23);
  const int threads_before = at::get_num_threads();
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    for (int64_t dim : {1, 7, 8, 64, 1000}) {
      const auto x = torch::randn({3, 5, dim}) * 3 + 1;
      const auto weight = torch::rand({dim}) + 0.5, bias = torch::randn({dim});
      for (const bool with_weight : {true, false}) {
        for (const bool with_bias : {true, false}) {
          const auto w = with_weight ? weight : torch::Tensor();
          const auto b = with_bias ? bias : torch::Tensor();
          INFO("threads " << threads << ", dim " << dim << ", weight " << with_weight << ", bias "
                          << with_bias);
          auto expected = torch::layer_norm(x, {dim}, w, b, 1e-5).reshape({-1, dim});
          if (dim == 1) {
            // Each row is its own mean: exactly 0, then the bias. (ATen's x rstd - mean rstd
            // leaves rounding of |x| / sqrt(eps) 2^-24 there.)
            expected = with_bias ? bias.expand({15, 1}) : torch::zeros({15, 1});
          }
          const auto got = fk::layer_norm(x, w, b, 1e-5);
          REQUIRE(got.sizes() == expected.sizes());
          CHECK(torch::allclose(got, expected, 1e-5, 1e-5));
        }
      }
      // A non-contiguous input.
      if (dim == 1) continue;
      const auto xt = torch::randn({dim, 6}).t();
      CHECK(torch::allclose(fk::layer_norm(xt, weight, bias, 1e-5),
                            torch::layer_norm(xt, {dim}, weight, bias, 1e-5), 1e-5, 1e-5));
    }
  }
  at::set_num_threads(threads_before);
  // Rows of a constant: zero variance, the output is the bias (eps keeps it finite).
  const auto flat = torch::full({2, 16}, 3.0);
  const auto shift = torch::randn({16});
  CHECK(
      torch::allclose(fk::layer_norm(flat, torch::ones({16}), shift, 1e-5), shift.expand({2, 16})));
  const auto x = torch::randn({2, 8});
  CHECK_THROWS_AS(fk::layer_norm(x, torch::ones({9}), {}, 1e-5), c10::Error);
  CHECK(torch::allclose(fk::layer_norm(x.to(torch::kDouble), {}, {}, 1e-5),
                        torch::layer_norm(x.to(torch::kDouble), {8})));
}

TEST_CASE("the primitives give autograd's gradients where it records them") {
  // Their loops have no gradient: a call that autograd records runs ATen's ops. Each primitive's
  // gradients against its ATen expression's, float32 on the CPU (the loops' inputs), 1e-5.
  torch::manual_seed(29);
  const auto grads = [](const std::function<torch::Tensor(const std::vector<torch::Tensor>&)>& f,
                        const std::vector<torch::Tensor>& inputs) {
    std::vector<torch::Tensor> leaves;
    for (const auto& t : inputs) leaves.push_back(t.detach().clone().requires_grad_(true));
    const auto y = f(leaves);
    (y * torch::arange(y.numel()).view(y.sizes()).sin()).sum().backward();
    std::vector<torch::Tensor> out{y.detach()};
    for (const auto& leaf : leaves) out.push_back(leaf.grad());
    return out;
  };
  const auto require_same = [](const std::vector<torch::Tensor>& got,
                               const std::vector<torch::Tensor>& expected) {
    REQUIRE(got.size() == expected.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
      INFO("output " << i << " (0: the value, then each input's gradient)");
      REQUIRE(got[i].defined());
      CHECK(torch::allclose(got[i].reshape(expected[i].sizes()), expected[i], 1e-5, 1e-5));
    }
  };
  const auto x = torch::randn({6, 64}), w = torch::rand({64}) + 0.5, b = torch::randn({64});
  require_same(
      grads([](const auto& t) { return fk::layer_norm(t[0], t[1], t[2], 1e-5); }, {x, w, b}),
      grads([](const auto& t) { return torch::layer_norm(t[0], {64}, t[1], t[2], 1e-5); },
            {x, w, b}));
  require_same(grads([](const auto& t) { return fk::rms_norm(t[0], t[1], 1e-6); }, {x, w}),
               grads(
                   [](const auto& t) {
                     return t[1] * (t[0] * torch::rsqrt(t[0].pow(2).mean(-1, true) + 1e-6));
                   },
                   {x, w}));
  require_same(
      grads([](const auto& t) { return fk::activation_mul(t[0], t[1], fk::Activation::silu); },
            {x, x.flip(0)}),
      grads([](const auto& t) { return torch::silu(t[0]) * t[1]; }, {x, x.flip(0)}));
  const auto weight = torch::randn({32, 64}), bias = torch::randn({32});
  for (const auto path : {fk::GemmPath::hand_written, fk::GemmPath::libxsmm, fk::GemmPath::blis}) {
    const auto before = fk::force_gemm_path(path);
    INFO("path " << static_cast<int>(path));
    require_same(
        grads([](const auto& t) { return fk::project(t[0], t[1], t[2]); }, {x, weight, bias}),
        grads([](const auto& t) { return torch::linear(t[0], t[1], t[2]); }, {x, weight, bias}));
    fk::force_gemm_path(before);
  }
}

TEST_CASE("stack_in_place moves weights into one storage once, and re-points them") {
  torch::NoGradGuard no_grad;
  auto a = torch::randn({3, 4}), b = torch::randn({2, 4});
  const auto a_values = a.clone(), b_values = b.clone();
  const auto stacked = fk::stack_in_place({a, b});
  CHECK(torch::equal(stacked, torch::cat({a_values, b_values})));
  CHECK(a.storage().is_alias_of(stacked.storage()));
  CHECK(b.storage().is_alias_of(stacked.storage()));
  CHECK(torch::equal(a, a_values));
  // Already adjacent: the same storage comes back, nothing moves.
  const auto again = fk::stack_in_place({a, b});
  CHECK(again.data_ptr() == stacked.data_ptr());
  CHECK(again.sizes() == stacked.sizes());
  // 1-D tensors (biases).
  auto c = torch::randn({3}), d = torch::randn({5});
  const auto biases = fk::stack_in_place({c, d});
  CHECK(biases.sizes() == torch::IntArrayRef({8}));
  CHECK(d.storage().is_alias_of(biases.storage()));
}
