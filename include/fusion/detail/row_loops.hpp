// Row-wise float32 loops behind fusion::kernels' norms and projections: RMSNorm and LayerNorm in
// one read of each row (the row stays in cache across its passes), and a bias added to the rows of
// a GEMM's output. Each replaces several ATen ops, whose fixed cost per op (dispatch, a
// TensorIterator, a temporary) is what a transformer kernel at small widths or a few tokens
// spends most of its time on.
//
// The norms are plain loops with eight partial sums, which compilers vectorise without
// -ffast-math; the bias loop uses AVX-512 where the CPU runs it and the caller asks for it. Rows
// are split across LibTorch's threads through at::parallel_for (parallel only in code compiled
// with OpenMP).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <ATen/Parallel.h>

#include "fusion/detail/simd.hpp"

namespace fusion::detail {

/// The sum of row[0..dim) of f(row[i]), in eight partial sums.
template <typename F>
float row_sum(const float* row, int64_t dim, F f) {
  float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= dim; i += 8) {
    for (int k = 0; k < 8; ++k) partial[k] += f(row[i + k]);
  }
  float sum = 0;
  for (; i < dim; ++i) sum += f(row[i]);
  for (float p : partial) sum += p;
  return sum;
}

/// Rows of about 16K floats per thread at least: below that a thread costs more than it saves.
inline int64_t row_grain(int64_t dim) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, dim));
}

/// out = x * rsqrt(mean(x^2) + eps) [* weight], row by row; x and out [rows, dim] contiguous,
/// weight [dim] or null.
inline void rms_norm_rows(const float* x, const float* weight, float* out, int64_t rows,
                          int64_t dim, float eps) {
  at::parallel_for(0, rows, row_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * dim;
      const float sum = row_sum(row, dim, [](float v) { return v * v; });
      const float scale = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
      float* dst = out + r * dim;
      if (weight != nullptr) {
        for (int64_t j = 0; j < dim; ++j) dst[j] = weight[j] * (row[j] * scale);
      } else {
        for (int64_t j = 0; j < dim; ++j) dst[j] = row[j] * scale;
      }
    }
  });
}

/// out = (x - mean(x)) * rsqrt(var(x) + eps) [* weight] [+ bias], row by row (var: the biased
/// variance, as at::layer_norm's, from the deviations of a second pass, not from mean(x^2));
/// x and out [rows, dim] contiguous, weight and bias [dim] or null.
inline void layer_norm_rows(const float* x, const float* weight, const float* bias, float* out,
                            int64_t rows, int64_t dim, float eps) {
  at::parallel_for(0, rows, row_grain(dim), [&](int64_t begin, int64_t end) {
    const auto n = static_cast<float>(dim);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * dim;
      const float mean = row_sum(row, dim, [](float v) { return v; }) / n;
      const float var = row_sum(row, dim, [mean](float v) { return (v - mean) * (v - mean); }) / n;
      const float rstd = 1.0f / std::sqrt(var + eps);
      float* dst = out + r * dim;
      for (int64_t j = 0; j < dim; ++j) {
        float v = (row[j] - mean) * rstd;
        if (weight != nullptr) v *= weight[j];
        if (bias != nullptr) v += bias[j];
        dst[j] = v;
      }
    }
  });
}

#ifdef FUSION_X86_SIMD
namespace simd {
__attribute__((target("avx512f"))) inline void add_bias_range(float* y, const float* bias,
                                                              int64_t n, int64_t begin,
                                                              int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    float* row = y + r * n;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mask = n - j >= 16 ? 0xFFFF : (1u << (n - j)) - 1;
      _mm512_mask_storeu_ps(row + j, mask,
                            _mm512_add_ps(_mm512_maskz_loadu_ps(mask, row + j),
                                          _mm512_maskz_loadu_ps(mask, bias + j)));
    }
  }
}
}  // namespace simd

/// y [rows, n] (contiguous) += bias [n], each row; only where avx512_enabled().
inline void add_bias_rows(float* y, const float* bias, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, row_grain(n) * 4, [&](int64_t begin, int64_t end) {
    simd::add_bias_range(y, bias, n, begin, end);
  });
}
#else
inline void add_bias_rows(float*, const float*, int64_t, int64_t) {}
#endif

}  // namespace fusion::detail
