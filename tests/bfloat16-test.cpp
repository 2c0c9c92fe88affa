// The bfloat16 kernels (fusion/kernels/bfloat16.hpp): each 2d convolution kernel's ".bf16"
// variant against the float32 modules, the plan setting, verify's and the checked policy's
// tolerance, report, optimize's opt-in, and the float32 replay where bfloat16 is turned off.
#include "catch_compat.hpp"

#include <string>
#include <vector>

#include <fusion/fusion.hpp>
#include <fusion/hardswish.hpp>
#include <fusion/kernels/bfloat16.hpp>
#include <fusion/optimize.hpp>

#include "conv_chains.hpp"

using fusion_test::Contains;
using fusion_test::kernel;
using fusion_test::member_paths;
using fusion_test::randomize_batch_norm;
using fusion_test::specs;

namespace {

namespace nn = torch::nn;

// One convolution in bfloat16 (inputs and weights rounded to 8 bits of mantissa, float32
// accumulation): within 1e-2 of the largest output of the float32 modules.
constexpr double kBFloat16Tolerance = 1e-2;

void require_close_bf16(const torch::Tensor& got, const torch::Tensor& expected) {
  REQUIRE(got.scalar_type() == torch::kFloat32);
  REQUIRE(fusion_test::require_within(got, expected, kBFloat16Tolerance) > 0);  // computed in bf16
}

/// Conv2d (8 -> 16, kernel 3) [+ BatchNorm2d] [+ activation], eval mode.
fusion::Sequential conv_model(int64_t groups, int64_t stride, bool batch_norm,
                              const std::string& activation,
                              nn::detail::conv_padding_mode_t mode = torch::kZeros) {
  fusion::Sequential model;
  model->push_back(nn::Conv2d(
      nn::Conv2dOptions(8, 16, 3).groups(groups).stride(stride).padding(1).padding_mode(mode)));
  if (batch_norm) {
    model->push_back(nn::BatchNorm2d(16));
    randomize_batch_norm(*model->ptr(1));
  }
  if (activation == "relu") model->push_back(nn::ReLU());
  if (activation == "relu6") model->push_back(nn::ReLU6());
  if (activation == "silu") model->push_back(nn::SiLU());
  if (activation == "hardswish") model->push_back(fusion::Hardswish());
  if (activation == "leaky_relu") {
    model->push_back(nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.3)));
  }
  if (activation == "gelu") model->push_back(nn::GELU());
  model->eval();
  return model;
}

std::string kernel_name(bool batch_norm, const std::string& activation) {
  std::string name = batch_norm ? "fusion.conv2d_bn" : "fusion.conv2d";
  if (!activation.empty()) name += "_" + activation;
  return name + fusion::kernels::kBFloat16Suffix;
}

/// Skips (with a warning) where this CPU or LibTorch cannot compute in bfloat16.
bool bfloat16_here() {
  if (fusion::kernels::bfloat16_supported()) return true;
  WARN(
      "no AVX512_BF16 (or no oneDNN) here: the bfloat16 paths are not run; the float32 "
      "replay is tested by 'turned off, the bfloat16 kernels decline'");
  return false;
}

}  // namespace

