// The CPU primitives behind the transformer kernels (fusion/kernels/transformer.hpp), public so
// that a user's own kernel can use them: a row-wise RMSNorm in one pass, an activation times a
// second input in one pass, a projection computed by whichever GEMM is fastest for its shape, and
// the packing of several weights into one storage without a second copy.
//
// Each takes any tensor and computes what the ATen expression in its comment computes; the fast
// paths cover float32 and bfloat16 on the CPU, everything else goes to those ATen ops (CUDA
// included, and any call autograd records: the loops have no gradient).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include "fusion/detail/blis.hpp"
#include "fusion/detail/gemm_choice.hpp"
#include "fusion/detail/libxsmm.hpp"
#include "fusion/detail/row_loops.hpp"
#include "fusion/detail/simd.hpp"
#include "fusion/detail/simd_bf16.hpp"

namespace fusion::kernels {

/// Turns the hand-written AVX-512 loops off (false) or back on (true, the default where the CPU
/// has AVX-512F); returns the previous setting. The paths then taken are the ones a CPU without
/// AVX-512 takes: for tests and benchmarks. The environment variable FUSION_NO_AVX512 starts a
/// process with them off.
inline bool set_avx512(bool enabled) {
  return detail::avx512_allowed().exchange(enabled, std::memory_order_relaxed);
}

/// Whether the AVX-512 loops run on this CPU now.
inline bool avx512_enabled() { return detail::avx512_enabled(); }

}  // namespace fusion::kernels

namespace fusion::detail {
/// Whether autograd records an op on these tensors: then the primitives run ATen's ops, whose
/// gradients it knows, not their loops.
template <typename... T>
bool records_grad(const T&... tensors) {
  return c10::GradMode::is_enabled() && ((tensors.defined() && tensors.requires_grad()) || ...);
}
}  // namespace fusion::detail

namespace fusion::kernels {

/// The activations of transformer MLPs.
enum class Activation {
  silu,       // x * sigmoid(x) (Llama, Qwen, Mistral: "silu", "swish")
  gelu,       // the exact, erf form (BERT, "gelu")
  gelu_tanh,  // the tanh approximation (GPT-2's "gelu_new", Gemma's "gelu_pytorch_tanh")
  relu,
};

inline const char* to_string(Activation activation) {
  switch (activation) {
    case Activation::silu:
      return "silu";
    case Activation::gelu:
      return "gelu";
    case Activation::gelu_tanh:
      return "gelu_tanh";
    case Activation::relu:
      return "relu";
  }
  return "?";
}

/// activation(x), as ATen computes it.
inline at::Tensor activate(const at::Tensor& x, Activation activation) {
  switch (activation) {
    case Activation::silu:
      return at::silu(x);
    case Activation::gelu:
      return at::gelu(x);
    case Activation::gelu_tanh:
      return at::gelu(x, "tanh");
    case Activation::relu:
      return at::relu(x);
  }
  return x;
}

/// RMSNorm over the last dimension: x * rsqrt(mean(x^2) + eps), times `weight` when defined,
/// computed in float32 (as Llama's and Qwen's RMSNorm compute it). Float32 on the CPU: one pass
/// per row instead of ATen's eight ops; eight partial sums keep the loop fast without
/// -ffast-math. Bfloat16 on the CPU (AVX-512): one pass too, rounding where the module rounds.
/// Returns [rows, dim], contiguous.
inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t dim = x.size(-1);
  // A weight of another shape goes to ATen's formula, which broadcasts it or raises as the
  // module's `weight * x` does; so does a call autograd records.
  const bool fits = (!weight.defined() || (weight.dim() == 1 && weight.size(0) == dim)) &&
                    !detail::records_grad(x, weight);
  if (fits && x.scalar_type() == at::kBFloat16 && x.device().is_cpu() && avx512_enabled() &&
      (!weight.defined() || (weight.scalar_type() == at::kBFloat16 && weight.device().is_cpu()))) {
    const auto input = x.contiguous();
    auto out = at::empty({dim == 0 ? 0 : input.numel() / dim, dim}, input.options());
    const auto w = weight.defined() ? weight.contiguous() : weight;
    detail::rms_norm_rows_bf16(detail::bf16_bits(input),
                               w.defined() ? detail::bf16_bits(w) : nullptr, detail::bf16_bits(out),
                               out.size(0), dim, static_cast<float>(eps));
    return out;
  }
  const bool fast = fits && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                    (!weight.defined() || weight.scalar_type() == at::kFloat);
  if (!fast) {
    auto xf = x.to(at::kFloat);
    xf = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
    auto out = xf.to(x.scalar_type());
    if (weight.defined()) out = weight * out;
    return out.reshape({-1, dim});
  }
  const auto input = x.contiguous();
  auto out = at::empty({dim == 0 ? 0 : input.numel() / dim, dim}, input.options());
  const auto w = weight.defined() ? weight.contiguous() : weight;
  detail::rms_norm_rows(input.data_ptr<float>(), w.defined() ? w.data_ptr<float>() : nullptr,
                        out.data_ptr<float>(), out.size(0), dim, static_cast<float>(eps));
  return out;
}

