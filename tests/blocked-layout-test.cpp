// The kernels that run in oneDNN's blocked layout: the residual block kernel
// (fusion/kernels/residual_block.hpp) on torchvision's BasicBlock and Bottleneck, the stem's
// conv+bn+relu+maxpool (fusion/kernels/conv_pooling.hpp), and fusion::Sequential handing results
// on blocked between them (detail/blocked_layout.hpp).
#include "catch_compat.hpp"

#include <chrono>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fusion/detail/winograd.hpp>
#include <fusion/fusion.hpp>
#include <fusion/kernels/batch_norm_folding.hpp>
#include <fusion/kernels/bfloat16.hpp>
#include <fusion/kernels/primitives.hpp>
#include <fusion/kernels/residual_block.hpp>

using fusion_test::Contains;

namespace {

namespace nn = torch::nn;
namespace fk = fusion::kernels;

// The kernel folds every BatchNorm into its convolution: compared within this tolerance, relative
// to the largest output (float32).
constexpr double kRelativeTolerance = 1e-5;

void require_close(const torch::Tensor& got, const torch::Tensor& expected,
                   double tolerance = kRelativeTolerance) {
  REQUIRE_FALSE(got.is_mkldnn());
  REQUIRE(got.sizes() == expected.sizes());
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  const double diff = (got - expected).abs().max().item<double>();
  INFO("max abs diff " << diff << ", largest output " << scale);
  REQUIRE(diff <= tolerance * scale);
}

nn::Conv2d conv(int64_t in, int64_t out, int64_t k, int64_t stride = 1) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, k).stride(stride).padding(k / 2).bias(false));
}

/// torchvision's BasicBlock: conv3x3-bn-relu, conv3x3-bn, + identity (downsampled), relu.
struct BasicImpl : nn::Cloneable<BasicImpl> {
  BasicImpl(int64_t in_channels, int64_t out_channels, int64_t block_stride, bool branch = true)
      : in(in_channels), out(out_channels), stride(block_stride), with_branch(branch) {
    reset();
  }
  void reset() override {
    conv1 = fusion::register_slot(*this, "conv1", conv(in, out, 3, stride));
    bn1 = fusion::register_slot(*this, "bn1", nn::BatchNorm2d(out));
    relu = fusion::register_slot(*this, "relu", nn::ReLU(nn::ReLUOptions(true)));
    conv2 = fusion::register_slot(*this, "conv2", conv(out, out, 3));
    bn2 = fusion::register_slot(*this, "bn2", nn::BatchNorm2d(out));
    if (with_branch && (stride != 1 || in != out)) {
      downsample = register_module(
          "downsample", fusion::Sequential(conv(in, out, 1, stride), nn::BatchNorm2d(out)));
    }
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = relu(bn1(conv1(x)));
    h = bn2(conv2(h));
    h += downsample.is_empty() ? x : downsample->forward(x);
    return relu(h);
  }
  int64_t in, out, stride;
  bool with_branch;
  fusion::Slot<nn::Conv2d> conv1, conv2;
  fusion::Slot<nn::BatchNorm2d> bn1, bn2;
  fusion::Slot<nn::ReLU> relu;
  fusion::Sequential downsample{nullptr};
};
TORCH_MODULE(Basic);

/// torchvision's Bottleneck (plain holders and a torch::nn::Sequential branch): 1x1, 3x3
/// (strided), 1x1 to 4x the width, + identity, relu.
struct BottleneckImpl : nn::Cloneable<BottleneckImpl> {
  BottleneckImpl(int64_t in_channels, int64_t width_channels, int64_t block_stride)
      : in(in_channels), width(width_channels), stride(block_stride) {
    reset();
  }
  void reset() override {
    conv1 = register_module("conv1", conv(in, width, 1));
    bn1 = register_module("bn1", nn::BatchNorm2d(width));
    conv2 = register_module("conv2", conv(width, width, 3, stride));
    bn2 = register_module("bn2", nn::BatchNorm2d(width));
    conv3 = register_module("conv3", conv(width, 4 * width, 1));
    bn3 = register_module("bn3", nn::BatchNorm2d(4 * width));
    if (stride != 1 || in != 4 * width) {
      downsample = register_module(
          "downsample", nn::Sequential(conv(in, 4 * width, 1, stride), nn::BatchNorm2d(4 * width)));
    }
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::relu(bn1(conv1(x)));
    h = torch::relu(bn2(conv2(h)));
    h = bn3(conv3(h));
    h += downsample.is_empty() ? x : downsample->forward(x);
    return torch::relu(h);
  }
  int64_t in, width, stride;
  nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  nn::Sequential downsample{nullptr};
};
TORCH_MODULE(Bottleneck);

/// torchvision's Conv2dNormActivation as a module of Slots: conv, bn, then the activation.
template <typename Activation>
struct StageImpl : nn::Cloneable<StageImpl<Activation>> {
  StageImpl(int64_t in_channels, int64_t out_channels, int64_t stage_stride)
      : in(in_channels), out(out_channels), stride(stage_stride) {
    reset();
  }
  void reset() override {
    conv = fusion::register_slot(*this, "0", ::conv(in, out, 3, stride));
    bn = fusion::register_slot(*this, "1", nn::BatchNorm2d(out));
    act = fusion::register_slot(*this, "2", Activation());
  }
  torch::Tensor forward(const torch::Tensor& x) { return act(bn(conv(x))); }
  int64_t in, out, stride;
  fusion::Slot<nn::Conv2d> conv;
  fusion::Slot<nn::BatchNorm2d> bn;
  fusion::Slot<Activation> act;
};
using ReLU6Stage = nn::ModuleHolder<StageImpl<nn::ReLU6>>;

