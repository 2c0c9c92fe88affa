// AVX-512 loops behind fusion::kernels' primitives, each used only where the CPU runs it (and the
// user has not turned it off: fusion::kernels::set_avx512); the primitives fall back to ATen's ops
// otherwise.
//
// small_gemm: y = x w^T for a few rows of x, float32. Each output is a dot product of a row of x
// with a row of w, both contiguous along k, so w is read in place, once, in blocks of 4 rows that
// stay in L1 while every 4-row block of x passes over them: 16 accumulators of 16 lanes, reduced
// at the end; for one row of x (decode), each row of w on its own, front to back, which streams
// from memory faster. Only the summation order differs from linear's.
//
// small_gemm_kn: y = x w for a weight stored [in, out] (GPT-2's Conv1D), read in place: panels
// of 64 output columns, each row of the panel loaded once per block of 4 rows of x and multiplied
// by a broadcast element of each, 16 accumulators of 16 lanes.
//
// silu_mul_rows: SiLU(gate) * up in one pass, with a polynomial exp (Cephes' expf, within ~2 ulp).
//
// Both split their work across threads through at::parallel_for, which runs in parallel only in
// code compiled with OpenMP (the top-level CMakeLists.txt says how).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>

#include <ATen/Parallel.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FUSION_X86_SIMD 1
#endif

#include "fusion/detail/abi.hpp"

namespace fusion::detail {

inline namespace FUSION_ABI_VERSION {
/// Whether the AVX-512 loops may run: the CPU has AVX-512F, FUSION_NO_AVX512 is unset, and
/// set_avx512(false) was not called. One word per process (FUSION_API), read on every call.
inline FUSION_API std::atomic<bool>& avx512_allowed() {
  static std::atomic<bool> allowed{std::getenv("FUSION_NO_AVX512") == nullptr};
  return allowed;
}
}  // namespace FUSION_ABI_VERSION

inline bool cpu_has_avx512() {
#ifdef FUSION_X86_SIMD
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

inline bool avx512_enabled() {
  return cpu_has_avx512() && avx512_allowed().load(std::memory_order_relaxed);
}

#ifdef FUSION_X86_SIMD
// GCC 12 reports the intrinsics' own _mm512_undefined_* operands as uninitialised once inlined
// (a false positive of its middle end); the loops below read nothing uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace simd {

/// y[i][j] = dot(x row i, w row j) for i < MB, j < NB; rows of x and w are k floats apart,
/// rows of y n floats apart.
template <int MB, int NB>
__attribute__((target("avx512f"))) inline void block(const float* x, const float* w, float* y,
                                                     int64_t k, int64_t n) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < k; p += 16) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_ps(w + j * k + p);
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * k + p);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) y[i * n + j] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

/// NB output columns for all m rows: 4 rows of x at a time, then the rest.
template <int NB>
__attribute__((target("avx512f"))) inline void columns(const float* x, const float* w, float* y,
                                                       int64_t m, int64_t k, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) block<4, NB>(x + i * k, w, y + i * n, k, n);
  switch (m - i) {
    case 3:
      block<3, NB>(x + i * k, w, y + i * n, k, n);
      break;
    case 2:
      block<2, NB>(x + i * k, w, y + i * n, k, n);
      break;
    case 1:
      block<1, NB>(x + i * k, w, y + i * n, k, n);
      break;
    default:
      break;
  }
}

/// dot(x, w) over k (a multiple of 16) floats, 4 accumulators: for one row of x, each row of w
/// read front to back on its own, one memory stream, which streams from memory faster than 4 rows
/// side by side as block<1, 4> reads them (docs/performance.md).
__attribute__((target("avx512f"))) inline float dot(const float* x, const float* w, int64_t k) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  int64_t p = 0;
  for (; p + 64 <= k; p += 64) {
    for (int u = 0; u < 4; ++u) {
      acc[u] =
          _mm512_fmadd_ps(_mm512_loadu_ps(x + p + 16 * u), _mm512_loadu_ps(w + p + 16 * u), acc[u]);
    }
  }
  for (; p < k; p += 16)
    acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + p), _mm512_loadu_ps(w + p), acc[0]);
  return _mm512_reduce_add_ps(
      _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

/// Output columns [begin, end) of small_gemm, on this thread.
__attribute__((target("avx512f"))) inline void column_range(const float* x, const float* w,
                                                            float* y, int64_t m, int64_t k,
                                                            int64_t n, int64_t begin, int64_t end) {
  if (m == 1) {
    for (int64_t j = begin; j < end; ++j) y[j] = dot(x, w + j * k, k);
    return;
  }
  for (int64_t j = begin; j < end; j += 4) {
    switch (std::min<int64_t>(4, end - j)) {
      case 4:
        columns<4>(x, w + j * k, y + j, m, k, n);
        break;
      case 3:
        columns<3>(x, w + j * k, y + j, m, k, n);
        break;
      case 2:
        columns<2>(x, w + j * k, y + j, m, k, n);
        break;
      default:
        columns<1>(x, w + j * k, y + j, m, k, n);
        break;
    }
  }
}

/// y[i][j0 + c] = sum_p x[i][p] * w[p][j0 + c] for i < MB and the 16 NB columns from j0 (the
/// last `tail` lanes masked off when fewer remain): w stored [k, n], row-major, so each step
/// of p loads NB vectors of one row of w and broadcasts one x per row into MB x NB accumulators.
template <int MB, int NB>
__attribute__((target("avx512f"))) inline void block_kn(const float* x, const float* w, float* y,
                                                        int64_t k, int64_t n, __mmask16 last) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < k; ++p) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) {
      wv[j] = _mm512_maskz_loadu_ps(j == NB - 1 ? last : __mmask16(0xFFFF), w + p * n + 16 * j);
    }
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * k + p]);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) {
      _mm512_mask_storeu_ps(y + i * n + 16 * j, j == NB - 1 ? last : __mmask16(0xFFFF), acc[i][j]);
    }
  }
}

