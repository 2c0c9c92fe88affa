// Kernels: typed, checked when attached, run per call when they apply (else the chain replays and
// counts why), prepared state never stale, safe across threads, reproducible through plans.
#include "catch_compat.hpp"

#include <cstdlib>

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <memory>
#include <thread>

#include "forward_runners.hpp"
#include "models.hpp"

using namespace models;
using fusion_test::Contains;

namespace {

// Fused outputs are computed with other ops than the modules': compared within this tolerance
// (float32; the values are O(1)).
constexpr double kTolerance = 1e-5;

void require_close(const torch::Tensor& a, const torch::Tensor& b) {
  REQUIRE(a.sizes() == b.sizes());
  REQUIRE(a.dtype() == b.dtype());
  INFO("max abs diff " << (a - b).abs().max().item<double>());
  REQUIRE(torch::allclose(a, b, 0, kTolerance));
}

/// RMSNorm then MLP, with gate and up as one GEMM on a concatenated copy of their weights.
struct NormMLP {
  struct State {
    torch::Tensor gate_up;
    std::vector<torch::Tensor> tensors() const { return {gate_up}; }
  };
  State prepare(RMSNormImpl& /*norm*/, MLPImpl& mlp) const {
    return {torch::cat({mlp.gate_proj->weight, mlp.up_proj->weight})};
  }
  torch::Tensor operator()(const State& state, RMSNormImpl& norm, MLPImpl& mlp,
                           const torch::Tensor& x) const {
    auto gate_up = torch::linear(norm.forward(x), state.gate_up).chunk(2, -1);
    return mlp.down_proj(torch::silu(gate_up[0]) * gate_up[1]);
  }
};

/// Stateless and differentiable: the modules' own forwards, so it may run with gradients.
struct PlainNormMLP {
  torch::Tensor operator()(RMSNormImpl& norm, MLPImpl& mlp, const torch::Tensor& x) const {
    return mlp.forward(norm.forward(x));
  }
};

/// Deliberately wrong.
struct WrongNormMLP {
  torch::Tensor operator()(RMSNormImpl& norm, MLPImpl& mlp, const torch::Tensor& x) const {
    return mlp.forward(norm.forward(x)) * 1.01;
  }
};

/// A kernel of one member: replaces the MLP's forward.
struct MLPOnly {
  torch::Tensor operator()(MLPImpl& mlp, const torch::Tensor& x) const {
    auto gate_up = torch::linear(x, torch::cat({mlp.gate_proj->weight, mlp.up_proj->weight}));
    auto parts = gate_up.chunk(2, -1);
    return mlp.down_proj(torch::silu(parts[0]) * parts[1]);
  }
};

/// Types that do not fit the norm + MLP chain.
struct TakesLinear {
  torch::Tensor operator()(RMSNormImpl&, torch::nn::LinearImpl& l, const torch::Tensor& x) const {
    return l.forward(x);
  }
};
struct TakesDouble {
  torch::Tensor operator()(RMSNormImpl&, MLPImpl&, double) const { return {}; }
};
struct ReturnsPair {
  std::tuple<torch::Tensor, torch::Tensor> operator()(RMSNormImpl&, MLPImpl&,
                                                      const torch::Tensor& x) const {
    return {x, x};
  }
};

/// The MLP's own forward, after waiting while `blocking_gate` is set (a call held in flight).
std::atomic<bool> blocking_gate{false};
std::atomic<bool> blocking_inside{false};
struct BlockingMLP {
  torch::Tensor operator()(MLPImpl& mlp, const torch::Tensor& x) const {
    blocking_inside = true;
    while (blocking_gate) std::this_thread::yield();
    return mlp.forward(x);
  }
};

void register_test_kernels() {
  fusion::register_kernels_once("test.kernels", [] {
    fusion::register_kernel("test.blocking_mlp", BlockingMLP{});
    fusion::register_kernel("test.norm_mlp", NormMLP{});
    fusion::register_kernel("test.plain_norm_mlp", PlainNormMLP{},
                            {{c10::DeviceType::CPU}, /*training=*/true, /*autograd=*/true});
    fusion::register_kernel("test.wrong", WrongNormMLP{});
    fusion::register_kernel("test.cuda_only", NormMLP{}, {{c10::DeviceType::CUDA}});
    fusion::register_kernel("test.mlp_only", MLPOnly{});
    fusion::register_kernel("test.takes_linear", TakesLinear{});
    fusion::register_kernel("test.takes_double", TakesDouble{});
    fusion::register_kernel("test.returns_pair", ReturnsPair{});
  });
}

fusion::FuseOptions with_kernel(const std::string& name,
                                fusion::KernelPolicy policy = fusion::KernelPolicy::fallback) {
  fusion::FuseOptions options;
  options.kernel = name;
  options.policy = policy;
  return options;
}

fusion::KernelStats stats_of(Stack& model, std::size_t chain = 0) {
  return fusion::fused_chains(model).at(chain).stats;
}

}  // namespace