/// torchvision's Conv2dNormActivation with any activation (an AnyModule, registered as "2").
struct ConvNormActImpl : nn::Cloneable<ConvNormActImpl> {
  ConvNormActImpl(nn::Conv2d conv_layer, nn::AnyModule activation_module)
      : conv(std::move(conv_layer)), act(std::move(activation_module)) {
    reset();
  }
  void reset() override {
    conv = register_module("0", conv);
    bn = register_module("1", nn::BatchNorm2d(conv->options.out_channels()));
    register_module("2", act.ptr());
  }
  torch::Tensor forward(const torch::Tensor& x) { return act.forward(bn(conv(x))); }
  nn::Conv2d conv;
  nn::BatchNorm2d bn{nullptr};
  nn::AnyModule act;
};
TORCH_MODULE(ConvNormAct);

/// torchvision's InvertedResidual, its `conv` a torch::nn::Sequential of Conv2dNormActivations
/// (conv, bn, activation) as torchvision's: an expanding 1x1 (unless `expand` is 1), a depthwise
/// 3x3, a 1x1 projection and its BatchNorm; the input added where the stride is 1 and the channels
/// stay.
struct InvertedImpl : nn::Cloneable<InvertedImpl> {
  InvertedImpl(int64_t in_channels, int64_t out_channels, int64_t block_stride, int64_t ratio,
               std::function<nn::AnyModule()> activation_factory)
      : in(in_channels),
        out(out_channels),
        stride(block_stride),
        expand(ratio),
        activation(std::move(activation_factory)) {
    reset();
  }
  void reset() override {
    const int64_t hidden = in * expand;
    conv = register_module("conv", nn::Sequential());
    if (expand != 1) conv->push_back(ConvNormAct(pointwise(in, hidden), activation()));
    conv->push_back(ConvNormAct(nn::Conv2d(nn::Conv2dOptions(hidden, hidden, 3)
                                               .stride(stride)
                                               .padding(1)
                                               .groups(hidden)
                                               .bias(false)),
                                activation()));
    conv->push_back(pointwise(hidden, out));
    conv->push_back(nn::BatchNorm2d(out));
    use_res_connect = stride == 1 && in == out;
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return use_res_connect ? x + conv->forward(x) : conv->forward(x);
  }
  static nn::Conv2d pointwise(int64_t in, int64_t out) {
    return nn::Conv2d(nn::Conv2dOptions(in, out, 1).bias(false));
  }
  int64_t in, out, stride, expand;
  std::function<nn::AnyModule()> activation;
  bool use_res_connect = false;
  nn::Sequential conv{nullptr};
};
TORCH_MODULE(Inverted);

void register_blocks() {
  fusion::register_kernels_once("residual-block-test", [] {
    fk::register_residual_block("test.basic",
                                fk::residual_block(fk::conv_bn(&BasicImpl::conv1, &BasicImpl::bn1),
                                                   fk::conv_bn(&BasicImpl::conv2, &BasicImpl::bn2),
                                                   fk::downsample(&BasicImpl::downsample)));
    using B = BottleneckImpl;
    fk::register_residual_block(
        "test.bottleneck",
        fk::residual_block(fk::conv_bn(&B::conv1, &B::bn1), fk::conv_bn(&B::conv2, &B::bn2),
                           fk::conv_bn(&B::conv3, &B::bn3), fk::downsample(&B::downsample)));
    using S = StageImpl<nn::ReLU6>;
    fk::register_residual_block("test.stage",
                                fk::conv_block(fk::conv_bn(&S::conv, &S::bn, &S::act)));
    fk::register_residual_block("test.inverted",
                                fk::conv_block(fk::sequential_stages(&InvertedImpl::conv),
                                               fk::add_input_if(&InvertedImpl::use_res_connect)));
  });
}

/// Random weights, affine parameters and running statistics, eval mode.
template <typename Model>
void randomize(Model& model) {
  torch::NoGradGuard no_grad;
  for (auto& item : model->named_parameters()) {
    if (item.key().find("bn") != std::string::npos || item.key().find(".1.") != std::string::npos) {
      item.value().uniform_(0.5, 1.5);
    } else {
      item.value().normal_(0, std::sqrt(2.0 / static_cast<double>(item.value()[0].numel())));
    }
  }
  for (auto& item : model->named_buffers()) {
    if (item.key().find("running_mean") != std::string::npos) item.value().normal_(0, 0.3);
    if (item.key().find("running_var") != std::string::npos) item.value().uniform_(0.5, 2.0);
  }
  model->eval();
}

fusion::FuseOptions kernel(const std::string& name) {
  fusion::FuseOptions options;
  options.kernel = name;
  return options;
}
const std::vector<fusion::ModuleSpec> one_tensor{fusion::ModuleSpec{{"x"}, {"x"}}};

/// Passes its input through; a kernel over it records the layout it was given, and keeps its
/// result blocked when granted: the probe between two blocks in a fusion::Sequential.
struct ProbeImpl : nn::Cloneable<ProbeImpl> {
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& x) { return x.is_mkldnn() ? x.to_dense() : x; }
};
TORCH_MODULE(Probe);
std::vector<bool> probe_inputs;  // is_mkldnn() of each input the probe's kernel got
std::vector<bool> probe_grants;  // whether each call of the probe's kernel might keep it blocked
struct ProbeKernel {
  torch::Tensor operator()(ProbeImpl&, const torch::Tensor& x) const {
    const bool keep = fusion::detail::BlockedHandOff::take_grant();
    probe_inputs.push_back(x.is_mkldnn());
    probe_grants.push_back(keep);
    if (keep && !x.is_mkldnn()) {
      fusion::detail::BlockedHandOff::gave_blocked();
      return x.to_mkldnn();
    }
    return x;  // a blocked input was handed in: the next entry takes it, or gets it dense
  }
};

void register_probe() {
  fusion::register_kernels_once("residual-block-test.probe", [] {
    fusion::KernelOptions options;
    options.blocked_layout = true;
    fusion::register_kernel("test.probe", ProbeKernel{}, options);
  });
}

/// Forces the blocked convolution path for its lifetime (std::nullopt: measured), then restores
/// the previous setting.
class ForcedPath {
 public:
  explicit ForcedPath(std::optional<fusion::kernels::BlockedConvPath> path)
      : previous_(fusion::kernels::force_blocked_conv_path(path)) {}
  ForcedPath(const ForcedPath&) = delete;
  ForcedPath& operator=(const ForcedPath&) = delete;
  ~ForcedPath() { fusion::kernels::force_blocked_conv_path(previous_); }