/// LayerNorm over the last dimension: at::layer_norm(x, {dim}, weight, bias, eps), as
/// [rows, dim]. Float32 on the CPU: one loop per row (mean, variance, output) instead of ATen's
/// op, which also returns the mean and deviation of each row; the result differs from ATen's only
/// by float32 summation order. Everything else: at::layer_norm, which raises as the module does
/// for a weight or bias of another shape.
inline at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             double eps) {
  const int64_t dim = x.size(-1);
  const auto fits = [&](const at::Tensor& t) {
    return !t.defined() || (t.dim() == 1 && t.size(0) == dim && t.scalar_type() == at::kFloat &&
                            t.device().is_cpu());
  };
  if (dim == 0 || x.scalar_type() != at::kFloat || !x.device().is_cpu() || !fits(weight) ||
      !fits(bias) || detail::records_grad(x, weight, bias)) {
    return at::layer_norm(x, {dim}, weight, bias, eps).reshape({-1, dim});
  }
  const auto input = x.contiguous();
  auto out = at::empty({input.numel() / dim, dim}, input.options());
  const auto w = weight.defined() ? weight.contiguous() : weight;
  const auto b = bias.defined() ? bias.contiguous() : bias;
  detail::layer_norm_rows(input.data_ptr<float>(), w.defined() ? w.data_ptr<float>() : nullptr,
                          b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                          out.size(0), dim, static_cast<float>(eps));
  return out;
}

/// activation(gate) * up for gate and up of one shape [rows, inter] (views of one [rows, 2 inter]
/// GEMM output are fine), into a new [rows, inter]: one pass over the data for SiLU in float32
/// (AVX-512, or a scalar loop up to 4096 elements: past that ATen's vectorised exp wins) and in
/// bfloat16 (AVX-512, rounding where ATen's two ops round), ATen's two ops otherwise.
inline at::Tensor activation_mul(const at::Tensor& gate, const at::Tensor& up,
                                 Activation activation) {
  const bool row_major = gate.dim() == 2 && up.sizes() == gate.sizes() &&
                         up.scalar_type() == gate.scalar_type() && gate.device().is_cpu() &&
                         up.device().is_cpu() && gate.stride(1) == 1 && up.stride(1) == 1 &&
                         gate.stride(0) == up.stride(0) && !detail::records_grad(gate, up);
  const bool rows_of_floats = row_major && gate.scalar_type() == at::kFloat;
  if (activation == Activation::silu && row_major && gate.scalar_type() == at::kBFloat16 &&
      avx512_enabled()) {
    auto out = at::empty({gate.size(0), gate.size(1)}, gate.options());
    detail::silu_mul_rows_bf16(detail::bf16_bits(gate), detail::bf16_bits(up),
                               gate.size(0) > 1 ? gate.stride(0) : 0, detail::bf16_bits(out),
                               gate.size(0), gate.size(1));
    return out;
  }
  if (activation == Activation::silu && rows_of_floats) {
    const int64_t rows = gate.size(0), inter = gate.size(1);
    const int64_t stride = rows > 1 ? gate.stride(0) : inter;
    auto out = at::empty({rows, inter}, gate.options());
    const float* g = gate.data_ptr<float>();
    const float* u = up.data_ptr<float>();
    float* o = out.data_ptr<float>();
    if (avx512_enabled()) {
      detail::silu_mul_rows(g, u, stride, o, rows, inter);
      return out;
    }
    if (rows * inter <= 4096) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < inter; ++i) {
          const float x = g[r * stride + i];
          o[r * inter + i] = x / (1.0f + std::exp(-x)) * u[r * stride + i];
        }
      }
      return out;
    }
  }
  return activate(gate, activation).mul_(up);
}

