// What a fused chain must keep exact beyond plain outputs: per-member autograd modes, placeholders
// that cannot write into the caller's tensors, wiring from earlier inputs, spec defaults, and a
// verify that compares any result and gradients without changing the model.
#include "catch_compat.hpp"

#include <map>
#include <optional>
#include <utility>

#include "models.hpp"

using namespace models;
using fusion_test::Contains;

namespace {

/// Records the autograd mode it was last called in.
struct ModeProbeImpl : torch::nn::Module {
  ModeProbeImpl() { weight = register_buffer("weight", torch::ones({16})); }
  torch::Tensor forward(const torch::Tensor& x) {
    grad = torch::GradMode::is_enabled();
    inference = c10::InferenceMode::is_enabled();
    return x * weight;
  }
  torch::Tensor weight;
  bool grad = false, inference = false;
};
TORCH_MODULE(ModeProbe);

struct ProbeChainImpl : torch::nn::Module {
  ProbeChainImpl() {
    first = fusion::register_slot(*this, "first", ModeProbe());
    second = fusion::register_slot(*this, "second", ModeProbe());
  }
  // The parent calls `first` in one mode and `second` in another.
  torch::Tensor forward(const torch::Tensor& x, bool first_inference) {
    torch::Tensor y;
    if (first_inference) {
      c10::InferenceMode inference;
      y = first(x);
    } else {
      torch::NoGradGuard no_grad;
      y = first(x);
    }
    return second(y);
  }
  fusion::Slot<ModeProbe> first, second;
};
TORCH_MODULE(ProbeChain);

/// A frozen norm: run without gradients, the MLP after it with gradients.
struct FrozenNormImpl : torch::nn::Module {
  FrozenNormImpl() {
    norm = fusion::register_slot(*this, "norm", RMSNorm(16));
    mlp = fusion::register_slot(*this, "mlp", MLP(16, 24));
  }
  torch::Tensor forward(const torch::Tensor& h) {
    torch::Tensor n;
    {
      torch::NoGradGuard no_grad;
      n = norm(h);
    }
    return h + mlp(n);
  }
  fusion::Slot<RMSNorm> norm;
  fusion::Slot<MLP> mlp;
};
TORCH_MODULE(FrozenNorm);

/// Detaches between the members: the replay skips that, so only the gradients differ.
struct DetachedImpl : torch::nn::Module {
  DetachedImpl() {
    norm = fusion::register_slot(*this, "norm", RMSNorm(16));
    mlp = fusion::register_slot(*this, "mlp", MLP(16, 24));
  }
  torch::Tensor forward(const torch::Tensor& h) { return mlp(norm(h).detach()); }
  fusion::Slot<RMSNorm> norm;
  fusion::Slot<MLP> mlp;
};
TORCH_MODULE(Detached);

/// Writes into the first member's result in place.
struct InPlaceImpl : torch::nn::Module {
  InPlaceImpl() {
    norm = fusion::register_slot(*this, "norm", RMSNorm(16));
    mlp = fusion::register_slot(*this, "mlp", MLP(16, 24));
  }
  torch::Tensor forward(const torch::Tensor& h) {
    auto n = norm(h);
    n.relu_();
    return mlp(n);
  }
  fusion::Slot<RMSNorm> norm;
  fusion::Slot<MLP> mlp;
};
TORCH_MODULE(InPlace);

/// Parent code between the members, which the replay skips.
struct ScaledImpl : torch::nn::Module {
  ScaledImpl() {
    norm = fusion::register_slot(*this, "norm", RMSNorm(16));
    mlp = fusion::register_slot(*this, "mlp", MLP(16, 24));
  }
  torch::Tensor forward(const torch::Tensor& h) { return mlp(norm(h) * 2); }
  fusion::Slot<RMSNorm> norm;
  fusion::Slot<MLP> mlp;
};
TORCH_MODULE(Scaled);

/// Keeps what the first member returned, to look at the placeholder.
struct PeekImpl : torch::nn::Module {
  PeekImpl() {
    norm = fusion::register_slot(*this, "norm", RMSNorm(16));
    mlp = fusion::register_slot(*this, "mlp", MLP(16, 24));
  }
  torch::Tensor forward(const torch::Tensor& h) {
    seen = norm(h);
    return mlp(seen);
  }
  fusion::Slot<RMSNorm> norm;
  fusion::Slot<MLP> mlp;
  torch::Tensor seen;
};
TORCH_MODULE(Peek);

/// A mixture-of-experts shape: the experts take the router's input as well as its outputs.
struct RouterImpl : torch::nn::Module {
  RouterImpl() { gate = register_module("gate", torch::nn::Linear(16, 4)); }
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) {
    auto [weights, indices] = torch::softmax(gate(x), -1).topk(2, -1);
    return {weights, indices};
  }
  torch::nn::Linear gate{nullptr};
};
TORCH_MODULE(Router);

