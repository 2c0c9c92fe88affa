// qwen3_fusion: load a Qwen3 causal LM (or build a tiny random one), fuse
// post_attention_layernorm+mlp and input_layernorm+self_attn in every layer, and check that the
// fused model gives the original logits, then that the unfused one does again; then run both
// chains with their fused kernels (kernels.hpp) and check their logits within a tolerance.
//
//   qwen3_fusion [--model-dir DIR] [--input-ids 1,2,3] [--generate N] [--save-logits FILE]
//                [--save-kernel-logits FILE] [--folded] [--expect FILE] [--auto [--min-speedup X]]
//                [--dtype float32|bf16]
//
// --auto: the kernels' plan is found by fusion::optimize on the prompt (printed, and checked to
// cover every chain of qwen3::kernel_plan with the same kernels), and the forward is timed with
// both plans, interleaved.
//
// --dtype bf16: the model in bfloat16 (half the bytes; Qwen3's checkpoints are stored so), computed
// by the same kernels with float32 accumulation (oneDNN's bfloat16 matmul), where the CPU has
// AVX512_BF16 (fusion::kernels::bfloat16_supported; else the demo says so and runs float32).
// Everything is then compared with the bfloat16 model, and its logits with float32's for the
// record.
//
// Generation is greedy and follows the model directory's generation settings as transformers
// reads them (generation_config.json, else config.json; see examples/qwen3/README.md). --expect
// FILE (written by transformers/make_models.py) sets the prompt and the number of new tokens, and
// checks the original logits against transformers' (within 1e-4 of the largest logit) and every
// generated sequence against transformers' ids; or, for a directory transformers refuses, that
// loading it is refused too, for the same reason.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <fusion/kernels/bfloat16.hpp>
#include <fusion/optimize.hpp>

#include "checkpoint.hpp"
#include "demo.hpp"
#include "kernels.hpp"
#include "npy.hpp"
#include "qwen3.hpp"

namespace {

/// The default model: tiny, random, seeded, so the demo runs with nothing downloaded.
qwen3::ForCausalLM tiny_model() {
  qwen3::ForCausalLM model(qwen3::Config{});
  qwen3::init_random(*model, 2024);
  return model;
}

}  // namespace

