// AVX-512 loops over bfloat16 data behind fusion::kernels' primitives, for a model converted to
// bfloat16 (`model->to(torch::kBFloat16)`): ATen computes each of its bfloat16 ops in float32 in a
// pass of its own, rounding every intermediate back to bfloat16, and at one token those passes
// and oneDNN's per-call overhead cost more than the halved weight bytes save.
//
// rms_norm_rows_bf16, silu_mul_rows_bf16: the float32 loops of simd.hpp on bfloat16 data, rounding
// where the module's ATen ops store their results. The norm then equals ATen's but for the float32
// summation order of the mean; SiLU × up is within two bfloat16 roundings of the exact product
// (ATen's own bfloat16 SiLU also rounds inside, so the two differ in the last place). AVX-512F
// only: the conversions are shifts, and the rounding to nearest even is c10::BFloat16's, NaN
// included.
//
// gemv_bf16: y = x w^T for a few rows of bfloat16 x and an [out, in] bfloat16 weight read in
// place, multiplying pairs with AVX512_BF16's dot product (float32 accumulation), one weight row
// at a time for all rows of x; rounded to bfloat16 once, after the bias.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include "fusion/detail/simd.hpp"

#if defined(FUSION_X86_SIMD)
#include <cpuid.h>
#endif

namespace fusion::detail {

/// The CPU has AVX512_BF16 (CPUID leaf 7, sub-leaf 1, EAX bit 5) with the AVX-512 state enabled
/// by the OS (what cpu_has_avx512 checks).
inline bool cpu_has_avx512_bf16() {
#ifdef FUSION_X86_SIMD
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return cpu_has_avx512() && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0 &&
           (eax & (1u << 5)) != 0;
  }();
  return has;
#else
  return false;
#endif
}

/// The bits of a bfloat16 tensor, as the loops below take them.
inline uint16_t* bf16_bits(const at::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

#ifdef FUSION_X86_SIMD
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace simd {

/// `count` (<= 16) bfloat16 from p as float32 lanes, the rest 0.
__attribute__((target("avx512f"))) inline __m512 load_bf16(const uint16_t* p, int64_t count = 16) {
  __m256i bits;
  if (count >= 16) {
    bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else {
    alignas(32) uint16_t part[16] = {};
    std::memcpy(part, p, static_cast<std::size_t>(count) * sizeof(uint16_t));
    bits = _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
  }
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/// Each lane rounded to the nearest bfloat16, ties to even, NaN to 0x7FC0 (c10::BFloat16's
/// rounding), in the low 16 bits of its 32.
__attribute__((target("avx512f"))) inline __m512i round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0x7FC0));
}

/// v as float32 after rounding it to bfloat16 (where ATen's op would have stored it).
__attribute__((target("avx512f"))) inline __m512 through_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(round_bf16(v), 16));
}

/// The first `count` (<= 16) lanes of v rounded to bfloat16, stored at p.
__attribute__((target("avx512f"))) inline void store_bf16(uint16_t* p, __m512 v,
                                                          int64_t count = 16) {
  const __mmask16 mask = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  _mm512_mask_cvtepi32_storeu_epi16(p, mask, round_bf16(v));
}

/// Rows [begin, end) of rms_norm_rows_bf16.
__attribute__((target("avx512f"))) inline void rms_norm_range_bf16(const uint16_t* in,
                                                                   const uint16_t* weight,
                                                                   uint16_t* out, int64_t dim,
                                                                   float eps, int64_t begin,
                                                                   int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const uint16_t* row = in + r * dim;
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 16) {
      const __m512 v = load_bf16(row + i, dim - i);
      squares = _mm512_fmadd_ps(v, v, squares);
    }
    const float mean = _mm512_reduce_add_ps(squares) / static_cast<float>(dim);
    const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(mean + eps));
    uint16_t* dst = out + r * dim;
    for (int64_t i = 0; i < dim; i += 16) {
      __m512 y = _mm512_mul_ps(load_bf16(row + i, dim - i), scale);
      if (weight != nullptr) y = _mm512_mul_ps(load_bf16(weight + i, dim - i), through_bf16(y));
      store_bf16(dst + i, y, dim - i);
    }
  }
}

/// Rows [begin, end) of silu_mul_rows_bf16.
__attribute__((target("avx512f"))) inline void silu_mul_range_bf16(const uint16_t* gate,
                                                                   const uint16_t* up,
                                                                   int64_t stride, uint16_t* out,
                                                                   int64_t inter, int64_t begin,
                                                                   int64_t end) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t i = 0; i < inter; i += 16) {
      const __m512 g = load_bf16(gate + r * stride + i, inter - i);
      const __m512 silu =
          _mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      const __m512 product =
          _mm512_mul_ps(through_bf16(silu), load_bf16(up + r * stride + i, inter - i));
      store_bf16(out + r * inter + i, product, inter - i);
    }
  }
}