/// How a projection's weight is stored: [out, in] as torch::nn::Linear, or [in, out] as
/// GPT-2's Conv1D (transformers' `pytorch_utils.Conv1D`).
enum class WeightLayout { out_in, in_out };

/// Makes project() take `path` wherever it can compute the shape (std::nullopt: measure, the
/// default); returns the previous setting. For tests and benchmarks of one path.
inline std::optional<GemmPath> force_gemm_path(std::optional<GemmPath> path) {
  auto& choices = detail::GemmChoices::instance();
  std::lock_guard<std::mutex> lock(choices.mutex);
  std::swap(choices.forced, path);
  return path;
}

/// Forgets the paths measured so far (after changing the thread count or the BLAS settings).
inline void reset_gemm_choices() {
  auto& choices = detail::GemmChoices::instance();
  std::lock_guard<std::mutex> lock(choices.mutex);
  choices.chosen.clear();
}

/// x [..., in] times the weight, plus bias: at::linear's result (at::addmm's for in_out). Float32
/// on the CPU takes whichever of these was measured fastest for the shape on this machine the
/// first time it came (detail/gemm_choice.hpp): the BLAS LibTorch links (one row of an [out, in]
/// weight as a matrix-vector product), the hand-written AVX-512 loops (1-256 rows; rows a
/// multiple of 16 long for [out, in]), oneDNN's matmul (48 rows or more, [out, in]), BLIS where
/// the system has it (2 rows or more; FUSION_NO_BLIS leaves it out), libxsmm where the build links
/// it (FUSION_NO_LIBXSMM leaves it out). Bfloat16 on the CPU: linear (oneDNN) or, for 1-4 rows of
/// an [out, in] weight with rows a multiple of 32 long, the AVX512_BF16 dot-product loops,
/// measured the same way. Every path reads the weight in place.
/// Results differ from linear's only by float32 summation order (and for bfloat16 by where the
/// sum is rounded: once, after the bias).
inline at::Tensor project(const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& bias = {}, WeightLayout layout = WeightLayout::out_in) {
  const int64_t in = x.size(-1);
  const bool in_out = layout == WeightLayout::in_out;
  const int64_t out = in_out ? weight.size(1) : weight.size(0);
  const int64_t rows = in == 0 ? 0 : x.numel() / in;
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  const auto blas = [&](const at::Tensor& x2) {
    if (in_out) return bias.defined() ? at::addmm(bias, x2, weight) : at::mm(x2, weight);
    // linear runs one float32 row as a GEMM, which OpenBLAS runs several times slower than its
    // GEMV; for a bfloat16 row linear's oneDNN GEMM is the faster (ATen's own GEMV otherwise).
    if (rows != 1 || x2.scalar_type() != at::kFloat) return at::linear(x2, weight, bias);
    auto y = at::mv(weight, x2.view({in})).view({1, out});
    return bias.defined() ? y.add_(bias) : y;
  };
  const auto all_of = [&](at::ScalarType dtype) {
    return x.scalar_type() == dtype && weight.scalar_type() == dtype &&
           (!bias.defined() || bias.scalar_type() == dtype);
  };
  // The loops read the weight and bias as these shapes without checking: any other goes to ATen,
  // which raises as linear does.
  const bool fits =
      weight.dim() == 2 && weight.size(in_out ? 0 : 1) == in && weight.device() == x.device() &&
      (!bias.defined() || (bias.dim() == 1 && bias.size(0) == out && bias.device() == x.device()));
  if (!fits || rows == 0 || !x.device().is_cpu() || detail::records_grad(x, weight, bias) ||
      !(all_of(at::kFloat) || all_of(at::kBFloat16))) {
    return blas(x.reshape({rows, in})).view(sizes);
  }
  const auto x2 = x.reshape({rows, in}).contiguous();
  if (x.scalar_type() == at::kBFloat16) {
    const std::array<GemmPath, 2> paths{GemmPath::blas, GemmPath::hand_written};
    const bool loops = avx512_enabled() && detail::cpu_has_avx512_bf16() && !in_out &&
                       weight.is_contiguous() && in % 32 == 0 && rows <= 4;
    const auto run = [&](GemmPath path) {
      if (path == GemmPath::blas) return blas(x2);
      auto y = at::empty({rows, out}, x2.options());
      const auto b = bias.defined() ? bias.contiguous() : bias;
      detail::gemv_bf16(detail::bf16_bits(x2), detail::bf16_bits(weight),
                        b.defined() ? detail::bf16_bits(b) : nullptr, detail::bf16_bits(y), rows,
                        in, out);
      return y;
    };
    return run(detail::choose_gemm(2, rows, in, out, paths, loops ? 2 : 1, run)).view(sizes);
  }
  std::array<GemmPath, 5> paths{GemmPath::blas};
  std::size_t count = 1;
  if (avx512_enabled() && weight.is_contiguous() && rows <= 256 &&
      (in_out || (in % 16 == 0 && (in >= 128 || rows <= 16)))) {
    paths[count++] = GemmPath::hand_written;
  }
  if (!in_out && rows >= 48 && at::hasMKLDNN()) paths[count++] = GemmPath::onednn;
  if (rows >= 2 && weight.is_contiguous() && detail::Blis::instance().available()) {
    paths[count++] = GemmPath::blis;
  }
#if defined(FUSION_HAS_LIBXSMM)
  std::optional<detail::XsmmGemm> xsmm;  // its kernels looked up only where it may run
  if (weight.is_contiguous() && detail::libxsmm_available()) {
    xsmm.emplace(rows, in, out, in_out);
    if (xsmm->ok()) paths[count++] = GemmPath::libxsmm;
  }
#endif
  const auto run = [&](GemmPath path) {
    if (path == GemmPath::onednn) {
      return at::mkldnn_linear(x2.to_mkldnn(), weight, bias).to_dense();
    }
    if (path == GemmPath::blas) return blas(x2);
    auto y = at::empty({rows, out}, x2.options());
    const float* xp = x2.data_ptr<float>();
    const float* wp = weight.data_ptr<float>();
    if (path == GemmPath::blis) {
      detail::blis_gemm(xp, wp, y.data_ptr<float>(), rows, in, out, in_out, at::get_num_threads());
#if defined(FUSION_HAS_LIBXSMM)
    } else if (path == GemmPath::libxsmm) {
      (*xsmm)(xp, wp, y.data_ptr<float>());
#endif
    } else {
      (in_out ? detail::small_gemm_kn : detail::small_gemm)(xp, wp, y.data_ptr<float>(), rows, in,
                                                            out);
    }
    if (bias.defined() && avx512_enabled() && bias.is_contiguous()) {
      detail::add_bias_rows(y.data_ptr<float>(), bias.data_ptr<float>(), rows, out);
    } else if (bias.defined()) {
      y.add_(bias);
    }
    return y;
  };
  return run(detail::choose_gemm(in_out ? 1 : 0, rows, in, out, paths, count, run)).view(sizes);
}