int main(int argc, char** argv) try {
  demo::Options options = demo::parse(argc, argv);
  if (options.bfloat16 && !options.expect.empty()) {
    throw std::invalid_argument(
        "--expect compares with transformers' float32 run: not with --dtype bf16");
  }
  torch::NoGradGuard no_grad;
  c10::optional<demo::Expected> expected;
  if (!options.expect.empty()) {
    expected = demo::read_expected(options.expect);
    if (expected->refusal.empty()) {
      options.input_ids = expected->input_ids;
      options.generate = expected->max_new_tokens;
    }
  }
  qwen3::ForCausalLM model{nullptr};
  qwen3::GenerationConfig generation;
  if (options.model_dir.empty()) {
    model = tiny_model();
    std::cout << "Model: tiny random Qwen3 (hidden 64, 4 layers, vocab 1000, seed 2024)\n";
  } else {
    std::vector<std::string> notes;
    const auto load = [&] {
      auto config = qwen3::load_config(options.model_dir, &notes);
      qwen3::untie_if_checkpoint_differs(config, options.model_dir, &notes);
      model = qwen3::ForCausalLM(config);
      qwen3::load_weights(*model, options.model_dir);
      generation = qwen3::load_generation_config(options.model_dir, &notes);
      return config;
    };
    if (expected && !expected->refusal.empty()) {
      try {
        load();
      } catch (const std::exception& e) {
        const bool same = std::string(e.what()).find(expected->refusal) != std::string::npos;
        std::cout << fmt::format("Refused, as transformers refuses it ('{}'): {}\n{}\n",
                                 expected->refusal, e.what(), same ? "OK" : "FAILED");
        return same ? 0 : 1;
      }
      std::cout << fmt::format("Loaded, but transformers refuses it ('{}')\nFAILED\n",
                               expected->refusal);
      return 1;
    }
    const auto config = load();
    std::cout << fmt::format(
        "Model: {} (stored as {}, rope {}, {}, eos ids [{}], repetition penalty {:g}, min new "
        "tokens {}, min length {})\n",
        options.model_dir, config.dtype, config.rope_scaling.type,
        config.tie_word_embeddings ? "tied" : "untied", fmt::join(generation.eos_token_ids, ", "),
        generation.repetition_penalty, generation.min_new_tokens, generation.min_length);
    for (const auto& note : notes) std::cout << "Note: " << note << "\n";
  }
  model->eval();
  const auto ids = torch::tensor(options.input_ids, torch::kInt64).unsqueeze(0);
  std::cout << fmt::format("Input ids: [{}]\n", fmt::join(options.input_ids, ", "));
  const auto generate = [&] { return model->generate(ids, options.generate, generation); };

  if (options.bfloat16 && !fusion::kernels::bfloat16_supported()) {
    std::cout << "bf16: not available here (no AVX512_BF16, no oneDNN, or FUSION_NO_BFLOAT16): "
                 "running float32\n";
  } else if (options.bfloat16) {
    const int64_t float32_bytes = demo::tensor_bytes(*model);
    const auto float32_logits = model(ids);
    model->to(torch::kBFloat16);
    std::cout << fmt::format(
        "Model in bfloat16: {:.2f} MiB of parameters and buffers (float32: {:.2f} MiB); max diff "
        "of its logits vs float32: {:g} (largest logit {:g})\n",
        demo::tensor_bytes(*model) / 1048576.0, float32_bytes / 1048576.0,
        demo::max_diff(model(ids), float32_logits), float32_logits.abs().max().item<double>());
  }

  const auto original = model(ids);
  bool ok = true;
  if (expected) {
    const double scale = std::max(1.0, expected->logits.abs().max().item<double>());
    const double diff = demo::max_diff(original[0], expected->logits);
    std::cout << fmt::format("Max diff original vs transformers: {:g} (tolerance {:g})\n", diff,
                             1e-4 * scale);
    ok = diff <= 1e-4 * scale;
  }
  torch::Tensor original_generated;
  if (options.generate > 0) {
    original_generated = generate();
    const int64_t produced = original_generated.size(1) - ids.size(1);
    if (produced < options.generate) {
      std::cout << fmt::format("Generation stopped at an eos id after {} of {} new tokens\n",
                               produced, options.generate);
    }
    if (expected) {
      const bool same = torch::equal(original_generated, expected->ids);
      std::cout << fmt::format("Generated ids (transformers): [{}]  {}\n",
                               fmt::join(demo::new_ids(expected->ids, ids.size(1)), ", "),
                               same ? "identical" : "DIFFERENT");
      ok = ok && same;
    }
  }

  fusion::fuse_modules(model, qwen3::mlp_patterns(), qwen3::mlp_specs());
  fusion::fuse_modules(model, qwen3::attention_patterns(), qwen3::attention_specs());
  std::cout << fusion::report(model);

  const auto fused = model(ids);
  const double fused_diff = demo::max_diff(fused, original);
  std::cout << "Max diff fused vs original: " << fused_diff << "\n";
  ok = ok && fused_diff == 0;
  if (!options.save_logits.empty()) {
    npy::save_float32(options.save_logits, fused[0]);
    std::cout << "Saved fused logits [" << fused.size(1) << ", " << fused.size(2) << "] to "
              << options.save_logits << "\n";
  }
  if (options.generate > 0) {
    const auto generated = generate();
    const bool same = torch::equal(generated, original_generated);
    const auto prompt = ids.size(1);
    std::cout << fmt::format("Generated ids (original): [{}]\n",
                             fmt::join(demo::new_ids(original_generated, prompt), ", "));
    std::cout << fmt::format("Generated ids (fused):    [{}]  {}\n",
                             fmt::join(demo::new_ids(generated, prompt), ", "),
                             same ? "identical" : "DIFFERENT");
    ok = ok && same;
  }

  fusion::unfuse_modules(model);
  const double unfused_diff = demo::max_diff(model(ids), original);
  std::cout << "Max diff unfused vs original: " << unfused_diff << "\n";
  ok = ok && unfused_diff == 0;

  // Kernels compute with other ops (one GEMM for gate and up, raw loops), so their logits differ
  // by rounding: within 1e-4 of the largest logit in float32, 5e-2 in bf16/f16.
  if (options.automatic) {
    ok = demo::fuse_automatically(
             model, qwen3::kernel_plan(), [&] { return model(ids); }, options.min_speedup) &&
         ok;
  } else {
    qwen3::fuse_with_kernels(model, options.folded);
  }
  const auto with_kernels = model(ids);
  const double scale = std::max(1.0, original.abs().max().item<double>());
  const double tolerance = (original.scalar_type() == torch::kFloat32 ? 1e-4 : 5e-2) * scale;
  const double kernel_diff = demo::max_diff(with_kernels, original);
  std::cout << fmt::format("Max diff with kernels vs original: {:g} (tolerance {:g})\n",
                           kernel_diff, tolerance);
  ok = ok && kernel_diff <= tolerance;
  if (!options.save_kernel_logits.empty()) {
    npy::save_float32(options.save_kernel_logits, with_kernels[0]);
    std::cout << "Saved kernel logits [" << with_kernels.size(1) << ", " << with_kernels.size(2)
              << "] to " << options.save_kernel_logits << "\n";
  }
  if (options.generate > 0) {
    const auto generated = generate();
    const bool same = torch::equal(generated, original_generated);
    std::cout << fmt::format("Generated ids (kernels):  [{}]  {}\n",
                             fmt::join(demo::new_ids(generated, ids.size(1)), ", "),
                             same ? "identical" : "DIFFERENT");
    ok = ok && same;
  }
  std::cout << fusion::report(model);
  std::cout << (ok ? "OK\n" : "FAILED\n");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::cerr << "qwen3_fusion: " << e.what() << "\n";
  return 2;
}
