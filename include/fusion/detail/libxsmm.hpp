// libxsmm as one of the GEMM paths fusion::kernels::project measures, where the build found it
// (Debian: libxsmm-dev; CMake defines FUSION_HAS_LIBXSMM, cmake/fusionLibxsmm.cmake). libxsmm
// generates a kernel for each shape at run time, for the CPU it runs on, which is what makes it
// worth measuring beside the BLAS: on small and mid-sized products its kernels beat OpenBLAS's
// GEMM (docs/performance.md).
//
// libxsmm's kernels are column-major, C = A B, with no transposed A (1.17 generates none). In
// those terms a weight stored [in, out] (GPT-2's Conv1D) is A, read in place: y = x w. A weight
// stored [out, in] (torch::nn::Linear) can only be B, read in place too: then C is y transposed,
// so the product runs on x transposed and writes each block of y transposed into a small buffer,
// put in place while it is in cache.
//
// The work is cut in blocks of at most 64 rows by 64 output columns, and a kernel is generated per
// block shape, not per row count: libxsmm keeps every kernel it generates for the process, so a
// kernel per prompt length would grow without bound. For [out, in] a block's rows are rounded up
// to a multiple of 8 (zeros in the transposed copy of x), so at most 16 kernels per weight shape.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include <ATen/Parallel.h>

#if defined(FUSION_HAS_LIBXSMM)
#include <libxsmm.h>
#endif

#include "fusion/detail/simd.hpp"

namespace fusion::detail {

/// Whether project() may take libxsmm: compiled in, and FUSION_NO_LIBXSMM unset.
inline bool libxsmm_available() {
#if defined(FUSION_HAS_LIBXSMM)
  static const bool available = std::getenv("FUSION_NO_LIBXSMM") == nullptr;
  return available;
#else
  return false;
#endif
}

#if defined(FUSION_HAS_LIBXSMM)
/// y [m, n] = x [m, k] times the weight, by libxsmm's kernels over blocks of rows and output
/// columns; the kernels are looked up (generated the first time a block shape comes) when the
/// object is made.
class XsmmGemm {
 public:
  static constexpr int64_t kBlock = 64;

  XsmmGemm(int64_t m, int64_t k, int64_t n, bool in_out) : m_(m), k_(k), n_(n), in_out_(in_out) {
    const int64_t rows[2] = {std::min(kBlock, m), m % kBlock};
    const int64_t columns[2] = {std::min(kBlock, n), n % kBlock};
    for (int r = 0; r < 2; ++r) {
      for (int c = 0; c < 2; ++c) {
        if (rows[r] == 0 || columns[c] == 0) continue;
        kernels_[r][c] = dispatch(rows[r], columns[c]);
        ok_ = ok_ && kernels_[r][c] != nullptr;
      }
    }
  }
  /// Whether libxsmm has kernels for this shape.
  bool ok() const { return ok_; }

  /// x [m, k], w [n, k] (or [k, n] for in_out), y [m, n]; all contiguous float32.
  void operator()(const float* x, const float* w, float* y) const {
    const int64_t panels = (n_ + kBlock - 1) / kBlock, chunks = (m_ + kBlock - 1) / kBlock;
    const int64_t grain = gemm_grain(m_ * k_ * kBlock, k_ * kBlock * int64_t{sizeof(float)});
    if (in_out_) {
      // A: the weight's columns, [panel, k] column-major with leading dimension n; B: the rows
      // of x, [k, chunk]; C: y's block, [panel, chunk] with leading dimension n.
      at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          for (int64_t c = 0; c < chunks; ++c) {
            kernel(c, p)(w + p * kBlock, x + c * kBlock * k_, y + c * kBlock * n_ + p * kBlock);
          }
        }
      });
      return;
    }
    if (m_ == 1) {  // x and y are their own transposes
      at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) kernel(0, p)(x, w + p * kBlock * k_, y + p * kBlock);
      });
      return;
    }
    // A: a chunk of x transposed, [rows, k] column-major, padded with zero rows; B: the weight's
    // rows p * 64.., [k, panel] column-major; C: the block of y, [rows, panel] column-major.
    std::vector<float> xt(static_cast<std::size_t>(chunks * kBlock * k_), 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t first = c * kBlock, count = rows(c), lead = padded(count);
      float* chunk = xt.data() + first * k_;
      for (int64_t r0 = 0; r0 < count; r0 += 16) {  // in tiles, to stay in cache
        for (int64_t c0 = 0; c0 < k_; c0 += 16) {
          for (int64_t r = r0; r < std::min(count, r0 + 16); ++r) {
            for (int64_t i = c0; i < std::min(k_, c0 + 16); ++i) {
              chunk[i * lead + r] = x[(first + r) * k_ + i];
            }
          }
        }
      }
    }
    at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> block(static_cast<std::size_t>(kBlock * kBlock));
      for (int64_t p = begin; p < end; ++p) {
        const int64_t width = std::min(kBlock, n_ - p * kBlock);
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t first = c * kBlock, count = rows(c), lead = padded(count);
          kernel(c, p)(xt.data() + first * k_, w + p * kBlock * k_, block.data());
          for (int64_t r = 0; r < count; ++r) {
            float* row = y + (first + r) * n_ + p * kBlock;
            for (int64_t j = 0; j < width; ++j) row[j] = block[j * lead + r];
          }
        }
      }
    });
  }

 private:
  int64_t rows(int64_t chunk) const { return std::min(kBlock, m_ - chunk * kBlock); }
  /// The rows a [out, in] kernel computes for `count` rows: a multiple of 8, or 1 for one row.
  int64_t padded(int64_t count) const { return m_ == 1 ? 1 : (count + 7) / 8 * 8; }
  libxsmm_smmfunction kernel(int64_t chunk, int64_t panel) const {
    return kernels_[(chunk + 1) * kBlock > m_ && m_ % kBlock != 0 ? 1 : 0]
                   [(panel + 1) * kBlock > n_ && n_ % kBlock != 0 ? 1 : 0];
  }
  libxsmm_smmfunction dispatch(int64_t rows, int64_t columns) const {
    const float alpha = 1, beta = 0;
    const int flags = LIBXSMM_GEMM_FLAG_NONE;
    if (in_out_) {
      const libxsmm_blasint lda = n_, ldb = k_, ldc = n_;
      return libxsmm_smmdispatch(columns, rows, k_, &lda, &ldb, &ldc, &alpha, &beta, &flags,
                                 nullptr);
    }
    const libxsmm_blasint lead = padded(rows), ldb = k_;
    return libxsmm_smmdispatch(lead, columns, k_, &lead, &ldb, &lead, &alpha, &beta, &flags,
                               nullptr);
  }

  int64_t m_, k_, n_;
  bool in_out_;
  bool ok_ = true;
  libxsmm_smmfunction kernels_[2][2] = {{nullptr, nullptr}, {nullptr, nullptr}};
};
#endif

}  // namespace fusion::detail