struct ExpertsImpl : torch::nn::Module {
  ExpertsImpl() { weight = register_parameter("weight", torch::randn({4, 16, 16}) * 0.1); }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& weights,
                        const torch::Tensor& indices) {
    auto out = torch::zeros_like(x);
    for (int64_t k = 0; k < indices.size(-1); ++k) {
      auto w = weight.index_select(0, indices.select(-1, k));  // [tokens, 16, 16]
      out = out + weights.select(-1, k).unsqueeze(-1) * torch::bmm(w, x.unsqueeze(-1)).squeeze(-1);
    }
    return out;
  }
  torch::Tensor weight;
};
TORCH_MODULE(Experts);

struct MoEImpl : torch::nn::Module {
  MoEImpl() {
    router = fusion::register_slot(*this, "router", Router());
    experts = fusion::register_slot(*this, "experts", Experts());
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto [weights, indices] = router(x);
    return experts(x, weights, indices);
  }
  fusion::Slot<Router> router;
  fusion::Slot<Experts> experts;
};
TORCH_MODULE(MoE);

/// A C++ default of None that the spec has to repeat.
struct BiasedImpl : torch::nn::Module {
  BiasedImpl() { proj = register_module("proj", torch::nn::Linear(16, 16)); }
  torch::Tensor forward(const torch::Tensor& x, c10::optional<torch::Tensor> bias = c10::nullopt,
                        std::optional<double> scale = std::nullopt) {
    auto y = proj(x) * scale.value_or(1.0);
    return bias.has_value() ? y + *bias : y;
  }
  torch::nn::Linear proj{nullptr};
};
TORCH_MODULE(Biased);

struct BiasedChainImpl : torch::nn::Module {
  BiasedChainImpl() {
    norm = fusion::register_slot(*this, "norm", RMSNorm(16));
    biased = fusion::register_slot(*this, "biased", Biased());
  }
  torch::Tensor forward(const torch::Tensor& h) { return biased(norm(h)); }
  torch::Tensor forward_scaled(const torch::Tensor& h, double scale) {
    return biased(norm(h), c10::nullopt, std::optional<double>(scale));
  }
  fusion::Slot<RMSNorm> norm;
  fusion::Slot<Biased> biased;
};
TORCH_MODULE(BiasedChain);

