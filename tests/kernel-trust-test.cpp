// Kernels are never silently wrong: a replaced tensor is seen whatever address its bytes get, the
// writes no stamp can see are named (inference tensors, writes through .data()), verify fails a
// kernel it did not run, a kernel's result is checked against the replay, the built-in folding
// kernels refuse what the modules refuse, and fusion changes under load wait instead of failing.
#include "catch_compat.hpp"

#include <torch/version.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include <fusion/kernels/batch_norm_folding.hpp>

#include "forward_runners.hpp"
#include "models.hpp"

using namespace models;
using fusion_test::Contains;

namespace {

/// A linear layer as a model's head: one member, its kernel keeps a derived copy of the weight,
/// so a stale state shows in the result.
struct HeadImpl : torch::nn::Module {
  HeadImpl(int64_t in, int64_t out) {
    linear = fusion::register_slot(
        *this, "linear", torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return linear(x); }
  fusion::Slot<torch::nn::Linear> linear;
};
TORCH_MODULE(Head);

struct CopiedWeight {
  struct State {
    torch::Tensor weight;
    std::vector<torch::Tensor> tensors() const { return {weight}; }
  };
  State prepare(torch::nn::LinearImpl& linear) const { return {linear.weight.clone()}; }
  torch::Tensor operator()(const State& s, torch::nn::LinearImpl&, const torch::Tensor& x) const {
    return torch::linear(x, s.weight);
  }
};

/// Right but for a shift of 1e-3: what only a comparison of values finds.
struct ShiftedNormMLP {
  torch::Tensor operator()(RMSNormImpl& norm, MLPImpl& mlp, const torch::Tensor& x) const {
    return mlp.forward(norm.forward(x)) + 1e-3;
  }
};
/// The right values, reduced over the hidden size: [B, T, 1] for [B, T, H], which a parent's
/// residual add would broadcast.
struct KeepdimNormMLP {
  torch::Tensor operator()(RMSNormImpl& norm, MLPImpl& mlp, const torch::Tensor& x) const {
    return mlp.forward(norm.forward(x)).sum(-1, true);
  }
};
struct RightNormMLP {
  torch::Tensor operator()(RMSNormImpl& norm, MLPImpl& mlp, const torch::Tensor& x) const {
    return mlp.forward(norm.forward(x));
  }
};
struct NeverNormMLP {
  bool applies(RMSNormImpl&, MLPImpl&) const { return false; }
  torch::Tensor operator()(RMSNormImpl& norm, MLPImpl& mlp, const torch::Tensor& x) const {
    return mlp.forward(norm.forward(x));
  }
};
struct ThrowingNormMLP {
  torch::Tensor operator()(RMSNormImpl&, MLPImpl&, const torch::Tensor&) const {
    throw std::runtime_error("kernel failed");
  }
};

void register_trust_kernels() {
  fusion::register_kernels_once("test.trust", [] {
    fusion::register_kernel("trust.copied_weight", CopiedWeight{});
    fusion::register_kernel("trust.shifted", ShiftedNormMLP{});
    fusion::register_kernel("trust.keepdim", KeepdimNormMLP{});
    fusion::register_kernel("trust.right", RightNormMLP{});
    fusion::register_kernel("trust.never", NeverNormMLP{});
    fusion::register_kernel("trust.throwing", ThrowingNormMLP{});
    fusion::kernels::register_builtin_kernels();
  });
}

fusion::FuseOptions with_kernel(const std::string& name,
                                fusion::KernelPolicy policy = fusion::KernelPolicy::fallback) {
  fusion::FuseOptions options;
  options.kernel = name;
  options.policy = policy;
  return options;
}

Head fused_head(int64_t in, int64_t out) {
  Head head(in, out);
  head->eval();
  fusion::fuse_modules(head, {"linear"}, {fusion::ModuleSpec{{"x"}, {"x"}}},
                       with_kernel("trust.copied_weight"));
  return head;
}

/// The kernel's result against the module's own forward, now.
void require_fresh(Head& head, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  const auto fused = head(x);
  const auto direct = head->linear->forward(x);
  INFO("max abs diff " << (fused - direct).abs().max().item<double>());
  REQUIRE(torch::allclose(fused, direct, 1e-5, 1e-5));
}

// c10's warning handler changed shape in LibTorch 2: its namespace and process()'s parameters.
#if TORCH_VERSION_MAJOR >= 2
namespace warning_utils = c10::WarningUtils;
#else
namespace warning_utils = c10::Warning;
#endif
struct CapturedWarnings : c10::WarningHandler {
#if TORCH_VERSION_MAJOR >= 2
  void process(const c10::Warning& warning) override { messages.push_back(warning.msg()); }
#else
  void process(const c10::SourceLocation&, const std::string& message, const bool) override {
    messages.push_back(message);
  }
#endif
  std::vector<std::string> messages;
};

}  // namespace

TEST_CASE("a replaced weight is seen whatever address the allocator gives its bytes") {
  register_trust_kernels();
  torch::manual_seed(50);
  SECTION("a 48 MiB weight replaced twice with set_data") {
    auto head = fused_head(1024, 12288);
    const auto x = torch::randn({2, 1024});
    require_fresh(head, x);
    for (int round = 0; round < 2; ++round) {
      torch::NoGradGuard no_grad;
      head->linear->weight.set_data(torch::randn({12288, 1024}));
      require_fresh(head, x);
    }
  }
  SECTION("an 8 KiB weight replaced twice, seven times over") {
    for (int run = 0; run < 7; ++run) {
      auto head = fused_head(32, 64);
      const auto x = torch::randn({3, 32});
      require_fresh(head, x);
      for (int round = 0; round < 2; ++round) {
        torch::NoGradGuard no_grad;
        head->linear->weight.set_data(torch::randn({64, 32}));
        require_fresh(head, x);
      }
    }
  }
  SECTION("to(kHalf) then to(kFloat)") {
    auto head = fused_head(64, 64);
    const auto x = torch::randn({3, 64});
    require_fresh(head, x);
    head->to(torch::kHalf);
    head->to(torch::kFloat);
    require_fresh(head, x);  // the weights rounded to half precision, as the module has them
  }
  SECTION("copy_ into the weight, and a load loop assigning each parameter") {
    auto head = fused_head(32, 64);
    const auto x = torch::randn({3, 32});
    require_fresh(head, x);
    {
      torch::NoGradGuard no_grad;
      head->linear->weight.copy_(torch::randn({64, 32}));
    }
    require_fresh(head, x);
    {
      torch::NoGradGuard no_grad;
      for (auto& item : head->named_parameters())
        item.value().set_data(torch::randn_like(item.value()));
    }
    require_fresh(head, x);
  }
  SECTION("a replaced weight's bytes are freed: the stamp keeps no storage alive") {
    auto head = fused_head(1024, 4096);
    const auto x = torch::randn({2, 1024});
    require_fresh(head, x);
    const auto old = head->linear->weight.storage().getWeakStorageImpl();
    {
      torch::NoGradGuard no_grad;
      head->linear->weight.set_data(torch::randn({4096, 1024}));
    }
    CHECK(old.expired());  // before the next call: the prepared state's copy is its own
    require_fresh(head, x);
    CHECK(old.expired());
    CHECK(fusion::fused_chains(head)[0].stats.prepares == 2);
  }
}

TEST_CASE("inference tensors: an in-place write is not seen, and fusion says so") {
  register_trust_kernels();
  torch::manual_seed(51);
  c10::InferenceMode inference;
  Head head(32, 64);
  head->eval();
  CapturedWarnings warnings;
  {
    const warning_utils::WarningHandlerGuard guard(&warnings);
    fusion::fuse_modules(head, {"linear"}, {fusion::ModuleSpec{{"x"}, {"x"}}},
                         with_kernel("trust.copied_weight"));
  }
  REQUIRE(warnings.messages.size() == 1);
  CHECK_THAT(warnings.messages[0],
             Contains("kernel 'trust.copied_weight' on chain [linear]: 1 of the members' 1 "
                      "parameters and buffers are inference tensors"));
  CHECK_THAT(warnings.messages[0], Contains("Call fusion::refresh_kernels after such a write"));
  CHECK(fusion::fused_chains(head)[0].stats.unversioned_tensors == 1);
  CHECK_THAT(fusion::report(head),
             Contains("note: 1 member tensor(s) are inference tensors: in-place writes to them "
                      "are not seen; call fusion::refresh_kernels after one"));
  const auto x = torch::randn({3, 32});
  require_fresh(head, x);
  head->linear->weight.copy_(torch::randn({64, 32}));  // an in-place reload: no version to see
  fusion::refresh_kernels(head);
  require_fresh(head, x);
  // A replacement is seen all the same: it is another storage.
  head->linear->weight.set_data(torch::randn({64, 32}));
  require_fresh(head, x);
}

TEST_CASE("an optimizer step without a forward in between needs refresh_kernels") {
  register_trust_kernels();
  torch::manual_seed(52);
  auto head = fused_head(32, 64);
  const auto x = torch::randn({3, 32});
  require_fresh(head, x);
  // Gradients from elsewhere (another process, accumulated by hand), then LibTorch's SGD, which
  // writes through .data(): no stamp moves, and no forward with gradients ran.
  torch::optim::SGD sgd(head->parameters(), 0.5);
  for (auto& p : head->parameters()) p.mutable_grad() = torch::randn_like(p);
  sgd.step();
  fusion::refresh_kernels(head);
  require_fresh(head, x);
}

TEST_CASE("a layer norm + linear chain in train() under NoGradGuard is prepared once") {
  register_trust_kernels();
  torch::manual_seed(53);
  struct NormLinearImpl : torch::nn::Module {
    NormLinearImpl() {
      norm = fusion::register_slot(*this, "norm",
                                   torch::nn::LayerNorm(torch::nn::LayerNormOptions({16})));
      linear = fusion::register_slot(*this, "linear", torch::nn::Linear(16, 8));
    }
    torch::Tensor forward(const torch::Tensor& x) { return linear(norm(x)); }
    fusion::Slot<torch::nn::LayerNorm> norm;
    fusion::Slot<torch::nn::Linear> linear;
  };
  auto model = std::make_shared<NormLinearImpl>();
  model->train();
  fusion::fuse_modules(*model, {"norm", "linear"},
                       {fusion::ModuleSpec{{"x"}, {"x"}}, fusion::ModuleSpec{{"x"}, {"x"}}},
                       with_kernel("fusion.layernorm_linear"));
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({4, 16});
  for (int i = 0; i < 5; ++i) model->forward(x);
  const auto stats = fusion::fused_chains(*model)[0].stats;
  CHECK(stats.runs == 5);
  CHECK(stats.prepares == 1);
}

TEST_CASE("verify fails a kernel it could not run, and checks the others where they apply") {
  register_trust_kernels();
  torch::manual_seed(54);
  Stack model(2);
  model->train();  // and grad mode on: no kernel here registered for either applies as called
  const auto x = torch::randn({2, 5, 16});
  fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("trust.right"));
  fusion::use_kernel(model, {"layers.1.*"}, "trust.shifted");
  const auto report = fusion::verify(model, [&] { return model(x); });
  REQUIRE(report.chains.size() == 2);
  CHECK(report.chains[0].ok);  // within the float32 default tolerance, checked in eval()
  CHECK(report.chains[0].kernel_ran);
  CHECK(report.chains[0].kernel_in_eval);
  CHECK_FALSE(report.chains[1].ok);
  CHECK(report.chains[1].max_abs_diff > 5e-4);
  CHECK_THAT(report.to_string(),
             Contains("FAIL [layers.1.post_attention_layernorm -> layers.1.mlp] kernel "
                      "'trust.shifted' (checked in eval() under NoGradGuard): max abs diff"));
  CHECK(model->is_training());  // verify put the training flags back
  CHECK(model->block(1).mlp->is_training());

