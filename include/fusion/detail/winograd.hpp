// The library's own Winograd convolution, F(4x4, 3x3), for stride-1 3x3 float32 convolutions on
// channel-blocked inputs (oneDNN's aBcd16b, the layout its direct convolutions give on AVX-512),
// where oneDNN has none: oneDNN 3 dropped its CPU Winograd, and LibTorch 2.x links oneDNN 3.
//
// Each 6x6 patch of the input (4x4 outputs, padding 1) is transformed (B^T d B), the 36 products
// with the transformed weight (G g G^T) are 36 matrix products over the channels (at::bmm, so
// LibTorch's BLAS and its threads), and each product tile is transformed back (A^T m A), with the
// bias, the residual and the ReLU added in that same pass. 16 channels make one AVX-512 vector,
// so the transforms are vector additions; a tile is read and written once per transform.
//
// The result is the same convolution with another rounding: the transforms scale values by up to
// 8 and cancel them again. docs/kernels.md states the tolerance the tests hold it to. It is one
// of the paths measured per shape (detail/blocked_conv_choice.hpp), kept only where faster.
#pragma once

#if defined(FUSION_HAS_ONEDNN)

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "fusion/detail/onednn.hpp"
#include "fusion/detail/onednn_weights.hpp"
#include "fusion/detail/simd.hpp"

namespace fusion::detail {

#ifdef FUSION_X86_SIMD
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace winograd {

constexpr int64_t kLanes = 16;  // channels per vector and per block of aBcd16b

/// One dimension of B^T d: six input points to six transformed ones.
__attribute__((target("avx512f"))) inline void input_1d(const __m512 (&d)[6], __m512 (&out)[6]) {
  const __m512 four = _mm512_set1_ps(4.f), five = _mm512_set1_ps(5.f);
  const __m512 two = _mm512_set1_ps(2.f);
  out[0] = _mm512_fmadd_ps(four, d[0], _mm512_fnmadd_ps(five, d[2], d[4]));
  const __m512 a = _mm512_fnmadd_ps(four, d[2], d[4]);  // d4 - 4 d2
  const __m512 b = _mm512_fnmadd_ps(four, d[1], d[3]);  // d3 - 4 d1
  out[1] = _mm512_add_ps(a, b);
  out[2] = _mm512_sub_ps(a, b);
  const __m512 c = _mm512_sub_ps(d[4], d[2]);
  const __m512 e = _mm512_mul_ps(two, _mm512_sub_ps(d[3], d[1]));
  out[3] = _mm512_add_ps(c, e);
  out[4] = _mm512_sub_ps(c, e);
  out[5] = _mm512_fmadd_ps(four, d[1], _mm512_fnmadd_ps(five, d[3], d[5]));
}

/// One dimension of A^T m: six products to four outputs.
__attribute__((target("avx512f"))) inline void output_1d(const __m512 (&m)[6], __m512 (&out)[4]) {
  const __m512 a = _mm512_add_ps(m[1], m[2]), b = _mm512_sub_ps(m[1], m[2]);
  const __m512 c = _mm512_add_ps(m[3], m[4]), e = _mm512_sub_ps(m[3], m[4]);
  out[0] = _mm512_add_ps(_mm512_add_ps(m[0], a), c);
  out[1] = _mm512_fmadd_ps(_mm512_set1_ps(2.f), e, b);
  out[2] = _mm512_fmadd_ps(_mm512_set1_ps(4.f), c, a);
  out[3] = _mm512_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(8.f), e, b), m[5]);
}

/// The sizes of one call: batch, channel blocks in and out, height and width (the result's too),
/// and the tiles of 4x4 outputs.
struct Geometry {
  int64_t n, in_blocks, out_blocks, h, w, tiles_h, tiles_w;
  int64_t tiles() const { return n * tiles_h * tiles_w; }
};

/// x (aBcd16b) to v [36][tiles][in channels], for tiles [begin, end).
__attribute__((target("avx512f"))) inline void input_range(const float* x, float* v,
                                                           const Geometry& g, int64_t begin,
                                                           int64_t end) {
  const int64_t tiles = g.tiles(), channels = g.in_blocks * kLanes;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / (g.tiles_h * g.tiles_w), i = t / g.tiles_w % g.tiles_h, j = t % g.tiles_w;
    const int64_t y0 = i * 4 - 1, x0 = j * 4 - 1;
    const bool inside = y0 >= 0 && x0 >= 0 && y0 + 6 <= g.h && x0 + 6 <= g.w;
    for (int64_t cb = 0; cb < g.in_blocks; ++cb) {
      const float* plane = x + (b * g.in_blocks + cb) * g.h * g.w * kLanes;
      __m512 columns[6][6];  // [s][r]: B^T applied down each column
      for (int s = 0; s < 6; ++s) {
        __m512 d[6];
        for (int r = 0; r < 6; ++r) {
          const int64_t y = y0 + r, xx = x0 + s;
          d[r] = inside || (y >= 0 && y < g.h && xx >= 0 && xx < g.w)
                     ? _mm512_loadu_ps(plane + (y * g.w + xx) * kLanes)
                     : _mm512_setzero_ps();
        }
        input_1d(d, columns[s]);
      }
      for (int r = 0; r < 6; ++r) {
        const __m512 row[6] = {columns[0][r], columns[1][r], columns[2][r],
                               columns[3][r], columns[4][r], columns[5][r]};
        __m512 out[6];
        input_1d(row, out);
        for (int s = 0; s < 6; ++s) {
          _mm512_storeu_ps(v + ((r * 6 + s) * tiles + t) * channels + cb * kLanes, out[s]);
        }
      }
    }
  }
}