TEST_CASE("a kernel runs instead of the replay and matches the unfused model") {
  register_test_kernels();
  torch::manual_seed(30);
  Stack model(3);
  model->eval();  // kernels registered without training run in eval mode only
  const auto x = torch::randn({2, 5, 16});
  torch::NoGradGuard no_grad;
  const auto original = model(x);
  const auto chains =
      fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.norm_mlp"));
  REQUIRE(chains.size() == 3);
  CHECK(chains[0].kernel == "test.norm_mlp");
  require_close(model(x), original);
  require_close(model(x), original);
  const auto stats = stats_of(model, 1);
  CHECK(stats.runs == 2);
  CHECK(stats.prepares == 1);  // nothing changed: prepared once
  CHECK(stats.replays_device + stats.replays_training + stats.replays_grad == 0);
  CHECK(stats.state_bytes == 2 * 32 * 16 * sizeof(float));  // the concatenated copy
  CHECK(stats.shared_state_bytes == 0);
  const auto text = fusion::report(model);
  // The first run after the prepare was also checked against the replay.
  CHECK_THAT(text, Contains("kernel test.norm_mlp: 2 run(s), 0 exception(s), 1 checked; replays: "
                            "device 0, training 0, grad 0, modes 0, declined 0; 1 prepare(s); "
                            "state 4096 B own, 0 B shared"));

  // use_kernel with no kernel returns to the replay, bit-identical again.
  CHECK(fusion::use_kernel(model, {"layers.*.mlp"}, "") == 3);
  CHECK(fusion::fused_chains(model)[0].kernel.empty());
  CHECK(torch::equal(model(x), original));
  // and back
  CHECK(fusion::use_kernel(model, {"layers.1.mlp"}, "test.norm_mlp") == 1);
  require_close(model(x), original);
  CHECK(stats_of(model, 1).runs == 1);
  CHECK(fusion::fused_chains(model)[0].kernel.empty());
  // Unfusing drops the kernels.
  fusion::unfuse_modules(model);
  fusion::fuse_modules(model, block_patterns(), block_specs());
  CHECK(fusion::fused_chains(model)[1].kernel.empty());
}

TEST_CASE("a kernel of one member replaces that module's forward") {
  register_test_kernels();
  torch::manual_seed(31);
  Stack model(2);
  model->eval();
  const auto x = torch::randn({3, 16});
  torch::NoGradGuard no_grad;
  const auto original = model(x);
  const auto chains =
      fusion::fuse_modules(model, {"layers.*.mlp"}, {hidden_spec()}, with_kernel("test.mlp_only"));
  REQUIRE(chains.size() == 2);
  require_close(model(x), original);
  CHECK(stats_of(model).runs == 1);
  CHECK_THROWS_WITH(
      fusion::fuse_modules(model, {"layers.*.post_attention_layernorm"}, {hidden_spec()}),
      Contains("a chain needs at least 2 patterns (or 1 with a kernel)"));
  CHECK_THROWS_WITH(fusion::use_kernel(model, {"layers.*.mlp"}, ""),
                    Contains("has a single member, which only a kernel justifies"));
}