  // A kernel that never applies is not checked, and so does not pass.
  fusion::use_kernel(model, {"layers.*.mlp"}, "trust.never");
  const auto never = fusion::verify(model, [&] { return model(x); });
  CHECK_FALSE(never.ok());
  CHECK_FALSE(never.chains[0].kernel_ran);
  CHECK_THAT(never.to_string(), Contains("kernel 'trust.never' (did not run: not checked)"));
  fusion::VerifyOptions lenient;
  lenient.require_kernel_run = false;
  CHECK(fusion::verify(
            model, [&] { return model(x); }, lenient)
            .ok());

  // The default tolerance is relative and per dtype: a correct float64 kernel passes it.
  fusion::use_kernel(model, {"layers.*.mlp"}, "trust.right");
  model->to(torch::kDouble);
  const auto xd = x.to(torch::kDouble);
  CHECK(fusion::verify(model, [&] { return model(xd); }).ok());
}

TEST_CASE("a kernel's result is checked against the replay: shape on first use, values if asked") {
  register_trust_kernels();
  torch::manual_seed(55);
  Stack model(2);
  model->eval();
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 5, 16});
  const auto expected = model(x);
  fusion::fuse_modules(model, block_patterns(), block_specs(), with_kernel("trust.keepdim"));
  CHECK_THROWS_WITH(model(x),
                    Contains("fused chain [layers.0.post_attention_layernorm -> layers.0.mlp]: "
                             "kernel 'trust.keepdim' gave a result unlike the replay's: output #0 "
                             "is a Float tensor of shape [2, 5, 1] on cpu where the replay gives "
                             "a Float tensor of shape [2, 5, 16] on cpu"));
  CHECK_THROWS_WITH(model(x), Contains("kernel 'trust.keepdim' gave a result unlike"));  // again

  // A right kernel is checked once after its prepare, then runs alone.
  fusion::use_kernel(model, {"**"}, "trust.right");
  for (int i = 0; i < 3; ++i) CHECK(torch::allclose(model(x), expected, 1e-5, 1e-5));
  CHECK(fusion::fused_chains(model)[0].stats.checks == 1);
  CHECK(fusion::fused_chains(model)[0].stats.runs == 3);

  // The checked policy compares values on every call.
  fusion::use_kernel(model, {"**"}, "trust.shifted", fusion::KernelPolicy::checked);
  CHECK_THROWS_WITH(model(x), Contains("kernel 'trust.shifted' (checked policy): output #0 "
                                       "differs from the replay by 0.00"));
  fusion::use_kernel(model, {"**"}, "trust.right", fusion::KernelPolicy::checked);
  for (int i = 0; i < 2; ++i) CHECK(torch::allclose(model(x), expected, 1e-5, 1e-5));
  CHECK(fusion::fused_chains(model)[1].stats.checks == 2);

  // report counts a kernel's exceptions.
  fusion::use_kernel(model, {"**"}, "trust.throwing");
  CHECK_THROWS_WITH(model(x), Contains("kernel failed"));
  CHECK(fusion::fused_chains(model)[0].stats.exceptions == 1);
  CHECK_THAT(fusion::report(model), Contains("0 run(s), 1 exception(s)"));
  fusion::use_kernel(model, {"**"}, "trust.right");
  CHECK(torch::allclose(model(x), expected, 1e-5, 1e-5));
}

