// Whether the bfloat16 kernels (fusion::kernels::in_bfloat16, kernels/bfloat16.hpp) compute in
// bfloat16 here: oneDNN's bfloat16 convolutions and matmuls are fast only on CPUs with the
// AVX512_BF16 instructions (elsewhere oneDNN emulates them, slower than float32), so without them
// the bfloat16 kernels decline and their chains replay in float32.
#pragma once

#include <atomic>
#include <cstdlib>

#include <ATen/Context.h>

#include "fusion/detail/abi.hpp"
#include "fusion/detail/simd_bf16.hpp"
#include "fusion/options.hpp"

namespace fusion::detail {

/// What names a kernel's bfloat16 variant, `name + kBFloat16Suffix`: where the built-in variants
/// are registered and where in_bfloat16 looks them up.
inline constexpr const char* kBFloat16Suffix = ".bf16";

/// The options of the bfloat16 variants: the CPU, eval mode, computing in bfloat16.
inline KernelOptions bfloat16_options(bool blocked_layout = false) {
  KernelOptions options{{c10::DeviceType::CPU}};
  options.blocked_layout = blocked_layout;
  options.compute_dtype = c10::ScalarType::BFloat16;
  return options;
}

inline namespace FUSION_ABI_VERSION {
/// Whether the bfloat16 kernels may compute in bfloat16: FUSION_NO_BFLOAT16 is unset and
/// set_bfloat16(false) was not called. One word per process (FUSION_API).
inline FUSION_API std::atomic<bool>& bfloat16_allowed() {
  static std::atomic<bool> allowed{std::getenv("FUSION_NO_BFLOAT16") == nullptr};
  return allowed;
}
}  // namespace FUSION_ABI_VERSION

/// The CPU has AVX512_BF16 (cpu_has_avx512_bf16) and LibTorch has oneDNN.
inline bool cpu_has_bfloat16() { return cpu_has_avx512_bf16() && at::hasMKLDNN(); }

inline bool bfloat16_enabled() {
  return cpu_has_bfloat16() && bfloat16_allowed().load(std::memory_order_relaxed);
}

}  // namespace fusion::detail
