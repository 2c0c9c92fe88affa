// The GPT-2 port: checkpoint names and loading, its KV cache, and fusion over it: the replay is
// exact, and the library's transformer kernels (declared by layout in kernels.hpp) are within
// tolerance with the same greedy ids.
#include "catch_compat.hpp"

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint.hpp"
#include "gpt2.hpp"
#include "kernels.hpp"

namespace fs = std::filesystem;
using fusion_test::Contains;

namespace {

gpt2::LMHeadModel random_model(uint64_t seed, bool tied = true) {
  gpt2::Config config;
  config.tie_word_embeddings = tied;
  gpt2::LMHeadModel model(config);
  gpt2::init_random(*model, seed);
  model->eval();
  return model;
}

torch::Tensor ids(std::vector<int64_t> values) {
  return torch::tensor(values, torch::kInt64).unsqueeze(0);
}

/// Kernels compute with other ops: within 1e-4 of the largest logit (float32).
void require_within_kernel_tolerance(const torch::Tensor& got, const torch::Tensor& expected) {
  REQUIRE(got.sizes() == expected.sizes());
  const double tolerance = 1e-4 * std::max(1.0, expected.abs().max().item<double>());
  const double diff = (got - expected).abs().max().item<double>();
  INFO("max abs diff " << diff << ", tolerance " << tolerance);
  REQUIRE(diff <= tolerance);
}

fs::path scratch(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("gpt2-test-" + name);
  fs::remove_all(dir);
  return dir;
}

}  // namespace

TEST_CASE("parameter names are transformers' GPT2LMHeadModel keys; a tied head has none") {
  auto tied = random_model(1);
  const auto params = tied->named_parameters();
  CHECK(params["transformer.h.0.attn.c_attn.weight"].sizes() == torch::IntArrayRef({64, 192}));
  CHECK(params["transformer.h.3.mlp.c_proj.weight"].sizes() == torch::IntArrayRef({256, 64}));
  CHECK(params.contains("transformer.wpe.weight"));
  CHECK(params.contains("transformer.ln_f.bias"));
  CHECK_FALSE(params.contains("lm_head.weight"));
  CHECK(tied->lm_head->weight.is_same(tied->transformer->wte->weight));
  auto untied = random_model(1, /*tied=*/false);
  CHECK(untied->named_parameters().contains("lm_head.weight"));
}

TEST_CASE("the KV cache reproduces the full forward") {
  torch::NoGradGuard no_grad;
  auto model = random_model(2);
  const auto prompt = ids({1, 2, 3, 4, 5, 6});
  const auto full = model(prompt);
  gpt2::KVCache cache;
  const auto first = model->forward(prompt.narrow(1, 0, 4), &cache);
  const auto rest = model->forward(prompt.narrow(1, 4, 2), &cache);
  CHECK(torch::allclose(torch::cat({first, rest}, 1), full, 1e-5, 1e-5));
  CHECK_THROWS_WITH(model(torch::zeros({1, 129}, torch::kInt64)), Contains("past n_positions"));
}

TEST_CASE("GPT-2 fused: the replay is exact, the library kernels within tolerance, same ids") {
  torch::NoGradGuard no_grad;
  const bool folded = GENERATE(false, true);
  const bool tied = GENERATE(true, false);
  INFO((folded ? "folded" : "default (no weight copy)") << ", " << (tied ? "tied" : "untied"));
  auto model = random_model(3, tied);
  const auto prompt = ids({1, 2, 3, 4, 5, 6, 7, 8});
  const auto original = model(prompt);
  const auto original_ids = model->generate(prompt, 10);

  fusion::fuse_modules(model, gpt2::attention_patterns(), gpt2::attention_specs());
  fusion::fuse_modules(model, gpt2::mlp_patterns(), gpt2::hidden_specs());
  fusion::fuse_modules(model, gpt2::lm_head_patterns(), gpt2::hidden_specs());
  CHECK(torch::equal(model(prompt), original));
  CHECK(torch::equal(model->generate(prompt, 10), original_ids));
  fusion::unfuse_modules(model);

  gpt2::fuse_with_kernels(model, folded);
  REQUIRE(fusion::fused_chains(model).size() == 9);
  require_within_kernel_tolerance(model(prompt), original);
  CHECK(torch::equal(model->generate(prompt, 10), original_ids));  // with the KV cache
  for (const auto& chain : fusion::fused_chains(model)) {
    INFO(fusion::to_string(chain) << " " << chain.kernel);
    CHECK(chain.stats.runs > 0);
    CHECK(chain.stats.prepares == 1);
    // One projection per input (c_attn is packed already; [in, out] weights are read in
    // place): the default copies nothing.
    CHECK((chain.stats.state_bytes > 0) == folded);
  }
  if (tied) CHECK(model->lm_head->weight.is_same(model->transformer->wte->weight));
  const auto report = fusion::verify(
      model, [&] { return model(prompt); },
      1e-4 * std::max(1.0, original.abs().max().item<double>()));
  INFO(report.to_string());
  CHECK(report.ok());
}