/// std::optional parameters and results: on LibTorch 1.13 a different type from c10::optional,
/// on 2.x the same one.
struct MaybeScaleImpl : torch::nn::Module {
  std::optional<torch::Tensor> forward(std::optional<torch::Tensor> x,
                                       std::optional<double> scale = std::nullopt) {
    if (!x.has_value()) return std::nullopt;
    return *x * scale.value_or(2.0);
  }
};
TORCH_MODULE(MaybeScale);
struct MaybeAddImpl : torch::nn::Module {
  torch::Tensor forward(const std::optional<torch::Tensor>& x,
                        const std::optional<torch::Tensor>& bias) {
    if (!bias.has_value()) return x.value();
    return x.value() + bias.value();
  }
};
TORCH_MODULE(MaybeAdd);
struct MaybeChainImpl : torch::nn::Module {
  MaybeChainImpl() {
    scale = fusion::register_slot(*this, "scale", MaybeScale());
    add = fusion::register_slot(*this, "add", MaybeAdd());
  }
  torch::Tensor forward(const torch::Tensor& x, std::optional<torch::Tensor> bias = std::nullopt,
                        bool write_into_placeholder = false) {
    auto h = scale(std::optional<torch::Tensor>(x));
    if (write_into_placeholder) h->add_(1);
    return add(h, std::move(bias));
  }
  fusion::Slot<MaybeScale> scale;
  fusion::Slot<MaybeAdd> add;
};
TORCH_MODULE(MaybeChain);

/// Training-mode state: BatchNorm statistics and dropout draws.
struct NormDropImpl : torch::nn::Module {
  NormDropImpl() {
    bn = fusion::register_slot(*this, "bn", torch::nn::BatchNorm1d(16));
    mlp = fusion::register_slot(*this, "mlp", MLP(16, 24));
    drop = register_module("drop", torch::nn::Dropout(0.5));
  }
  torch::Tensor forward(const torch::Tensor& x) { return drop(mlp(bn(x))); }
  fusion::Slot<torch::nn::BatchNorm1d> bn;
  fusion::Slot<MLP> mlp;
  torch::nn::Dropout drop{nullptr};
};
TORCH_MODULE(NormDrop);

struct TwoOverloadsImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) { return x * 2; }
  std::vector<torch::Tensor> forward(const torch::Tensor& x, int64_t parts) {
    return x.chunk(parts, -1);
  }
};
TORCH_MODULE(TwoOverloads);
struct Opaque {  // no default constructor
  explicit Opaque(torch::Tensor t) : value(std::move(t)) {}
  torch::Tensor value;
};
struct WrapImpl : torch::nn::Module {
  Opaque forward(const torch::Tensor& x) { return Opaque(x + 1); }
};
TORCH_MODULE(Wrap);
struct UnwrapImpl : torch::nn::Module {
  torch::Tensor forward(const Opaque& o) { return o.value * 3; }
};
TORCH_MODULE(Unwrap);

std::vector<torch::Tensor> gradients_of(torch::nn::Module& model, const torch::Tensor& input) {
  std::vector<torch::Tensor> grads{input.grad()};
  for (const auto& p : model.parameters()) grads.push_back(p.grad());
  return grads;
}

void require_same_gradients(const std::vector<torch::Tensor>& a,
                            const std::vector<torch::Tensor>& b) {
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    INFO("gradient " << i);
    REQUIRE(a[i].defined() == b[i].defined());
    if (a[i].defined()) REQUIRE(torch::equal(a[i], b[i]));
  }
}

}  // namespace

TEST_CASE("each member replays in the autograd mode it was called in") {
  ProbeChain model;
  const auto x = torch::randn({2, 16});
  fusion::fuse_modules(model, {"first", "second"},
                       {fusion::ModuleSpec{{"x"}, {"x"}}, fusion::ModuleSpec{{"x"}, {"x"}}});
  for (bool first_inference : {false, true}) {
    INFO("first member in " << (first_inference ? "InferenceMode" : "NoGradGuard"));
    fusion::unfuse_modules(model);
    const auto unfused = model(x, first_inference);
    const bool grad = model->first->grad, inference = model->first->inference;
    CHECK(inference == first_inference);
    CHECK_FALSE(grad);
    CHECK(model->second->grad);
    fusion::fuse_modules(model, {"first", "second"},
                         {fusion::ModuleSpec{{"x"}, {"x"}}, fusion::ModuleSpec{{"x"}, {"x"}}});
    const auto fused = model(x, first_inference);
    CHECK(model->first->grad == grad);
    CHECK(model->first->inference == inference);
    CHECK(model->second->grad);
    CHECK_FALSE(model->second->inference);
    CHECK(torch::equal(fused, unfused));
  }
}