/// m [36][tiles][out channels] to y (aBcd16b) for tiles [begin, end): + bias, + residual (aBcd16b,
/// may be y itself), then ReLU, as asked.
__attribute__((target("avx512f"))) inline void output_range(const float* m, const float* bias,
                                                            const float* residual, bool relu,
                                                            float* y, const Geometry& g,
                                                            int64_t begin, int64_t end) {
  const int64_t tiles = g.tiles(), channels = g.out_blocks * kLanes;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / (g.tiles_h * g.tiles_w), i = t / g.tiles_w % g.tiles_h, j = t % g.tiles_w;
    const int rows = static_cast<int>(std::min<int64_t>(4, g.h - i * 4));
    const int cols = static_cast<int>(std::min<int64_t>(4, g.w - j * 4));
    for (int64_t kb = 0; kb < g.out_blocks; ++kb) {
      __m512 columns[6][4];  // [s][r]: A^T applied down each column
      for (int s = 0; s < 6; ++s) {
        __m512 p[6];
        for (int q = 0; q < 6; ++q) {
          p[q] = _mm512_loadu_ps(m + ((q * 6 + s) * tiles + t) * channels + kb * kLanes);
        }
        output_1d(p, columns[s]);
      }
      const __m512 base = bias ? _mm512_loadu_ps(bias + kb * kLanes) : _mm512_setzero_ps();
      const int64_t plane = (b * g.out_blocks + kb) * g.h * g.w * kLanes;
      for (int r = 0; r < rows; ++r) {
        const __m512 row[6] = {columns[0][r], columns[1][r], columns[2][r],
                               columns[3][r], columns[4][r], columns[5][r]};
        __m512 out[4];
        output_1d(row, out);
        for (int s = 0; s < cols; ++s) {
          const int64_t at = plane + ((i * 4 + r) * g.w + j * 4 + s) * kLanes;
          __m512 value = _mm512_add_ps(out[s], base);
          if (residual) value = _mm512_add_ps(value, _mm512_loadu_ps(residual + at));
          if (relu) value = _mm512_max_ps(value, _mm512_setzero_ps());
          _mm512_storeu_ps(y + at, value);
        }
      }
    }
  }
}

}  // namespace winograd
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // FUSION_X86_SIMD

/// A folded 3x3 convolution, stride 1, padding 1, without groups or dilation, by Winograd F(4x4,
/// 3x3). Its transformed weight is one of the weight's forms in ReorderedWeights: made on the
/// first call, shared with the other primitives of that weight, freed by release.
class WinogradConv2d {
 public:
  /// Whether a convolution of this weight [out, in, kh, kw] and these options has this path:
  /// float32, both channel counts multiples of 16, and AVX-512 (detail/simd.hpp).
  static bool applies(const torch::Tensor& weight, c10::IntArrayRef stride,
                      c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
#ifdef FUSION_X86_SIMD
    const auto ones = [](c10::IntArrayRef v) { return v.size() == 2 && v[0] == 1 && v[1] == 1; };
    return avx512_enabled() && weight.dim() == 4 && weight.scalar_type() == torch::kFloat32 &&
           weight.size(0) % winograd::kLanes == 0 && weight.size(1) % winograd::kLanes == 0 &&
           weight.size(2) == 3 && weight.size(3) == 3 && ones(stride) && ones(padding) &&
           ones(dilation) && groups == 1;
#else
    (void)weight, (void)stride, (void)padding, (void)dilation, (void)groups;
    return false;
#endif
  }

  /// A weight that applies, and its bias (float32 [out] or undefined); with `sum`, a call adds a
  /// residual before the ReLU (`relu`).
  WinogradConv2d(std::shared_ptr<const ReorderedWeights> weights, torch::Tensor bias, bool relu,
                 bool sum)
      : weights_(std::move(weights)), bias_(std::move(bias)), relu_(relu), sum_(sum) {}

  /// Lets go of the transformed weight (a path that lost its measurement); it is freed with the
  /// last primitive that holds it, and a later call makes it again.
  void release() const {
    std::lock_guard<std::mutex> lock(mutex_);
    transformed_.reset();
  }

