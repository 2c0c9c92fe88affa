// Fused chains compute exactly what the original modules compute: outputs, gradients, state.
#include "catch_compat.hpp"

#include <atomic>
#include <cstdio>
#include <thread>

#include "models.hpp"

using namespace models;
using fusion_test::Contains;

namespace {

// Replay runs the very same ops on the very same tensors, so "equal" below means bit-identical.
void require_identical(const torch::Tensor& a, const torch::Tensor& b) {
  REQUIRE(a.sizes() == b.sizes());
  REQUIRE(a.dtype() == b.dtype());
  REQUIRE(torch::equal(a, b));
}

std::vector<std::pair<std::string, torch::Tensor>> snapshot(
    const torch::OrderedDict<std::string, torch::Tensor>& dict) {
  std::vector<std::pair<std::string, torch::Tensor>> items;
  for (const auto& item : dict) items.emplace_back(item.key(), item.value());
  return items;
}

}  // namespace

TEST_CASE("a multi-layer model fused gives bit-identical outputs, and again after unfuse") {
  torch::manual_seed(0);
  Stack model(4);
  const auto x = torch::randn({2, 5, 16});
  const auto original = model(x);

  const auto chains = fusion::fuse_modules(model, block_patterns(), block_specs());
  REQUIRE(chains.size() == 4);
  for (std::size_t i = 0; i < chains.size(); ++i) {
    const std::string layer = std::to_string(i);
    CHECK(chains[i].paths ==
          std::vector<std::string>{"layers." + layer + ".post_attention_layernorm",
                                   "layers." + layer + ".mlp"});
    CHECK(chains[i].binding == std::vector<std::string>{layer});
  }
  CHECK(model->block(0).mlp.is_fused());
  require_identical(model(x), original);
  require_identical(model(x), original);  // and on the next pass

  CHECK(fusion::unfuse_modules(model) == 4);
  CHECK_FALSE(model->block(0).mlp.is_fused());
  require_identical(model(x), original);

  // fuse -> unfuse -> fuse works
  CHECK(fusion::fuse_modules(model, block_patterns(), block_specs()).size() == 4);
  require_identical(model(x), original);
}

TEST_CASE("the slot still gives typed access to the module it holds") {
  Stack model(1);
  fusion::fuse_modules(model, block_patterns(), block_specs());
  auto& mlp = model->block(0).mlp;
  CHECK(mlp->gate_proj->weight.sizes() == torch::IntArrayRef{32, 16});
  CHECK(&(*mlp) == mlp.holder().get());
  CHECK(mlp.holder().ptr() == model->layers->at<BlockImpl>(0).named_children()["mlp"]);
}

TEST_CASE("a three-member chain, with a built-in module in the middle") {
  torch::manual_seed(1);
  Triple model;
  const auto x = torch::randn({3, 16});
  const auto original = model(x);
  const auto chains = fusion::fuse_modules(
      model, {"norm", "proj", "mlp"},
      {fusion::ModuleSpec{{"x"}, {"normed"}}, fusion::ModuleSpec{{"normed"}, {"projected"}},
       fusion::ModuleSpec{{"projected"}, {"out"}}});
  REQUIRE(chains.size() == 1);
  CHECK(chains[0].paths == std::vector<std::string>{"norm", "proj", "mlp"});
  require_identical(model(x), original);
}

TEST_CASE("a tuple result is split into named outputs and wired by name") {
  torch::manual_seed(2);
  TupleChain model;
  const auto x = torch::randn({4, 16});
  const auto original = model(x);
  fusion::fuse_modules(model, {"split", "gate"},
                       {fusion::ModuleSpec{{"x"}, {"value", "gate"}},
                        fusion::ModuleSpec{{"gate", "value"}, {"out"}}});
  require_identical(model(x), original);
}

