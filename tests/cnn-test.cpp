// fusion::Sequential and the built-in CNN kernels: conv (+ batch norm) (+ an activation), conv
// transpose + batch norm, linear + batch norm, layer norm + linear.
#include "catch_compat.hpp"

#include <atomic>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fusion/fusion.hpp>
#include <fusion/hardswish.hpp>
#include <fusion/kernels/batch_norm_folding.hpp>
#include <fusion/optimize.hpp>

#include "conv_chains.hpp"

using fusion_test::Contains;
using fusion_test::kernel;
using fusion_test::member_paths;
using fusion_test::randomize_batch_norm;
using fusion_test::specs;

namespace {

namespace nn = torch::nn;

// Folded kernels compute with other weights than the modules: compared within this tolerance,
// relative to the largest output (float32).
constexpr double kRelativeTolerance = 1e-5;

void require_close(const torch::Tensor& got, const torch::Tensor& expected) {
  fusion_test::require_within(got, expected, kRelativeTolerance);
}

fusion::KernelStats stats_of(fusion::SequentialImpl& model) {
  return fusion::fused_chains(model).at(0).stats;
}

/// A block as CNNs write it: named children, some in a fusion::Sequential.
struct StemImpl : nn::Cloneable<StemImpl> {
  StemImpl() { reset(); }
  void reset() override {
    conv = fusion::register_slot(*this, "conv", nn::Conv2d(nn::Conv2dOptions(3, 8, 3).bias(false)));
    bn = fusion::register_slot(*this, "bn", nn::BatchNorm2d(8));
    features = register_module("features",
                               fusion::Sequential(nn::Conv2d(nn::Conv2dOptions(8, 8, 3).padding(1)),
                                                  nn::BatchNorm2d(8), nn::ReLU()));
  }
  torch::Tensor forward(const torch::Tensor& x) { return features->forward(bn(conv(x))); }
  fusion::Slot<nn::Conv2d> conv;
  fusion::Slot<nn::BatchNorm2d> bn;
  fusion::Sequential features{nullptr};
};
TORCH_MODULE(Stem);

/// An activation as the kernel names call it, and a fresh module computing it. LeakyReLU and
/// GELU with options other than their defaults: a kernel that ignored them would differ.
struct Activation {
  std::string name;
  std::function<void(fusion::SequentialImpl&)> push;
};

std::vector<Activation> activations() {
  return {
      {"relu", [](fusion::SequentialImpl& s) { s.push_back(nn::ReLU()); }},
      {"relu6", [](fusion::SequentialImpl& s) { s.push_back(nn::ReLU6()); }},
      {"silu", [](fusion::SequentialImpl& s) { s.push_back(nn::SiLU()); }},
      {"hardswish", [](fusion::SequentialImpl& s) { s.push_back(fusion::Hardswish()); }},
      {"leaky_relu",
       [](fusion::SequentialImpl& s) {
         s.push_back(nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.3)));
       }},
      {"gelu", [](fusion::SequentialImpl& s) { s.push_back(nn::GELU()); }},
      {"gelu",  // the tanh approximation
       [](fusion::SequentialImpl& s) {
         s.push_back(nn::GELU(nn::GELUOptions().approximate("tanh")));
       }},
  };
}

/// Conv{dims}d (+ BatchNorm) with these options, 8 -> 16 channels, kernel 3, padding 1.
template <typename Options>
Options conv_options(Options options, int64_t groups, int64_t stride, int64_t dilation, bool bias) {
  return options.stride(stride).dilation(dilation).groups(groups).padding(1).bias(bias);
}

void push_conv(fusion::SequentialImpl& model, int64_t dims, int64_t groups, int64_t stride,
               int64_t dilation, bool bias, bool batch_norm) {
  if (dims == 1) {
    model.push_back(
        nn::Conv1d(conv_options(nn::Conv1dOptions(8, 16, 3), groups, stride, dilation, bias)));
    if (batch_norm) model.push_back(nn::BatchNorm1d(16));
  } else if (dims == 2) {
    model.push_back(
        nn::Conv2d(conv_options(nn::Conv2dOptions(8, 16, 3), groups, stride, dilation, bias)));
    if (batch_norm) model.push_back(nn::BatchNorm2d(16));
  } else {
    model.push_back(
        nn::Conv3d(conv_options(nn::Conv3dOptions(8, 16, 3), groups, stride, dilation, bias)));
    if (batch_norm) model.push_back(nn::BatchNorm3d(16));
  }
}

}  // namespace

