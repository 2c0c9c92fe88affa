// The documentation is true: its printed examples are what the library prints (the README's
// `report` of its example, the form of a `verify` line in docs/semantics.md), and the LibTorch
// internals docs/compatibility.md lists behave as the library relies on. (That every C++ block of
// the documentation compiles is the docs.snippets test: docs/extract_snippets.cpp.)
#include "catch_compat.hpp"

#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <fusion/detail/blocked_eltwise.hpp>
#include <fusion/detail/onednn_conv.hpp>
#include <fusion/kernels/batch_norm_folding.hpp>

#include "models.hpp"

using namespace models;

namespace {

/// A file of the source tree, found from this file's path (CMake compiles it by absolute path).
std::string read_doc(const std::string& relative) {
  const std::string here = __FILE__;
  const std::string root = here.substr(0, here.rfind("/tests/"));
  std::ifstream in(root + "/" + relative);
  INFO(root + "/" + relative);
  REQUIRE(in);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

/// The lines of the fenced block that follows `marker` in `text`.
std::vector<std::string> block_after(const std::string& text, const std::string& marker) {
  const auto at = text.find(marker);
  REQUIRE(at != std::string::npos);
  std::istringstream in(text.substr(text.find("```", at)));
  std::vector<std::string> lines;
  std::string line;
  std::getline(in, line);  // the opening fence
  while (std::getline(in, line) && line.rfind("```", 0) != 0) lines.push_back(line);
  return lines;
}

}  // namespace

TEST_CASE("the README's report is what report prints for its example") {
  Stack model(2, 64, 128);  // the README's Block: RMSNorm(64), MLP(64, 128); two layers
  fusion::fuse_modules(model, {"layers.*.post_attention_layernorm", "layers.*.mlp"},
                       {fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}},
                        fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}}});
  std::istringstream printed(fusion::report(model));
  const auto shown = block_after(read_doc("README.md"), "`report` prints:");
  REQUIRE(shown.size() > 2);
  std::string line;
  for (const auto& expected : shown) {
    if (expected == "[1] ...") break;  // the README elides the second chain
    REQUIRE(std::getline(printed, line));
    CHECK(line == expected);
  }
}

TEST_CASE("docs/semantics.md shows a verify line as verify prints one") {
  torch::manual_seed(14);
  Reused model;  // mlp(normed) + normed: the replay skips the second use
  fusion::fuse_modules(model, {"norm", "mlp"}, block_specs());
  const auto x = torch::randn({3, 16});
  const std::string printed = fusion::verify(model, [&] { return model(x); }).to_string();
  const auto snippet = block_after(read_doc("docs/semantics.md"), "Check a model with");
  std::string shown;
  for (const auto& line : snippet) {
    if (line.rfind("// FAIL", 0) == 0) shown = line.substr(3) + "\n";
  }
  const std::regex form(
      R"(FAIL \[(\S+) -> (\S+)\]: max abs diff ([0-9.e+-]+|inf), gradients: max abs diff )"
      R"(([0-9.e+-]+|inf) at '\S+'\n)");
  CHECK(std::regex_match(shown, form));
  INFO(printed);
  CHECK(std::regex_match(printed, form));
}