TEST_CASE("a member run under NoGradGuard by its parent gets no gradients when fused") {
  torch::manual_seed(20);
  FrozenNorm model;
  const auto x = torch::randn({3, 16});
  auto run = [&] {
    model->zero_grad();
    auto input = x.clone().requires_grad_(true);
    model(input).pow(2).sum().backward();
    return gradients_of(*model, input);
  };
  const auto original = run();
  CHECK_FALSE(model->norm->weight.grad().defined());  // frozen
  fusion::fuse_modules(model, {"norm", "mlp"}, block_specs());
  const auto fused = run();
  CHECK_FALSE(model->norm->weight.grad().defined());
  require_same_gradients(fused, original);
  CHECK(fusion::verify(model, [&] { return model(x); }).ok());
}

TEST_CASE("verify compares gradients when grad mode is on") {
  torch::manual_seed(21);
  Detached model;
  const auto x = torch::randn({3, 16}).requires_grad_(true);
  fusion::fuse_modules(model, {"norm", "mlp"}, block_specs());

  // The outputs agree: the replay only loses the detach, so only gradients tell.
  {
    torch::NoGradGuard no_grad;
    const auto outputs_only = fusion::verify(model, [&] { return model(x); });
    CHECK(outputs_only.ok());
  }
  fusion::VerifyOptions options;
  options.inputs = {x};
  const auto report = fusion::verify(
      model, [&] { return model(x); }, options);
  REQUIRE(report.chains.size() == 1);
  CHECK_FALSE(report.ok());
  CHECK(report.chains[0].max_abs_diff == 0);
  CHECK(report.chains[0].worst_gradient == "'norm.weight' (a gradient fused, none unfused)");
  CHECK_THAT(report.to_string(),
             Contains("FAIL [norm -> mlp]: max abs diff 0, gradients: max abs diff inf at "
                      "'norm.weight' (a gradient fused, none unfused)"));
  // verify put the gradients back as it found them: none.
  CHECK_FALSE(x.grad().defined());
  for (const auto& p : model->parameters()) CHECK_FALSE(p.grad().defined());
}

TEST_CASE("a collector's placeholder shares no memory with the caller's tensor") {
  torch::manual_seed(22);
  SECTION("it has the argument's shape, dtype and device, and reads as NaN") {
    Peek model;
    const auto x = torch::randn({3, 16});
    fusion::fuse_modules(model, {"norm", "mlp"}, block_specs());
    model(x);
    const auto& seen = model->seen;
    CHECK(seen.sizes() == x.sizes());
    CHECK(seen.dtype() == x.dtype());
    CHECK(seen.device() == x.device());
    CHECK_FALSE(seen.requires_grad());
    CHECK(seen.data_ptr() != x.data_ptr());
    CHECK(seen.isnan().all().item<bool>());
    // Stand-ins are reused across calls only when nothing holds them: one kept stays as it was.
    const auto kept = seen;
    model(torch::randn({5, 16}));
    CHECK(model->seen.sizes() == torch::IntArrayRef{5, 16});
    CHECK(kept.sizes() == x.sizes());
    CHECK_FALSE(model->seen.is_same(kept));
    model->seen.unsqueeze_(0);  // a metadata change on a stand-in nobody else holds
    model->seen.reset();
    model(x);
    CHECK(model->seen.sizes() == x.sizes());
  }
  SECTION("an in-place write on it fails instead of writing into the input") {
    InPlace model;
    const auto x = torch::randn({3, 16});
    const auto copy = x.clone();
    const auto original = model(x);
    CHECK(torch::equal(x, copy));
    fusion::fuse_modules(model, {"norm", "mlp"}, block_specs());
    CHECK_THROWS_WITH(model(x), Contains("more than one element of the written-to tensor refers "
                                         "to a single memory location"));
    CHECK(torch::equal(x, copy));
    // A leaf that requires grad: the same clear error, not autograd's leaf error.
    const auto leaf = x.clone().requires_grad_(true);
    CHECK_THROWS_WITH(model(leaf), Contains("single memory location"));
    // verify names the chain that cannot be fused.
    torch::NoGradGuard no_grad;
    const auto report = fusion::verify(model, [&] { return model(x); });
    CHECK_FALSE(report.ok());
    CHECK_THAT(report.to_string(), Contains("FAIL [norm -> mlp]: threw:"));
    CHECK(torch::equal(x, copy));
  }
}