TEST_CASE("GPT-2 checkpoints round-trip; OpenAI's key names and mask buffers load") {
  torch::NoGradGuard no_grad;
  const auto prompt = ids({3, 1, 4, 1, 5});
  auto source = random_model(4);
  const auto expected = source(prompt);
  const auto dir = scratch("round-trip");
  gpt2::save_pretrained(*source, dir);

  auto model = gpt2::LMHeadModel(gpt2::load_config(dir));
  gpt2::fuse_with_kernels(model);
  const auto before = model(prompt);
  gpt2::load_weights(*model, dir);  // into a kernel-equipped model: the kernels prepare again
  model->eval();
  require_within_kernel_tolerance(model(prompt), expected);
  CHECK_FALSE(torch::allclose(before, model(prompt)));

  // As GPT2Model saves it: no "transformer." prefix, with h.N.attn.bias buffers.
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& item : source->transformer->named_parameters()) {
    tensors.emplace_back(item.key(), item.value());
  }
  for (int layer = 0; layer < 4; ++layer) {
    tensors.emplace_back("h." + std::to_string(layer) + ".attn.bias",
                         torch::ones({128, 128}).tril().view({1, 1, 128, 128}));
  }
  checkpoint::save_safetensors(tensors, dir / "model.safetensors");
  auto openai = gpt2::LMHeadModel(gpt2::load_config(dir));
  gpt2::load_weights(*openai, dir);
  openai->eval();
  CHECK(torch::equal(openai(prompt), expected));

  // A wrong shape names the file and key, and leaves the model as it was.
  tensors[0].second = torch::zeros({3, 3});
  checkpoint::save_safetensors(tensors, dir / "model.safetensors");
  const auto unchanged = openai(prompt);
  CHECK_THROWS_WITH(gpt2::load_weights(*openai, dir),
                    Contains("model.safetensors: tensor 'transformer." + tensors[0].first +
                             "' has shape [3, 3]"));
  CHECK(torch::equal(openai(prompt), unchanged));
  fs::remove_all(dir);
}

TEST_CASE("GPT-2 config fields that would change the computation are refused, by name") {
  const auto dir = scratch("config");
  auto source = random_model(5);
  gpt2::save_pretrained(*source, dir);
  auto edit = [&](const std::string& key, const nlohmann::json& value) {
    auto config = checkpoint::detail::read_json(dir / "config.json");
    config[key] = value;
    std::ofstream(dir / "config.json") << config.dump();
  };
  edit("activation_function", "relu");
  CHECK_THROWS_WITH(gpt2::load_config(dir), Contains("activation_function 'relu'"));
  edit("activation_function", "gelu_new");
  edit("reorder_and_upcast_attn", true);
  CHECK_THROWS_WITH(gpt2::load_config(dir), Contains("'reorder_and_upcast_attn' true"));
  edit("reorder_and_upcast_attn", false);
  edit("n_head", 5);
  CHECK_THROWS_WITH(gpt2::load_config(dir), Contains("n_embd (64) must be a multiple of n_head"));
  fs::remove_all(dir);
}