 private:
  std::optional<fusion::kernels::BlockedConvPath> previous_;
};

}  // namespace

TEST_CASE(
    "the residual block kernel matches BasicBlock and Bottleneck, with and without "
    "downsample") {
  register_blocks();
  torch::manual_seed(1);
  torch::NoGradGuard no_grad;
  auto basic = fusion::Sequential(Basic(16, 32, 2), Basic(32, 32, 1));
  auto bottleneck = fusion::Sequential(Bottleneck(32, 8, 2), Bottleneck(32, 8, 1));
  randomize(basic);
  randomize(bottleneck);
  const auto x = torch::randn({2, 16, 20, 20});
  const auto y = torch::randn({2, 32, 20, 20});
  const auto basic_expected = basic->forward(x);
  const auto bottleneck_expected = bottleneck->forward(y);
  CHECK(fusion::fuse_modules(basic, {"*"}, one_tensor, kernel("test.basic")).size() == 2);
  CHECK(fusion::fuse_modules(bottleneck, {"*"}, one_tensor, kernel("test.bottleneck")).size() == 2);
  for (int call = 0; call < 3; ++call) {  // the first call is checked, the later hand on blocked
    require_close(basic->forward(x), basic_expected);
    require_close(bottleneck->forward(y), bottleneck_expected);
  }
  for (const auto& chain : fusion::fused_chains(*basic)) CHECK(chain.stats.runs == 3);
  for (const auto& chain : fusion::fused_chains(*bottleneck)) CHECK(chain.stats.runs == 3);
  // An input the user put in oneDNN's layout comes out in it, as from the modules.
  const auto blocked = basic->forward(x.to_mkldnn());
  REQUIRE(blocked.is_mkldnn());
  require_close(blocked.to_dense(), basic_expected);
  // A changed running statistic is seen (the folded state is rebuilt).
  basic->ptr<BasicImpl>(1)->bn2->running_var.mul_(2);
  const auto changed = basic->forward(x);
  fusion::unfuse_modules(basic);
  require_close(changed, basic->forward(x));
}

TEST_CASE("fusion::Sequential hands blocked results on only to kernels that take them") {
  register_blocks();
  register_probe();
  torch::manual_seed(2);
  torch::NoGradGuard no_grad;
  auto model = fusion::Sequential(Basic(8, 16, 2), Probe(), Basic(16, 16, 1), Basic(16, 16, 1));
  randomize(model);
  const auto x = torch::randn({1, 8, 16, 16});
  const auto expected = model->forward(x);
  fusion::fuse_modules(model, {"0"}, one_tensor, kernel("test.basic"));
  fusion::fuse_modules(model, {"1"}, one_tensor, kernel("test.probe"));
  fusion::fuse_modules(model, {"2"}, one_tensor, kernel("test.basic"));
  probe_inputs.clear();
  require_close(model->forward(x), expected);  // each kernel's first call: checked, dense
  require_close(model->forward(x), expected);  // entry 3, not fused, gets block 2's result dense
  REQUIRE(probe_inputs == std::vector<bool>{false, true});  // block 0 handed its result on

  SECTION("an entry that is not such a kernel gets its input dense") {
    fusion::unfuse_modules(model, {"1"});
    probe_inputs.clear();
    require_close(model->forward(x), expected);  // the unfused probe got a dense input
    CHECK(probe_inputs.empty());
  }
  SECTION("a kernel that declines the call replays on a dense input") {
    model->ptr<BasicImpl>(2)->train();  // training mode: the block's kernel replays
    model->ptr<BasicImpl>(2)->bn1->eval();
    model->ptr<BasicImpl>(2)->bn2->eval();
    require_close(model->forward(x), expected);
    CHECK(fusion::fused_chains(*model).at(2).stats.replays_training == 1);
  }
}