TEST_CASE("the 2d convolution kernels' bfloat16 variants match the float32 modules", "[bfloat16]") {
  fusion::kernels::register_builtin_kernels();
  if (!bfloat16_here()) return;
  torch::manual_seed(71);
  struct Case {
    std::string name;
    int64_t groups, stride;
  };
  const auto kase = GENERATE(Case{"plain", 1, 1}, Case{"depthwise", 8, 1}, Case{"grouped", 2, 2});
  const bool batch_norm = GENERATE(true, false);
  const auto x = torch::randn({2, 8, 12, 12});
  for (const std::string activation :
       {"", "relu", "relu6", "silu", "hardswish", "leaky_relu", "gelu"}) {
    if (!batch_norm && activation.empty()) continue;  // no fusion.conv2d kernel
    const std::string name = kernel_name(batch_norm, activation);
    INFO(kase.name << ", " << name);
    auto model = conv_model(kase.groups, kase.stride, batch_norm, activation);
    torch::NoGradGuard no_grad;
    const auto original = model->forward(x);
    fusion::fuse_modules(model, member_paths(model->size()), specs(model->size()), kernel(name));
    require_close_bf16(model->forward(x), original);
    const auto channels_last = model->forward(x.contiguous(torch::MemoryFormat::ChannelsLast));
    CHECK(channels_last.is_contiguous(torch::MemoryFormat::ChannelsLast));
    require_close_bf16(channels_last.contiguous(), original);
    // oneDNN's layout in: a blocked result, in bfloat16 (what the block kernels hand on).
    const auto blocked = model->forward(x.to_mkldnn());
    CHECK(blocked.is_mkldnn());
    CHECK(blocked.scalar_type() == torch::kBFloat16);
    require_close_bf16(blocked.to_dense(torch::kFloat), original);
    // The library's primitive, the activation its post-op where oneDNN has one (oneDNN 2.x
    // builds; elsewhere not offered, and LibTorch's convolution runs).
    const auto previous =
        fusion::kernels::force_blocked_conv_path(fusion::kernels::BlockedConvPath::onednn);
    const auto primitive = model->forward(x.to_mkldnn());
    fusion::kernels::force_blocked_conv_path(previous);
    CHECK(primitive.scalar_type() == torch::kBFloat16);
    require_close_bf16(primitive.to_dense(torch::kFloat), original);
    const auto stats = fusion::fused_chains(model).at(0).stats;
    CHECK(stats.runs == 4);
    CHECK(stats.replays_declined == 0);
  }
}

TEST_CASE("fusion.linear.bf16 computes the Linear in bfloat16, and replays where it cannot",
          "[bfloat16]") {
  fusion::kernels::register_builtin_kernels();
  if (!bfloat16_here()) return;
  torch::manual_seed(72);
  fusion::Sequential model(nn::Linear(64, 40));
  model->eval();
  fusion::fuse_modules(model, {"0"}, specs(1), kernel("fusion.linear.bf16"));
  torch::NoGradGuard no_grad;
  for (const auto& x : {torch::randn({1, 64}), torch::randn({6, 64}), torch::randn({2, 3, 64})}) {
    const auto original = torch::linear(x, model->ptr<nn::LinearImpl>(0)->weight,
                                        model->ptr<nn::LinearImpl>(0)->bias);
    require_close_bf16(model->forward(x), original);
  }
  const auto stats = fusion::fused_chains(model).at(0).stats;
  CHECK(stats.runs == 3);
  CHECK(stats.state_bytes == (64 * 40 + 40) * 2);  // the weight and bias in bfloat16
  // Another dtype runs the module's own forward, and gets its error; so does another width.
  REQUIRE_THROWS_WITH(model->forward(torch::randn({2, 64}, torch::kFloat64)),
                      Contains("same dtype"));
  REQUIRE_THROWS_WITH(model->forward(torch::randn({1, 63})), Contains("64"));
}