/// The columns [j0, j0 + width) of small_gemm_kn, width <= 64, for all m rows.
template <int NB>
__attribute__((target("avx512f"))) inline void panel_kn(const float* x, const float* w, float* y,
                                                        int64_t m, int64_t k, int64_t n, int64_t j0,
                                                        int64_t width) {
  const int64_t rest = width - 16 * (NB - 1);
  const __mmask16 last = rest >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rest) - 1);
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) block_kn<4, NB>(x + i * k, w + j0, y + i * n + j0, k, n, last);
  switch (m - i) {
    case 3:
      block_kn<3, NB>(x + i * k, w + j0, y + i * n + j0, k, n, last);
      break;
    case 2:
      block_kn<2, NB>(x + i * k, w + j0, y + i * n + j0, k, n, last);
      break;
    case 1:
      block_kn<1, NB>(x + i * k, w + j0, y + i * n + j0, k, n, last);
      break;
    default:
      break;
  }
}

/// Column panels [begin, end) (64 columns each) of small_gemm_kn, on this thread.
__attribute__((target("avx512f"))) inline void panel_range_kn(const float* x, const float* w,
                                                              float* y, int64_t m, int64_t k,
                                                              int64_t n, int64_t begin,
                                                              int64_t end) {
  for (int64_t panel = begin; panel < end; ++panel) {
    const int64_t j0 = panel * 64, width = std::min<int64_t>(64, n - j0);
    switch ((width + 15) / 16) {
      case 4:
        panel_kn<4>(x, w, y, m, k, n, j0, width);
        break;
      case 3:
        panel_kn<3>(x, w, y, m, k, n, j0, width);
        break;
      case 2:
        panel_kn<2>(x, w, y, m, k, n, j0, width);
        break;
      default:
        panel_kn<1>(x, w, y, m, k, n, j0, width);
        break;
    }
  }
}

/// e^x per lane: x = n ln2 + r, e^r by Cephes' expf polynomial, times 2^n by scalef (which
/// gives 0 and inf past the float range). x is clamped to [-104, 88.7]; NaN stays NaN.
__attribute__((target("avx512f"))) inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(88.7f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

/// Rows [begin, end) of silu_mul_rows.
__attribute__((target("avx512f"))) inline void silu_mul_range(const float* gate, const float* up,
                                                              int64_t stride, float* out,
                                                              int64_t inter, int64_t begin,
                                                              int64_t end) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = begin; r < end; ++r) {
    const float* g = gate + r * stride;
    const float* u = up + r * stride;
    float* o = out + r * inter;
    for (int64_t i = 0; i < inter; i += 16) {
      const __mmask16 mask = inter - i >= 16 ? 0xFFFF : (1u << (inter - i)) - 1;
      const __m512 gv = _mm512_maskz_loadu_ps(mask, g + i);
      const __m512 uv = _mm512_maskz_loadu_ps(mask, u + i);
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));  // e^-g
      const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, e));
      _mm512_mask_storeu_ps(o + i, mask, _mm512_mul_ps(silu, uv));
    }
  }
}

}  // namespace simd
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// How many units of work (each `macs` multiply-adds reading `weight_bytes` of the weight) one
/// thread takes at least: ~4M multiply-adds, or ~256 KiB of weight where fewer rows make the
/// product bound by memory (one or a few rows: two threads read the weight faster than one).
inline int64_t gemm_grain(int64_t macs, int64_t weight_bytes) {
  const int64_t by_work = 4'000'000 / std::max<int64_t>(1, macs);
  const int64_t by_memory = (256 << 10) / std::max<int64_t>(1, weight_bytes);
  return std::max<int64_t>(1, std::min(by_work, by_memory));
}

/// y [m, n] = x [m, k] times w [n, k] transposed; all row-major and contiguous, k a multiple of
/// 16; only where avx512_enabled(). The output columns are split across LibTorch's threads in
/// blocks of gemm_grain.
inline void small_gemm(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n) {
  const int64_t blocks = (n + 3) / 4;
  const int64_t grain = gemm_grain(m * k * 4, k * 4 * 4);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    simd::column_range(x, w, y, m, k, n, begin * 4, std::min(n, end * 4));
  });
}

/// y [m, n] = x [m, k] times w [k, n] (GPT-2's Conv1D layout); all row-major and contiguous;
/// only where avx512_enabled(). Panels of 64 output columns are split across LibTorch's threads
/// in runs of gemm_grain.
inline void small_gemm_kn(const float* x, const float* w, float* y, int64_t m, int64_t k,
                          int64_t n) {
  const int64_t panels = (n + 63) / 64;
  const int64_t grain = gemm_grain(m * k * 64, k * 64 * 4);
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    simd::panel_range_kn(x, w, y, m, k, n, begin, end);
  });
}

/// out [rows, inter] = SiLU(gate) * up, gate and up rows `stride` floats apart (contiguous
/// along inter), out contiguous; only where avx512_enabled().
inline void silu_mul_rows(const float* gate, const float* up, int64_t stride, float* out,
                          int64_t rows, int64_t inter) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, inter));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    simd::silu_mul_range(gate, up, stride, out, inter, begin, end);
  });
}
#else
inline void small_gemm(const float*, const float*, float*, int64_t, int64_t, int64_t) {}
inline void small_gemm_kn(const float*, const float*, float*, int64_t, int64_t, int64_t) {}
inline void silu_mul_rows(const float*, const float*, int64_t, float*, int64_t, int64_t) {}
#endif

}  // namespace fusion::detail