TEST_CASE("attaching a kernel that does not fit fails, naming it, and changes nothing") {
  register_test_kernels();
  torch::manual_seed(32);
  Stack model(2);
  model->eval();
  const auto x = torch::randn({2, 16});
  torch::NoGradGuard no_grad;
  fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.norm_mlp"));
  const auto output = model(x);
  const auto before = fusion::report(model);

  auto fails = [&](const std::string& kernel, const std::string& message) {
    INFO("kernel " << kernel);
    CHECK_THROWS_WITH(fusion::use_kernel(model, {"layers.*.mlp"}, kernel), Contains(message));
  };
  fails("test.nope", "unknown kernel 'test.nope'; registered kernels: [");
  fails("test.takes_linear",
        "kernel 'test.takes_linear' on chain [layers.0.post_attention_layernorm -> "
        "layers.0.mlp]: member #1 'layers.0.mlp' is a models::MLPImpl, but the kernel takes a "
        "torch::nn::LinearImpl there");
  fails("test.takes_double",
        "free input #0 is parameter torch::Tensor #0 of 'layers.0.post_attention_layernorm', but "
        "the kernel takes a double there");
  fails("test.returns_pair",
        "the kernel returns (torch::Tensor, torch::Tensor), but the last member 'layers.0.mlp' "
        "returns (torch::Tensor)");
  fails("test.mlp_only", "the kernel takes 1 module(s) (models::MLPImpl), the chain has 2");
  CHECK_THROWS_WITH(fusion::use_kernel(model, {"norm"}, "test.norm_mlp"),
                    Contains("patterns [norm] select no fused chain under the root"));
  CHECK(fusion::report(model) == before);
  CHECK(fusion::fused_chains(model)[0].kernel == "test.norm_mlp");
  CHECK(torch::equal(model(x), output));

  // At fuse time the same checks run before anything is fused.
  Stack fresh(2);
  CHECK_THROWS_WITH(fusion::fuse_modules(fresh, block_patterns(), block_specs(),
                                         with_kernel("test.takes_double")),
                    Contains("the kernel takes a double there"));
  CHECK(fusion::fused_chains(fresh).empty());
  // Registering a second implementation with other types, or for a device already taken.
  CHECK_THROWS_WITH(fusion::register_kernel("test.norm_mlp", TakesDouble{}),
                    Contains("already registered with other types"));
  CHECK_THROWS_WITH(fusion::register_kernel("test.norm_mlp", NormMLP{}),
                    Contains("already has an implementation for cpu"));
}

TEST_CASE("a kernel that does not apply replays and counts why; strict raises") {
  register_test_kernels();
  torch::manual_seed(33);
  Stack model(1);
  model->eval();
  const auto x = torch::randn({2, 16});
  torch::Tensor original;
  {
    torch::NoGradGuard no_grad;
    original = model(x);
  }

  SECTION("device: a CUDA-only kernel replays on CPU") {
    fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.cuda_only"));
    torch::NoGradGuard no_grad;
    CHECK(torch::equal(model(x), original));
    CHECK(stats_of(model).replays_device == 1);
    CHECK(stats_of(model).runs == 0);
  }
  SECTION("training mode") {
    fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.norm_mlp"));
    torch::NoGradGuard no_grad;
    model->train();
    CHECK(torch::equal(model(x), original));
    CHECK(stats_of(model).replays_training == 1);
    model->eval();
    require_close(model(x), original);
    CHECK(stats_of(model).runs == 1);
  }
  SECTION("gradients: replay with grad mode on, the kernel under NoGradGuard or InferenceMode") {
    fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.norm_mlp"));
    model->eval();
    CHECK(torch::equal(model(x), original));  // parameters require grad
    CHECK(stats_of(model).replays_grad == 1);
    {
      torch::NoGradGuard no_grad;
      require_close(model(x), original);
    }
    {
      c10::InferenceMode inference;
      require_close(model(x), original);
    }
    CHECK(stats_of(model).runs == 2);
  }
  SECTION("a kernel registered with autograd and training runs with gradients") {
    fusion::fuse_modules(model, block_patterns(), block_specs(),
                         with_kernel("test.plain_norm_mlp"));
    model->train();
    auto input = x.clone().requires_grad_(true);
    model(input).sum().backward();
    CHECK(stats_of(model).runs == 1);
    CHECK(input.grad().defined());
  }
  SECTION("strict policy raises instead of replaying") {
    fusion::fuse_modules(model, block_patterns(), block_specs(),
                         with_kernel("test.norm_mlp", fusion::KernelPolicy::strict));
    model->train();
    torch::NoGradGuard no_grad;
    CHECK_THROWS_WITH(model(x), Contains("fused chain [layers.0.post_attention_layernorm -> "
                                         "layers.0.mlp]: kernel 'test.norm_mlp' does not apply "
                                         "(strict policy): a member is in training mode"));
    model->eval();
    require_close(model(x), original);  // the next forward is fine
  }
}