// docs/compatibility.md: each LibTorch internal the library relies on, checked where it is used
// (detail/libtorch.hpp and the two named there). A failure here names the internal that changed.
TEST_CASE("the LibTorch internals docs/compatibility.md lists behave as the library relies on") {
  namespace d = fusion::detail;
  SECTION("at::detail::make_tensor + set_sizes_and_strides: an all-zero-strides view") {
    INFO("LibTorch changed at::detail::make_tensor or TensorImpl::set_sizes_and_strides");
    const auto scalar = torch::full({}, 7.0);
    const auto view = d::expanded_view(scalar, {2, 3});
    CHECK(view.sizes() == c10::IntArrayRef({2, 3}));
    CHECK(view.strides() == c10::IntArrayRef({0, 0}));
    CHECK(d::storage_of(view) == d::storage_of(scalar));
    CHECK(torch::equal(view, torch::full({2, 3}, 7.0)));
    CHECK_THROWS(view.add_(1));  // more than one element refers to one memory location
  }
  SECTION("StorageImpl identity, held weakly: never reused, bytes still freed") {
    INFO(
        "LibTorch changed Storage::getWeakStorageImpl, weak_intrusive_ptr or StorageImpl's "
        "lifetime");
    auto parameter = torch::randn({1024, 1024});
    for (int round = 0; round < 5; ++round) {
      const auto old = d::weak_storage(parameter);
      CHECK(d::target_of(old) == d::storage_of(parameter));
      torch::NoGradGuard no_grad;
      parameter.set_data(torch::randn({1024, 1024}));
      CHECK(old.expired());                                  // the bytes went with the last tensor
      CHECK(d::target_of(old) != d::storage_of(parameter));  // the object did not
    }
  }
  SECTION("the version counter, and inference tensors without one") {
    INFO("LibTorch changed TensorImpl::version_counter or is_inference");
    auto tensor = torch::zeros({3});
    const auto before = d::version_of(tensor);
    CHECK(before >= 0);
    tensor.add_(1);
    CHECK(d::version_of(tensor) == before + 1);
    c10::InferenceMode inference;
    CHECK(d::version_of(torch::zeros({3})) == -1);
  }
  SECTION("AutogradState: grad and inference modes in one read") {
    INFO("LibTorch changed c10::AutogradState");
    {
      torch::NoGradGuard no_grad;
      CHECK_FALSE(d::autograd_state().get_grad_mode());
    }
    c10::InferenceMode inference;
    CHECK(d::autograd_state().get_inference_mode());
  }
  SECTION("AnyModuleHolder's friendship: FORWARD_HAS_DEFAULT_ARGS defaults") {
    INFO("LibTorch changed torch::nn::AnyModuleHolder or _forward_populate_default_args");
    ScaleShift module;  // forward(x, scale = 2.0, shift = 1), declared
    auto defaults = d::forward_defaults(*module, 3);  // AnyValue::get is not const
    REQUIRE(defaults.size() == 3);
    CHECK_FALSE(defaults[0].has_value());
    REQUIRE(defaults[1].has_value());
    REQUIRE(defaults[2].has_value());
    CHECK(defaults[1]->get<double>() == 2.0);
    CHECK(defaults[2]->get<int64_t>() == 1);
  }
  SECTION("TorchScript's in-place activations on oneDNN tensors (prim::MKLDNNClamp_, HardSwish_)") {
    if (!at::hasMKLDNN()) return;  // no oneDNN tensors to run them on
    INFO(
        "LibTorch changed the JIT operators prim::MKLDNNClamp_ or prim::MKLDNNHardSwish_ "
        "(frozen_ops_to_mkldnn.cpp), or Operator::getOperation(node)");
    for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
      CAPTURE(dtype);
      // A convolution's result, in oneDNN's blocked layout (nChw16c or nChw8c): 32 channels, so
      // nothing is padded.
      const auto x = torch::randn({2, 32, 5, 5});
      const auto weight = at::mkldnn_reorder_conv2d_weight(
          (torch::randn({32, 32, 1, 1}) * 5).to_mkldnn(dtype), {0, 0}, {1, 1}, {1, 1}, 1);
      const auto result = [&] {
        return at::mkldnn_convolution(x.to_mkldnn(dtype), weight, {}, {0, 0}, {1, 1}, {1, 1}, 1);
      };
      const auto expected = result().to_dense(torch::kFloat);
      auto clamped = result();
      REQUIRE(d::BlockedEltwise::relu6_(clamped));
      CHECK(torch::equal(clamped.to_dense(torch::kFloat), expected.clamp(0, 6)));
      auto swished = result();
      REQUIRE(d::BlockedEltwise::hardswish_(swished));
      CHECK(torch::allclose(swished.to_dense(torch::kFloat),
                            torch::hardswish(expected).to(dtype).to(torch::kFloat), 1e-2, 1e-2));
    }
    // 24 channels, padded to 32 in oneDNN's blocks: LibTorch 1.13's operator computes the wrong
    // elements there, so the library declines (and goes dense and back).
    auto padded = torch::randn({1, 24, 4, 4}).to_mkldnn();
    CHECK_FALSE(d::BlockedEltwise::relu6_(padded));
  }
  SECTION("TorchScript's prepacked oneDNN convolution, where LibTorch has it") {
    if (!d::PrepackedConv2d::available()) {
      WARN(
          "mkldnn_prepacked::conv2d_prepack/conv2d_run are not registered in this LibTorch: the "
          "folding kernels run the dense convolution instead");
      return;
    }
    INFO("LibTorch changed mkldnn_prepacked::conv2d_prepack or conv2d_run");
    const auto weight = torch::randn({8, 3, 3, 3});
    const auto bias = torch::randn({8});
    const d::PrepackedConv2d conv(weight, bias, {1, 1}, {1, 1}, {1, 1}, 1, "none");
    const auto x = torch::randn({1, 3, 8, 8});
    CHECK(torch::allclose(conv(x), torch::conv2d(x, weight, bias, 1, 1), 1e-4, 1e-4));
  }