/// torchvision's ResNet trunk in miniature: a stem of four Slots, then layers, each a
/// fusion::Sequential, called by fusion::sequence with a Slot and a plain callable between them.
struct TrunkImpl : nn::Cloneable<TrunkImpl> {
  TrunkImpl() { reset(); }
  void reset() override {
    conv1 = fusion::register_slot(
        *this, "conv1", nn::Conv2d(nn::Conv2dOptions(3, 8, 7).stride(2).padding(3).bias(false)));
    bn1 = fusion::register_slot(*this, "bn1", nn::BatchNorm2d(8));
    relu = fusion::register_slot(*this, "relu", nn::ReLU(nn::ReLUOptions(true)));
    maxpool = fusion::register_slot(*this, "maxpool",
                                    nn::MaxPool2d(nn::MaxPool2dOptions(3).stride(2).padding(1)));
    layer1 = register_module("layer1", fusion::Sequential(Basic(8, 8, 1), Basic(8, 8, 1)));
    probe = fusion::register_slot(*this, "probe", Probe());
    layer2 = register_module("layer2", fusion::Sequential(Basic(8, 16, 2), Basic(16, 16, 1)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return fusion::sequence(x, conv1, bn1, relu, maxpool, layer1, probe, layer2,
                            [this](const torch::Tensor& h) {
                              tail_inputs.push_back(h.is_mkldnn());
                              return h * 2;
                            });
  }
  fusion::Slot<nn::Conv2d> conv1;
  fusion::Slot<nn::BatchNorm2d> bn1;
  fusion::Slot<nn::ReLU> relu;
  fusion::Slot<nn::MaxPool2d> maxpool;
  fusion::Sequential layer1{nullptr}, layer2{nullptr};
  fusion::Slot<Probe> probe;
  std::vector<bool> tail_inputs;  // is_mkldnn() of each input of the last step
};
TORCH_MODULE(Trunk);

TEST_CASE("fusion::sequence hands blocked results on across Slots and Sequentials") {
  register_blocks();
  fusion::kernels::register_builtin_kernels();
  register_probe();
  torch::manual_seed(4);
  torch::NoGradGuard no_grad;
  Trunk model;
  randomize(model);
  const auto x = torch::randn({2, 3, 40, 40});
  const auto expected = model(x);
  const std::vector<fusion::ModuleSpec> four(4, one_tensor[0]);
  fusion::fuse_modules(model, {"conv1", "bn1", "relu", "maxpool"}, four,
                       kernel("fusion.conv2d_bn_relu_maxpool2d"));
  fusion::fuse_modules(model, {"layer*.*"}, one_tensor, kernel("test.basic"));
  fusion::fuse_modules(model, {"probe"}, one_tensor, kernel("test.probe"));
  probe_inputs.clear();
  probe_grants.clear();
  model->tail_inputs.clear();
  for (int call = 0; call < 3; ++call) require_close(model(x), expected);
  // The first call is checked (dense); then layer1's last block hands its result to the probe,
  // which may keep it blocked for layer2; the plain callable after layer2 gets it dense.
  CHECK(probe_inputs == std::vector<bool>{false, true, true});
  CHECK(probe_grants == std::vector<bool>{false, true, true});
  CHECK(model->tail_inputs == std::vector<bool>{false, false, false});
  for (const auto& chain : fusion::fused_chains(*model)) CHECK(chain.stats.runs == 3);

  SECTION("a result is kept blocked only for a step that takes it") {
    fusion::unfuse_modules(model, {"layer2.0"});
    probe_inputs.clear();
    probe_grants.clear();
    for (int call = 0; call < 2; ++call) require_close(model(x), expected);
    CHECK(probe_inputs == std::vector<bool>{true, true});
    CHECK(probe_grants == std::vector<bool>{false, false});  // layer2.0 now takes it dense
  }
  SECTION("a step that is not such a kernel gets its input dense") {
    fusion::unfuse_modules(model, {"probe"});
    probe_inputs.clear();
    require_close(model(x), expected);
    CHECK(probe_inputs.empty());
  }
  SECTION("unfused, it is the nested calls") {
    fusion::unfuse_modules(model);
    require_close(model(x), expected);
    CHECK(model(x).equal(expected));
  }
}

TEST_CASE("a blocked input gives the same result on either convolution path") {
  register_blocks();
  torch::manual_seed(5);
  torch::NoGradGuard no_grad;
  auto model = fusion::Sequential(Basic(8, 16, 2), Basic(16, 16, 1), Basic(16, 32, 2));
  randomize(model);
  const auto x = torch::randn({2, 8, 24, 24});
  const auto expected = model->forward(x);
  fusion::fuse_modules(model, {"*"}, one_tensor, kernel("test.basic"));
  using fusion::kernels::BlockedConvPath;
  // Winograd where the build has oneDNN 2.x and the CPU AVX-512; else the forced path is not
  // offered and the direct convolution runs.
  for (const auto path : {std::optional<BlockedConvPath>{BlockedConvPath::blocked},
                          std::optional<BlockedConvPath>{BlockedConvPath::round_trip},
                          std::optional<BlockedConvPath>{BlockedConvPath::winograd},
                          std::optional<BlockedConvPath>{}}) {
    CAPTURE(path.has_value() ? static_cast<int>(*path) : -1);
    const ForcedPath forced(path);
    // Each block's convolutions run on blocked activations from the second call on (the first is
    // checked); the last call measures the paths where nothing is forced.
    for (int call = 0; call < 3; ++call) require_close(model->forward(x), expected);
  }
  CHECK_FALSE(fusion::kernels::force_blocked_conv_path(std::nullopt).has_value());
}

TEST_CASE("a measured convolution path that lost is told so, once, after the choice") {
  namespace d = fusion::detail;
  using fusion::kernels::BlockedConvPath;
  const ForcedPath unforced(std::nullopt);
  const auto x = torch::randn({1, 4, 8, 8});
  // A key no kernel makes (variant 99), so that this test's choice is the only one for it.
  const auto key = d::blocked_conv_key({4, 4, 3, 3}, {1, 1}, {1, 1}, {1, 1}, 1, x, 99);
  std::vector<BlockedConvPath> lost;
  const auto run = [&](BlockedConvPath path, bool /*measuring*/) {
    // The default sleeps: the other path is the faster by far.
    if (path == BlockedConvPath::blocked) std::this_thread::sleep_for(std::chrono::milliseconds(3));
    return x;
  };
  const auto lose = [&](BlockedConvPath path) { lost.push_back(path); };
  const std::vector<BlockedConvPath> offered{BlockedConvPath::blocked, BlockedConvPath::onednn};
  d::run_blocked_conv(key, offered, run, lose);
  REQUIRE(lost.size() == 1);
  CHECK(lost[0] == BlockedConvPath::blocked);
  d::run_blocked_conv(key, offered, run, lose);  // chosen: nothing measured, nothing lost
  CHECK(lost.size() == 1);
}

TEST_CASE("after measuring its paths a convolution keeps what the chosen path needs, no more") {
  fk::register_builtin_kernels();
  if (!at::hasMKLDNN()) {
    WARN("this LibTorch has no oneDNN: no blocked inputs");
    return;
  }
  namespace d = fusion::detail;
  using fusion::kernels::BlockedConvPath;
  torch::NoGradGuard no_grad;
  const auto make = [] {
    torch::manual_seed(64);
    fusion::Sequential model(nn::Conv2d(nn::Conv2dOptions(8, 16, 3).padding(1)),
                             nn::BatchNorm2d(16), nn::ReLU());
    model->eval();
    fusion::fuse_modules(model, {"0", "1", "2"}, std::vector<fusion::ModuleSpec>(3, one_tensor[0]),
                         kernel("fusion.conv2d_bn_relu"));
    return model;
  };
  const auto bytes = [](fusion::Sequential& model) {
    return fusion::fused_chains(model).at(0).stats.state_bytes;
  };
  // Sizes no other test measures, so that this test's measurement makes the choice.
  const auto dense = torch::randn({1, 8, 17, 17});
  const auto blocked = torch::randn({1, 8, 19, 19}).to_mkldnn();
  const auto run = [&](fusion::Sequential& model) {
    model->forward(dense);
    for (int call = 0; call < 2; ++call) model->forward(blocked);
  };
  auto measured = make();
  {
    const ForcedPath unforced(std::nullopt);
    run(measured);
  }
  const auto key = d::blocked_conv_key({16, 8, 3, 3}, {1, 1}, {1, 1}, {1, 1}, 1, blocked);
  BlockedConvPath chosen;
  {
    auto& choices = d::BlockedConvChoices::instance();
    std::lock_guard<std::mutex> lock(choices.mutex);
    REQUIRE(choices.chosen.count(key) == 1);
    chosen = choices.chosen.at(key);
  }
  // The same calls with the chosen path forced measure nothing and make only what it needs: the
  // paths that lost (LibTorch's prepacked convolution of the round trip, the library's
  // primitives) left nothing behind.
  auto forced = make();
  {
    const ForcedPath only(chosen);
    run(forced);
  }
  INFO("chosen path " << static_cast<int>(chosen));
  CHECK(bytes(measured) == bytes(forced));
}

#if defined(FUSION_HAS_ONEDNN)
TEST_CASE(
    "the library's oneDNN primitive reorders its weight once it runs, and frees it when "
    "released") {
  namespace d = fusion::detail;
  using Algorithm = d::OneDnnConv2d::Algorithm;
  torch::NoGradGuard no_grad;
  torch::manual_seed(6);
  const auto weight = torch::randn({16, 16, 3, 3}) * 0.1;
  const auto bias = torch::randn({16});
  const auto x = torch::randn({1, 16, 12, 12});
  const auto expected = torch::relu(torch::conv2d(x, weight, bias, 1, 1));
  const d::OneDnnConv2d conv(weight, bias, {1, 1}, {1, 1}, {1, 1}, 1,
                             d::OneDnnEltwise{dnnl::algorithm::eltwise_relu}, /*sum=*/false);
  const auto input = x.to_mkldnn();
  REQUIRE(conv.offers(input, Algorithm::direct));
  CHECK(conv.reordered()->bytes() == 0);  // asked, not run
  require_close(conv(input, Algorithm::direct).to_dense(), expected);
  const auto one_copy = conv.reordered()->bytes();
  CHECK(one_copy >= static_cast<std::uint64_t>(weight.nbytes()));
  // What release_lost does for the path `onednn`, and nothing for the others.
  d::release_lost(conv, input, fusion::kernels::BlockedConvPath::round_trip);
  CHECK(conv.reordered()->bytes() == one_copy);
  d::release_lost(conv, input, fusion::kernels::BlockedConvPath::onednn);
  CHECK(conv.reordered()->bytes() == 0);
  // Made again where it runs again (a forced path, or the choice of another layout).
  require_close(conv(input, Algorithm::direct).to_dense(), expected);
  CHECK(conv.reordered()->bytes() == one_copy);
}
#endif

#if defined(FUSION_HAS_ONEDNN)
TEST_CASE(
    "the library's Winograd convolution matches the convolution in double, with bias, residual "
    "and ReLU, on partial tiles and in either input layout") {
  namespace d = fusion::detail;
  torch::NoGradGuard no_grad;
  torch::manual_seed(7);
  const auto weight = torch::randn({32, 16, 3, 3}) * 0.1;
  const auto bias = torch::randn({32});
  if (!d::WinogradConv2d::applies(weight, {1, 1}, {1, 1}, {1, 1}, 1)) {
    WARN("no AVX-512 here: the library's Winograd convolution is not offered");
    return;
  }
  // Only what it computes: stride 1, padding 1, 3x3, no groups, 16-channel multiples, float32.
  CHECK_FALSE(d::WinogradConv2d::applies(weight, {2, 2}, {1, 1}, {1, 1}, 1));
  CHECK_FALSE(d::WinogradConv2d::applies(weight, {1, 1}, {0, 0}, {1, 1}, 1));
  CHECK_FALSE(d::WinogradConv2d::applies(weight, {1, 1}, {1, 1}, {2, 2}, 1));
  CHECK_FALSE(d::WinogradConv2d::applies(weight, {1, 1}, {1, 1}, {1, 1}, 2));
  CHECK_FALSE(d::WinogradConv2d::applies(torch::randn({24, 16, 3, 3}), {1, 1}, {1, 1}, {1, 1}, 1));
  CHECK_FALSE(d::WinogradConv2d::applies(torch::randn({32, 16, 1, 1}), {1, 1}, {1, 1}, {1, 1}, 1));
  CHECK_FALSE(d::WinogradConv2d::applies(weight.to(torch::kBFloat16), {1, 1}, {1, 1}, {1, 1}, 1));
  {
    const bool before = fk::set_avx512(false);
    CHECK_FALSE(d::WinogradConv2d::applies(weight, {1, 1}, {1, 1}, {1, 1}, 1));
    fk::set_avx512(before);
  }

  const auto weights = std::make_shared<const d::ReorderedWeights>(weight, 1);
  const d::WinogradConv2d plain(weights, bias, /*relu=*/false, /*sum=*/false);
  const d::WinogradConv2d block(weights, bias, /*relu=*/true, /*sum=*/true);
  const auto to_double = [](const torch::Tensor& t) { return t.to(torch::kDouble); };
  // A 1x1 input (one tile, mostly padding), partial tiles on either edge, whole tiles.
  for (const auto& [h, w] :
       std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {5, 7}, {8, 8}, {13, 6}}) {
    CAPTURE(h, w);
    const auto x = torch::randn({2, 16, h, w});
    const auto residual = torch::randn({2, 32, h, w});
    const auto convolved = torch::conv2d(to_double(x), to_double(weight), to_double(bias), 1, 1);
    // x.to_mkldnn() is in the plain layout (reordered first); a convolution's result in aBcd16b.
    const auto identity = at::mkldnn_reorder_conv2d_weight(
        torch::eye(16).view({16, 16, 1, 1}).to_mkldnn(), {0, 0}, {1, 1}, {1, 1}, 1);
    for (const auto& input : {x.to_mkldnn(), at::mkldnn_convolution(x.to_mkldnn(), identity, {},
                                                                    {0, 0}, {1, 1}, {1, 1}, 1)}) {
      const auto y = plain(input, {}, false);
      REQUIRE(y.is_mkldnn());
      require_close(to_double(y.to_dense()), convolved);
      const auto added = residual.to_mkldnn();
      const auto z = block(input, added, /*overwrite_residual=*/false);
      require_close(to_double(z.to_dense()), torch::relu(convolved + to_double(residual)));
      CHECK(torch::equal(added.to_dense(), residual));
      // Written over where asked and the residual is in the result's layout (y's).
      auto owned = plain(input, {}, false);
      const auto values = owned.to_dense();
      const auto over = block(input, owned, /*overwrite_residual=*/true);
      CHECK(over.is_same(owned));
      require_close(to_double(over.to_dense()), torch::relu(convolved + to_double(values)));
    }
  }
  // The transformed weight (36 values per 9 of the weight) is one of the weight's shared forms,
  // freed when neither primitive holds it.
  CHECK(weights->bytes() == 36 * 16 * 32 * sizeof(float));
  plain.release();
  CHECK(weights->bytes() == 36 * 16 * 32 * sizeof(float));
  block.release();
  CHECK(weights->bytes() == 0);
}
#endif

TEST_CASE("a residual block adds its input without writing over the caller's blocked tensor") {
  register_blocks();
  torch::manual_seed(6);
  torch::NoGradGuard no_grad;
  auto model = fusion::Sequential(Basic(16, 16, 1));
  randomize(model);
  const auto x = torch::randn({2, 16, 12, 12});
  const auto expected = model->forward(x);
  fusion::fuse_modules(model, {"*"}, one_tensor, kernel("test.basic"));
  for (int call = 0; call < 3; ++call) {  // the first checked, the second measures the paths
    const auto blocked = x.to_mkldnn();
    const auto y = model->forward(blocked);
    REQUIRE(y.is_mkldnn());
    require_close(y.to_dense(), expected);
    CHECK(torch::equal(blocked.to_dense(), x));
    require_close(model->forward(x), expected);  // a dense input: the block's own reordered copy
  }
  // report counts each stage's folded weight and bias, and its weight in oneDNN's layout.
  const uint64_t weight = 16 * 16 * 9 * 4, bias = 16 * 4;
  CHECK(fusion::fused_chains(model).at(0).stats.state_bytes >= 2 * (weight + bias) + 2 * weight);
#if defined(FUSION_HAS_ONEDNN)
  // And the weights the block's own primitives reordered (the first stage's with its ReLU, the
  // last's with the sum), forced here: measured, the copies of a path that lost are freed.
  const ForcedPath forced(fusion::kernels::BlockedConvPath::onednn);
  for (int call = 0; call < 2; ++call)
    require_close(model->forward(x.to_mkldnn()).to_dense(), expected);
  const auto bytes = fusion::fused_chains(model).at(0).stats.state_bytes;
  CHECK(bytes >= 2 * (weight + bias) + 4 * weight);
  // Another batch size makes primitives of its own, which would each hold the weight's bytes
  // again, but they share the copies already reordered into the layouts they read (oneDNN picks
  // the layout by the weight's shape and the CPU, not by the batch).
  const auto larger = torch::randn({4, 16, 12, 12}).to_mkldnn();
  for (int call = 0; call < 2; ++call) model->forward(larger);
  CHECK(fusion::fused_chains(model).at(0).stats.state_bytes - bytes < weight);
#endif
}

TEST_CASE("the residual block kernels' bfloat16 variants on each convolution path") {
  register_blocks();
  if (!fk::bfloat16_supported()) {
    WARN("no AVX512_BF16 (or no oneDNN) here: the bfloat16 blocks are not run");
    return;
  }
  torch::manual_seed(8);
  torch::NoGradGuard no_grad;
  // Basic blocks with and without a downsample branch, then Bottlenecks: the last convolution of
  // each adds the residual, by oneDNN's sum post-op on the onednn path.
  auto model = fusion::Sequential(Basic(8, 16, 2), Basic(16, 16, 1), Bottleneck(16, 4, 1),
                                  Bottleneck(16, 8, 2));
  randomize(model);
  const auto x = torch::randn({2, 8, 20, 20});
  const auto expected = model->forward(x);
  for (const char* block : {"0", "1"}) {
    fusion::fuse_modules(model, {block}, one_tensor, kernel("test.basic.bf16"));
  }
  for (const char* block : {"2", "3"}) {
    fusion::fuse_modules(model, {block}, one_tensor, kernel("test.bottleneck.bf16"));
  }
  const double tolerance = fusion::default_tolerance(torch::kBFloat16);
  using fusion::kernels::BlockedConvPath;
  for (const auto path : {std::optional<BlockedConvPath>{BlockedConvPath::blocked},
                          std::optional<BlockedConvPath>{BlockedConvPath::onednn},
                          std::optional<BlockedConvPath>{}}) {
    CAPTURE(path.has_value() ? static_cast<int>(*path) : -1);
    const ForcedPath forced(path);
    for (int call = 0; call < 3; ++call) {  // the first checked, the later hand on blocked
      const auto y = model->forward(x);
      require_close(y, expected, tolerance);
      CHECK_FALSE(torch::equal(y, expected));  // computed in bfloat16
    }
    // The caller's blocked input is read, not written over, by the first block's sum post-op.
    const auto blocked = x.to_mkldnn();
    require_close(model->forward(blocked).to_dense(), expected, tolerance);
    CHECK(torch::equal(blocked.to_dense(), x));
  }
  for (const auto& chain : fusion::fused_chains(*model)) {
    CHECK(chain.stats.runs == 12);
    CHECK(chain.stats.replays_declined == 0);
  }
}

TEST_CASE(
    "the residual block kernel names the member whose shape does not fit, and replays "
    "BatchNorm without running statistics") {
  register_blocks();
  torch::NoGradGuard no_grad;
  SECTION("a BatchNorm of other channels") {
    auto model = fusion::Sequential(Basic(8, 8, 1));
    model->ptr<BasicImpl>(0)->bn2->options.num_features(4);
    REQUIRE_THROWS_WITH(fusion::fuse_modules(model, {"*"}, one_tensor, kernel("test.basic")),
                        Contains("member 'bn2': normalises 4 channels, its convolution gives 8"));
    CHECK(fusion::fused_chains(*model).empty());
  }
  SECTION("a downsample branch of three entries") {
    auto model = fusion::Sequential(Basic(8, 16, 2));
    model->ptr<BasicImpl>(0)->downsample->push_back(nn::ReLU());
    REQUIRE_THROWS_WITH(
        fusion::fuse_modules(model, {"*"}, one_tensor, kernel("test.basic")),
        Contains("member 'downsample': has 3 entries; a downsample branch must be Conv2d, "
                 "BatchNorm2d"));
  }
  SECTION("no downsample branch where the identity cannot fit") {
    auto model = fusion::Sequential(Basic(8, 16, 2, /*branch=*/false));
    REQUIRE_THROWS_WITH(fusion::fuse_modules(model, {"*"}, one_tensor, kernel("test.basic")),
                        Contains("adds its input without a downsample branch, but its stages take "
                                 "8 channels and give 16 (stride 2)"));
  }
  SECTION("without running statistics the block's own code runs") {
    auto model = fusion::Sequential(Basic(8, 8, 1));
    randomize(model);
    model->ptr<BasicImpl>(0)->bn1->options.track_running_stats(false);  // batch statistics
    const auto x = torch::randn({2, 8, 6, 6});
    const auto expected = model->forward(x);
    fusion::fuse_modules(model, {"*"}, one_tensor, kernel("test.basic"));
    require_close(model->forward(x), expected);
    CHECK(fusion::fused_chains(*model).at(0).stats.replays_declined == 1);
  }
}

TEST_CASE(
    "conv_block: MobileNetV2's inverted residual blocks and conv + bn + activation stages, each "
    "activation, handed on blocked") {
  register_blocks();
  register_probe();
  torch::NoGradGuard no_grad;
  const std::vector<std::pair<std::string, std::function<nn::AnyModule()>>> activations{
      {"ReLU6", [] { return nn::AnyModule(nn::ReLU6()); }},
      {"Hardswish", [] { return nn::AnyModule(fusion::Hardswish()); }},
      {"SiLU", [] { return nn::AnyModule(nn::SiLU()); }},
      {"LeakyReLU",
       [] { return nn::AnyModule(nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.2))); }},
      {"GELU", [] { return nn::AnyModule(nn::GELU(nn::GELUOptions().approximate("tanh"))); }}};
  for (const auto& [name, activation] : activations) {
    CAPTURE(name);
    torch::manual_seed(4);
    // The stem, a probe, then blocks: expanding with the input added, strided (no add), not
    // expanding (expand ratio 1) with the input added, and one of 24 channels (padded in oneDNN's
    // blocks of 16).
    auto model =
        fusion::Sequential(ReLU6Stage(3, 16, 2), Probe(), Inverted(16, 16, 1, 6, activation),
                           Inverted(16, 24, 2, 6, activation), Inverted(24, 24, 1, 1, activation),
                           ReLU6Stage(24, 32, 1));
    randomize(model);
    const auto x = torch::randn({2, 3, 30, 30});
    const auto expected = model->forward(x);
    // Compared within a tolerance of the largest result of any entry: activations that do not
    // bound their results (all but ReLU6) let magnitudes grow from block to block, and the last
    // stage's ReLU6 clamps them to 6, so its output alone would not show the scale of the rounding.
    double largest = 0;
    torch::Tensor h = x;
    for (auto& entry : *model) {
      h = entry.forward(h);
      largest = std::max(largest, h.abs().max().item<double>());
    }
    const auto require_within_entries = [&](const torch::Tensor& got, double tolerance) {
      REQUIRE_FALSE(got.is_mkldnn());
      const double diff = (got - expected).abs().max().item<double>();
      INFO("max abs diff " << diff << ", largest result of an entry " << largest);
      REQUIRE(diff <= tolerance * largest);
    };
    fusion::fuse_modules(model, {"0"}, one_tensor, kernel("test.stage"));
    fusion::fuse_modules(model, {"1"}, one_tensor, kernel("test.probe"));
    for (const char* block : {"2", "3", "4"}) {
      fusion::fuse_modules(model, {block}, one_tensor, kernel("test.inverted"));
    }
    fusion::fuse_modules(model, {"5"}, one_tensor, kernel("test.stage"));
    probe_inputs.clear();
    for (int call = 0; call < 3; ++call)
      require_within_entries(model->forward(x), kRelativeTolerance);
    CHECK(probe_inputs == std::vector<bool>{false, true, true});  // the stem handed its result on
    for (const auto& chain : fusion::fused_chains(*model)) CHECK(chain.stats.runs == 3);
    // An input in oneDNN's layout comes out in it.
    const auto blocked = model->forward(x.to_mkldnn());
    REQUIRE(blocked.is_mkldnn());
    require_within_entries(blocked.to_dense(), kRelativeTolerance);
    {
      // The library's primitives, the activation as their post-op, in the blocks' layout
      // (oneDNN 2.x builds; elsewhere not offered, and the stages run as declared).
      const ForcedPath forced(fusion::kernels::BlockedConvPath::onednn);
      for (int call = 0; call < 2; ++call) {
        require_within_entries(model->forward(x), kRelativeTolerance);
      }
    }

    if (fusion::kernels::bfloat16_supported()) {
      auto plan = fusion::plan_of(*model);
      fusion::unfuse_modules(model);
      for (auto& rule : plan.rules) {
        if (rule.options.kernel != "test.probe") rule.options.kernel += ".bf16";
      }
      fusion::fuse_modules(model, plan);
      // Measured, then LibTorch's convolutions, then the library's primitives with the
      // activations and the add as post-ops, in bfloat16.
      using fusion::kernels::BlockedConvPath;
      for (const auto path : {std::optional<BlockedConvPath>{},
                              std::optional<BlockedConvPath>{BlockedConvPath::blocked},
                              std::optional<BlockedConvPath>{BlockedConvPath::onednn}}) {
        CAPTURE(path.has_value() ? static_cast<int>(*path) : -1);
        const ForcedPath forced(path);
        for (int call = 0; call < 3; ++call) {
          const auto y = model->forward(x);
          require_within_entries(y, fusion::default_tolerance(torch::kBFloat16));
          CHECK_FALSE(torch::equal(y, expected));  // it did compute in bfloat16
        }
      }
    }
  }
}