TEST_CASE("fusion::Sequential has torch::nn::Sequential's names, archives and results") {
  torch::manual_seed(40);
  fusion::Sequential ours(nn::Linear(4, 8), nn::ReLU(), nn::Linear(8, 2));
  nn::Sequential theirs(nn::Linear(4, 8), nn::ReLU(), nn::Linear(8, 2));
  CHECK(ours->size() == 3);
  CHECK(ours->named_parameters().keys() == theirs->named_parameters().keys());
  // An archive of one loads into the other, both ways.
  std::stringstream archive;
  torch::save(ours, archive);
  torch::load(theirs, archive);
  const auto x = torch::randn({5, 4});
  CHECK(torch::equal(ours->forward(x), theirs->forward(x)));
  torch::manual_seed(41);
  nn::Sequential other(nn::Linear(4, 8), nn::ReLU(), nn::Linear(8, 2));
  std::stringstream back;
  torch::save(other, back);
  torch::load(ours, back);
  CHECK(torch::equal(ours->forward(x), other->forward(x)));

  SECTION("indexing, iteration and push_back work as torch::nn::Sequential's") {
    CHECK(ours[0]->name() == "torch::nn::LinearImpl");
    CHECK(ours->ptr<nn::LinearImpl>(2)->options.out_features() == 2);
    CHECK(ours->at<nn::LinearImpl>(0).options.in_features() == 4);
    std::size_t n = 0;
    for (auto& entry : *ours) n += entry.ptr() != nullptr;
    CHECK(n == 3);
    ours->push_back(std::make_shared<nn::TanhImpl>());
    ours->push_back("last", nn::Linear(2, 2));
    CHECK(ours->named_children().keys() == std::vector<std::string>{"0", "1", "2", "3", "last"});
    CHECK(ours->forward(x).sizes() == torch::IntArrayRef{5, 2});
    CHECK_THROWS_WITH(ours->push_back("last", nn::ReLU()), Contains("'last' exists already"));
  }
  SECTION("entries fuse like any Slot: outputs identical, names and archives unchanged") {
    const auto original = ours->forward(x);
    fusion::fuse_modules(ours, {"0", "1", "2"}, specs(3));
    CHECK(torch::equal(ours->forward(x), original));
    CHECK(ours->named_parameters().keys() == theirs->named_parameters().keys());
    fusion::unfuse_modules(ours);
    CHECK(torch::equal(ours->forward(x), original));
  }
  SECTION("a wrong argument type is a FusionError naming the entry") {
    CHECK_THROWS_WITH(ours->forward(int64_t{3}),
                      Contains("entry #0 (torch::nn::LinearImpl) takes torch::Tensor as argument "
                               "#0, but was given a long"));
    CHECK_THROWS_WITH(ours->forward<std::vector<torch::Tensor>>(x),
                      Contains("the last entry returned a at::Tensor"));
  }
}

TEST_CASE("a model holding a fusion::Sequential clones, fused or not") {
  torch::manual_seed(42);
  Stem model;
  model->eval();
  const auto x = torch::randn({2, 3, 12, 12});
  torch::NoGradGuard no_grad;
  const auto original = model(x);
  auto copy = std::dynamic_pointer_cast<StemImpl>(model->clone());
  CHECK(torch::equal(copy->forward(x), original));
  CHECK(copy->features->ptr(0).get() != model->features->ptr(0).get());  // deep
  // The clone's Sequential calls the clone's own modules, which parameters() lists.
  torch::nn::init::zeros_(copy->features->ptr<nn::Conv2dImpl>(0)->weight);
  CHECK_FALSE(torch::equal(copy->forward(x), original));
  CHECK(torch::equal(model(x), original));

  fusion::kernels::register_builtin_kernels();
  fusion::fuse_modules(model, {"conv", "bn"}, specs(2), kernel("fusion.conv2d_bn"));
  fusion::fuse_modules(model, {"features.0", "features.1", "features.2"}, specs(3),
                       kernel("fusion.conv2d_bn_relu"));
  require_close(model(x), original);
  auto fused_copy = std::dynamic_pointer_cast<StemImpl>(model->clone());
  fusion::fuse_modules(*fused_copy, fusion::plan_of(model));
  require_close(fused_copy->forward(x), original);
  CHECK(fusion::fused_chains(*fused_copy).size() == 2);
}