TEST_CASE("a kernel's prepared state is never stale, and never rebuilt for nothing") {
  register_test_kernels();
  torch::manual_seed(34);
  Stack model(2);
  model->eval();
  Stack reference(2);  // the unfused twin, kept equal to the model
  {
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < model->parameters().size(); ++i) {
      reference->parameters()[i].copy_(model->parameters()[i]);
    }
  }
  fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.norm_mlp"));
  const auto x = torch::randn({3, 16});
  auto check = [&](std::uint64_t prepares) {
    torch::NoGradGuard no_grad;
    require_close(model(x), reference(x));
    CHECK(stats_of(model).prepares == prepares);
  };
  check(1);
  check(1);

  SECTION("after an SGD step") {
    for (Stack* m : {&model, &reference}) {
      torch::optim::SGD sgd((*m)->parameters(), 0.1);
      (*m)(x).pow(2).sum().backward();  // grad mode: the fused model replays here
      sgd.step();
    }
    check(2);
  }
  SECTION("after torch::load of another checkpoint") {
    torch::manual_seed(35);
    Stack other(2);
    const std::string path = "fusion-kernel-stale.pt";
    torch::save(other, path);
    torch::load(model, path);
    torch::load(reference, path);
    std::remove(path.c_str());
    check(2);
  }
  SECTION("after to(kDouble)") {
    model->to(torch::kDouble);
    reference->to(torch::kDouble);
    torch::NoGradGuard no_grad;
    const auto xd = x.to(torch::kDouble);
    const auto fused = model(xd);
    CHECK(fused.dtype() == torch::kDouble);
    CHECK(torch::allclose(fused, reference(xd), 0, 1e-12));
    CHECK(stats_of(model).prepares == 2);
  }
  SECTION("after a write no stamp shows, once refresh_kernels is called") {
    {
      torch::NoGradGuard no_grad;
      model->block(0).mlp->gate_proj->weight.data().mul_(0.5);  // .data(): no version moves
      reference->block(0).mlp->gate_proj->weight.data().mul_(0.5);
    }
    fusion::refresh_kernels(model);
    check(2);
  }
  SECTION("after an in-place mul_ on one weight under NoGradGuard") {
    {
      torch::NoGradGuard no_grad;
      model->block(1).mlp->up_proj->weight.mul_(1.5);
      reference->block(1).mlp->up_proj->weight.mul_(1.5);
    }
    torch::NoGradGuard no_grad;
    require_close(model(x), reference(x));
    CHECK(stats_of(model, 1).prepares == 2);
    CHECK(stats_of(model, 0).prepares == 1);  // the other layer did not change
  }
}