  /// As OneDnnConv2d's call: a blocked input (another layout or dtype than aBcd16b float32 is
  /// reordered to it), a residual where made with `sum` (likewise); the result a new blocked
  /// tensor in aBcd16b, or with `overwrite_residual` the residual itself where it has that layout.
  torch::Tensor operator()(const torch::Tensor& input, const torch::Tensor& residual,
                           bool overwrite_residual) const {
    TORCH_INTERNAL_ASSERT(residual.defined() == sum_,
                          "WinogradConv2d: a residual where made with sum");
#ifdef FUSION_X86_SIMD
    const auto transformed = this->transformed();
    const int64_t n = input.size(0), in = input.size(1), h = input.size(2), w = input.size(3);
    const int64_t out = weights_->weight().size(0);
    const winograd::Geometry g{
        n, in / winograd::kLanes, out / winograd::kLanes, h, w, (h + 3) / 4, (w + 3) / 4};
    const auto x = in_blocks(onednn::memory_of(input), {n, in, h, w});
    ideep::tensor fresh, added_copy;
    const float* added = nullptr;
    float* y = nullptr;
    if (residual.defined()) {
      const ideep::tensor& memory = onednn::memory_of(residual);
      if (overwrite_residual && memory.get_desc() == blocks_desc({n, out, h, w})) {
        y = static_cast<float*>(memory.get_data_handle());  // read, then written, tile by tile
        added = y;
      } else {
        added_copy = in_blocks(memory, {n, out, h, w});
        added = static_cast<const float*>(added_copy.get_data_handle());
      }
    }
    if (!y) {
      overwrite_residual = false;
      fresh = onednn::new_memory(blocks_desc({n, out, h, w}));
      y = static_cast<float*>(fresh.get_data_handle());
    }
    const int64_t tiles = g.tiles();
    float* const buffer = scratch(36 * tiles * (in + out));
    float* const v = buffer;
    float* const m = buffer + 36 * tiles * in;
    const float* xp = static_cast<const float*>(x.get_data_handle());
    at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
      winograd::input_range(xp, v, g, begin, end);
    });
    auto products = at::from_blob(m, {36, tiles, out});
    at::bmm_out(products, at::from_blob(v, {36, tiles, in}),
                at::from_blob(transformed->get_data_handle(), {36, in, out}));
    const float* bias = bias_.defined() ? bias_.data_ptr<float>() : nullptr;
    at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
      winograd::output_range(m, bias, added, relu_, y, g, begin, end);
    });
    return overwrite_residual ? residual : onednn::as_blocked(std::move(fresh));
#else
    TORCH_INTERNAL_ASSERT(false, "WinogradConv2d: no AVX-512 in this build");
    (void)input, (void)overwrite_residual;
    return {};
#endif
  }

 private:
  static dnnl::memory::desc blocks_desc(const dnnl::memory::dims& dims) {
    return {dims, dnnl::memory::data_type::f32, dnnl::memory::format_tag::aBcd16b};
  }

  /// `memory` in aBcd16b float32: itself where it is, else a reordered copy.
  static ideep::tensor in_blocks(const ideep::tensor& memory, const dnnl::memory::dims& dims) {
    if (memory.get_desc() == blocks_desc(dims)) return memory;
    ideep::tensor copy = onednn::new_memory(blocks_desc(dims));
    dnnl::memory from = memory;  // a handle on the same buffer
    dnnl::reorder(from, copy).execute(onednn::stream(), from, copy);
    onednn::stream().wait();
    return copy;
  }

  /// Room for the transformed tiles and their products, kept by each calling thread at the size
  /// of its largest call: allocated per call, the page faults of these buffers cost about as much
  /// as the transforms themselves (LibTorch 2.x returns such blocks to the system on free).
  static float* scratch(int64_t floats) {
    static thread_local torch::Tensor buffer;
    if (!buffer.defined() || buffer.numel() < floats) buffer = at::empty({floats});
    return buffer.data_ptr<float>();
  }

  /// U = G g G^T per output and input channel, as [36][in][out] for at::bmm (made in double).
  std::shared_ptr<const dnnl::memory> transformed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!transformed_) {
      const auto& weight = weights_->weight();
      const dnnl::memory::desc desc({36, weight.size(1), weight.size(0)},
                                    dnnl::memory::data_type::f32, dnnl::memory::format_tag::abc);
      transformed_ = weights_->made(desc, [&](dnnl::memory& memory) {
        const auto g = torch::tensor({1.0 / 4, 0.0, 0.0, -1.0 / 6, -1.0 / 6, -1.0 / 6, -1.0 / 6,
                                      1.0 / 6, -1.0 / 6, 1.0 / 24, 1.0 / 12, 1.0 / 6, 1.0 / 24,
                                      -1.0 / 12, 1.0 / 6, 0.0, 0.0, 1.0},
                                     torch::kDouble)
                           .view({6, 3});
        const auto u = torch::matmul(torch::matmul(g, weight.to(torch::kDouble)), g.t())
                           .permute({2, 3, 1, 0})
                           .to(torch::kFloat32)
                           .contiguous();
        std::memcpy(memory.get_data_handle(), u.data_ptr(), u.nbytes());
      });
    }
    return transformed_;
  }

  std::shared_ptr<const ReorderedWeights> weights_;
  torch::Tensor bias_;
  bool relu_, sum_;
  mutable std::mutex mutex_;
  mutable std::shared_ptr<const dnnl::memory> transformed_;  // mutex_; null until a call
};

}  // namespace fusion::detail

#endif