TEST_CASE("a block stage whose activation module is replaced after fusing computes the new one") {
  register_blocks();
  torch::manual_seed(7);
  torch::NoGradGuard no_grad;
  auto model = fusion::Sequential(
      ReLU6Stage(3, 16, 1), Inverted(16, 16, 1, 6, [] { return nn::AnyModule(nn::ReLU6()); }));
  randomize(model);
  const auto x = torch::randn({2, 3, 12, 12});
  fusion::fuse_modules(model, {"0"}, one_tensor, kernel("test.stage"));
  fusion::fuse_modules(model, {"1"}, one_tensor, kernel("test.inverted"));
  const ForcedPath forced(fusion::kernels::BlockedConvPath::onednn);
  for (int call = 0; call < 2; ++call) model->forward(x);  // ReLU6 as the post-op where built
  // A parameter-free module swapped: no weight changes, so the state is not rebuilt.
  auto& block = *model->ptr<InvertedImpl>(1);
  auto& expanding = *block.conv->ptr<ConvNormActImpl>(0);
  expanding.act = nn::AnyModule(nn::GELU());
  expanding.replace_module("2", expanding.act.ptr());
  // The entries' own code, which the fused Sequential does not reach.
  const auto expected = block.forward(model->ptr<StageImpl<nn::ReLU6>>(0)->forward(x));
  for (int call = 0; call < 2; ++call) require_close(model->forward(x), expected);
}