TEST_CASE("conv + batch norm (+ relu) folding matches the modules, for every convolution shape") {
  fusion::kernels::register_builtin_kernels();
  torch::manual_seed(43);
  struct Case {
    std::string name;
    int64_t groups;
    int64_t stride;
    int64_t dilation;
    bool bias;
    bool affine;
    bool relu;
  };
  const auto kase = GENERATE(
      Case{"plain", 1, 1, 1, true, true, false}, Case{"no conv bias", 1, 1, 1, false, true, true},
      Case{"depthwise", 8, 1, 1, false, true, true},
      Case{"grouped, strided", 2, 2, 1, true, true, false},
      Case{"dilated", 1, 1, 2, true, false, true}, Case{"no affine", 1, 2, 1, false, false, false});
  INFO(kase.name);
  const int64_t dims = GENERATE(1, 2, 3);
  INFO("Conv" << dims << "d");
  const int64_t size = dims == 3 ? 7 : 12;
  std::vector<int64_t> shape{2, 8};
  shape.insert(shape.end(), dims, size);
  const auto x = torch::randn(shape);

  fusion::Sequential model;
  const auto with_options = [&](auto options) {
    return options.stride(kase.stride)
        .dilation(kase.dilation)
        .groups(kase.groups)
        .padding(1)
        .bias(kase.bias);
  };
  std::string name = "fusion.conv" + std::to_string(dims) + "d_bn";
  if (dims == 1) {
    model->push_back(nn::Conv1d(with_options(nn::Conv1dOptions(8, 16, 3))));
    model->push_back(nn::BatchNorm1d(nn::BatchNorm1dOptions(16).affine(kase.affine)));
  } else if (dims == 2) {
    model->push_back(nn::Conv2d(with_options(nn::Conv2dOptions(8, 16, 3))));
    model->push_back(nn::BatchNorm2d(nn::BatchNorm2dOptions(16).affine(kase.affine)));
  } else {
    model->push_back(nn::Conv3d(with_options(nn::Conv3dOptions(8, 16, 3))));
    model->push_back(nn::BatchNorm3d(nn::BatchNorm3dOptions(16).affine(kase.affine)));
  }
  std::vector<std::string> patterns{"0", "1"};
  if (kase.relu) {
    model->push_back(nn::ReLU());
    patterns.push_back("2");
    name += "_relu";
  }
  randomize_batch_norm(*model->ptr(1));
  model->eval();
  torch::NoGradGuard no_grad;
  const auto original = model->forward(x);
  fusion::fuse_modules(model, patterns, specs(patterns.size()), kernel(name));
  require_close(model->forward(x), original);
  CHECK(stats_of(*model).runs == 1);
  CHECK(stats_of(*model).prepares == 1);
  model->forward(x);
  CHECK(stats_of(*model).prepares == 1);  // nothing changed, nothing rebuilt
}