/// 32 bfloat16 from p, as pairs for _mm512_dpbf16_ps.
__attribute__((target("avx512f,avx512bf16"))) inline __m512bh load_pairs(const uint16_t* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

/// y[i][0] for i < MB: dot(x row i, w's row) in float32 plus `bias`, rounded to bfloat16; rows of
/// x k (a multiple of 32) apart, rows of y n apart. The weight row is read once, front to back,
/// with U accumulators per x row along k: one memory stream, faster from memory than several
/// weight rows side by side as simd::block reads them (docs/performance.md).
template <int MB>
__attribute__((target("avx512f,avx512bf16"))) inline void row_bf16(const uint16_t* x,
                                                                   const uint16_t* w, float bias,
                                                                   uint16_t* y, int64_t k,
                                                                   int64_t n) {
  constexpr int U = MB == 1 ? 4 : 2;
  __m512 acc[MB][U];
  for (int i = 0; i < MB; ++i) {
    for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_ps();
  }
  int64_t p = 0;
  for (; p + 32 * U <= k; p += 32 * U) {
    for (int u = 0; u < U; ++u) {
      const __m512bh wv = load_pairs(w + p + 32 * u);
      for (int i = 0; i < MB; ++i) {
        acc[i][u] = _mm512_dpbf16_ps(acc[i][u], load_pairs(x + i * k + p + 32 * u), wv);
      }
    }
  }
  for (; p < k; p += 32) {
    const __m512bh wv = load_pairs(w + p);
    for (int i = 0; i < MB; ++i)
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], load_pairs(x + i * k + p), wv);
  }
  for (int i = 0; i < MB; ++i) {
    for (int u = 1; u < U; ++u) acc[i][0] = _mm512_add_ps(acc[i][0], acc[i][u]);
    y[i * n] = c10::BFloat16(_mm512_reduce_add_ps(acc[i][0]) + bias).x;
  }
}

/// Output columns [begin, end) of gemv_bf16 for all m rows, on this thread: 4 rows of x at a
/// time, then the rest.
__attribute__((target("avx512f,avx512bf16"))) inline void column_range_bf16(
    const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t m, int64_t k,
    int64_t n, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    const float b = bias == nullptr
                        ? 0.0f
                        : static_cast<float>(c10::BFloat16(bias[j], c10::BFloat16::from_bits()));
    const uint16_t* row = w + j * k;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) row_bf16<4>(x + i * k, row, b, y + i * n + j, k, n);
    switch (m - i) {
      case 3:
        row_bf16<3>(x + i * k, row, b, y + i * n + j, k, n);
        break;
      case 2:
        row_bf16<2>(x + i * k, row, b, y + i * n + j, k, n);
        break;
      case 1:
        row_bf16<1>(x + i * k, row, b, y + i * n + j, k, n);
        break;
      default:
        break;
    }
  }
}

}  // namespace simd
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// out [rows, dim] = x * rsqrt(mean(x^2) + eps), rounded to bfloat16, times weight (when not null)
/// and rounded again, as Llama's RMSNorm computes a bfloat16 input; all contiguous; only where
/// avx512_enabled().
inline void rms_norm_rows_bf16(const uint16_t* in, const uint16_t* weight, uint16_t* out,
                               int64_t rows, int64_t dim, float eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, dim));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    simd::rms_norm_range_bf16(in, weight, out, dim, eps, begin, end);
  });
}

/// out [rows, inter] = SiLU(gate) * up in bfloat16 (each op rounded as ATen rounds it), gate and
/// up rows `stride` apart (contiguous along inter), out contiguous; only where avx512_enabled().
inline void silu_mul_rows_bf16(const uint16_t* gate, const uint16_t* up, int64_t stride,
                               uint16_t* out, int64_t rows, int64_t inter) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, inter));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    simd::silu_mul_range_bf16(gate, up, stride, out, inter, begin, end);
  });
}

/// y [m, n] = x [m, k] times w [n, k] transposed, plus bias [n] (when not null), in bfloat16 with
/// float32 accumulation; all contiguous, k a multiple of 32; only where avx512_enabled() and
/// cpu_has_avx512_bf16(). The output columns are split across LibTorch's threads in runs of
/// gemm_grain.
inline void gemv_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y,
                      int64_t m, int64_t k, int64_t n) {
  at::parallel_for(0, n, gemm_grain(m * k, k * 2), [&](int64_t begin, int64_t end) {
    simd::column_range_bf16(x, w, bias, y, m, k, n, begin, end);
  });
}
#else
inline void rms_norm_rows_bf16(const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t,
                               float) {}
inline void silu_mul_rows_bf16(const uint16_t*, const uint16_t*, int64_t, uint16_t*, int64_t,
                               int64_t) {}
inline void gemv_bf16(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, int64_t,
                      int64_t, int64_t) {}
#endif

}  // namespace fusion::detail