TEST_CASE("conv_block names the module or member that does not fit") {
  register_blocks();
  torch::NoGradGuard no_grad;
  const auto relu6 = [] { return nn::AnyModule(nn::ReLU6()); };
  SECTION("a module that is not part of a stage") {
    auto model = fusion::Sequential(Inverted(8, 8, 1, 6, relu6));
    model->ptr<InvertedImpl>(0)->conv->push_back(nn::Dropout(0.1));
    REQUIRE_THROWS_WITH(
        fusion::fuse_modules(model, {"*"}, one_tensor, kernel("test.inverted")),
        Contains(
            "its stages: member 'conv.4' (torch::nn::DropoutImpl) is not a Conv2d followed by a "
            "BatchNorm2d"));
    CHECK(fusion::fused_chains(*model).empty());
  }
  SECTION("an added input that does not fit") {
    auto model = fusion::Sequential(Inverted(8, 16, 1, 6, relu6));
    model->ptr<InvertedImpl>(0)->use_res_connect = true;
    REQUIRE_THROWS_WITH(fusion::fuse_modules(model, {"*"}, one_tensor, kernel("test.inverted")),
                        Contains("adds its input without a downsample branch, but its stages take "
                                 "8 channels and give 16 (stride 1)"));
  }
  SECTION("a nested member's channels") {
    auto model = fusion::Sequential(Inverted(8, 8, 1, 6, relu6));
    model->ptr<InvertedImpl>(0)->conv[1]->as<ConvNormActImpl>()->bn->options.num_features(4);
    REQUIRE_THROWS_WITH(
        fusion::fuse_modules(model, {"*"}, one_tensor, kernel("test.inverted")),
        Contains("member 'conv.1.1': normalises 4 channels, its convolution gives 48"));
  }
}