TEST_CASE("conv + batch norm folding: memory format, padding modes, modes and staleness") {
  fusion::kernels::register_builtin_kernels();
  torch::manual_seed(44);
  fusion::Sequential model(nn::Conv2d(nn::Conv2dOptions(4, 6, 3).padding(1)), nn::BatchNorm2d(6),
                           nn::ReLU());
  randomize_batch_norm(*model->ptr(1));
  model->eval();
  const auto x = torch::randn({2, 4, 9, 9});
  torch::NoGradGuard no_grad;
  const auto original = model->forward(x);
  fusion::fuse_modules(model, {"0", "1", "2"}, specs(3), kernel("fusion.conv2d_bn_relu"));

  SECTION("channels-last in, channels-last out") {
    const auto channels_last = x.contiguous(torch::MemoryFormat::ChannelsLast);
    const auto y = model->forward(channels_last);
    CHECK(y.is_contiguous(torch::MemoryFormat::ChannelsLast));
    CHECK_FALSE(y.is_contiguous());
    require_close(y.contiguous(), original);
    CHECK(model->forward(x).is_contiguous());
  }
  SECTION("oneDNN's layout in, oneDNN's layout out (as TorchScript's optimize_for_inference)") {
    if (!at::hasMKLDNN()) {
      WARN("this LibTorch has no oneDNN: skipped");
      return;
    }
    const auto y = model->forward(x.to_mkldnn());
    CHECK(y.is_mkldnn());
    require_close(y.to_dense(), original);
    CHECK(stats_of(*model).runs == 1);
  }
  SECTION("many input shapes (more than the prepacked cache holds) and threads") {
    INFO(
        "prepacked oneDNN convolution available: " << fusion::detail::PrepackedConv2d::available());
    for (int64_t size = 5;
         size < 5 + 2 * static_cast<int64_t>(fusion::detail::PrepackedConv2d::kShapes); ++size) {
      fusion::unfuse_modules(model);
      const auto input = torch::randn({1, 4, size, size + 1});
      const auto reference = model->forward(input);
      fusion::fuse_modules(model, {"0", "1", "2"}, specs(3), kernel("fusion.conv2d_bn_relu"));
      require_close(model->forward(input), reference);
      require_close(model->forward(input), reference);  // from the cache
    }
    std::vector<std::thread> threads;
    std::atomic<int> mismatches{0};
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&] {
        torch::NoGradGuard thread_no_grad;
        for (int i = 0; i < 50; ++i) {
          const auto y = model->forward(x);
          if ((y - original).abs().max().item<double>() >
              1e-5 * std::max(1.0, original.abs().max().item<double>()))
            ++mismatches;
        }
      });
    }
    for (auto& thread : threads) thread.join();
    CHECK(mismatches == 0);
  }
  SECTION("training mode replays (batch statistics), eval mode folds again") {
    model->train();
    const auto training = model->forward(x);
    CHECK(stats_of(*model).replays_training == 1);
    fusion::unfuse_modules(model);
    randomize_batch_norm(*model->ptr(1));  // the training pass moved the running statistics
    model->eval();
    const auto reference = model->forward(x);
    fusion::fuse_modules(model, {"0", "1", "2"}, specs(3), kernel("fusion.conv2d_bn_relu"));
    require_close(model->forward(x), reference);
    CHECK(training.sizes() == reference.sizes());
  }
  SECTION("weights and statistics changed after fusing are folded again") {
    model->forward(x);
    CHECK(stats_of(*model).prepares == 1);
    model->ptr<nn::Conv2dImpl>(0)->weight.mul_(0.5);
    model->ptr<nn::BatchNorm2dImpl>(1)->running_mean.add_(0.25);
    model->ptr<nn::BatchNorm2dImpl>(1)->running_var.mul_(2.0);
    const auto fused = model->forward(x);
    CHECK(stats_of(*model).prepares == 2);
    fusion::unfuse_modules(model);
    const auto changed = model->forward(x);
    CHECK_FALSE(torch::allclose(changed, original));
    require_close(fused, changed);
  }
  SECTION("padding modes and 'same' padding") {
    for (const auto& options :
         {nn::Conv2dOptions(4, 6, 3).padding(1).padding_mode(torch::kReflect),
          nn::Conv2dOptions(4, 6, 3).padding(2).padding_mode(torch::kCircular),
          nn::Conv2dOptions(4, 6, 3).padding(1).padding_mode(torch::kReplicate),
          nn::Conv2dOptions(4, 6, 3).padding(torch::kSame),
          nn::Conv2dOptions(4, 6, 3).padding(torch::kValid)}) {
      fusion::Sequential padded(nn::Conv2d(options), nn::BatchNorm2d(6));
      randomize_batch_norm(*padded->ptr(1));
      padded->eval();
      const auto reference = padded->forward(x);
      fusion::fuse_modules(padded, {"0", "1"}, specs(2), kernel("fusion.conv2d_bn"));
      require_close(padded->forward(x), reference);
      if (at::hasMKLDNN()) {  // modes oneDNN lacks compute dense, and answer in the input's layout
        const auto y = padded->forward(x.to_mkldnn());
        CHECK(y.is_mkldnn());
        require_close(y.to_dense(), reference);
      }
    }
  }
  SECTION("a batch norm without running statistics uses batch statistics: the kernel declines") {
    fusion::Sequential batch_stats(
        nn::Conv2d(nn::Conv2dOptions(4, 6, 3)),
        nn::BatchNorm2d(nn::BatchNorm2dOptions(6).track_running_stats(false)));
    batch_stats->eval();
    const auto reference = batch_stats->forward(x);
    fusion::fuse_modules(batch_stats, {"0", "1"}, specs(2), kernel("fusion.conv2d_bn"));
    CHECK(torch::equal(batch_stats->forward(x), reference));
    CHECK(stats_of(*batch_stats).replays_declined == 1);
    CHECK(stats_of(*batch_stats).runs == 0);
    CHECK_THAT(fusion::report(batch_stats), Contains("declined 1"));
    fusion::use_kernel(batch_stats, {"1"}, "fusion.conv2d_bn", fusion::KernelPolicy::strict);
    CHECK_THROWS_WITH(batch_stats->forward(x),
                      Contains("the kernel declined these modules (its applies() returned false)"));
  }
}