TEST_CASE("8 threads share a kernel-equipped model, starting unprepared", "[threads]") {
  register_test_kernels();
  torch::manual_seed(36);
  Stack model(3);
  model->eval();
  constexpr int threads = 8, calls = 50;
  std::vector<torch::Tensor> inputs, expected;
  torch::NoGradGuard no_grad;
  for (int i = 0; i < threads; ++i) {
    inputs.push_back(torch::randn({1 + i % 3, 16}));
    expected.push_back(model(inputs.back()));
  }
  fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.norm_mlp"));
  std::atomic<int> mismatches{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      torch::NoGradGuard guard;
      for (int c = 0; c < calls; ++c) {
        if (!torch::allclose(model(inputs[t]), expected[t], 0, kTolerance)) ++mismatches;
      }
    });
  }
  for (auto& worker : workers) worker.join();
  CHECK(mismatches == 0);
  CHECK(stats_of(model).runs == threads * calls);
  CHECK(stats_of(model).prepares == 1);
}

TEST_CASE("attaching a kernel while another thread is in the chain's call is refused",
          "[threads]") {
  register_test_kernels();
  torch::manual_seed(38);
  Stack model(1);
  model->eval();
  const auto x = torch::randn({2, 16});
  torch::NoGradGuard no_grad;
  const auto expected = model(x);
  fusion::fuse_modules(model, {"layers.*.mlp"}, {fusion::ModuleSpec{{"x"}, {"x"}}},
                       with_kernel("test.blocking_mlp"));
  blocking_gate = true;
  blocking_inside = false;
  torch::Tensor got;
  std::thread runner([&] {
    torch::NoGradGuard guard;
    got = model(x);
  });
  while (!blocking_inside) std::this_thread::yield();
  CHECK_THROWS_WITH(fusion::use_kernel(model, {"layers.0.mlp"}, "test.mlp_only"),
                    Contains("fusion::use_kernel: fused chain [layers.0.mlp] is in use on another "
                             "thread (a call of one of its members is in flight)"));
  CHECK_THROWS_WITH(fusion::unfuse_modules(model), Contains("is in use on another thread"));
  CHECK(fusion::fused_chains(model).at(0).kernel == "test.blocking_mlp");
  blocking_gate = false;
  runner.join();
  require_close(got, expected);
  CHECK(fusion::use_kernel(model, {"layers.0.mlp"}, "test.mlp_only") == 1);
  require_close(model(x), expected);
}

TEST_CASE("fusion changed while 4 threads run the model: refused or made, every forward exact",
          "[threads]") {
  register_test_kernels();
  torch::manual_seed(39);
  Stack model(3);
  model->eval();
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> inputs, expected;
  for (int i = 0; i < 8; ++i) {
    inputs.push_back(torch::randn({1 + i % 3, 16}));
    expected.push_back(model(inputs.back()));
  }
  // A pass that began unfused and met a chain fused meanwhile finishes unfused: still exact.
  fusion_test::ForwardRunners<Stack> runners(model, inputs, expected, 0, kTolerance);
  int changes = 0, refused = 0, misreported = 0;
  const auto change = [&](auto&& make_change) {
    try {
      make_change();
      ++changes;
    } catch (const fusion::FusionError& error) {
      ++(std::string(error.what()).find("in use on another thread") != std::string::npos
             ? refused
             : misreported);
    }
  };
  const int cycles = std::getenv("FUSION_STRESS_FORWARDS") != nullptr ? 40 : 300;
  const auto fused = [&] { return !fusion::fused_chains(model).empty(); };
  for (int i = 0; i < cycles; ++i) {
    if (!fused()) change([&] { fusion::fuse_modules(model, block_patterns(), block_specs()); });
    if (fused()) change([&] { fusion::use_kernel(model, {"**"}, "test.norm_mlp"); });
    if (fused()) change([&] { fusion::use_kernel(model, {"**"}, ""); });
    if (fused()) change([&] { fusion::unfuse_modules(model); });
  }
  runners.stop();
  INFO(runners.forwards << " forwards, " << changes << " changes made, " << refused << " refused");
  CHECK(runners.wrong == 0);
  CHECK(runners.failed == 0);
  CHECK(misreported == 0);
  CHECK(runners.forwards > 0);
  // How many changes get through depends on timing (all may be refused while 4 threads keep every
  // chain busy); that they succeed once the threads stop is checked here.
  if (!fused()) fusion::fuse_modules(model, block_patterns(), block_specs());
  fusion::use_kernel(model, {"**"}, "test.norm_mlp");
  require_close(model(inputs[0]), expected[0]);
  fusion::unfuse_modules(model);
  for (std::size_t k = 0; k < inputs.size(); ++k)
    CHECK(torch::equal(model(inputs[k]), expected[k]));
}