TEST_CASE("non-tensor and user-struct arguments reach the replay") {
  torch::manual_seed(3);
  ArgsChain model;
  const auto x = torch::randn({2, 16});
  const auto bias = torch::randn({16});
  fusion::fuse_modules(model, {"mix", "tagged"},
                       {fusion::ModuleSpec{{"x", "bias", "repeat", "alpha", "negate"}, {"x"}},
                        fusion::ModuleSpec{{"x", "tag"}, {"x"}}});
  auto run_both = [&](c10::optional<torch::Tensor> b, int64_t repeat, double alpha, bool negate,
                      Tag tag) {
    const auto fused = model(x, b, repeat, alpha, negate, tag);
    fusion::unfuse_modules(model);
    const auto original = model(x, b, repeat, alpha, negate, tag);
    fusion::fuse_modules(model, {"mix", "tagged"},
                         {fusion::ModuleSpec{{"x", "bias", "repeat", "alpha", "negate"}, {"x"}},
                          fusion::ModuleSpec{{"x", "tag"}, {"x"}}});
    require_identical(fused, original);
  };
  run_both(bias, 1, 0.5, false, Tag{"plain", 1.5});
  run_both(c10::nullopt, 3, 0.25, true, Tag{"double", 0.75});
  run_both(bias, 2, -1.0, true, Tag{"double", 2.0});
}

TEST_CASE("parameters left out of the spec take their defaults") {
  torch::manual_seed(4);
  DefaultsChain model;
  const auto x = torch::randn({2, 16});
  const auto original = model(x);
  // scale's defaults come from FORWARD_HAS_DEFAULT_ARGS; power's C++ default is invisible to the
  // library, so the spec gives it.
  fusion::fuse_modules(model, {"norm", "scale", "power"},
                       {fusion::ModuleSpec{{"x"}, {"x"}}, fusion::ModuleSpec{{"x"}, {"x"}},
                        fusion::ModuleSpec{{"x"}, {"x"}, {{1, fusion::box(3.0)}}}});
  require_identical(model(x), original);

  // A call argument wins over the default.
  fusion::unfuse_modules(model);
  const auto expected = model->power(model->scale(model->norm(x), 0.5, 4), 2.0);
  fusion::fuse_modules(model, {"norm", "scale", "power"},
                       {fusion::ModuleSpec{{"x"}, {"x"}}, fusion::ModuleSpec{{"x"}, {"x"}},
                        fusion::ModuleSpec{{"x"}, {"x"}, {{1, fusion::box(3.0)}}}});
  const auto fused = model->power(model->scale(model->norm(x), 0.5, 4), 2.0);
  require_identical(fused, expected);
}

TEST_CASE("an overloaded forward is fused through the signature the Slot names") {
  struct HostImpl : torch::nn::Module {
    HostImpl() {
      norm = fusion::register_slot(*this, "norm", RMSNorm(16));
      proj = fusion::register_slot(*this, "proj", Overloaded());
    }
    torch::Tensor forward(const torch::Tensor& x) { return proj(norm(x)); }
    fusion::Slot<RMSNorm> norm;
    fusion::Slot<Overloaded, torch::Tensor(const torch::Tensor&)> proj;
  };
  torch::manual_seed(5);
  auto model = std::make_shared<HostImpl>();
  const auto x = torch::randn({2, 16});
  const auto original = model->forward(x);
  CHECK(model->proj(x, 2.0).sizes() == original.sizes());  // other overloads stay callable unfused
  fusion::fuse_modules(*model, {"norm", "proj"}, {models::hidden_spec(), models::hidden_spec()});
  require_identical(model->forward(x), original);
}

TEST_CASE("gradients of every parameter and of the input are identical fused and unfused") {
  torch::manual_seed(6);
  Stack model(3);
  const auto x = torch::randn({2, 4, 16});

  auto gradients = [&] {
    model->zero_grad();
    auto input = x.clone().requires_grad_(true);
    model(input).pow(2).sum().backward();
    std::vector<torch::Tensor> grads{input.grad().clone()};
    for (const auto& p : model->parameters()) grads.push_back(p.grad().clone());
    return grads;
  };
  const auto original = gradients();
  fusion::fuse_modules(model, block_patterns(), block_specs());
  const auto fused = gradients();
  REQUIRE(fused.size() == original.size());
  REQUIRE(original.size() == 1 + model->parameters().size());
  for (std::size_t i = 0; i < original.size(); ++i) {
    INFO("gradient " << i);
    require_identical(fused[i], original[i]);
  }
}