TEST_CASE("a member's input can be wired from an earlier member's input of the same name") {
  torch::manual_seed(23);
  MoE model;
  const auto x = torch::randn({5, 16});
  auto run = [&] {
    model->zero_grad();
    auto input = x.clone().requires_grad_(true);
    auto out = model(input);
    out.pow(2).sum().backward();
    auto grads = gradients_of(*model, input);
    grads.insert(grads.begin(), out.detach());
    return grads;
  };
  const auto original = run();
  const auto chains =
      fusion::fuse_modules(model, {"router", "experts"},
                           {fusion::ModuleSpec{{"x"}, {"weights", "indices"}},
                            fusion::ModuleSpec{{"x", "weights", "indices"}, {"y"}}});
  REQUIRE(chains.size() == 1);
  require_same_gradients(run(), original);
  CHECK(fusion::verify(model, [&] { return model(x); }).ok());
}

TEST_CASE("spec defaults: None for an optional, and numbers converted as C++ converts them") {
  torch::manual_seed(24);
  BiasedChain model;
  const auto x = torch::randn({2, 16});
  const auto original = model(x);
  const auto scaled = model->forward_scaled(x, 0.5);
  fusion::fuse_modules(
      model, {"norm", "biased"},
      {fusion::ModuleSpec{{"x"}, {"x"}},
       fusion::ModuleSpec{{"x"}, {"x"}, {{1, fusion::box(c10::nullopt)}, {2, fusion::box(1)}}}});
  CHECK(torch::equal(model(x), original));
  CHECK(torch::equal(model->forward_scaled(x, 0.5), scaled));  // the call's argument wins
  fusion::unfuse_modules(model);
  fusion::fuse_modules(
      model, {"norm", "biased"},
      {fusion::ModuleSpec{{"x"}, {"x"}},
       fusion::ModuleSpec{{"x"}, {"x"}, {{1, fusion::box(std::nullopt)}, {2, fusion::box(1.0)}}}});
  CHECK(torch::equal(model(x), original));
  fusion::unfuse_modules(model);
  CHECK_THROWS_WITH(
      fusion::fuse_modules(model, {"norm", "biased"},
                           {fusion::ModuleSpec{{"x"}, {"x"}},
                            fusion::ModuleSpec{{"x"}, {"x"}, {{2, fusion::box(true)}}}}),
      Contains("gives parameter #2 a default of kind Bool, but forward() takes "
               "std::optional<double> there"));
}

