// bfloat16 inference, opt-in: the ".bf16" variants of the convolution kernels (every 2d kernel of
// conv_folding.hpp and conv_pooling.hpp, and each residual block kernel) keep their folded weights
// in bfloat16 and run oneDNN's bfloat16 convolutions with float32 accumulation, on float32 models:
// inputs and results stay float32, half the state's weight bytes, faster on CPUs with
// AVX512_BF16, and less exact.
//
//   fusion::fuse_modules(model, fusion::kernels::in_bfloat16(plan));
//   fusion::verify(model, run);   // within bfloat16's tolerance: KernelOptions::compute_dtype
//
// What it costs in accuracy is the model's: verify compares each chain with the float32 model
// within 5e-2 of the largest magnitude (the bfloat16 default, VerifyOptions::tolerance), and
// report says "computes in BFloat16" for each such kernel. fusion::optimize never picks a
// bfloat16 kernel by itself (OptimizeOptions::kernels names them to try them).
#pragma once

#include <algorithm>
#include <string>

#include "fusion/detail/bfloat16.hpp"
#include "fusion/detail/kernel_registry.hpp"
#include "fusion/error.hpp"
#include "fusion/kernels/batch_norm_folding.hpp"
#include "fusion/plan.hpp"

namespace fusion::kernels {

/// What names a kernel's bfloat16 variant: `name + kBFloat16Suffix`.
inline constexpr const char* kBFloat16Suffix = detail::kBFloat16Suffix;

/// Whether the bfloat16 kernels compute in bfloat16 here: the CPU has AVX512_BF16 (oneDNN
/// emulates bfloat16 more slowly than float32 without it), LibTorch has oneDNN, and neither
/// set_bfloat16(false) nor the environment variable FUSION_NO_BFLOAT16 turned them off. Where not,
/// they decline each call (report counts it) and their chains replay in float32: fuse with the
/// float32 plan instead.
inline bool bfloat16_supported() { return detail::bfloat16_enabled(); }

/// Turns the bfloat16 kernels off (false: they decline, as on a CPU without AVX512_BF16) or back
/// on; returns the previous setting. For tests and benchmarks.
inline bool set_bfloat16(bool enabled) {
  return detail::bfloat16_allowed().exchange(enabled, std::memory_order_relaxed);
}

/// Whether `name` names a bfloat16 variant (ends with kBFloat16Suffix, after a base name).
inline bool is_bfloat16_variant(const std::string& name) {
  const std::string suffix = kBFloat16Suffix;
  return name.size() > suffix.size() &&
         name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// `plan` with each rule's kernel replaced by its bfloat16 variant (a rule without a kernel, or
/// already on a variant, as it is). Throws FusionError naming the first kernel without one.
inline Plan in_bfloat16(Plan plan) {
  register_builtin_kernels();
  const std::string suffix = kBFloat16Suffix;
  const auto registered = detail::KernelRegistry::instance().names();
  const auto has = [&](const std::string& name) {
    return std::find(registered.begin(), registered.end(), name) != registered.end();
  };
  for (std::size_t r = 0; r < plan.rules.size(); ++r) {
    std::string& kernel = plan.rules[r].options.kernel;
    if (kernel.empty() || is_bfloat16_variant(kernel)) continue;
    if (!has(kernel + suffix)) {
      detail::fail(
          "fusion::kernels::in_bfloat16: rule #{} (patterns {}) uses kernel '{}', which "
          "has no bfloat16 variant ('{}{}' is not registered)",
          r, detail::describe_names(plan.rules[r].patterns), kernel, kernel, suffix);
    }
    kernel += suffix;
  }
  return plan;
}

}  // namespace fusion::kernels
