// gpt2_fusion: load a GPT-2 model directory (or build a tiny random one), fuse ln_1 + attn and
// ln_2 + mlp in every block and ln_f + lm_head, and check that the fused model gives the original
// logits, then that the unfused one does again; then run every chain with the library's
// transformer kernels (kernels.hpp: layouts only) and check their logits within a tolerance.
//
//   gpt2_fusion [--model-dir DIR] [--input-ids 1,2,3] [--generate N] [--save-logits FILE]
//               [--save-kernel-logits FILE] [--folded] [--expect FILE]
//
// --expect FILE (written by transformers/make_models.py) sets the prompt and the number of new
// tokens, and checks the original logits against transformers' (within 1e-4 of the largest logit)
// and the greedy ids against transformers' generate().
#include <iostream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "checkpoint.hpp"
#include "demo.hpp"
#include "gpt2.hpp"
#include "kernels.hpp"
#include "npy.hpp"

int main(int argc, char** argv) try {
  demo::Options options = demo::parse(argc, argv);
  torch::NoGradGuard no_grad;
  c10::optional<demo::Expected> expected;
  if (!options.expect.empty()) {
    expected = demo::read_expected(options.expect);
    options.input_ids = expected->input_ids;
    options.generate = expected->max_new_tokens;
  }
  gpt2::LMHeadModel model{nullptr};
  if (options.model_dir.empty()) {
    model = gpt2::LMHeadModel(gpt2::Config{});
    gpt2::init_random(*model, 2024);
    std::cout << "Model: tiny random GPT-2 (n_embd 64, 4 layers, vocab 1000, seed 2024)\n";
  } else {
    const auto config = gpt2::load_config(options.model_dir);
    model = gpt2::LMHeadModel(config);
    gpt2::load_weights(*model, options.model_dir);
    std::cout << fmt::format("Model: {} (stored as {}, n_embd {}, {} layers, {})\n",
                             options.model_dir, config.dtype, config.n_embd, config.n_layer,
                             config.tie_word_embeddings ? "tied" : "untied");
  }
  model->eval();
  const auto ids = torch::tensor(options.input_ids, torch::kInt64).unsqueeze(0);
  std::cout << fmt::format("Input ids: [{}]\n", fmt::join(options.input_ids, ", "));
  const auto generate = [&] { return model->generate(ids, options.generate); };
  const auto prompt = ids.size(1);

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
    if (expected) {
      const bool same = torch::equal(original_generated, expected->ids);
      std::cout << fmt::format("Generated ids (transformers): [{}]  {}\n",
                               fmt::join(demo::new_ids(expected->ids, prompt), ", "),
                               same ? "identical" : "DIFFERENT");
      ok = ok && same;
    }
  }
  // Prints the generated ids of `label` and whether they equal the original model's.
  const auto check_generation = [&](const char* label) {
    if (options.generate == 0) return;
    const auto generated = generate();
    const bool same = torch::equal(generated, original_generated);
    std::cout << fmt::format("Generated ids ({}): [{}]  {}\n", label,
                             fmt::join(demo::new_ids(generated, prompt), ", "),
                             same ? "identical" : "DIFFERENT");
    ok = ok && same;
  };

  fusion::fuse_modules(model, gpt2::attention_patterns(), gpt2::attention_specs());
  fusion::fuse_modules(model, gpt2::mlp_patterns(), gpt2::hidden_specs());
  fusion::fuse_modules(model, gpt2::lm_head_patterns(), gpt2::hidden_specs());
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
    std::cout << fmt::format("Generated ids (original): [{}]\n",
                             fmt::join(demo::new_ids(original_generated, prompt), ", "));
  }
  check_generation("fused");

  fusion::unfuse_modules(model);
  const double unfused_diff = demo::max_diff(model(ids), original);
  std::cout << "Max diff unfused vs original: " << unfused_diff << "\n";
  ok = ok && unfused_diff == 0;

  // Kernels compute with other ops (GEMMs chosen by shape, GELU-tanh as ATen's, folded weights),
  // so their logits differ by rounding: within 1e-4 of the largest logit.
  gpt2::fuse_with_kernels(model, options.folded);
  const auto with_kernels = model(ids);
  const double tolerance = 1e-4 * std::max(1.0, original.abs().max().item<double>());
  const double kernel_diff = demo::max_diff(with_kernels, original);
  std::cout << fmt::format("Max diff with kernels vs original: {:g} (tolerance {:g})\n",
                           kernel_diff, tolerance);
  ok = ok && kernel_diff <= tolerance;
  if (!options.save_kernel_logits.empty()) {
    npy::save_float32(options.save_kernel_logits, with_kernels[0]);
    std::cout << "Saved kernel logits [" << with_kernels.size(1) << ", " << with_kernels.size(2)
              << "] to " << options.save_kernel_logits << "\n";
  }
  check_generation("kernels");
  std::cout << fusion::report(model);
  std::cout << (ok ? "OK\n" : "FAILED\n");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::cerr << "gpt2_fusion: " << e.what() << "\n";
  return 2;
}