TEST_CASE("std::optional parameters, defaults and results work as c10::optional does") {
  torch::manual_seed(27);
  MaybeChain model;
  const auto x = torch::randn({2, 16});
  const auto bias = torch::randn({2, 16});
  const auto original = model(x);
  const auto with_bias = model(x, bias);
  const auto copy = x.clone();
  fusion::fuse_modules(model, {"scale", "add"},
                       {fusion::ModuleSpec{{"x"}, {"x"}, {{1, fusion::box(std::nullopt)}}},
                        fusion::ModuleSpec{{"x", "bias"}, {"y"}}});
  CHECK(torch::equal(model(x), original));
  CHECK(torch::equal(model(x, bias), with_bias));
  // The placeholder inside a std::optional shares no memory with the caller's tensor either.
  CHECK_THROWS_WITH(model(x, bias, true), Contains("single memory location"));
  CHECK(torch::equal(x, copy));
  const auto report = fusion::report(model);
  CHECK_THAT(report, Contains("scale -> add"));
  // A std::optional default of the wrong kind names the type as written.
  fusion::unfuse_modules(model);
  CHECK_THROWS_WITH(
      fusion::fuse_modules(model, {"scale", "add"},
                           {fusion::ModuleSpec{{"x"}, {"x"}, {{1, fusion::box(true)}}},
                            fusion::ModuleSpec{{"x", "bias"}, {"y"}}}),
      Contains("std::optional<double>"));
  CHECK(torch::equal(model(x), original));
}

TEST_CASE("verify compares results of any shape: vectors, pairs, lists, maps, nested") {
  torch::manual_seed(25);
  Stack model(2);
  const auto x = torch::randn({2, 16});
  fusion::fuse_modules(model, block_patterns(), block_specs());
  torch::NoGradGuard no_grad;
  auto check_ok = [&](auto run) {
    const auto report = fusion::verify(model, run);
    INFO(report.to_string());
    CHECK(report.ok());
    REQUIRE(report.chains.size() == 2);
    CHECK(report.chains[0].max_abs_diff == 0);
  };
  check_ok([&] { return std::vector<torch::Tensor>{model(x), x}; });
  check_ok([&] { return std::make_pair(model(x), 3); });
  check_ok([&] { return c10::List<torch::Tensor>({model(x), x}); });
  check_ok([&] {
    return std::map<std::string, std::vector<torch::Tensor>>{{"a", {model(x)}}, {"b", {x}}};
  });
  check_ok([&] {
    return std::make_tuple(std::vector<std::pair<int64_t, torch::Tensor>>{{1, model(x)}},
                           c10::optional<torch::Tensor>());
  });

  // A real difference inside a container is still found.
  Scaled bad;
  fusion::fuse_modules(bad, {"norm", "mlp"}, block_specs());
  const auto report = fusion::verify(bad, [&] {
    return std::map<std::string, std::vector<torch::Tensor>>{{"out", {x, bad(x)}}};
  });
  CHECK_FALSE(report.ok());
  CHECK(report.chains[0].max_abs_diff > 0.1);
  CHECK(report.chains[0].max_abs_diff < 1e9);
}

TEST_CASE("verify leaves parameters, buffers, gradients and random state as it found them") {
  torch::manual_seed(26);
  NormDrop model;
  model->train();
  const auto x = torch::randn({8, 16});
  fusion::fuse_modules(model, {"bn", "mlp"}, block_specs());
  model(x).sum().backward();  // gradients to keep

  std::vector<torch::Tensor> values, grads;
  for (const auto& p : model->parameters()) {
    values.push_back(p.clone());
    grads.push_back(p.grad().clone());
  }
  for (const auto& b : model->buffers()) values.push_back(b.clone());
  REQUIRE(model->bn->num_batches_tracked.item<int64_t>() == 1);
  auto generator = at::detail::getDefaultCPUGenerator();
  const auto rng = generator.get_state();

  const auto report = fusion::verify(model, [&] { return model(x); });
  // Dropout draws the same mask in every run, since each run starts from the same random state.
  INFO(report.to_string());
  CHECK(report.ok());

  std::size_t i = 0;
  for (const auto& p : model->parameters()) {
    CHECK(torch::equal(p, values[i]));
    CHECK(torch::equal(p.grad(), grads[i]));
    ++i;
  }
  for (const auto& b : model->buffers()) CHECK(torch::equal(b, values[i++]));
  CHECK(model->bn->num_batches_tracked.item<int64_t>() == 1);
  const auto after = torch::rand({8});
  generator.set_state(rng);
  CHECK(torch::equal(after, torch::rand({8})));
}