TEST_CASE("fusion leaves the model's state untouched") {
  torch::manual_seed(7);
  Stack model(2);
  const auto x = torch::randn({2, 3, 16});
  const auto params = snapshot(model->named_parameters());
  const auto buffers = snapshot(model->named_buffers());
  const auto original = model(x);
  fusion::fuse_modules(model, block_patterns(), block_specs());

  SECTION("parameter and buffer keys, order and tensors are the same") {
    const auto fused_params = snapshot(model->named_parameters());
    const auto fused_buffers = snapshot(model->named_buffers());
    REQUIRE(fused_params.size() == params.size());
    REQUIRE(fused_buffers.size() == buffers.size());
    CHECK(buffers.size() == 2);
    for (std::size_t i = 0; i < params.size(); ++i) {
      CHECK(fused_params[i].first == params[i].first);
      CHECK(fused_params[i].second.is_same(params[i].second));
    }
    for (std::size_t i = 0; i < buffers.size(); ++i) {
      CHECK(fused_buffers[i].first == buffers[i].first);
      CHECK(fused_buffers[i].second.is_same(buffers[i].second));
    }
  }

  SECTION("a fused model's archive loads into an unfused model, and back") {
    const std::string path = "fusion-state-test.pt";
    torch::save(model, path);
    torch::manual_seed(99);
    Stack other(2);
    REQUIRE_FALSE(torch::equal(other(x), original));
    torch::load(other, path);
    require_identical(other(x), original);

    // back: an unfused model's archive into the fused one
    torch::manual_seed(100);
    Stack source(2);
    const auto source_out = source(x);
    torch::save(source, path);
    torch::load(model, path);
    CHECK(model->block(0).mlp.is_fused());
    require_identical(model(x), source_out);
    std::remove(path.c_str());
  }

  SECTION("to() and eval() reach the original modules") {
    model->to(torch::kDouble);
    CHECK(model->block(1).mlp->down_proj->weight.dtype() == torch::kDouble);
    const auto xd = x.to(torch::kDouble);
    const auto fused = model(xd);
    CHECK(fused.dtype() == torch::kDouble);
    fusion::unfuse_modules(model);
    require_identical(fused, model(xd));

    model->eval();
    for (const auto& module : model->modules()) CHECK_FALSE(module->is_training());
  }

  SECTION("clone() of a fused model is a correct, independent, unfused model") {
    auto copy = std::dynamic_pointer_cast<StackImpl>(model->clone());
    REQUIRE(copy != nullptr);
    CHECK(fusion::fused_chains(*copy).empty());
    require_identical(copy->forward(x), original);
    // The clone can be fused on its own.
    CHECK(fusion::fuse_modules(*copy, block_patterns(), block_specs()).size() == 2);
    require_identical(copy->forward(x), original);
    {
      torch::NoGradGuard no_grad;
      copy->block(0).mlp->up_proj->weight.add_(1.0);
    }
    CHECK_FALSE(torch::equal(copy->forward(x), original));
    require_identical(model(x), original);
    CHECK(fusion::fused_chains(model).size() == 2);
  }
}

TEST_CASE("one fused model called from 4 threads at once matches the unfused outputs",
          "[threads]") {
  torch::manual_seed(8);
  Stack model(3);
  constexpr int threads = 4, inputs_per_thread = 8, rounds = 50;
  std::vector<torch::Tensor> inputs, expected;
  for (int i = 0; i < threads * inputs_per_thread; ++i) {
    inputs.push_back(torch::randn({1 + i % 3, 16}));
    expected.push_back(model(inputs.back()));
  }
  fusion::fuse_modules(model, block_patterns(), block_specs());
  torch::NoGradGuard no_grad;
  std::atomic<int> mismatches{0}, calls{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      at::set_num_threads(1);
      torch::NoGradGuard guard;
      for (int r = 0; r < rounds; ++r) {
        for (int i = 0; i < inputs_per_thread; ++i) {
          const int k = t * inputs_per_thread + (i + r) % inputs_per_thread;
          if (!torch::equal(model(inputs[k]), expected[k])) ++mismatches;
          ++calls;
        }
      }
    });
  }
  for (auto& worker : workers) worker.join();
  CHECK(calls == threads * inputs_per_thread * rounds);
  CHECK(mismatches == 0);
}