TEST_CASE("folding kernels refuse what the modules refuse, with the modules' errors") {
  register_trust_kernels();
  torch::manual_seed(56);
  namespace nn = torch::nn;
  auto model = fusion::Sequential(nn::Conv2d(nn::Conv2dOptions(3, 16, 3).stride(4)),
                                  nn::BatchNorm2d(16), nn::ReLU());
  model->eval();
  const auto error_of = [&](const torch::Tensor& input) -> std::string {
    torch::NoGradGuard no_grad;
    try {
      model->forward(input);
    } catch (const fusion::FusionError& e) {
      return std::string("FusionError: ") + e.what();
    } catch (const c10::Error& e) {
      return e.what_without_backtrace();
    }
    return "no error";
  };
  const std::vector<torch::Tensor> bad_inputs{
      torch::randn({3, 16, 16}),     // unbatched: Conv2d takes it, BatchNorm2d refuses it
      torch::randn({1, 4, 16, 16}),  // 4 channels for a convolution over 3
      torch::randn({1, 3, 2, 2}),    // smaller than the kernel
      torch::randn({0, 3, 16, 16}),  // an empty batch: no error, an empty result
  };
  std::vector<std::string> unfused;
  for (const auto& input : bad_inputs) unfused.push_back(error_of(input));
  CHECK_THAT(unfused[0], Contains("expected 4D input (got 3D input)"));
  CHECK_THAT(unfused[1], Contains("channels"));
  fusion::fuse_modules(*model, {"0", "1", "2"},
                       std::vector<fusion::ModuleSpec>(3, fusion::ModuleSpec{{"x"}, {"x"}}),
                       with_kernel("fusion.conv2d_bn_relu"));
  for (std::size_t i = 0; i < bad_inputs.size(); ++i) {
    INFO("input " << i);
    CHECK(error_of(bad_inputs[i]) == unfused[i]);
  }
  torch::NoGradGuard no_grad;
  CHECK(model->forward(bad_inputs[3]).sizes() == std::vector<int64_t>{0, 16, 4, 4});
}