TEST_CASE("a bfloat16 convolution kernel keeps half the weight bytes, and says what it computes in",
          "[bfloat16]") {
  fusion::kernels::register_builtin_kernels();
  if (!bfloat16_here()) return;
  torch::manual_seed(72);
  const auto x = torch::randn({1, 8, 10, 10});
  torch::NoGradGuard no_grad;
  auto float32 = conv_model(1, 1, true, "relu");
  auto bfloat16 = conv_model(1, 1, true, "relu");
  fusion::fuse_modules(float32, member_paths(3), specs(3), kernel("fusion.conv2d_bn_relu"));
  fusion::fuse_modules(bfloat16, member_paths(3), specs(3), kernel("fusion.conv2d_bn_relu.bf16"));
  float32->forward(x);
  bfloat16->forward(x);
  const auto f32 = fusion::fused_chains(float32).at(0);
  const auto bf16 = fusion::fused_chains(bfloat16).at(0);
  const uint64_t weights = 16 * 8 * 3 * 3, bias = 16;
  // float32: the folded weight, its channels-last copy and its form in oneDNN's layout (blocked,
  // at least the weight's bytes), the bias, and the weight LibTorch's prepacked convolution
  // packed for this input shape (counted as the weight's size).
  const uint64_t packed = fusion::detail::PrepackedConv2d::available() ? weights * 4 : 0;
  CHECK(f32.stats.state_bytes >= 3 * weights * 4 + bias * 4 + packed);
  CHECK(f32.stats.state_bytes <= 4 * weights * 4 + bias * 4 + packed);
  // bfloat16: half of that: the folded weight and its form in oneDNN's layout in bfloat16 (no
  // channels-last copy, no pack: LibTorch's prepacked convolution takes float32 only), the bias
  // in float32 (oneDNN adds it to the float32 accumulator).
  CHECK(bf16.stats.state_bytes >= 2 * weights * 2 + bias * 4);
  CHECK(bf16.stats.state_bytes <= 3 * weights * 2 + bias * 4);
  CHECK(2 * (bf16.stats.state_bytes - bias * 4) <= f32.stats.state_bytes - bias * 4 - packed);
  CHECK(f32.kernel_dtype.empty());
  CHECK(bf16.kernel_dtype == "BFloat16");
  CHECK_THAT(fusion::report(bfloat16),
             Contains("kernel fusion.conv2d_bn_relu.bf16 (computes in BFloat16): 1 run(s)"));
}

TEST_CASE("bfloat16 convolution kernels: other padding modes, odd inputs and training mode",
          "[bfloat16]") {
  fusion::kernels::register_builtin_kernels();
  if (!bfloat16_here()) return;
  torch::manual_seed(73);
  const auto x = torch::randn({2, 8, 9, 9});
  torch::NoGradGuard no_grad;
  SECTION("a padding mode oneDNN lacks: the dense convolution, bfloat16 weights") {
    auto model = conv_model(1, 1, true, "silu", torch::kReflect);
    const auto original = model->forward(x);
    fusion::fuse_modules(model, member_paths(3), specs(3), kernel("fusion.conv2d_bn_silu.bf16"));
    require_close_bf16(model->forward(x), original);
    CHECK(fusion::fused_chains(model).at(0).stats.runs == 1);
  }
  SECTION("inputs the module refuses get the module's error; unbatched ones the modules") {
    auto model = conv_model(1, 1, false, "relu6");
    fusion::fuse_modules(model, member_paths(2), specs(2), kernel("fusion.conv2d_relu6.bf16"));
    CHECK_THROWS_AS(model->forward(torch::randn({2, 5, 9, 9})), c10::Error);  // 5 channels
    fusion::unfuse_modules(model);
    const auto unbatched = model->forward(x[0]);
    fusion::fuse_modules(model, member_paths(2), specs(2), kernel("fusion.conv2d_relu6.bf16"));
    CHECK(torch::equal(model->forward(x[0]), unbatched));
  }
  SECTION("training mode replays (batch statistics)") {
    auto model = conv_model(1, 1, true, "");
    fusion::fuse_modules(model, member_paths(2), specs(2), kernel("fusion.conv2d_bn.bf16"));
    model->train();
    model->forward(x);
    CHECK(fusion::fused_chains(model).at(0).stats.replays_training == 1);
  }
}

TEST_CASE("turned off, the bfloat16 kernels decline and their chains replay in float32",
          "[bfloat16]") {
  fusion::kernels::register_builtin_kernels();
  torch::manual_seed(74);
  const bool before = fusion::kernels::set_bfloat16(false);
  CHECK_FALSE(fusion::kernels::bfloat16_supported());
  auto model = conv_model(1, 1, true, "relu");
  const auto x = torch::randn({1, 8, 10, 10});
  torch::NoGradGuard no_grad;
  const auto original = model->forward(x);
  fusion::fuse_modules(model, member_paths(3), specs(3), kernel("fusion.conv2d_bn_relu.bf16"));
  CHECK(torch::equal(model->forward(x), original));
  const auto stats = fusion::fused_chains(model).at(0).stats;
  CHECK(stats.runs == 0);
  CHECK(stats.replays_declined == 1);
  fusion::kernels::set_bfloat16(before);
}