TEST_CASE(
    "conv + batch norm folding on CUDA, after to(CUDA), dense and channels-last "
    "(skipped without CUDA)",
    "[cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("CUDA is not available in this LibTorch build or machine: CUDA case skipped");
    return;
  }
  fusion::kernels::register_builtin_kernels();
  torch::manual_seed(46);
  // cuDNN computes float32 convolutions in TF32 by default on Ampere and newer, the modules' and
  // the folded kernel's alike but from other weights: off, so both are float32 and comparable.
  auto& context = at::globalContext();
  const bool tf32 = context.allowTF32CuDNN();
  context.setAllowTF32CuDNN(false);
  const int64_t groups = GENERATE(1, 4);
  INFO("groups " << groups);
  fusion::Sequential model(nn::Conv2d(nn::Conv2dOptions(4, 8, 3).padding(1).groups(groups)),
                           nn::BatchNorm2d(8), nn::ReLU());
  randomize_batch_norm(*model->ptr(1));
  model->eval();
  const auto x = torch::randn({2, 4, 9, 9});
  torch::NoGradGuard no_grad;
  const auto original = model->forward(x);
  fusion::fuse_modules(model, {"0", "1", "2"}, specs(3), kernel("fusion.conv2d_bn_relu"));
  require_close(model->forward(x), original);
  CHECK(stats_of(*model).prepares == 1);

  model->to(torch::kCUDA);  // moves every member's tensors: the folded weights follow
  const auto y = model->forward(x.to(torch::kCUDA));
  REQUIRE(y.is_cuda());
  require_close(y.cpu(), original);
  CHECK(stats_of(*model).prepares == 2);
  CHECK(stats_of(*model).runs == 2);
  CHECK(stats_of(*model).replays_device == 0);

  const auto channels_last =
      model->forward(x.to(torch::kCUDA).contiguous(torch::MemoryFormat::ChannelsLast));
  CHECK(channels_last.is_contiguous(torch::MemoryFormat::ChannelsLast));
  require_close(channels_last.contiguous().cpu(), original);
  CHECK(stats_of(*model).prepares == 2);
  context.setAllowTF32CuDNN(tf32);
}

TEST_CASE("linear + batch norm and layer norm + linear folding match the modules") {
  fusion::kernels::register_builtin_kernels();
  torch::manual_seed(45);
  torch::NoGradGuard no_grad;
  SECTION("linear + batch norm 1d") {
    const bool bias = GENERATE(true, false);
    fusion::Sequential model(nn::Linear(nn::LinearOptions(6, 5).bias(bias)), nn::BatchNorm1d(5));
    randomize_batch_norm(*model->ptr(1));
    model->eval();
    const auto x = torch::randn({7, 6});
    const auto original = model->forward(x);
    fusion::fuse_modules(model, {"0", "1"}, specs(2), kernel("fusion.linear_bn"));
    require_close(model->forward(x), original);
    CHECK(stats_of(*model).runs == 1);
  }
  SECTION("linear + batch norm 1d on [batch, channels, length] is computed as the modules do") {
    fusion::Sequential model(nn::Linear(6, 6), nn::BatchNorm1d(6));
    randomize_batch_norm(*model->ptr(1));
    model->eval();
    const auto x = torch::randn({3, 6, 6});
    const auto original = model->forward(x);
    fusion::fuse_modules(model, {"0", "1"}, specs(2), kernel("fusion.linear_bn"));
    CHECK(torch::equal(model->forward(x), original));
  }
  SECTION("layer norm + linear, with and without the norm's affine parameters") {
    const bool affine = GENERATE(true, false);
    fusion::Sequential model(nn::LayerNorm(nn::LayerNormOptions({6}).elementwise_affine(affine)),
                             nn::Linear(6, 3));
    if (affine) {
      model->ptr<nn::LayerNormImpl>(0)->weight.uniform_(0.5, 1.5);
      model->ptr<nn::LayerNormImpl>(0)->bias.normal_(0, 0.5);
    }
    const auto x = torch::randn({4, 5, 6});
    const auto original = model->forward(x);
    fusion::fuse_modules(model, {"0", "1"}, specs(2), kernel("fusion.layernorm_linear"));
    require_close(model->forward(x), original);
    CHECK(stats_of(*model).runs == 1);
  }
  SECTION("a layer norm over more than the linear's features cannot be folded: it declines") {
    fusion::Sequential model(nn::LayerNorm(nn::LayerNormOptions({5, 6})), nn::Linear(6, 3));
    const auto x = torch::randn({4, 5, 6});
    const auto original = model->forward(x);
    fusion::fuse_modules(model, {"0", "1"}, specs(2), kernel("fusion.layernorm_linear"));
    CHECK(torch::equal(model->forward(x), original));
    CHECK(stats_of(*model).replays_declined == 1);
  }
}