TEST_CASE("a fault at any step of fuse_modules, use_kernel, plans and unfuse changes nothing") {
  register_test_kernels();
  torch::manual_seed(40);
  Stack model(3);
  model->eval();
  const auto x = torch::randn({2, 16});
  torch::NoGradGuard no_grad;
  const auto expected = model(x);
  // Makes step 0, 1, 2, ... of `operation` fail in turn until it completes; returns its steps.
  const auto fail_each_step = [&](const char* name, auto&& operation) {
    for (long step = 0;; ++step) {
      const auto output = model(x);
      const std::string before = fusion::report(model);
      fusion::detail::fault_countdown() = step;
      try {
        operation();
      } catch (const std::bad_alloc&) {
        fusion::detail::fault_countdown() = -1;
        INFO(name << ": a fault at step " << step);
        CHECK(fusion::report(model) == before);  // chains, kernels, counters
        // Also proves no Slot was left held for a change: a held one would make this wait.
        CHECK(torch::equal(model(x), output));
        continue;
      }
      fusion::detail::fault_countdown() = -1;
      return step;
    }
  };
  CHECK(fail_each_step("fuse_modules", [&] {
          fusion::fuse_modules(model, block_patterns(), block_specs());
        }) == 3 + 3 + 2);  // per chain: planned, checked; then before and after holding the Slots
  CHECK(fail_each_step("use_kernel", [&] { fusion::use_kernel(model, {"**"}, "test.norm_mlp"); }) ==
        3 + 1);
  CHECK(fail_each_step("unfuse_modules", [&] { fusion::unfuse_modules(model); }) == 1);
  const fusion::Plan plan{{{block_patterns(), block_specs(), with_kernel("test.norm_mlp")}}};
  CHECK(fail_each_step("fuse_modules(plan)", [&] { fusion::fuse_modules(model, plan); }) ==
        1 + 3 + 3 + 2);
  CHECK(fusion::fused_chains(model).at(2).kernel == "test.norm_mlp");
  require_close(model(x), expected);
  fusion::unfuse_modules(model);
  CHECK(torch::equal(model(x), expected));
}

TEST_CASE("verify checks chains with their kernels and names a wrong one") {
  register_test_kernels();
  torch::manual_seed(37);
  Stack model(2);
  model->eval();
  const auto x = torch::randn({2, 16});
  fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.norm_mlp"));
  fusion::use_kernel(model, {"layers.1.*"}, "test.wrong");
  torch::NoGradGuard no_grad;
  const auto report = fusion::verify(
      model, [&] { return model(x); }, 1e-5);
  REQUIRE(report.chains.size() == 2);
  CHECK(report.chains[0].ok);
  CHECK(report.chains[0].kernel_ran);
  CHECK_FALSE(report.chains[1].ok);
  CHECK_THAT(report.to_string(),
             Contains("FAIL [layers.1.post_attention_layernorm -> layers.1.mlp] kernel "
                      "'test.wrong': max abs diff"));
}