TEST_CASE("in_bfloat16 puts a plan's kernels on their bfloat16 variants", "[bfloat16]") {
  fusion::Plan plan;
  plan.rules.push_back({{"0", "1", "2"}, specs(3), kernel("fusion.conv2d_bn_relu")});
  plan.rules.push_back({{"3", "4"}, specs(2), {}});  // replays: as it is
  plan.rules.push_back({{"5", "6"}, specs(2), kernel("fusion.conv2d_bn.bf16")});  // already
  const auto bf16 = fusion::kernels::in_bfloat16(plan);
  CHECK(bf16.rules[0].options.kernel == "fusion.conv2d_bn_relu.bf16");
  CHECK(bf16.rules[1].options.kernel.empty());
  CHECK(bf16.rules[2].options.kernel == "fusion.conv2d_bn.bf16");
  plan.rules.push_back({{"7", "8"}, specs(2), kernel("fusion.conv1d_bn")});
  CHECK_THROWS_WITH(fusion::kernels::in_bfloat16(plan),
                    Contains("rule #3 (patterns [7, 8]) uses kernel 'fusion.conv1d_bn', which has "
                             "no bfloat16 variant ('fusion.conv1d_bn.bf16' is not registered)"));
}

TEST_CASE("verify and the checked policy compare a bfloat16 kernel within bfloat16's tolerance",
          "[bfloat16]") {
  fusion::kernels::register_builtin_kernels();
  if (!bfloat16_here()) return;
  torch::manual_seed(75);
  auto model = conv_model(1, 1, true, "relu6");
  const auto x = torch::randn({2, 8, 10, 10});
  torch::NoGradGuard no_grad;
  const auto original = model->forward(x);
  fusion::FuseOptions options = kernel("fusion.conv2d_bn_relu6.bf16");
  fusion::fuse_modules(model, member_paths(3), specs(3), options);
  const auto run = [&] { return model->forward(x); };
  const auto report = fusion::verify(model, run);
  INFO(report.to_string());
  CHECK(report.ok());
  CHECK(report.chains.at(0).kernel_ran);
  CHECK(report.chains.at(0).max_abs_diff > 1e-5 * original.abs().max().item<double>());
  // Held to float32's tolerance, it fails: the precision is what it costs.
  CHECK_FALSE(fusion::verify(model, run, 1e-5 * original.abs().max().item<double>()).ok());

  fusion::unfuse_modules(model);
  options.policy = fusion::KernelPolicy::checked;
  fusion::fuse_modules(model, member_paths(3), specs(3), options);
  require_close_bf16(model->forward(x), original);
  CHECK(fusion::fused_chains(model).at(0).stats.checks == 1);
}

TEST_CASE("optimize tries bfloat16 kernels only when named", "[bfloat16][optimize]") {
  fusion::kernels::register_builtin_kernels();
  if (!bfloat16_here()) return;
  torch::manual_seed(76);
  auto model = conv_model(1, 1, true, "relu");
  const auto x = torch::randn({1, 8, 16, 16});
  torch::NoGradGuard no_grad;
  const auto run = [&] { return model->forward(x); };
  fusion::OptimizeOptions options;
  options.time_budget = std::chrono::milliseconds(1000);
  options.min_speedup = -1;  // keep what verifies: this test is about which kernels are tried
  auto plan = fusion::optimize(model, run, options);
  INFO(fusion::to_string(plan));
  REQUIRE(plan.rules.size() == 1);
  CHECK(plan.rules[0].options.kernel == "fusion.conv2d_bn_relu");
  fusion::unfuse_modules(model);
  options.kernels = {"fusion.conv2d_bn_relu.bf16"};
  plan = fusion::optimize(model, run, options);
  INFO(fusion::to_string(plan));
  REQUIRE(plan.rules.size() == 1);
  CHECK(plan.rules[0].options.kernel == "fusion.conv2d_bn_relu.bf16");
}