TEST_CASE(
    "conv (+ batch norm) + activation kernels match the modules, for every convolution "
    "shape and activation") {
  fusion::kernels::register_builtin_kernels();
  torch::manual_seed(61);
  struct Case {
    std::string name;
    int64_t groups, stride, dilation;
    bool bias;
  };
  const auto kase =
      GENERATE(Case{"plain", 1, 1, 1, true}, Case{"depthwise, no bias", 8, 1, 1, false},
               Case{"grouped, strided, dilated", 2, 2, 2, true});
  const int64_t dims = GENERATE(1, 2, 3);
  const bool batch_norm = GENERATE(true, false);
  INFO(kase.name << ", Conv" << dims << "d" << (batch_norm ? " + BatchNorm" : ""));
  std::vector<int64_t> shape{2, 8};
  shape.insert(shape.end(), dims, dims == 3 ? 7 : 12);
  const auto x = torch::randn(shape);
  for (const auto& activation : activations()) {
    INFO("activation " << activation.name);
    fusion::Sequential model;
    push_conv(*model, dims, kase.groups, kase.stride, kase.dilation, kase.bias, batch_norm);
    activation.push(*model);
    if (batch_norm) randomize_batch_norm(*model->ptr(1));
    model->eval();
    torch::NoGradGuard no_grad;
    const auto original = model->forward(x);
    const std::string name =
        "fusion.conv" + std::to_string(dims) + "d" + (batch_norm ? "_bn_" : "_") + activation.name;
    fusion::fuse_modules(model, member_paths(model->size()), specs(model->size()), kernel(name));
    require_close(model->forward(x), original);
    CHECK(stats_of(*model).runs == 1);
    if (dims == 2) {
      const auto channels_last = model->forward(x.contiguous(torch::MemoryFormat::ChannelsLast));
      CHECK(channels_last.is_contiguous(torch::MemoryFormat::ChannelsLast));
      require_close(channels_last.contiguous(), original);
      if (at::hasMKLDNN()) {  // oneDNN's layout in and out, the activation too
        const auto blocked = model->forward(x.to_mkldnn());
        CHECK(blocked.is_mkldnn());
        require_close(blocked.to_dense(), original);
      }
    }
    // An unbatched input goes through the modules, which decide what it means.
    if (!batch_norm) {
      const auto unbatched = x[0];
      fusion::unfuse_modules(model);
      const auto expected = model->forward(unbatched);
      fusion::fuse_modules(model, member_paths(model->size()), specs(model->size()), kernel(name));
      CHECK(torch::equal(model->forward(unbatched), expected));
    }
  }
}

TEST_CASE("fusion.linear computes the Linear, on one row or many, with gradients, and its errors") {
  fusion::kernels::register_builtin_kernels();
  torch::manual_seed(46);
  const bool bias = GENERATE(true, false);
  // As a CNN's classifier: Dropout, then the Linear.
  fusion::Sequential model(nn::Dropout(0.2), nn::Linear(nn::LinearOptions(64, 40).bias(bias)));
  model->eval();
  fusion::fuse_modules(model, {"1"}, specs(1), kernel("fusion.linear"));
  auto& linear = *model->ptr<nn::LinearImpl>(1);
  const auto expected = [&](const torch::Tensor& x) {
    return torch::linear(x, linear.weight, linear.bias);
  };
  {
    torch::NoGradGuard no_grad;
    // One row (a classifier at batch 1: a matrix-vector product), a batch, [batch, seq, in].
    for (const auto& x : {torch::randn({1, 64}), torch::randn({5, 64}), torch::randn({2, 3, 64})}) {
      require_close(model->forward(x), expected(x));
    }
    const auto stats = stats_of(*model);
    CHECK(stats.runs == 3);
    CHECK(stats.state_bytes == 0);  // the module's own weight and bias, not copied
    CHECK(stats.shared_state_bytes == (64 * 40 + (bias ? 40 : 0)) * 4);
    // An input of another width gets the module's error.
    REQUIRE_THROWS_WITH(model->forward(torch::randn({1, 63})), Contains("64"));
  }
  // A call autograd records replays the Linear: gradients reach the input and its weight.
  const auto x = torch::randn({3, 64}, torch::requires_grad());
  const auto y = model->forward(x);
  const auto grads = torch::autograd::grad({y.sum()}, {x, linear.weight});
  const auto reference = expected(x);
  const auto expected_grads = torch::autograd::grad({reference.sum()}, {x, linear.weight});
  require_close(y, reference);
  require_close(grads[0], expected_grads[0]);
  require_close(grads[1], expected_grads[1]);
  // Training mode: the kernel still runs (the Linear computes the same).
  model->ptr<nn::LinearImpl>(1)->train();
  torch::NoGradGuard no_grad;
  const auto one = torch::randn({1, 64});
  require_close(model->forward(one), expected(one));
  CHECK(stats_of(*model).runs == 4);
  CHECK(stats_of(*model).replays_grad == 1);
}