TEST_CASE(
    "conv + batch norm + relu + max pooling matches the modules, dense, blocked and handed "
    "on") {
  register_blocks();
  fusion::kernels::register_builtin_kernels();
  register_probe();
  torch::manual_seed(3);
  torch::NoGradGuard no_grad;
  const auto stem = [](int64_t dilation, bool ceil_mode) {
    return fusion::Sequential(
        nn::Conv2d(nn::Conv2dOptions(3, 8, 7).stride(2).padding(3).bias(false)), nn::BatchNorm2d(8),
        nn::ReLU(nn::ReLUOptions(true)),
        nn::MaxPool2d(
            nn::MaxPool2dOptions(3).stride(2).padding(1).dilation(dilation).ceil_mode(ceil_mode)),
        Probe(), Basic(8, 8, 1));
  };
  const std::vector<fusion::ModuleSpec> four(4, one_tensor[0]);
  for (const auto& [dilation, ceil_mode] :
       {std::pair<int64_t, bool>{1, false}, {1, true}, {2, false}}) {
    CAPTURE(dilation, ceil_mode);
    auto model = stem(dilation, ceil_mode);
    randomize(model);
    const auto x = torch::randn({2, 3, 42, 42});
    const auto expected = model->forward(x);
    const auto channels_last = x.contiguous(torch::MemoryFormat::ChannelsLast);
    fusion::fuse_modules(model, {"0", "1", "2", "3"}, four,
                         kernel("fusion.conv2d_bn_relu_maxpool2d"));
    fusion::fuse_modules(model, {"4"}, one_tensor, kernel("test.probe"));
    fusion::fuse_modules(model, {"5"}, one_tensor, kernel("test.basic"));
    probe_inputs.clear();
    for (int call = 0; call < 3; ++call) {
      const auto y = model->forward(call == 2 ? channels_last : x);
      CHECK_FALSE(y.is_inference());
      require_close(y, expected);
    }
    // The first call is checked (dense); then the stem hands its pooled result on blocked, except
    // where the pooling is dilated (oneDNN has none: the module pools the dense result).
    CHECK(probe_inputs == std::vector<bool>{false, dilation == 1, dilation == 1});
    CHECK(fusion::fused_chains(*model).at(0).stats.runs == 3);
  }
}