TEST_CASE("use_kernel on modules that are not fused says so") {
  register_trust_kernels();
  Stack model(2);
  CHECK_THROWS_WITH(fusion::use_kernel(model, {"layers.*.mlp"}, "trust.right"),
                    Contains("patterns [layers.*.mlp] select no fused chain under the root: they "
                             "match 2 module(s) [layers.0.mlp, layers.1.mlp], none of them fused "
                             "(fuse_modules first)"));
  CHECK_THROWS_WITH(fusion::use_kernel(model, {"layers.*.ffn"}, "trust.right"),
                    Contains("select no fused chain under the root: they match no module"));
}

TEST_CASE(
    "fusion changed with a wait while 4 threads run the model: every change made, every "
    "forward exact",
    "[threads]") {
  register_trust_kernels();
  torch::manual_seed(57);
  Stack model(3);
  model->eval();
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> inputs, expected;
  for (int i = 0; i < 8; ++i) {
    inputs.push_back(torch::randn({1 + i % 3, 16}));
    expected.push_back(model(inputs.back()));
  }
  fusion_test::ForwardRunners<Stack> runners(model, inputs, expected, 1e-5, 1e-5);
  const auto wait = std::chrono::seconds(20);
  // Fewer cycles under ThreadSanitizer (scripts/run-sanitizers sets FUSION_STRESS_FORWARDS).
  const int cycles = std::getenv("FUSION_STRESS_FORWARDS") != nullptr ? 10 : 50;
  int changes = 0;
  for (int i = 0; i < cycles; ++i) {
    fusion::fuse_modules(model, block_patterns(), block_specs());
    fusion::use_kernel(model, {"**"}, "trust.right", fusion::KernelPolicy::fallback, wait);
    fusion::use_kernel(model, {"**"}, "", fusion::KernelPolicy::fallback, wait);
    CHECK(fusion::unfuse_modules(model, wait) == 3);
    changes += 4;
  }
  runners.stop();
  INFO(runners.forwards << " forwards, " << changes << " changes");
  CHECK(changes == 4 * cycles);
  CHECK(runners.failed == 0);
  CHECK(runners.wrong == 0);
  CHECK(runners.forwards > 0);
}