TEST_CASE("fusion::optimize tries fusion.linear only where named") {
  fusion::kernels::register_builtin_kernels();
  torch::manual_seed(47);
  fusion::Sequential model(nn::Linear(64, 32));
  const auto x = torch::randn({1, 64});
  torch::NoGradGuard no_grad;
  const auto run = [&] { return model->forward(x); };
  fusion::OptimizeOptions options;
  options.time_budget = std::chrono::milliseconds(500);
  options.min_speedup = -1;  // keep what verifies: this test is about which kernels are tried
  auto plan = fusion::optimize(model, run, options);
  INFO(fusion::to_string(plan));
  CHECK(plan.rules.empty());
  fusion::unfuse_modules(model);
  options.kernels = {"fusion.linear"};
  plan = fusion::optimize(model, run, options);
  INFO(fusion::to_string(plan));
  REQUIRE(plan.rules.size() == 1);
  CHECK(plan.rules[0].options.kernel == "fusion.linear");
}

TEST_CASE("conv + activation: no weight copy, runs in training mode, replays for gradients") {
  fusion::kernels::register_builtin_kernels();
  torch::manual_seed(62);
  fusion::Sequential model(nn::Conv2d(nn::Conv2dOptions(4, 6, 3).padding(1)), nn::SiLU());
  const auto x = torch::randn({2, 4, 9, 9});
  const auto original = model->forward(x);
  fusion::fuse_modules(model, {"0", "1"}, specs(2), kernel("fusion.conv2d_silu"));
  {
    torch::NoGradGuard no_grad;
    require_close(model->forward(x), original);  // training mode (the default): nothing folded
    CHECK(stats_of(*model).runs == 1);
    // The dense weight is the convolution's own; only oneDNN's packed forms are prepared, and
    // counted as the state's own bytes (opaque: no storage).
    CHECK(stats_of(*model).shared_state_bytes == (6 * 4 * 9 + 6) * 4);
    CHECK((stats_of(*model).state_bytes >= 6 * 4 * 9 * 4) == at::hasMKLDNN());
  }
  const auto y = model->forward(x);  // grad mode, parameters requiring grad: the replay
  CHECK(stats_of(*model).runs == 1);
  CHECK(stats_of(*model).replays_grad == 1);
  y.sum().backward();
  CHECK(model->ptr<nn::Conv2dImpl>(0)->weight.grad().defined());
}

TEST_CASE(
    "report counts the weights a convolution kernel packs and reorders for each input shape") {
  fusion::kernels::register_builtin_kernels();
  if (!at::hasMKLDNN()) {
    WARN("this LibTorch has no oneDNN: no packed or reordered weights to count");
    return;
  }
  torch::manual_seed(63);
  fusion::Sequential model(nn::Conv2d(nn::Conv2dOptions(8, 16, 3).padding(1)), nn::BatchNorm2d(16),
                           nn::ReLU());
  model->eval();
  fusion::fuse_modules(model, {"0", "1", "2"}, specs(3), kernel("fusion.conv2d_bn_relu"));
  torch::NoGradGuard no_grad;
  const uint64_t weight = 16 * 8 * 9 * 4, bias = 16 * 4;
  // The folded weight, its channels-last copy and the bias; the weight in oneDNN's layout (its
  // exact size: blocked, at least the weight's).
  const uint64_t tensors = 2 * weight + bias;
  model->forward(torch::randn({1, 8, 10, 10}));
  const auto first = stats_of(*model).state_bytes;
  const uint64_t pack = fusion::detail::PrepackedConv2d::available() ? weight : 0;
  CHECK(first >= tensors + weight + pack);
  CHECK(first <= tensors + 2 * weight + pack);
  // Each new input shape: one more pack of the weight.
  model->forward(torch::randn({1, 8, 12, 12}));
  CHECK(stats_of(*model).state_bytes == first + pack);
  model->forward(torch::randn({1, 8, 12, 12}));
  CHECK(stats_of(*model).state_bytes == first + pack);
#if defined(FUSION_HAS_ONEDNN)
  // A blocked input on the library's own primitive, with the weight reordered for it (forced:
  // measured, the copy of a path that lost is freed).
  using fusion::kernels::BlockedConvPath;
  const auto previous = fusion::kernels::force_blocked_conv_path(BlockedConvPath::onednn);
  model->forward(torch::randn({1, 8, 12, 12}).to_mkldnn());
  fusion::kernels::force_blocked_conv_path(previous);
  CHECK(stats_of(*model).state_bytes >= first + pack + weight);
#endif
  // A changed weight rebuilds the state: what the old one packed is gone from the count.
  model->ptr<nn::Conv2dImpl>(0)->weight.mul_(0.5);
  model->forward(torch::randn({1, 8, 10, 10}));
  CHECK(stats_of(*model).state_bytes == first);
  CHECK_THAT(fusion::report(model), Contains(fmt::format("state {} B own", first)));
}

