// The Qwen3 port: checkpoint loading and saving, and fused == original for both chains.
#include "catch_compat.hpp"

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "checkpoint.hpp"
#include "kernels.hpp"
#include "npy.hpp"
#include "qwen3.hpp"

namespace fs = std::filesystem;
using fusion_test::Approx;
using fusion_test::Contains;

namespace {

qwen3::Config small_config() {
  qwen3::Config c;  // the demo's tiny default: hidden 64, 4 layers, 8/4 heads, head_dim 16
  c.vocab_size = 128;
  return c;
}

qwen3::ForCausalLM random_model(uint64_t seed, qwen3::Config c = small_config()) {
  qwen3::ForCausalLM model(c);
  qwen3::init_random(*model, seed);
  model->eval();
  return model;
}

/// A fresh directory under the test's working directory.
fs::path scratch(const std::string& name) {
  const fs::path dir = fs::current_path() / "qwen3-test-files" / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

torch::Tensor ids(std::vector<int64_t> values) {
  return torch::tensor(values, torch::kInt64).unsqueeze(0);
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

/// A safetensors file: the header's length, the header JSON, then the tensor data.
void write_safetensors(const fs::path& path, const std::string& header, const std::string& data) {
  std::string bytes(8, '\0');
  const uint64_t size = header.size();
  std::memcpy(bytes.data(), &size, 8);
  write_file(path, bytes + header + data);
}

std::vector<torch::Tensor> parameters_of(qwen3::ForCausalLMImpl& model) {
  std::vector<torch::Tensor> copies;
  for (const auto& p : model.parameters()) copies.push_back(p.detach().clone());
  return copies;
}

bool same_parameters(qwen3::ForCausalLMImpl& model, const std::vector<torch::Tensor>& copies) {
  const auto now = model.parameters();
  for (std::size_t i = 0; i < now.size(); ++i) {
    if (!torch::equal(now[i], copies[i])) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("parameter names are the Hugging Face checkpoint keys") {
  auto model = random_model(1);
  auto params = model->named_parameters();
  for (const char* key :
       {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_norm.weight", "model.layers.3.mlp.down_proj.weight",
        "model.layers.3.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"}) {
    INFO(key);
    CHECK(params.contains(key));
  }
  CHECK(params.size() == 1 + 4 * 11 + 1 + 1);
  CHECK(params["model.layers.0.self_attn.k_proj.weight"].sizes() == torch::IntArrayRef{64, 64});

  auto c = small_config();
  c.tie_word_embeddings = true;
  CHECK_FALSE(random_model(1, c)->named_parameters().contains("lm_head.weight"));
}

TEST_CASE("the port's attention is causal and the KV cache reproduces the full forward") {
  torch::NoGradGuard no_grad;
  auto model = random_model(2);
  const auto prompt = ids({5, 9, 17, 33, 65, 100});
  const auto full = model(prompt);
  // Changing a later token does not change earlier logits.
  const auto changed = model(ids({5, 9, 17, 33, 65, 101}));
  CHECK(torch::allclose(full.slice(1, 0, 5), changed.slice(1, 0, 5), 0, 0));
  CHECK_FALSE(torch::allclose(full.select(1, 5), changed.select(1, 5)));
  // Feeding the tokens through the cache gives the same logits, within float32 rounding.
  qwen3::KVCache cache;
  const auto head = model->forward(prompt.slice(1, 0, 4), &cache);
  const auto tail = model->forward(prompt.slice(1, 4), &cache);
  CHECK(cache.seen() == 6);
  CHECK(torch::allclose(torch::cat({head, tail}, 1), full, 1e-5, 1e-5));
}

TEST_CASE("fused logits and generated ids are identical for both chains") {
  torch::NoGradGuard no_grad;
  auto model = random_model(3);
  const auto prompt = ids({1, 2, 3, 4, 5, 6, 7, 8});
  const auto original = model(prompt);
  const auto original_ids = model->generate(prompt, 10);

  auto mlp_chains = fusion::fuse_modules(model, qwen3::mlp_patterns(), qwen3::mlp_specs());
  CHECK(mlp_chains.size() == 4);
  CHECK(torch::equal(model(prompt), original));
  CHECK(torch::equal(model->generate(prompt, 10), original_ids));

  auto attention_chains =
      fusion::fuse_modules(model, qwen3::attention_patterns(), qwen3::attention_specs());
  CHECK(attention_chains.size() == 4);
  CHECK(attention_chains[0].paths[1] == "model.layers.0.self_attn");
  CHECK(torch::equal(model(prompt), original));
  CHECK(torch::equal(model->generate(prompt, 10), original_ids));
  CHECK(fusion::verify(model, [&] { return model(prompt); }).ok());

  CHECK(fusion::unfuse_modules(model) == 8);
  CHECK(torch::equal(model(prompt), original));
}

// Kernels compute with other ops than the modules: logits within 1e-4 of the largest logit in
// float32, 5e-2 in bf16 (its 8-bit mantissa rounds between steps differently).
double kernel_tolerance(const torch::Tensor& logits) {
  const double scale = std::max(1.0, logits.abs().max().item<double>());
  return (logits.scalar_type() == torch::kFloat32 ? 1e-4 : 5e-2) * scale;
}

void require_within_kernel_tolerance(const torch::Tensor& got, const torch::Tensor& expected) {
  REQUIRE(got.sizes() == expected.sizes());
  REQUIRE(got.dtype() == expected.dtype());
  const double diff =
      (got.to(torch::kFloat64) - expected.to(torch::kFloat64)).abs().max().item<double>();
  INFO("max abs diff " << diff << ", tolerance " << kernel_tolerance(expected));
  REQUIRE(diff <= kernel_tolerance(expected));
}

TEST_CASE("Qwen3 kernels match the unfused model, in float32 and bf16, and generate the same ids") {
  torch::NoGradGuard no_grad;
  const bool folded = GENERATE(false, true);
  const bool tied = GENERATE(false, true);
  INFO((folded ? "folded" : "default (no weight copy)") << (tied ? ", tied" : ", untied"));
  auto config = small_config();
  config.tie_word_embeddings = tied;
  auto model = random_model(3, config);
  const auto prompt = ids({1, 2, 3, 4, 5, 6, 7, 8});
  const auto original = model(prompt);
  const auto original_ids = model->generate(prompt, 10);

  qwen3::fuse_with_kernels(model, folded);
  require_within_kernel_tolerance(model(prompt), original);
  CHECK(torch::equal(model->generate(prompt, 10), original_ids));  // with the KV cache
  for (const auto& chain : fusion::fused_chains(model)) {
    INFO(fusion::to_string(chain) << " " << chain.kernel);
    CHECK(chain.stats.runs > 0);
    CHECK(chain.stats.prepares == 1);
    CHECK(chain.stats.replays_device + chain.stats.replays_training + chain.stats.replays_grad ==
          0);
    // The default keeps no copy of a weight: its state is the model's own storage (the lm_head
    // kernel's default has no state: it reads lm_head's weight as it is).
    CHECK((chain.stats.state_bytes > 0) == folded);
    const bool has_view = !folded && chain.kernel != "qwen3.rmsnorm_lm_head";
    CHECK((chain.stats.shared_state_bytes > 0) == has_view);
  }
  // Both chains of 4 layers, and the final norm with lm_head, tied or not.
  CHECK(fusion::fused_chains(model).size() == 9);
  if (!folded) {
    auto& mlp = *model->model->layers->at<qwen3::DecoderLayerImpl>(0).mlp;
    CHECK(mlp.gate_proj->weight.storage().is_alias_of(mlp.up_proj->weight.storage()));
  }
  {
    const auto report = fusion::verify(
        model, [&] { return model(prompt); }, kernel_tolerance(original));
    INFO(report.to_string());
    CHECK(report.ok());
    for (const auto& check : report.chains) CHECK(check.kernel_ran);
  }

  // bf16: to() swaps every tensor; the kernels prepare again and still match.
  model->to(torch::kBFloat16);
  fusion::use_kernel(model, {"**"}, "");
  const auto bf16_original = model(prompt);
  fusion::unfuse_modules(model);
  qwen3::fuse_with_kernels(model, folded);
  require_within_kernel_tolerance(model(prompt), bf16_original);
  // Tied, lm_head still reads the embedding itself.
  CHECK(model->lm_head->weight.is_same(model->model->embed_tokens->weight) == tied);
}

TEST_CASE("a kernel's first call, checked against a replay, does not update the KV cache twice") {
  // The first call after each prepare replays the chain to check the kernel's result; the
  // attention's forward appends to the cache, so the check must not run on a call that carries
  // one: generation's first step would see the prompt twice (positions and keys both wrong).
  torch::NoGradGuard no_grad;
  auto model = random_model(5);
  const auto prompt = ids({1, 2, 3, 4, 5, 6, 7, 8});
  const auto expected = model->generate(prompt, 6);
  qwen3::KVCache reference;
  model->forward(prompt, &reference);
  qwen3::fuse_with_kernels(model);
  qwen3::KVCache cache;
  model->forward(prompt, &cache);  // the kernels' first call
  REQUIRE(cache.seen() == reference.seen());
  CHECK(torch::equal(model->generate(prompt, 6), expected));
  for (const auto& chain : fusion::fused_chains(model)) {
    INFO(fusion::to_string(chain));
    CHECK(chain.stats.runs > 0);
  }
}

TEST_CASE("on CUDA, replay and kernels match the unfused model (skipped without CUDA)", "[cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("CUDA is not available in this LibTorch build or machine: CUDA case skipped");
    return;
  }
  torch::NoGradGuard no_grad;
  auto model = random_model(5);
  const auto prompt = ids({1, 2, 3, 4, 5, 6, 7, 8}).to(torch::kCUDA);
  const auto cpu_logits = model(prompt.cpu());
  model->to(torch::kCUDA);
  const auto original = model(prompt);
  REQUIRE(original.is_cuda());
  // The port itself computes the same on both devices (float32; cuBLAS without TF32, its default).
  require_within_kernel_tolerance(original.cpu(), cpu_logits);
  const auto original_ids = model->generate(prompt, 10);
  CHECK(original_ids.is_cuda());

  fusion::fuse_modules(model, qwen3::mlp_patterns(), qwen3::mlp_specs());
  fusion::fuse_modules(model, qwen3::attention_patterns(), qwen3::attention_specs());
  CHECK(torch::equal(model(prompt), original));
  CHECK(torch::equal(model->generate(prompt, 10), original_ids));
  fusion::unfuse_modules(model);

  for (const bool folded : {false, true}) {
    INFO((folded ? "folded" : "default (no weight copy)"));
    qwen3::fuse_with_kernels(model, folded);
    require_within_kernel_tolerance(model(prompt), original);
    CHECK(torch::equal(model->generate(prompt, 10), original_ids));
    for (const auto& chain : fusion::fused_chains(model)) {
      INFO(fusion::to_string(chain) << " " << chain.kernel);
      CHECK(chain.stats.runs > 0);
      CHECK(chain.stats.replays_device == 0);
    }
    fusion::unfuse_modules(model);
  }

  model->to(torch::kBFloat16);
  const auto bf16_original = model(prompt);
  qwen3::fuse_with_kernels(model, /*folded=*/true);
  require_within_kernel_tolerance(model(prompt), bf16_original);
}

TEST_CASE("a checkpoint loaded into a kernel-equipped model reaches its kernels") {
  torch::NoGradGuard no_grad;
  const bool folded = GENERATE(false, true);
  const fs::path dir = scratch(folded ? "kernel-load-folded" : "kernel-load");
  auto source = random_model(11);
  qwen3::save_pretrained(*source, source->config, dir);
  const auto prompt = ids({3, 1, 4, 1, 5});
  const auto expected = source(prompt);

  auto model = random_model(12);
  qwen3::fuse_with_kernels(model, folded);
  const auto before = model(prompt);  // prepared from the old weights
  qwen3::load_weights(*model, dir);
  const auto after = model(prompt);
  require_within_kernel_tolerance(after, expected);
  CHECK_FALSE(torch::allclose(before, after));
}

TEST_CASE("a fused model saves with torch::save and loads into an unfused one") {
  torch::NoGradGuard no_grad;
  auto model = random_model(4);
  const auto prompt = ids({3, 1, 4, 1, 5});
  const auto original = model(prompt);
  fusion::fuse_modules(model, qwen3::mlp_patterns(), qwen3::mlp_specs());
  fusion::fuse_modules(model, qwen3::attention_patterns(), qwen3::attention_specs());
  const auto path = (scratch("torch-save") / "model.pt").string();
  torch::save(model, path);
  auto other = random_model(5);
  torch::load(other, path);
  CHECK(torch::equal(other(prompt), original));
}

TEST_CASE("fused generation from several threads at once gives identical ids", "[threads]") {
  auto model = random_model(6);
  std::vector<torch::Tensor> prompts{ids({1, 2, 3}), ids({10, 20, 30, 40}), ids({7}),
                                     ids({99, 98})};
  std::vector<torch::Tensor> expected;
  for (const auto& p : prompts) expected.push_back(model->generate(p, 6));
  fusion::fuse_modules(model, qwen3::mlp_patterns(), qwen3::mlp_specs());
  fusion::fuse_modules(model, qwen3::attention_patterns(), qwen3::attention_specs());
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < prompts.size(); ++t) {
    threads.emplace_back([&, t] {
      at::set_num_threads(1);
      for (int round = 0; round < 5; ++round) {
        const auto k = (t + round) % prompts.size();
        if (!torch::equal(model->generate(prompts[k], 6), expected[k])) ++mismatches;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(mismatches == 0);
}

TEST_CASE("stress: 8 threads x 2000 forwards and 8 generating threads on one fused model",
          "[threads]") {
  // FUSION_STRESS_FORWARDS lowers the count where each forward is slow (ThreadSanitizer).
  const char* env = std::getenv("FUSION_STRESS_FORWARDS");
  const int forwards = env != nullptr ? std::atoi(env) : 2000;
  constexpr std::size_t kThreads = 8;
  torch::NoGradGuard no_grad;
  auto model = random_model(12);
  std::vector<torch::Tensor> prompts, expected_logits, expected_ids;
  for (std::size_t t = 0; t < kThreads; ++t) {
    prompts.push_back(torch::randint(0, 128, {1, static_cast<int64_t>(1 + t)}, torch::kInt64));
    expected_logits.push_back(model(prompts.back()));
    expected_ids.push_back(model->generate(prompts.back(), 6));
  }
  const bool kernels = GENERATE(false, true);
  INFO((kernels ? "with kernels" : "replay"));
  if (kernels) {
    qwen3::fuse_with_kernels(model, /*folded=*/false);
  } else {
    fusion::fuse_modules(model, qwen3::mlp_patterns(), qwen3::mlp_specs());
    fusion::fuse_modules(model, qwen3::attention_patterns(), qwen3::attention_specs());
  }
  std::atomic<int> mismatches{0}, errors{0};
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      at::set_num_threads(1);
      torch::NoGradGuard thread_no_grad;
      try {
        for (int i = 0; i < forwards; ++i) {
          const std::size_t k = (t + static_cast<std::size_t>(i)) % kThreads;
          const auto logits = model(prompts[k]);
          const bool same = kernels ? (logits - expected_logits[k]).abs().max().item<double>() <=
                                          kernel_tolerance(expected_logits[k])
                                    : torch::equal(logits, expected_logits[k]);
          if (!same) ++mismatches;
        }
        for (int round = 0; round < 3; ++round) {
          if (!torch::equal(model->generate(prompts[t], 6), expected_ids[t])) ++mismatches;
        }
      } catch (...) {
        ++errors;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(errors == 0);
  CHECK(mismatches == 0);
  if (kernels) {
    for (const auto& chain : fusion::fused_chains(model)) {
      INFO(fusion::to_string(chain));
      CHECK(chain.stats.runs >= static_cast<std::uint64_t>(kThreads * forwards));
      CHECK(chain.stats.prepares == 1);  // nothing changed: never rebuilt, whatever the threads
    }
  }
}

TEST_CASE("checkpoints round-trip through save_pretrained and load") {
  torch::NoGradGuard no_grad;
  auto model = random_model(7);
  const auto prompt = ids({11, 12, 13, 14});
  const auto original = model(prompt);
  const auto dir = scratch("round-trip");
  qwen3::save_pretrained(*model, model->config, dir);

  const auto config = qwen3::load_config(dir);
  CHECK(config.hidden_size == 64);
  CHECK(config.num_key_value_heads == 4);
  CHECK(config.rope_theta == 1e6);
  qwen3::ForCausalLM loaded(config);
  qwen3::load_weights(*loaded, dir);
  CHECK(torch::equal(loaded(prompt), original));

  SECTION("RoPE scaling round-trips") {
    auto scaled = model->config;
    scaled.rope_scaling.type = "yarn";
    scaled.rope_scaling.factor = 4.0;
    scaled.rope_scaling.original_max_position_embeddings = 32;
    scaled.rope_scaling.mscale = 0.7;
    const auto yarn_dir = scratch("yarn");
    qwen3::save_pretrained(*model, scaled, yarn_dir);
    const auto back = qwen3::load_config(yarn_dir);
    CHECK(back.rope_scaling.type == "yarn");
    CHECK(back.rope_scaling.factor == 4.0);
    CHECK(back.rope_scaling.original_max_position_embeddings == 32);
    CHECK(back.rope_scaling.mscale == 0.7);
    CHECK_FALSE(back.rope_scaling.mscale_all_dim.has_value());
  }
  SECTION("a fused model loads the same way") {
    qwen3::ForCausalLM fused(config);
    fusion::fuse_modules(fused, qwen3::mlp_patterns(), qwen3::mlp_specs());
    qwen3::load_weights(*fused, dir);
    CHECK(torch::equal(fused(prompt), original));
  }
  SECTION("F16 and BF16 checkpoints convert to the model dtype") {
    for (auto dtype : {torch::kFloat16, torch::kBFloat16}) {
      auto half = random_model(7);
      half->to(dtype);
      const auto half_dir = scratch("half");
      qwen3::save_pretrained(*half, config, half_dir);
      CHECK_THAT(read_file(half_dir / "model.safetensors").substr(8, 200),
                 Contains(dtype == torch::kFloat16 ? "\"F16\"" : "\"BF16\""));
      qwen3::ForCausalLM restored(config);
      qwen3::load_weights(*restored, half_dir);
      CHECK(restored->parameters()[0].dtype() == torch::kFloat32);
      CHECK(torch::equal(restored->parameters()[0], half->parameters()[0].to(torch::kFloat32)));
    }
  }
  SECTION("a tied config over a checkpoint with its own lm_head.weight loads untied") {
    auto tied_config = config;
    tied_config.tie_word_embeddings = true;
    std::vector<std::string> notes;
    // dir holds lm_head.weight from the untied model, unlike its embedding: transformers warns
    // and does not tie.
    qwen3::untie_if_checkpoint_differs(tied_config, dir, &notes);
    CHECK_FALSE(tied_config.tie_word_embeddings);
    REQUIRE(notes.size() == 1);
    CHECK_THAT(notes[0], Contains("loaded untied, as transformers does"));
    qwen3::ForCausalLM untied(tied_config);
    qwen3::load_weights(*untied, dir);
    CHECK(torch::equal(untied(prompt), original));
  }
  SECTION("a tied model ignores an lm_head.weight equal to its embedding, and takes one alone") {
    auto tied_config = config;
    tied_config.tie_word_embeddings = true;
    const auto tied_dir = scratch("tied-head");
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    for (const auto& item : model->named_parameters()) {
      if (item.key() != "lm_head.weight") tensors.emplace_back(item.key(), item.value());
    }
    tensors.emplace_back("lm_head.weight", model->model->embed_tokens->weight);
    tensors.emplace_back("model.rotary_emb.inv_freq",
                         torch::ones({8}));  // ignored, as transformers
    checkpoint::save_safetensors(tensors, tied_dir / "model.safetensors");
    qwen3::untie_if_checkpoint_differs(tied_config, tied_dir);
    CHECK(tied_config.tie_word_embeddings);
    qwen3::ForCausalLM tied(tied_config);
    qwen3::load_weights(*tied, tied_dir);
    CHECK(torch::equal(tied->model->embed_tokens->weight, model->model->embed_tokens->weight));
    // Only lm_head.weight: it is the embedding.
    tensors.erase(
        std::remove_if(tensors.begin(), tensors.end(),
                       [](const auto& t) { return t.first == "model.embed_tokens.weight"; }),
        tensors.end());
    checkpoint::save_safetensors(tensors, tied_dir / "model.safetensors");
    qwen3::ForCausalLM head_only(tied_config);
    qwen3::load_weights(*head_only, tied_dir);
    CHECK(torch::equal(head_only->model->embed_tokens->weight, model->model->embed_tokens->weight));
  }
  SECTION("sharded checkpoints load through the index") {
    const auto sharded = scratch("sharded");
    // Two shards, parameters alternating between them.
    auto params = model->named_parameters();
    nlohmann::json map;
    std::size_t i = 0;
    for (const auto& item : params) {
      map["weight_map"][item.key()] = fmt::format("model-0000{}-of-00002.safetensors", 1 + i++ % 2);
    }
    for (int shard = 1; shard <= 2; ++shard) {
      nlohmann::json header = nlohmann::json::object();
      std::string data;
      for (const auto& item : params) {
        if (map["weight_map"][item.key()] !=
            fmt::format("model-0000{}-of-00002.safetensors", shard))
          continue;
        auto t = item.value().contiguous();
        header[item.key()] = {
            {"dtype", "F32"},
            {"shape", t.sizes().vec()},
            {"data_offsets", nlohmann::json::array({data.size(), data.size() + t.numel() * 4})}};
        data.append(static_cast<const char*>(t.data_ptr()), t.numel() * 4);
      }
      write_safetensors(sharded / fmt::format("model-0000{}-of-00002.safetensors", shard),
                        header.dump(), data);
    }
    std::ofstream(sharded / "model.safetensors.index.json") << map.dump();
    fs::copy_file(dir / "config.json", sharded / "config.json");
    qwen3::ForCausalLM from_shards(config);
    qwen3::load_weights(*from_shards, sharded);
    CHECK(torch::equal(from_shards(prompt), original));
  }
}

TEST_CASE("loader errors name the file and key, and leave the model untouched") {
  auto model = random_model(8);
  const auto before = parameters_of(*model);
  const auto good = scratch("good");
  qwen3::save_pretrained(*model, model->config, good);
  const std::string bytes = read_file(good / "model.safetensors");
  auto target = random_model(9);
  const auto target_before = parameters_of(*target);

  auto fails_with = [&](const fs::path& dir, const std::string& message) {
    INFO("expecting: " << message);
    CHECK_THROWS_WITH(qwen3::load_weights(*target, dir), Contains(message));
    CHECK(same_parameters(*target, target_before));
  };

  SECTION("missing file") {
    const auto dir = scratch("missing");
    fails_with(dir, "holds neither model.safetensors nor model.safetensors.index.json");
    CHECK_THROWS_WITH(qwen3::load_config(dir), Contains("cannot open") && Contains("config.json"));
  }
  SECTION("truncated file and truncated header") {
    const auto dir = scratch("truncated");
    write_file(dir / "model.safetensors", bytes.substr(0, 5));
    fails_with(dir, "model.safetensors: truncated: 5 bytes");
    write_file(dir / "model.safetensors", bytes.substr(0, 100));
    fails_with(dir, "model.safetensors: truncated header: it claims");
  }
  SECTION("malformed header") {
    const auto dir = scratch("malformed");
    write_safetensors(dir / "model.safetensors", "{\"a\": [1, 2", "");
    fails_with(dir, "model.safetensors: malformed header");
    write_safetensors(dir / "model.safetensors", "{\"a\": {\"dtype\": \"F32\"}}", "");
    fails_with(dir, "malformed header entry for 'a'");
  }
  SECTION("a tensor whose bytes run past the file") {
    const auto dir = scratch("past-end");
    write_safetensors(
        dir / "model.safetensors",
        R"({"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}})",
        std::string(100, '\0'));
    fails_with(dir,
               "tensor 'model.norm.weight' runs past the end of the file (bytes 0..256 of 100)");
  }
  SECTION("a shape or offset that is not an integer") {
    // 5e30 made nlohmann's integer conversion undefined (found by the fuzzer); 1.5 would truncate.
    const auto dir = scratch("not-integers");
    const std::pair<std::string, std::string> cases[] = {
        {R"("shape": [5555555555555555555555555555552, 2], "data_offsets": [0, 16])",
         "tensor 'model.norm.weight' has a shape that is not a list of integers"},
        {R"("shape": [4], "data_offsets": [0, 16.5])",
         "tensor 'model.norm.weight' has a data_offsets that is not a list of integers: [0,16.5]"},
        {R"("shape": 4, "data_offsets": [0, 16])",
         "has a shape that is not a list of integers: 4"}};
    for (const auto& [fields, message] : cases) {
      write_safetensors(dir / "model.safetensors",
                        R"({"model.norm.weight": {"dtype": "F32", )" + fields + "}}",
                        std::string(16, '\0'));
      fails_with(dir, message);
    }
  }
  SECTION("unknown dtype") {
    const auto dir = scratch("dtype");
    write_safetensors(
        dir / "model.safetensors",
        R"({"model.norm.weight": {"dtype": "I8", "shape": [64], "data_offsets": [0, 64]}})",
        std::string(64, '\0'));
    fails_with(dir, "tensor 'model.norm.weight' has dtype I8, not one of BF16, F16, F32, F64, I64");
  }
  SECTION("missing and unexpected keys") {
    const auto dir = scratch("keys");
    write_safetensors(
        dir / "model.safetensors",
        R"({"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]},
                          "model.extra.weight": {"dtype": "F32", "shape": [1], "data_offsets": [256, 260]}})",
        std::string(260, '\0'));
    fails_with(dir,
               "missing keys [model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight");
    fails_with(dir, "unexpected keys [model.extra.weight]");
  }
  SECTION("shape mismatch") {
    auto c = small_config();
    c.intermediate_size = 96;
    qwen3::ForCausalLM narrower(c);
    const auto before_narrow = parameters_of(*narrower);
    CHECK_THROWS_WITH(qwen3::load_weights(*narrower, good),
                      Contains("tensor 'model.layers.0.mlp.gate_proj.weight' has shape [192, 64], "
                               "the model expects [96, 64]"));
    CHECK(same_parameters(*narrower, before_narrow));
  }
  SECTION("a sharded index that maps a key to the wrong shard") {
    const auto dir = scratch("bad-index");
    fs::copy_file(good / "model.safetensors", dir / "model-00001-of-00001.safetensors");
    nlohmann::json index;
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors";
    std::ofstream(dir / "model.safetensors.index.json") << index.dump();
    fails_with(dir, "cannot open");
    fails_with(dir, "model-00002-of-00002.safetensors");
  }
  CHECK(same_parameters(*model, before));
}

/// A config.json as transformers writes it for a small model, with `extra` merged in.
fs::path config_dir(const std::string& name, const nlohmann::json& extra) {
  nlohmann::json j{{"architectures", {"Qwen3ForCausalLM"}},
                   {"model_type", "qwen3"},
                   {"vocab_size", 256},
                   {"hidden_size", 64},
                   {"intermediate_size", 128},
                   {"num_hidden_layers", 2},
                   {"num_attention_heads", 4},
                   {"num_key_value_heads", 2},
                   {"head_dim", 16},
                   {"max_position_embeddings", 128}};
  j.merge_patch(extra);
  const auto dir = scratch(name);
  write_file(dir / "config.json", j.dump());
  return dir;
}

TEST_CASE("configs load as transformers 4 and 5 write them, RoPE scaling included") {
  SECTION("transformers 5: rope_parameters and dtype") {
    const auto c = qwen3::load_config(
        config_dir("v5", {{"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 50000.0}}},
                          {"dtype", "bfloat16"}}));
    CHECK(c.rope_theta == 50000.0);
    CHECK(c.rope_scaling.type == "default");
    CHECK(c.dtype == "bfloat16");
  }
  SECTION("transformers 4: rope_theta, rope_scaling and torch_dtype") {
    const auto c = qwen3::load_config(config_dir(
        "v4", {{"rope_theta", 1e6},
               {"rope_scaling",
                {{"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32}}},
               {"torch_dtype", "float16"}}));
    CHECK(c.rope_theta == 1e6);
    CHECK(c.rope_scaling.type == "yarn");
    CHECK(c.rope_scaling.factor == 4.0);
    CHECK(c.rope_scaling.original_max_position_embeddings == 32);
    CHECK(c.dtype == "float16");
  }
  SECTION("no RoPE field at all: transformers' default theta") {
    CHECK(qwen3::load_config(config_dir("bare", nlohmann::json::object())).rope_theta == 10000.0);
  }
  SECTION("rope_scaling beside a different rope_parameters wins, and the choice is said") {
    std::vector<std::string> notes;
    const auto c = qwen3::load_config(
        config_dir("both", {{"rope_parameters", {{"rope_type", "linear"}, {"factor", 2.0}}},
                            {"rope_scaling", {{"rope_type", "linear"}, {"factor", 4.0}}}}),
        &notes);
    CHECK(c.rope_scaling.factor == 4.0);
    REQUIRE(notes.size() == 1);
    CHECK_THAT(notes[0], Contains("using rope_scaling, as transformers does"));
  }
  SECTION("no head_dim: transformers 5's default of 128, not hidden / heads") {
    auto j = nlohmann::json::object();
    const auto dir = config_dir("no-head-dim", j);
    auto text = read_file(dir / "config.json");
    auto parsed = nlohmann::json::parse(text);
    parsed.erase("head_dim");
    write_file(dir / "config.json", parsed.dump());
    CHECK(qwen3::load_config(dir).head_dim == 128);
  }
  SECTION("hidden_act swish is SiLU") {
    CHECK_NOTHROW(qwen3::load_config(config_dir("swish", {{"hidden_act", "swish"}})));
  }
  SECTION("linear scaling divides the frequencies; yarn keeps the fastest ones") {
    qwen3::Config c;
    c.rope_theta = 50000.0;
    const auto plain = qwen3::rope_frequencies(c).first;
    c.rope_scaling.type = "linear";
    c.rope_scaling.factor = 3.0;
    CHECK(torch::allclose(qwen3::rope_frequencies(c).first, plain / 3.0));
    c.rope_scaling.type = "yarn";
    c.rope_scaling.factor = 4.0;
    c.rope_scaling.original_max_position_embeddings = 32;
    const auto [yarn, attention] = qwen3::rope_frequencies(c);
    CHECK(yarn[0].item<float>() == plain[0].item<float>());
    CHECK(yarn[-1].item<float>() == Approx(plain[-1].item<float>() / 4.0));
    CHECK(attention == Approx(0.1 * std::log(4.0) + 1.0));
  }
}

TEST_CASE("config fields that would change the computation are refused, naming field and value") {
  const auto refused = [](const nlohmann::json& extra, const std::string& message) {
    INFO(extra.dump());
    CHECK_THROWS_WITH(qwen3::load_config(config_dir("refused", extra)), Contains(message));
  };
  refused({{"model_type", "qwen2"}}, "model_type = \"qwen2\" is not supported");
  refused({{"architectures", {"Qwen3MoeForCausalLM"}}},
          "architectures = [\"Qwen3MoeForCausalLM\"]");
  refused({{"hidden_act", "gelu"}}, "hidden_act = \"gelu\" is not supported");
  refused({{"rope_parameters", {{"rope_type", "dynamic"}, {"factor", 2.0}}}},
          "rope type 'dynamic' is not implemented");
  refused({{"rope_scaling", {{"rope_type", "longrope"}}}}, "rope type 'longrope'");
  refused({{"rope_parameters", {{"rope_type", "linear"}, {"factor", 2.0}, {"low_freq_factor", 1}}}},
          "rope parameter 'low_freq_factor' (1) is not supported for rope type 'linear'");
  refused({{"layer_types", {"full_attention", "sliding_attention"}}},
          "layer_types = [\"full_attention\",\"sliding_attention\"] is not supported");
  refused({{"use_sliding_window", true}, {"max_window_layers", 1}},
          "use_sliding_window = true is not supported");
  refused({{"partial_rotary_factor", 0.5}}, "partial_rotary_factor = 0.5");
  refused({{"rope_parameters", {{"rope_type", "yarn"}, {"original_max_position_embeddings", 32}}}},
          "rope_parameters of rope type 'yarn' has no 'factor', a required key");
  // Sizes: positive JSON integers only (5e30 was undefined behaviour in the integer conversion).
  refused({{"hidden_size", 5e30}}, "'hidden_size' must be a positive integer, not 5e+30");
  refused({{"num_hidden_layers", 2.5}}, "'num_hidden_layers' must be a positive integer, not 2.5");
  refused({{"num_attention_heads", 0}}, "'num_attention_heads' must be a positive integer, not 0");
  refused({{"head_dim", -16}}, "'head_dim' must be a positive integer, not -16");
  refused({{"num_key_value_heads", 3}},
          "num_attention_heads (4) must be a multiple of num_key_value_heads (3)");
  // Sliding windows switched on but covering no layer change nothing: accepted, as transformers.
  CHECK_NOTHROW(qwen3::load_config(
      config_dir("window", {{"use_sliding_window", true}, {"max_window_layers", 28}})));
}

TEST_CASE("generation stops at the eos ids of generation_config.json, as transformers does") {
  torch::NoGradGuard no_grad;
  auto model = random_model(9);
  const auto prompt = ids({11, 12, 13, 14});
  const auto free_run = model->generate(prompt, 8);
  const int64_t eos = free_run[0][prompt.size(1) + 2].item<int64_t>();
  const auto stopped = model->generate(prompt, 8, qwen3::GenerationConfig{{eos}});
  // Stops at the first eos (the third new token, or earlier if it came before), keeping it.
  REQUIRE(stopped.size(1) <= prompt.size(1) + 3);
  CHECK(stopped[0][-1].item<int64_t>() == eos);
  CHECK(torch::equal(stopped, free_run.slice(1, 0, stopped.size(1))));
  SECTION("a finished row of a batch is padded until every row has finished") {
    const auto batch = torch::cat({prompt, ids({20, 21, 22, 23})}, 0);
    const auto rows = model->generate(batch, 8, qwen3::GenerationConfig{{eos}, /*pad=*/1});
    CHECK(torch::equal(rows[0].slice(0, 0, stopped.size(1)), stopped[0]));
    REQUIRE(rows.size(1) > stopped.size(1));  // the second row ran on
    CHECK((rows[0].slice(0, stopped.size(1)) == 1).all().item<bool>());
  }
  SECTION("the ids come from generation_config.json, else config.json, never both") {
    const auto dir = config_dir("eos", {{"eos_token_id", 5}, {"pad_token_id", 0}});
    CHECK(qwen3::load_generation_config(dir).eos_token_ids == std::vector<int64_t>{5});
    write_file(dir / "generation_config.json", R"({"eos_token_id": [7, 8]})");
    const auto g = qwen3::load_generation_config(dir);
    CHECK(g.eos_token_ids == std::vector<int64_t>{7, 8});
    CHECK_FALSE(g.pad_token_id.has_value());  // config.json's is not read either
    write_file(dir / "generation_config.json", R"({"do_sample": false})");
    CHECK(qwen3::load_generation_config(dir).eos_token_ids.empty());
    write_file(dir / "generation_config.json", R"({"eos_token_id": [7, 8.5]})");
    CHECK_THROWS_WITH(
        qwen3::load_generation_config(dir),
        Contains("'eos_token_id' must be an integer id or a list of them, not [7,8.5]"));
    write_file(dir / "generation_config.json", R"({"eos_token_id": 7, "pad_token_id": 1e30})");
    CHECK_THROWS_WITH(qwen3::load_generation_config(dir),
                      Contains("'pad_token_id' must be an integer id or a list of them"));
  }
}

TEST_CASE("generation settings that change greedy decoding are applied or refused, by name") {
  torch::NoGradGuard no_grad;
  auto model = random_model(9);
  const auto prompt = ids({3, 17, 42, 99});
  const auto free_run = model->generate(prompt, 8);
  SECTION("repetition_penalty: every id seen so far, as transformers' logits processor") {
    qwen3::GenerationConfig g;
    g.repetition_penalty = 1.5;
    const auto penalized = model->generate(prompt, 8, g);
    // Step by step: the same processing on the full forward's last logits.
    auto sequence = prompt;
    for (int step = 0; step < 8; ++step) {
      auto scores = model(sequence).select(1, -1).to(torch::kFloat32);
      const auto seen = scores.gather(1, sequence);
      scores.scatter_(1, sequence, torch::where(seen < 0, seen * 1.5, seen / 1.5));
      sequence = torch::cat({sequence, scores.argmax(-1, true)}, 1);
    }
    CHECK(torch::equal(penalized, sequence));
  }
  SECTION("min_new_tokens and min_length mask the eos ids until reached") {
    const int64_t eos = free_run[0][prompt.size(1)].item<int64_t>();  // the first new id
    qwen3::GenerationConfig g{{eos}};
    CHECK(model->generate(prompt, 8, g).size(1) == prompt.size(1) + 1);
    g.min_new_tokens = 3;
    const auto later = model->generate(prompt, 8, g);
    CHECK(later.size(1) >= prompt.size(1) + 4);
    CHECK((later.slice(1, prompt.size(1), prompt.size(1) + 3) != eos).all().item<bool>());
    qwen3::GenerationConfig by_length{{eos}};
    by_length.min_length = prompt.size(1) + 3;
    CHECK(torch::equal(model->generate(prompt, 8, by_length), later));
  }
  SECTION("fields read, fields refused, sampling fields named as ignored") {
    const auto dir = config_dir("generation", nlohmann::json::object());
    write_file(dir / "generation_config.json",
               R"({"eos_token_id": 7, "repetition_penalty": 1.1, "min_new_tokens": 2,
                   "do_sample": true, "temperature": 0.6, "top_k": 20, "top_p": 0.95})");
    std::vector<std::string> notes;
    const auto g = qwen3::load_generation_config(dir, &notes);
    CHECK(g.repetition_penalty == 1.1);
    CHECK(g.min_new_tokens == 2);
    REQUIRE(notes.size() == 1);
    CHECK_THAT(notes[0], Contains("generation_config.json sets do_sample, temperature = 0.6, "
                                  "top_k = 20, top_p = 0.95: this port decodes greedily"));
    for (const auto& [field, value] :
         std::vector<std::pair<std::string, std::string>>{{"num_beams", "4"},
                                                          {"no_repeat_ngram_size", "3"},
                                                          {"bad_words_ids", "[[5]]"},
                                                          {"suppress_tokens", "[1, 2]"},
                                                          {"forced_eos_token_id", "3"}}) {
      write_file(dir / "generation_config.json", "{\"" + field + "\": " + value + "}");
      INFO(field);
      CHECK_THROWS_WITH(qwen3::load_generation_config(dir),
                        Contains(field + " = ") && Contains("is not supported: it changes greedy "
                                                            "decoding in transformers"));
    }
    write_file(dir / "generation_config.json", R"({"num_beams": 1, "no_repeat_ngram_size": 0})");
    CHECK_NOTHROW(qwen3::load_generation_config(dir));  // neutral values change nothing
  }
}

TEST_CASE("input ids outside the vocabulary are a clear error") {
  auto model = random_model(10);
  CHECK_THROWS_WITH(model(ids({1, 128})),
                    Contains("input id 128 is outside the vocabulary [0, 128)"));
  CHECK_THROWS_WITH(model(ids({-1})), Contains("input id -1"));
}

TEST_CASE("logits save as a .npy file numpy can read") {
  const auto dir = scratch("npy");
  const auto logits = torch::arange(6, torch::kFloat32).view({2, 3});
  npy::save_float32((dir / "logits.npy").string(), logits);
  const auto bytes = read_file(dir / "logits.npy");
  CHECK(bytes.substr(0, 6) == "\x93NUMPY");
  CHECK(bytes.size() % 64 == 24 % 64);  // 64-byte aligned header + 6 floats
  CHECK_THAT(bytes, Contains("'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
  float last = 0;
  std::memcpy(&last, bytes.data() + bytes.size() - 4, 4);
  CHECK(last == 5.0f);
}