TEST_CASE("fused_chains, report and verify give paths relative to the root asked about") {
  Stack model(2);
  fusion::fuse_modules(model->layers, {"*.post_attention_layernorm", "*.mlp"}, block_specs());
  const auto from_model = fusion::fused_chains(model);
  REQUIRE(from_model.size() == 2);
  CHECK(from_model[1].paths ==
        std::vector<std::string>{"layers.1.post_attention_layernorm", "layers.1.mlp"});
  CHECK(fusion::fused_chains(model->layers)[1].paths ==
        std::vector<std::string>{"1.post_attention_layernorm", "1.mlp"});
  CHECK(fusion::fused_chains(model->block(1))[0].paths ==
        std::vector<std::string>{"post_attention_layernorm", "mlp"});
  CHECK_THAT(fusion::report(model), Contains("[1] layers.1.post_attention_layernorm -> "
                                             "layers.1.mlp"));
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 16});
  CHECK(fusion::verify(model, [&] { return model(x); }).chains[0].chain.paths[1] == "layers.0.mlp");
}

TEST_CASE("match_chains is a dry run of fuse_modules") {
  Stack model(3);
  const auto x = torch::randn({2, 16});
  const auto before = model(x);
  const auto planned =
      fusion::match_chains(model, {"**.post_attention_layernorm", "**.mlp"}, block_specs());
  REQUIRE(planned.size() == 3);
  CHECK(planned[2].binding == std::vector<std::string>{"layers.2"});
  CHECK(fusion::fused_chains(model).empty());
  CHECK_FALSE(model->block(0).mlp.is_fused());
  // The same errors as fuse_modules, specs included.
  CHECK_THROWS_WITH(
      fusion::match_chains(model, block_patterns(),
                           {fusion::ModuleSpec{{"x"}, {"normed"}}, hidden_spec()}),
      Contains("parameter #0 ('hidden_states') of 'layers.0.mlp' is provided by nothing"));
  // Without specs: patterns and slots only.
  const auto matched =
      fusion::match_chains(model, {"layers.[!0].post_attention_layernorm", "layers.[!0].mlp"});
  REQUIRE(matched.size() == 2);
  CHECK(matched[0].paths[1] == "layers.1.mlp");
  CHECK(matched[0].specs.empty());
  const auto fused =
      fusion::fuse_modules(model, {"**.post_attention_layernorm", "**.mlp"}, block_specs());
  REQUIRE(fused.size() == planned.size());
  for (std::size_t i = 0; i < fused.size(); ++i) CHECK(fused[i].paths == planned[i].paths);
  CHECK(torch::equal(model(x), before));
}

TEST_CASE("patterns with ** and character classes select chains across depths") {
  torch::manual_seed(27);
  auto model = std::make_shared<TwoTowersImpl>();
  const auto x = torch::randn({2, 16});
  const auto original = model->forward(x);

  auto chains =
      fusion::fuse_modules(*model, {"**.post_attention_layernorm", "**.mlp"}, block_specs());
  REQUIRE(chains.size() == 5);
  CHECK(chains[0].binding == std::vector<std::string>{"encoder.layers.0"});
  CHECK(chains[4].paths[1] == "decoder.layers.2.mlp");
  CHECK(torch::equal(model->forward(x), original));
  fusion::unfuse_modules(*model);

  chains = fusion::fuse_modules(
      *model, {"decoder.**.[0-1].post_attention_layernorm", "decoder.**.[0-1].mlp"}, block_specs());
  REQUIRE(chains.size() == 2);
  CHECK(chains[1].binding == std::vector<std::string>{"layers", "1"});
  CHECK_FALSE(model->decoder->block(2).mlp.is_fused());
  fusion::unfuse_modules(*model);

  // `layers.**.mlp` is not `layers.*.mlp`: it reaches any depth under layers.
  CHECK(fusion::match_chains(
            *model, {"encoder.layers.**.post_attention_layernorm", "encoder.layers.**.mlp"})
            .size() == 2);
}