TEST_CASE("conv transpose + batch norm folding matches the modules") {
  fusion::kernels::register_builtin_kernels();
  torch::manual_seed(63);
  struct Case {
    std::string name;
    int64_t groups, stride, output_padding, dilation;
    bool bias, affine;
  };
  const auto kase = GENERATE(Case{"plain", 1, 1, 0, 1, true, true},
                             Case{"upsampling: stride 2, output padding 1", 1, 2, 1, 1, true, true},
                             Case{"grouped, dilated, no bias", 2, 1, 0, 2, false, true},
                             Case{"depthwise, strided, no affine", 8, 2, 1, 1, true, false});
  const int64_t dims = GENERATE(1, 2, 3);
  INFO(kase.name << ", ConvTranspose" << dims << "d");
  const auto with_options = [&](auto options) {
    return options.stride(kase.stride)
        .output_padding(kase.output_padding)
        .dilation(kase.dilation)
        .groups(kase.groups)
        .padding(1)
        .bias(kase.bias);
  };
  fusion::Sequential model;
  const int64_t out = kase.groups == 8 ? 8 : 12;
  if (dims == 1) {
    model->push_back(nn::ConvTranspose1d(with_options(nn::ConvTranspose1dOptions(8, out, 3))));
    model->push_back(nn::BatchNorm1d(nn::BatchNorm1dOptions(out).affine(kase.affine)));
  } else if (dims == 2) {
    model->push_back(nn::ConvTranspose2d(with_options(nn::ConvTranspose2dOptions(8, out, 3))));
    model->push_back(nn::BatchNorm2d(nn::BatchNorm2dOptions(out).affine(kase.affine)));
  } else {
    model->push_back(nn::ConvTranspose3d(with_options(nn::ConvTranspose3dOptions(8, out, 3))));
    model->push_back(nn::BatchNorm3d(nn::BatchNorm3dOptions(out).affine(kase.affine)));
  }
  randomize_batch_norm(*model->ptr(1));
  model->eval();
  std::vector<int64_t> shape{2, 8};
  shape.insert(shape.end(), dims, dims == 3 ? 5 : 9);
  const auto x = torch::randn(shape);
  torch::NoGradGuard no_grad;
  const auto original = model->forward(x);
  const std::string name = "fusion.conv_transpose" + std::to_string(dims) + "d_bn";
  fusion::fuse_modules(model, {"0", "1"}, specs(2), kernel(name));
  require_close(model->forward(x), original);
  CHECK(stats_of(*model).runs == 1);
  CHECK(stats_of(*model).prepares == 1);

  SECTION("weights and statistics changed after fusing are folded again") {
    auto* conv = model->ptr(0).get();
    for (auto& item : conv->named_parameters()) item.value().mul_(0.5);
    model->ptr<nn::Module>(1)->named_buffers()["running_mean"].add_(0.25);
    const auto fused = model->forward(x);
    CHECK(stats_of(*model).prepares == 2);
    fusion::unfuse_modules(model);
    require_close(fused, model->forward(x));
  }
  SECTION("training mode replays") {
    model->train();
    model->forward(x);
    CHECK(stats_of(*model).replays_training == 1);
  }
  SECTION("an output_size argument: the modules compute it") {
    // (LibTorch 1.13's ConvTranspose ignores the dilation when it checks output_size.)
    if (dims != 2 || kase.dilation != 1) return;
    using Kernel =
        fusion::kernels::ConvTransposeBatchNorm<2, nn::ConvTranspose2dImpl, nn::BatchNorm2dImpl>;
    auto& conv = *model->ptr<nn::ConvTranspose2dImpl>(0);
    auto& bn = *model->ptr<nn::BatchNorm2dImpl>(1);
    const auto state = Kernel().prepare(conv, bn);
    // With stride 2 the other valid size (output padding 0); else the only one.
    const std::vector<int64_t> size{original.size(2) - (kase.stride > 1 ? 1 : 0),
                                    original.size(3) - (kase.stride > 1 ? 1 : 0)};
    const auto expected = bn.forward(conv.forward(x, at::IntArrayRef(size)));
    CHECK(torch::equal(Kernel()(state, conv, bn, x, at::IntArrayRef(size)), expected));
    require_close(Kernel()(state, conv, bn, x, c10::nullopt), original);
  }
}

TEST_CASE("fusion::Hardswish computes torch::hardswish and prints as itself") {
  fusion::Hardswish hardswish;
  const auto x = torch::linspace(-5, 5, 41);
  CHECK(torch::equal(hardswish(x), torch::hardswish(x)));
  CHECK(hardswish->parameters().empty());
  std::ostringstream printed;
  printed << *hardswish;
  CHECK(printed.str() == "fusion::Hardswish()");
}