TEST_CASE("a plan reproduces the fusion of a model on its clone") {
  register_test_kernels();
  torch::manual_seed(38);
  Stack model(3);
  model->eval();
  const auto x = torch::randn({2, 16});
  torch::NoGradGuard no_grad;
  fusion::fuse_modules(model->layers, {"*.post_attention_layernorm", "*.mlp"}, block_specs(),
                       with_kernel("test.norm_mlp"));
  fusion::use_kernel(model, {"layers.2.mlp"}, "");  // one chain back to the replay

  const fusion::Plan plan = fusion::plan_of(model);
  REQUIRE(plan.rules.size() == 3);  // layers 0 and 1 with the kernel, layer 2 without
  // Per chain: the call's patterns with each wildcard pinned to what it bound, so the bindings
  // stay.
  CHECK(plan.rules[0].patterns ==
        std::vector<std::string>{"layers.[0].post_attention_layernorm", "layers.[0].mlp"});
  CHECK(plan.rules[0].options.kernel == "test.norm_mlp");
  CHECK(plan.rules[2].options.kernel.empty());

  auto copy = std::dynamic_pointer_cast<StackImpl>(model->clone());
  copy->eval();
  CHECK(fusion::fused_chains(*copy).empty());
  fusion::fuse_modules(*copy, plan);
  model(x);
  copy->forward(x);
  CHECK(fusion::report(*copy) == fusion::report(model));
  CHECK(torch::equal(copy->forward(x), model(x)));

  // A whole call's chains with one kernel come back as its patterns, re-rooted.
  Stack simple(2);
  fusion::fuse_modules(simple->layers, {"*.post_attention_layernorm", "*.mlp"}, block_specs(),
                       with_kernel("test.norm_mlp"));
  const auto simple_plan = fusion::plan_of(simple);
  REQUIRE(simple_plan.rules.size() == 1);
  CHECK(simple_plan.rules[0].patterns ==
        std::vector<std::string>{"layers.*.post_attention_layernorm", "layers.*.mlp"});

  // All or nothing: a module taken by two rules fails before anything is fused.
  Stack other(2);
  fusion::Plan overlapping{{{block_patterns(), block_specs(), {}},
                            {{"layers.0.mlp"}, {hidden_spec()}, with_kernel("test.mlp_only")}}};
  CHECK_THROWS_WITH(fusion::fuse_modules(other, overlapping),
                    Contains("'layers.0.mlp' is taken by rule #0 and by rule #1"));
  CHECK(fusion::fused_chains(other).empty());
}

TEST_CASE("kernels dispatch by device: a CUDA kernel runs on CUDA (skipped without CUDA)",
          "[cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("CUDA is not available in this LibTorch build or machine: CUDA case skipped");
    return;
  }
  register_test_kernels();
  torch::manual_seed(31);
  Stack model(1);
  model->eval();
  model->to(torch::kCUDA);
  const auto x = torch::randn({2, 16}, torch::kCUDA);
  torch::NoGradGuard no_grad;
  const auto original = model(x);
  fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.cuda_only"));
  require_close(model(x), original);
  CHECK(stats_of(model).runs == 1);
  // Back on the CPU the same chain replays (and counts why), with its weights moved along.
  model->to(torch::kCPU);
  require_close(model(x.cpu()), original.cpu());
  CHECK(stats_of(model).replays_device == 1);
}

// GCC says so with __SANITIZE_*__, clang (before 16) only through __has_feature.
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define FUSION_TEST_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define FUSION_TEST_SANITIZED 1
#endif