TEST_CASE("a pattern that matches nothing says how far it got") {
  Stack model(2);
  CHECK_THROWS_WITH(
      fusion::fuse_modules(model, {"layers.*.post_attention_layernorm", "layers.*.ffn"},
                           block_specs()),
      Contains("pattern 'layers.*.ffn' matches no module under the root: 'layers.*' matched 2 "
               "module(s) [layers.0, layers.1], but none of them has a child matching 'ffn'; "
               "children there: [post_attention_layernorm, mlp]"));
  CHECK_THROWS_WITH(
      fusion::fuse_modules(model, {"blocks.*.post_attention_layernorm", "layers.*.mlp"},
                           block_specs()),
      Contains("no child of the root matches 'blocks'; the root's children: [layers, norm]"));
}

TEST_CASE("Slot usability: nullptr construction, other overloads, results without placeholder") {
  struct HostImpl : torch::nn::Module {
    HostImpl() {
      norm = fusion::register_slot(*this, "norm", RMSNorm(16));
      twice = fusion::register_slot(*this, "twice", TwoOverloads());
      wrap = fusion::register_slot(*this, "wrap", Wrap());
      unwrap = fusion::register_slot(*this, "unwrap", Unwrap());
    }
    fusion::Slot<RMSNorm> norm{nullptr};  // the habit from holders
    fusion::Slot<TwoOverloads, torch::Tensor(const torch::Tensor&)> twice{nullptr};
    fusion::Slot<Wrap> wrap{nullptr};
    fusion::Slot<Unwrap> unwrap{nullptr};
  };
  auto host = std::make_shared<HostImpl>();
  const auto x = torch::randn({2, 16});
  // The other overload, with another return type, works through the Slot unfused.
  CHECK(host->twice(x, 4).size() == 4);
  const auto expected = host->twice(host->norm(x));
  fusion::fuse_modules(*host, {"norm", "twice"}, block_specs());
  CHECK(torch::equal(host->twice(host->norm(x)), expected));
  CHECK_THROWS_WITH(host->twice(x, 4), Contains("do not fit the signature it was fused with"));
  fusion::unfuse_modules(*host);
  // A result that cannot be default-constructed: fine last, refused as a collector.
  CHECK(fusion::match_chains(*host, {"norm", "wrap"}, block_specs()).size() == 1);
  CHECK_THROWS_WITH(
      fusion::fuse_modules(*host, {"wrap", "unwrap"},
                           {fusion::ModuleSpec{{"x"}, {"o"}}, fusion::ModuleSpec{{"o"}, {"y"}}}),
      Contains("'wrap' (pattern 'wrap') cannot be a collector: forward() returns ("));
}

TEST_CASE("messages name types as they are written") {
  ArgsChain model;
  CHECK_THROWS_WITH(
      fusion::fuse_modules(model, {"mix", "tagged"},
                           {fusion::ModuleSpec{{"x"}, {"x"}, {{2, fusion::box(0.5)}}},
                            fusion::ModuleSpec{{"x", "tag"}, {"x"}}}),
      Contains("gives parameter #2 a default of kind Double, but forward() takes int64_t there"));
  CHECK_THROWS_WITH(
      fusion::fuse_modules(model, {"mix", "tagged"},
                           {fusion::ModuleSpec{{"a", "b", "c", "d", "e", "f"}, {"x"}},
                            fusion::ModuleSpec{{"x", "tag"}, {"x"}}}),
      Contains(std::string("names 6 inputs [a, b, c, d, e, f] but forward() takes 5 "
                           "parameter(s) (torch::Tensor, ") +
               // c10::optional is std::optional from LibTorch 2.0 on: named as users write it.
               (std::is_same_v<c10::optional<int>, std::optional<int>> ? "std" : "c10") +
               "::optional<torch::Tensor>, int64_t, double, bool)"));
}