TEST_CASE(
    "changing the fusion while another thread is inside a chain is refused, model unchanged") {
  torch::manual_seed(9);
  Stack model(2);
  const auto x = torch::randn({2, 16});
  const auto expected = model(x);
  fusion::fuse_modules(model, block_patterns(), block_specs());
  std::atomic<bool> inside{false}, release{false};
  model->block(1).between = [&] {
    inside = true;
    while (!release) std::this_thread::yield();
  };
  torch::Tensor got;
  std::thread runner([&] {
    torch::NoGradGuard no_grad;
    got = model(x);
  });
  while (!inside) std::this_thread::yield();
  // `runner` is between layer 1's norm (captured, a placeholder returned) and its mlp: unfusing
  // now would hand the placeholder to the original mlp.
  const char* busy =
      "fused chain [layers.1.post_attention_layernorm -> layers.1.mlp] is in use on another "
      "thread (a forward pass through it is in flight)";
  CHECK_THROWS_WITH(fusion::unfuse_modules(model),
                    Contains("fusion::unfuse_modules: ") && Contains(busy));
  CHECK_THROWS_WITH(fusion::unfuse_modules(model, {"layers.1.mlp"}), Contains(busy));
  CHECK_THROWS_WITH(fusion::verify(model, [&] { return model(x); }),
                    Contains("fusion::verify: ") && Contains(busy));
  CHECK(fusion::fused_chains(model).size() == 2);               // nothing changed
  CHECK(fusion::unfuse_modules(model, {"layers.0.mlp"}) == 1);  // no thread is in that chain
  release = true;
  runner.join();
  model->block(1).between = nullptr;
  require_identical(got, expected);

  // A pass an exception interrupted keeps its chain busy only until its thread calls the chain
  // again or ends; on the changing thread itself, not at all.
  model->block(1).throw_between = true;
  std::thread([&] { CHECK_THROWS(model(x)); }).join();
  CHECK_THROWS(model(x));
  model->block(1).throw_between = false;
  CHECK(fusion::unfuse_modules(model) == 1);
  require_identical(model(x), expected);
}

TEST_CASE("chains can be listed, reported and unfused selectively") {
  Stack model(3);
  fusion::fuse_modules(model, block_patterns(), block_specs());
  const auto chains = fusion::fused_chains(model);
  REQUIRE(chains.size() == 3);
  CHECK(chains[2].paths[1] == "layers.2.mlp");
  CHECK(chains[2].patterns == block_patterns());
  CHECK(chains[2].specs[1].outputs == std::vector<std::string>{"hidden_states"});

  const std::string text = fusion::report(model);
  CHECK_THAT(text, fusion_test::StartsWith("3 fused chains"));
  CHECK_THAT(text, Contains("[1] layers.1.post_attention_layernorm -> layers.1.mlp"));
  CHECK_THAT(text, Contains("FusedModule    layers.1.mlp: (hidden_states) -> (hidden_states)"));

  // From a sub-root: the chains under it, with paths relative to it.
  REQUIRE(fusion::fused_chains(model->block(1)).size() == 1);
  CHECK(fusion::fused_chains(model->block(1))[0].paths[1] == "mlp");

  CHECK(fusion::unfuse_modules(model, {"layers.1.*"}) == 1);
  CHECK_FALSE(model->block(1).mlp.is_fused());
  CHECK(model->block(2).mlp.is_fused());
  CHECK(fusion::fused_chains(model).size() == 2);
  CHECK(fusion::unfuse_modules(model) == 2);
  CHECK(fusion::unfuse_modules(model) == 0);
}

TEST_CASE("members may live under different parents, and incomplete chains can be skipped") {
  torch::manual_seed(9);
  auto model = std::make_shared<TwoTowersImpl>();
  // encoder.layers.i.mlp with decoder.layers.i.post_attention_layernorm: nonsense as a model, but
  // a fine test of binding across parents. Layer 2 has no encoder half.
  CHECK_THROWS_WITH(
      fusion::fuse_modules(*model, {"encoder.layers.*.mlp", "decoder.layers.*.mlp"}, block_specs()),
      Contains("incomplete chain for binding [2]"));
  const auto chains = fusion::fuse_modules(*model, {"encoder.layers.*.mlp", "decoder.layers.*.mlp"},
                                           block_specs(), fusion::FuseOptions{true});
  REQUIRE(chains.size() == 2);
  CHECK(chains[1].paths ==
        std::vector<std::string>{"encoder.layers.1.mlp", "decoder.layers.1.mlp"});
  CHECK_FALSE(model->decoder->block(2).mlp.is_fused());
}

TEST_CASE("a fused model on CUDA gives the original outputs (skipped without CUDA)", "[cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("CUDA is not available in this LibTorch build or machine: CUDA case skipped");
    return;
  }
  torch::manual_seed(15);
  Stack model(2);
  model->to(torch::kCUDA);
  const auto x = torch::randn({2, 5, 16}, torch::kCUDA);
  const auto original = model(x);
  fusion::fuse_modules(model, block_patterns(), block_specs());
  require_identical(model(x), original);
}
