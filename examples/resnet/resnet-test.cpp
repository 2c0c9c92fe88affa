// The ResNet-18 example: torchvision's names, the folding plan, the reused-ReLU trap, checkpoints.
#include "catch_compat.hpp"

#include <filesystem>
#include <fstream>

#include <fusion/kernels/bfloat16.hpp>

#include "resnet.hpp"

using fusion_test::Contains;

namespace {

namespace fs = std::filesystem;

fs::path scratch(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("fusion-resnet-test-" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

resnet::ResNet18 random_model(uint64_t seed) {
  resnet::ResNet18 model;
  resnet::init_random(*model, seed);
  model->eval();
  return model;
}

// Folded kernels over 20 layers: within 1e-4 of the largest logit (float32).
void require_close(const torch::Tensor& got, const torch::Tensor& expected) {
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  const double diff = (got - expected).abs().max().item<double>();
  INFO("max abs diff " << diff << ", largest logit " << scale);
  REQUIRE(diff <= 1e-4 * scale);
}

}  // namespace

TEST_CASE("the ResNet-18 port has torchvision's parameter and buffer names") {
  resnet::ResNet18 model;
  const auto params = model->named_parameters();
  const auto buffers = model->named_buffers();
  CHECK(params.size() == 62);
  CHECK(buffers.size() == 60);  // running_mean, running_var, num_batches_tracked of 20 norms
  for (const char* key :
       {"conv1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer1.1.bn2.weight",
        "layer2.0.downsample.0.weight", "layer4.1.conv2.weight", "fc.weight", "fc.bias"}) {
    INFO(key);
    CHECK(params.contains(key));
  }
  for (const char* key : {"bn1.running_mean", "layer2.0.downsample.1.running_var",
                          "layer4.1.bn2.num_batches_tracked"}) {
    INFO(key);
    CHECK(buffers.contains(key));
  }
  CHECK_FALSE(params.contains("layer1.0.downsample.0.weight"));  // no downsample: same shape
}

TEST_CASE("the folding plan fuses 20 chains whose kernels match the unfused network") {
  torch::NoGradGuard no_grad;
  auto model = random_model(50);
  const auto images = torch::randn({2, 3, 64, 64});
  const auto original = model(images);
  fusion::kernels::register_builtin_kernels();
  const auto chains = fusion::fuse_modules(model, resnet::folding_plan());
  CHECK(chains.size() == 20);
  require_close(model(images), original);
  for (const auto& chain : fusion::fused_chains(model)) {
    INFO(fusion::to_string(chain));
    CHECK(chain.stats.runs == 1);
  }
  SECTION("a clone is fused the same way through plan_of") {
    auto copy = std::dynamic_pointer_cast<resnet::ResNet18Impl>(model->clone());
    fusion::fuse_modules(*copy, fusion::plan_of(model));
    CHECK(fusion::fused_chains(*copy).size() == 20);
    require_close(copy->forward(images), original);
  }
  SECTION("oneDNN's layout in: the kernels keep it from one convolution to the next") {
    if (!at::hasMKLDNN()) {
      WARN("this LibTorch has no oneDNN: skipped");
      return;
    }
    // LibTorch 2.14 dispatches max_pool2d on oneDNN tensors only in InferenceMode (outside it,
    // "Ambiguity in AutogradOther kernel").
    c10::InferenceMode inference;
    require_close(model(images.to_mkldnn()), original);
    for (const auto& chain : fusion::fused_chains(model)) CHECK(chain.stats.runs == 2);
  }
  SECTION("unfused again, the network is exactly the original") {
    fusion::unfuse_modules(model);
    CHECK(torch::equal(model(images), original));
  }
}

TEST_CASE("block_plan in bfloat16: activations blocked in bfloat16 from block to block",
          "[bfloat16]") {
  if (!fusion::kernels::bfloat16_supported()) {
    WARN("no AVX512_BF16 (or no oneDNN) here: skipped");
    return;
  }
  torch::NoGradGuard no_grad;
  auto model = random_model(55);
  const auto images = torch::randn({2, 3, 64, 64});
  const auto original = model(images);
  const double largest = original.abs().max().item<double>();
  // 20 convolutions in bfloat16: within bfloat16's default tolerance of the largest logit.
  const auto require_bf16_close = [&](const torch::Tensor& logits) {
    CHECK(logits.scalar_type() == torch::kFloat32);
    CHECK_FALSE(logits.is_mkldnn());
    const double diff = (logits - original).abs().max().item<double>();
    INFO("max abs diff " << diff << ", largest logit " << largest);
    CHECK(diff > 0);
    CHECK(diff <= fusion::default_tolerance(torch::kBFloat16) * largest);
  };
  auto plan = fusion::kernels::in_bfloat16(resnet::block_plan());
  SECTION("every chain in bfloat16") {
    fusion::fuse_modules(model, plan);
    require_bf16_close(model(images));
    for (const auto& chain : fusion::fused_chains(model)) {
      INFO(fusion::to_string(chain));
      CHECK(chain.stats.runs == 1);
      CHECK(chain.kernel_dtype == "BFloat16");
    }
    const auto report = fusion::verify(model, [&] { return model(images); });
    INFO(report.to_string());
    CHECK(report.ok());
  }
  SECTION("the stem in bfloat16, the blocks in float32: the hand-off converts") {
    plan.rules[1].options.kernel = "resnet.basic_block";
    fusion::fuse_modules(model, plan);
    require_bf16_close(model(images));
    for (const auto& chain : fusion::fused_chains(model)) CHECK(chain.stats.runs == 1);
  }
}

TEST_CASE("fusing a block's conv1, bn1 and its twice-called relu stays exact") {
  // torchvision's BasicBlock calls one ReLU module after bn1 and again after the residual add.
  // torch.ao's fuse_modules([conv1, bn1, relu]) folds the relu into conv1 and makes relu an
  // Identity, so the second call no longer applies a ReLU and the logits are silently wrong.
  // Here the second call comes outside a pass of the chain (no conv1 before it), with a real
  // argument: the relu runs unfused, as in the original model.
  torch::NoGradGuard no_grad;
  auto model = random_model(51);
  const auto images = torch::randn({1, 3, 64, 64});
  const auto original = model(images);
  const std::vector<fusion::ModuleSpec> specs(3, resnet::tensor_spec());
  fusion::fuse_modules(model, {"layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu"}, specs);
  CHECK(torch::equal(model(images), original));
  fusion::kernels::register_builtin_kernels();
  fusion::use_kernel(model, {"layer1.0.conv1"}, "fusion.conv2d_bn_relu");
  CHECK(torch::allclose(model(images), original, 1e-4, 1e-4));
  const auto report = fusion::verify(model, [&] { return model(images); });
  CHECK(report.ok());
  CHECK(report.chains[0].kernel_ran);
  fusion::unfuse_modules(model);
  CHECK(torch::equal(model(images), original));
}

TEST_CASE("a torchvision state_dict in safetensors loads, num_batches_tracked included") {
  torch::NoGradGuard no_grad;
  auto source = random_model(52);
  const auto images = torch::randn({1, 3, 64, 64});
  const auto expected = source(images);
  std::vector<std::pair<std::string, torch::Tensor>> state;
  for (const auto& item : source->named_parameters()) state.emplace_back(item.key(), item.value());
  for (const auto& item : source->named_buffers()) state.emplace_back(item.key(), item.value());
  const auto dir = scratch("state");
  checkpoint::save_safetensors(state, dir / "model.safetensors");

  auto target = random_model(53);
  resnet::load_weights(*target, dir);
  CHECK(torch::equal(target(images), expected));
  CHECK(target->named_buffers()["bn1.num_batches_tracked"].scalar_type() == torch::kInt64);

  SECTION("a checkpoint without the buffers does not fit, and changes nothing") {
    std::vector<std::pair<std::string, torch::Tensor>> params_only;
    for (const auto& item : source->named_parameters()) {
      params_only.emplace_back(item.key(), item.value());
    }
    const auto partial = scratch("partial");
    checkpoint::save_safetensors(params_only, partial / "model.safetensors");
    auto untouched = random_model(54);
    const auto before = untouched(images);
    CHECK_THROWS_WITH(
        resnet::load_weights(*untouched, partial),
        Contains("missing keys [bn1.running_mean, bn1.running_var, bn1.num_batches_tracked"));
    CHECK(torch::equal(untouched(images), before));
  }
}