/// `parts` (tensors of one dtype and device, all but the first dimension equal) as views of one
/// storage, stacked along dim 0, without a second copy: if they already are such views, in
/// order, that storage is returned as is; else it is allocated once, the values moved there, and
/// each tensor re-pointed at its slice (`set_data`), so the model, its optimizer and a kernel
/// read the same bytes and the old storages are freed. Runs without recording gradients.
inline at::Tensor stack_in_place(const std::vector<at::Tensor>& parts) {
  bool adjacent = true;
  int64_t rows = 0, elements = 0;
  for (const auto& part : parts) {
    adjacent = adjacent && part.is_contiguous() && part.storage().is_alias_of(parts[0].storage()) &&
               part.storage_offset() == parts[0].storage_offset() + elements;
    rows += part.size(0);
    elements += part.numel();
  }
  if (adjacent) {
    auto sizes = parts[0].sizes().vec();
    sizes[0] = rows;
    std::vector<int64_t> strides(sizes.size(), 1);
    for (std::size_t d = sizes.size() - 1; d > 0; --d) strides[d - 1] = strides[d] * sizes[d];
    return at::empty({0}, parts[0].options())
        .set_(parts[0].storage(), parts[0].storage_offset(), sizes, strides);
  }
  c10::NoGradGuard no_grad;
  auto stacked = at::cat(parts);
  int64_t offset = 0;
  for (auto part : parts) {
    const int64_t n = part.size(0);
    part.set_data(stacked.narrow(0, offset, n));
    offset += n;
  }
  return stacked;
}

}  // namespace fusion::kernels
