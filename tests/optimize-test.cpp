// fusion::optimize: candidate discovery from a traced run, verification and timing of each
// candidate, generalized patterns, and plans as JSON.
//
// Timing decisions are made deterministic by sleeping: the unfused Scale sleeps (so a kernel that
// skips it is faster by far more than min_speedup) and the slow kernel sleeps longer than the
// whole unfused run. No assertion depends on how fast this machine computes.
#include "catch_compat.hpp"

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <fusion/fusion.hpp>
#include <fusion/optimize.hpp>
#include <fusion/plan_json.hpp>

#include "models.hpp"

using fusion_test::Contains;

namespace {

struct ScaleImpl : torch::nn::Module {
  explicit ScaleImpl(int64_t size = 8) {
    weight = register_parameter("weight", torch::linspace(0.5, 1.5, size));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return x * weight;
  }
  torch::Tensor weight;
};
TORCH_MODULE(Scale);

struct FeedForwardImpl : torch::nn::Module {
  explicit FeedForwardImpl(int64_t size = 8) {
    fc = register_module("fc", torch::nn::Linear(size, size));
  }
  torch::Tensor forward(const torch::Tensor& x) { return torch::relu(fc(x)); }
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(FeedForward);

torch::Tensor scale_ff(ScaleImpl& scale, FeedForwardImpl& ff, const torch::Tensor& x) {
  return torch::relu(torch::linear(x * scale.weight, ff.fc->weight, ff.fc->bias));
}

struct ScaleFF {  // right, and without Scale's sleep
  torch::Tensor operator()(ScaleImpl& scale, FeedForwardImpl& ff, const torch::Tensor& x) const {
    return scale_ff(scale, ff, x);
  }
};
struct BadScaleFF {  // wrong on purpose: verify must reject it
  torch::Tensor operator()(ScaleImpl& scale, FeedForwardImpl& ff, const torch::Tensor& x) const {
    return scale_ff(scale, ff, x) + 0.5;
  }
};
struct SlowScaleFF {  // right, and slow on purpose: timing must reject it
  torch::Tensor operator()(ScaleImpl& scale, FeedForwardImpl& ff, const torch::Tensor& x) const {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return scale_ff(scale, ff, x);
  }
};

struct NormMLP {  // right for the chain, wrong for a parent that also uses the norm's result
  torch::Tensor operator()(models::RMSNormImpl& norm, models::MLPImpl& mlp,
                           const torch::Tensor& x) const {
    return mlp.forward(norm.forward(x));
  }
};

void register_optimize_kernels() {
  fusion::register_kernels_once("test.optimize", [] {
    fusion::register_kernel("optimize.norm_mlp", NormMLP{});
    fusion::register_kernel("optimize.bad", BadScaleFF{});
    fusion::register_kernel("optimize.scale_ff", ScaleFF{});
    fusion::register_kernel("optimize.slow", SlowScaleFF{});
  });
}

struct BlockImpl : torch::nn::Module {
  BlockImpl() {
    scale = fusion::register_slot(*this, "scale", Scale());
    ff = fusion::register_slot(*this, "ff", FeedForward());
  }
  torch::Tensor forward(const torch::Tensor& h) { return h + ff(scale(h)); }
  fusion::Slot<Scale> scale;
  fusion::Slot<FeedForward> ff;
};
TORCH_MODULE(Block);

/// Three blocks (chains), then the cases that must not be proposed, then a Sequential and a
/// shared submodule (chains).
struct NetImpl : torch::nn::Module {
  explicit NetImpl(int64_t depth = 3) {
    blocks = register_module("blocks", torch::nn::ModuleList());
    for (int64_t i = 0; i < depth; ++i) blocks->push_back(Block());
    branch_scale = fusion::register_slot(*this, "branch_scale", Scale());
    branch_a = fusion::register_slot(*this, "branch_a", FeedForward());
    branch_b = fusion::register_slot(*this, "branch_b", FeedForward());
    between_scale = fusion::register_slot(*this, "between_scale", Scale());
    between_ff = fusion::register_slot(*this, "between_ff", FeedForward());
    inplace_scale = fusion::register_slot(*this, "inplace_scale", Scale());
    inplace_ff = fusion::register_slot(*this, "inplace_ff", FeedForward());
    twice_scale = fusion::register_slot(*this, "twice_scale", Scale());
    twice_ff = fusion::register_slot(*this, "twice_ff", FeedForward());
    seq = register_module("seq", fusion::Sequential(Scale(), FeedForward()));
    shared_scale = fusion::register_slot(*this, "shared_scale", Scale());
    FeedForward shared;
    shared_a = fusion::register_slot(*this, "shared_a", shared);
    shared_b = fusion::register_slot(*this, "shared_b", shared);
  }
  torch::Tensor forward(torch::Tensor h) {
    for (const auto& block : *blocks) h = block->as<BlockImpl>()->forward(h);
    const auto branched = branch_scale(h);  // used by two calls: no chain
    h = branch_a(branched) + branch_b(branched);
    h = between_ff(between_scale(h) * 2);  // parent code between: no chain
    auto modified = inplace_scale(h);      // modified in place between: no chain
    modified.add_(1);
    h = inplace_ff(modified);
    h = twice_ff(twice_ff(twice_scale(h)));      // twice_ff called twice: no chain
    h = seq->forward(h);                         // seq.0 -> seq.1
    return shared_b(shared_a(shared_scale(h)));  // shared_scale -> shared_a
  }
  torch::nn::ModuleList blocks{nullptr};
  fusion::Slot<Scale> branch_scale, between_scale, inplace_scale, twice_scale, shared_scale;
  fusion::Slot<FeedForward> branch_a, branch_b, between_ff, inplace_ff, twice_ff, shared_a,
      shared_b;
  fusion::Sequential seq{nullptr};
};
TORCH_MODULE(Net);

fusion::OptimizeOptions fast_options(std::vector<std::string> kernels) {
  fusion::OptimizeOptions options;
  options.kernels = std::move(kernels);
  options.time_budget = std::chrono::milliseconds(3000);
  return options;
}

std::vector<std::vector<std::string>> kept_chains(Net& net) {
  std::vector<std::vector<std::string>> chains;
  for (const auto& chain : fusion::fused_chains(net)) chains.push_back(chain.paths);
  return chains;
}

}  // namespace

TEST_CASE("optimize finds the data-flow chains, verifies and times them, and fuses the plan",
          "[optimize]") {
  register_optimize_kernels();
  torch::manual_seed(0);
  Net net;
  net->eval();
  const auto x = torch::randn({4, 8});
  const torch::NoGradGuard no_grad;
  const auto expected = net->forward(x);
  const auto run = [&] { return net->forward(x); };

  const int threads = at::get_num_threads();
  auto options = fast_options({"optimize.scale_ff"});
  options.threads = 1;
  const auto plan = fusion::optimize(net, run, options);
  INFO(fusion::to_string(plan));
  CHECK(at::get_num_threads() == threads);  // restored
  REQUIRE(plan.rules.size() == 3);
  // The blocks' chains as one generalized rule, with the member types recorded.
  CHECK(plan.rules[0].patterns == std::vector<std::string>{"blocks.*.scale", "blocks.*.ff"});
  CHECK(plan.rules[0].options.kernel == "optimize.scale_ff");
  CHECK(plan.rules[0].types.size() == 2);
  CHECK(plan.rules[1].patterns == std::vector<std::string>{"seq.0", "seq.1"});
  CHECK(plan.rules[2].patterns == std::vector<std::string>{"shared_scale", "shared_a"});
  CHECK(plan.kept.size() == 3);
  CHECK(plan.kept[0].chains == 3);
  CHECK(plan.kept[0].timing.speedup > 1.03);
  CHECK(plan.rejected.empty());
  // The reused module is named, not proposed; the branch, the parent code between and the value
  // modified in place are not data-flow chains at all.
  REQUIRE(plan.notes.size() == 1);
  CHECK_THAT(plan.notes[0], Contains("'twice_ff' is called 2 times"));
  const auto chains = kept_chains(net);
  CHECK(chains.size() == 5);
  for (const auto& chain : fusion::fused_chains(net)) CHECK(chain.kernel == "optimize.scale_ff");
  // Left fused by the plan, kernels running, results as unfused.
  CHECK(torch::allclose(net->forward(x), expected, 1e-5, 1e-6));
  for (const auto& chain : fusion::fused_chains(net)) CHECK(chain.stats.runs > 0);
  CHECK(plan.seconds > 0);
}

TEST_CASE("optimize rejects a wrong kernel by verification and a slow one by timing",
          "[optimize]") {
  register_optimize_kernels();
  torch::manual_seed(0);
  Net net(2);
  net->eval();
  const auto x = torch::randn({4, 8});
  const torch::NoGradGuard no_grad;
  const auto expected = net->forward(x);
  const auto run = [&] { return net->forward(x); };

  SECTION("wrong") {
    const auto plan = fusion::optimize(net, run, fast_options({"optimize.bad"}));
    INFO(fusion::to_string(plan));
    CHECK(plan.rules.empty());
    REQUIRE(plan.rejected.size() == 4);
    for (const auto& rejection : plan.rejected) {
      CHECK(rejection.kernel == "optimize.bad");
      CHECK_THAT(rejection.reason, Contains("verify: results differ by "));
    }
    CHECK(fusion::fused_chains(net).empty());
  }
  SECTION("wrong first, then the right one over the same modules") {
    const auto plan =
        fusion::optimize(net, run, fast_options({"optimize.bad", "optimize.scale_ff"}));
    INFO(fusion::to_string(plan));
    CHECK(plan.rejected.size() == 4);
    REQUIRE(plan.rules.size() == 3);
    for (const auto& rule : plan.rules) CHECK(rule.options.kernel == "optimize.scale_ff");
  }
  SECTION("slow") {
    const auto plan = fusion::optimize(net, run, fast_options({"optimize.slow"}));
    INFO(fusion::to_string(plan));
    CHECK(plan.rules.empty());
    REQUIRE(plan.rejected.size() == 4);
    CHECK_THAT(plan.rejected[0].reason, Contains("timing: "));
    CHECK(fusion::fused_chains(net).empty());
  }
  CHECK(torch::equal(net->forward(x), expected));
}

TEST_CASE("optimize rejects, by verification, a chain whose result the parent also uses",
          "[optimize]") {
  register_optimize_kernels();
  torch::manual_seed(0);
  models::Reused model;
  model->eval();
  const auto x = torch::randn({2, 16});
  const torch::NoGradGuard no_grad;
  const auto expected = model->forward(x);
  const auto plan = fusion::optimize(
      model, [&] { return model->forward(x); }, fast_options({"optimize.norm_mlp"}));
  INFO(fusion::to_string(plan));
  CHECK(plan.rules.empty());
  REQUIRE(plan.rejected.size() == 1);
  CHECK(plan.rejected[0].paths == std::vector<std::string>{"norm", "mlp"});
  CHECK_THAT(plan.rejected[0].reason, Contains("verify: results differ by "));
  CHECK(torch::equal(model->forward(x), expected));
}

TEST_CASE("optimize refuses a fused model and leaves a model whose run throws as it was",
          "[optimize]") {
  register_optimize_kernels();
  Net net(2);
  const torch::NoGradGuard no_grad;
  const auto x = torch::randn({4, 8});
  fusion::fuse_modules(net, {"blocks.*.scale", "blocks.*.ff"},
                       {fusion::ModuleSpec{{"x"}, {"x"}}, fusion::ModuleSpec{{"x"}, {"x"}}});
  CHECK_THROWS_WITH(fusion::optimize(net, [&] { return net->forward(x); }),
                    Contains("already has 2 fused chain(s)"));
  fusion::unfuse_modules(net);
  CHECK_THROWS_WITH(fusion::optimize(net,
                                     [&]() -> torch::Tensor {
                                       net->forward(x);
                                       throw std::runtime_error("sample failed");
                                     }),
                    Contains("sample failed"));
  CHECK(fusion::fused_chains(net).empty());
  CHECK(net->forward(x).defined());  // no Slot is left tracing
}

TEST_CASE("plans round-trip through JSON, and a plan that does not fit is refused", "[optimize]") {
  register_optimize_kernels();
  torch::manual_seed(0);
  Net net;
  net->eval();
  const auto x = torch::randn({4, 8});
  const torch::NoGradGuard no_grad;
  const auto expected = net->forward(x);
  const auto plan = fusion::optimize(
      net, [&] { return net->forward(x); }, fast_options({"optimize.scale_ff"}));
  const std::string path = "optimize-test.plan.json";
  fusion::save_plan(plan, path);
  const fusion::Plan loaded = fusion::load_plan(path);
  std::remove(path.c_str());
  CHECK(fusion::plan_to_json(loaded) == fusion::plan_to_json(plan));

  // Deployment: another model of the architecture, another depth, no re-tuning.
  Net deeper(5);
  fusion::fuse_modules(deeper, loaded);
  CHECK(fusion::fused_chains(deeper).size() == 7);

  fusion::Plan with_defaults;
  with_defaults.rules.push_back({{"seq.0", "seq.1"},
                                 {fusion::ModuleSpec{{"x"}, {"y"}, {{0, fusion::box(0.5)}}},
                                  fusion::ModuleSpec{{"y"}, {"z"}, {{0, fusion::box(int64_t{2})}}}},
                                 {}});
  with_defaults.rules[0].options.policy = fusion::KernelPolicy::checked;
  const auto again = fusion::plan_from_json(fusion::plan_to_json(with_defaults));
  CHECK(again.rules[0].specs[0].defaults.at(0).toDouble() == 0.5);
  CHECK(again.rules[0].specs[1].defaults.at(0).toInt() == 2);
  CHECK(again.rules[0].options.policy == fusion::KernelPolicy::checked);

  Net fresh;
  auto refused = [&](fusion::Plan bad, const std::string& message) {
    CHECK_THROWS_WITH(fusion::fuse_modules(fresh, bad), Contains(message));
    CHECK(fusion::fused_chains(fresh).empty());
  };
  auto bad = loaded;
  bad.rules[0].options.kernel = "optimize.missing";
  refused(bad, "optimize.missing");
  bad = loaded;
  bad.rules[0].patterns[0] = "layers.*.scale";
  refused(bad, "layers.*.scale");
  bad = loaded;
  bad.rules[0].types[1] = "SomethingElseImpl";
  refused(bad, "rule #0 takes a SomethingElseImpl at 'blocks.0.ff'");

  std::string text = fusion::plan_to_json(plan);
  text.replace(text.find("\"version\": 1"), 12, "\"version\": 9");
  CHECK_THROWS_WITH(fusion::plan_from_json(text), Contains("has version 9"));
  CHECK_THROWS_WITH(fusion::plan_from_json("{\"format\": 1}"),
                    Contains("is not a torch-module-fusion plan"));
  CHECK_THROWS_WITH(fusion::plan_from_json("not json"), Contains("load_plan"));
  CHECK_THROWS_WITH(fusion::load_plan("/nonexistent/plan.json"),
                    Contains("cannot read '/nonexistent/plan.json'"));
  CHECK(torch::allclose(net->forward(x), expected, 1e-5, 1e-6));
}