TEST_CASE("memory stays flat over 10,000 fused forwards and 1,000 fuse and kernel cycles") {
#ifdef FUSION_TEST_SANITIZED
  WARN(
      "resident memory is not meaningful under a sanitizer (freed memory is quarantined): skipped");
  return;
#endif
  register_test_kernels();
  torch::manual_seed(32);
  torch::NoGradGuard no_grad;
  Stack model(2);
  model->eval();
  const auto x = torch::randn({4, 16});
  // Resident memory of this process (Linux), in MiB.
  const auto resident_mib = [] {
    std::ifstream statm("/proc/self/statm");
    double pages = 0, resident = 0;
    statm >> pages >> resident;
    return resident * static_cast<double>(::sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
  };
  const auto cycle = [&] {
    fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.norm_mlp"));
    model(x);
    fusion::use_kernel(model, block_patterns(), "");
    model(x);
    fusion::unfuse_modules(model);
  };
  fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.norm_mlp"));
  for (int i = 0; i < 1000; ++i) model(x);  // warm: allocator pools, stand-ins, the state
  const double before_forwards = resident_mib();
  for (int i = 0; i < 10000; ++i) model(x);
  const double after_forwards = resident_mib();
  fusion::unfuse_modules(model);
  for (int i = 0; i < 100; ++i) cycle();
  const double before_cycles = resident_mib();
  for (int i = 0; i < 1000; ++i) cycle();
  const double after_cycles = resident_mib();
  // A leak of one small tensor per forward would be >= 10000 * 64 B = 0.6 MiB, of one chain per
  // cycle well over 1 MiB: 0.5 MiB of slack is what the allocator's own churn needs here.
  INFO("forwards: " << before_forwards << " -> " << after_forwards
                    << " MiB; cycles: " << before_cycles << " -> " << after_cycles << " MiB");
  CHECK(after_forwards - before_forwards < 0.5);
  CHECK(after_cycles - before_cycles < 0.5);
}

/// A kernel whose state reports its own lifetime.
struct Tracked {
  struct State {
    std::shared_ptr<int> token;
  };
  static std::weak_ptr<int>& last() {
    static std::weak_ptr<int> token;
    return token;
  }
  State prepare(RMSNormImpl&, MLPImpl&) const {
    auto token = std::make_shared<int>(0);
    last() = token;
    return {token};
  }
  torch::Tensor operator()(const State&, RMSNormImpl& norm, MLPImpl& mlp,
                           const torch::Tensor& x) const {
    return mlp.forward(norm.forward(x));
  }
};

TEST_CASE("a kernel's prepared state is freed when its chain is unfused or the model destroyed") {
  fusion::register_kernels_once("test.tracked",
                                [] { fusion::register_kernel("test.tracked", Tracked{}); });
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 16});
  {
    Stack model(1);
    model->eval();
    fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.tracked"));
    model(x);
    CHECK_FALSE(Tracked::last().expired());
    fusion::unfuse_modules(model);
    CHECK(Tracked::last().expired());
    fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.tracked"));
    model(x);
    fusion::use_kernel(model, block_patterns(), "");  // detached: the state goes too
    CHECK(Tracked::last().expired());
    fusion::use_kernel(model, block_patterns(), "test.tracked");
    model(x);
    CHECK_FALSE(Tracked::last().expired());
  }  // the model is destroyed while fused, with its kernel prepared
  CHECK(Tracked::last().expired());
}

/// A kernel that throws when told to.
struct Throwing {
  static std::atomic<bool>& armed() {
    static std::atomic<bool> flag{false};
    return flag;
  }
  torch::Tensor operator()(RMSNormImpl& norm, MLPImpl& mlp, const torch::Tensor& x) const {
    if (armed()) throw std::runtime_error("kernel fault injected");
    return mlp.forward(norm.forward(x));
  }
};

TEST_CASE("an exception thrown by a kernel leaves nothing captured; the next forward is right") {
  fusion::register_kernels_once("test.throwing",
                                [] { fusion::register_kernel("test.throwing", Throwing{}); });
  torch::manual_seed(33);
  torch::NoGradGuard no_grad;
  Stack model(2);
  model->eval();
  const auto x = torch::randn({2, 16});
  const auto expected = model(x);
  fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("test.throwing"));
  const auto baseline = x.use_count();
  Throwing::armed() = true;
  CHECK_THROWS_WITH(model(x), Contains("kernel fault injected"));
  Throwing::armed() = false;
  CHECK(x.use_count() == baseline);  // the failed call's captures are gone already
  require_close(model(x), expected);
  CHECK(stats_of(model, 0).runs == 1);  // the failed call is not counted as a run
}