#if defined(FUSION_HAS_ONEDNN)
  SECTION("LibTorch's oneDNN tensors as oneDNN memory (detail/onednn.hpp)") {
    INFO(
        "LibTorch changed at::native::itensor_from_mkldnn, new_with_itensor_mkldnn, "
        "ideep::engine::cpu_engine or ideep::tensor, or was built against other ideep headers");
    const auto weight = torch::randn({32, 32, 3, 3}) * 0.1;
    const auto bias = torch::randn({32});
    const auto x = torch::randn({2, 32, 10, 10});
    const auto residual = torch::randn({2, 32, 10, 10});
    const auto expected = torch::relu(torch::conv2d(x, weight, bias, 1, 1) + residual);
    const d::OneDnnConv2d conv(weight, bias, {1, 1}, {1, 1}, {1, 1}, 1,
                               d::OneDnnEltwise{dnnl::algorithm::eltwise_relu}, /*sum=*/true);
    // A plain oneDNN tensor in (reordered by the primitive's own layout), and a blocked one: the
    // result of a LibTorch convolution.
    const auto identity = at::mkldnn_reorder_conv2d_weight(
        torch::eye(32).view({32, 32, 1, 1}).to_mkldnn(), {0, 0}, {1, 1}, {1, 1}, 1);
    const auto blocked =
        at::mkldnn_convolution(x.to_mkldnn(), identity, {}, {0, 0}, {1, 1}, {1, 1}, 1);
    const d::OneDnnConv2d plain(weight, bias, {1, 1}, {1, 1}, {1, 1}, 1,
                                d::OneDnnEltwise{dnnl::algorithm::eltwise_relu}, /*sum=*/false);
    using Algorithm = d::OneDnnConv2d::Algorithm;
    CHECK(conv.offers(x.to_mkldnn(), Algorithm::direct));
    int overwritten = 0;
    for (const auto& input : {x.to_mkldnn(), blocked}) {
      for (const auto algorithm : {Algorithm::direct, Algorithm::winograd}) {
        CAPTURE(static_cast<int>(algorithm));
        if (!conv.offers(input, algorithm) || !plain.offers(input, algorithm)) {
          continue;  // Winograd: AVX-512 only
        }
        const auto added = residual.to_mkldnn();
        auto y = conv(input, algorithm, added);
        REQUIRE(y.is_mkldnn());
        CHECK(torch::equal(added.to_dense(), residual));  // not overwritten unless asked
        CHECK(torch::allclose(y.to_dense(), expected, 1e-4, 1e-4));
        y.relu_();  // LibTorch's own op on the memory the library made
        CHECK(torch::allclose(y.to_dense(), expected, 1e-4, 1e-4));
        // A residual the caller owns is written over where it has the result's layout (a result
        // of the same primitive without the sum has), else left as it was.
        auto owned = plain(input, algorithm);
        const auto values = owned.to_dense();
        const auto z = conv(input, algorithm, owned, /*overwrite_residual=*/true);
        CHECK(torch::allclose(
            z.to_dense(), torch::relu(torch::conv2d(x, weight, bias, 1, 1) + values), 1e-4, 1e-4));
        if (z.is_same(owned)) {
          ++overwritten;
        } else {
          CHECK(torch::equal(owned.to_dense(), values));
        }
      }
    }
    CHECK(overwritten > 0);

    // Layout::input (a block with a depthwise convolution): a channel-blocked input's layout is
    // the result's too; a plain one (x.to_mkldnn()'s, where oneDNN 2.x would convolve with its
    // GEMM-based implementation) is reordered as with Layout::chosen. The activation by name.
    const auto relu6 = d::onednn_eltwise_named("relu6");
    REQUIRE(relu6.has_value());
    CHECK(relu6->algorithm == dnnl::algorithm::eltwise_clip);
    CHECK_FALSE(d::onednn_eltwise_named("").has_value());
    CHECK_FALSE(d::onednn_eltwise_named("gelu").has_value());  // its options may change
    const d::OneDnnConv2d kept(weight, bias, {1, 1}, {1, 1}, {1, 1}, 1, relu6, /*sum=*/false,
                               d::OneDnnConv2d::Layout::input);
    const auto clipped = torch::clamp(torch::conv2d(x, weight, bias, 1, 1), 0, 6);
    CHECK_FALSE(kept.keeps(x.to_mkldnn()));
    CHECK(kept.keeps(blocked));
    for (const auto& input : {x.to_mkldnn(), blocked}) {
      const auto y = kept(input, Algorithm::direct);
      CHECK(torch::allclose(y.to_dense(), clipped, 1e-4, 1e-4));
      if (kept.keeps(input)) {
        CHECK(d::format_of(d::onednn::memory_of(y).get_desc()) ==
              d::format_of(d::onednn::memory_of(input).get_desc()));
      }
    }
  }
#endif
}
