// The GEMM paths a projection can take, against the well-kept libraries that could replace the
// hand-written loops, in one run: OpenBLAS (through at::linear / at::matmul, what the unfused
// model runs), oneDNN (at::mkldnn_linear, LibTorch's own), libxsmm 1.17 (JIT kernels, Debian's
// libxsmm-dev), BLIS 0.9 (Debian's libblis-dev), the hand-written AVX-512 loops
// (detail::small_gemm, small_gemm_kn) and fusion::kernels::project (the path it measured fastest);
// and for a model in bfloat16, oneDNN's bfloat16 matmul against libxsmm's bfloat16 kernels and the
// hand-written AVX512_BF16 loops (detail::gemv_bf16).
//
// BLIS is opened with dlopen(RTLD_LOCAL) and called by its own API (bli_sgemm): linked normally,
// its sgemm_ would replace OpenBLAS's inside LibTorch and change the baseline. libxsmm runs as
// project() runs it (detail/libxsmm.hpp: the weight in place, for a weight stored [out, in] on x
// and y transposed), and for [out, in] also on a transposed copy of the weight, libxsmm's own
// layout (what a folded kernel would keep: twice the weight bytes).
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <blis.h>
#include <libxsmm.h>

#include <fusion/kernels/primitives.hpp>

#include "bench_support.hpp"

namespace {

/// BLIS's typed sgemm, from a privately opened libblis (nullptr where it is not installed).
struct Blis {
  using Gemm = decltype(&bli_sgemm);
  using SetThreads = decltype(&bli_thread_set_num_threads);
  Gemm gemm = nullptr;
  SetThreads set_threads = nullptr;
  Blis() {
    void* library = ::dlopen("libblis.so.4", RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr) return;
    gemm = reinterpret_cast<Gemm>(::dlsym(library, "bli_sgemm"));
    set_threads = reinterpret_cast<SetThreads>(::dlsym(library, "bli_thread_set_num_threads"));
  }
};

const Blis& blis() {
  static const Blis instance;
  return instance;
}

/// y [m, n] = x [m, k] times a weight given as libxsmm's A operand (column-major: C = A X, no
/// transposes), by libxsmm JIT kernels over panels of 64 output columns, the panels split across
/// LibTorch's threads as small_gemm_kn splits them. `pairs`: how many consecutive k values A's
/// layout keeps together, 1 for float32 (w [k, n] row-major), 2 for bfloat16's VNNI layout
/// ([k / 2][n][2], made by vnni()).
template <typename T, typename Kernel>
class XsmmPanels {
 public:
  using Dispatch = Kernel (*)(libxsmm_blasint, libxsmm_blasint, libxsmm_blasint,
                              const libxsmm_blasint*, const libxsmm_blasint*,
                              const libxsmm_blasint*, const float*, const float*, const int*,
                              const int*);
  XsmmPanels(Dispatch dispatch, int flags, int64_t pairs, int64_t m, int64_t k, int64_t n)
      : pairs_(pairs), m_(m), k_(k), n_(n) {
    const libxsmm_blasint lda = n, ldb = k, ldc = n;
    const float alpha = 1, beta = 0;
    full_ = dispatch(kPanel, m, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, nullptr);
    if (n % kPanel != 0) {
      tail_ = dispatch(n % kPanel, m, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, nullptr);
    }
  }
  bool ok() const { return full_ != nullptr && (n_ % kPanel == 0 || tail_ != nullptr); }
  void operator()(const T* x, const T* w, T* y) const {
    const int64_t panels = (n_ + kPanel - 1) / kPanel;
    const int64_t grain =
        fusion::detail::gemm_grain(m_ * k_ * kPanel, k_ * kPanel * static_cast<int64_t>(sizeof(T)));
    at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const auto kernel = (p + 1) * kPanel <= n_ ? full_ : tail_;
        kernel(w + p * kPanel * pairs_, x, y + p * kPanel);
      }
    });
  }

 private:
  static constexpr int64_t kPanel = 64;
  int64_t pairs_, m_, k_, n_;
  Kernel full_ = nullptr, tail_ = nullptr;
};

/// float32, w [k, n] row-major.
XsmmPanels<float, libxsmm_smmfunction> xsmm_float(int64_t m, int64_t k, int64_t n) {
  return {libxsmm_smmdispatch, LIBXSMM_GEMM_FLAG_NONE, 1, m, k, n};
}

/// bfloat16 in and out (float32 accumulation), w given in libxsmm's VNNI layout (vnni()).
XsmmPanels<libxsmm_bfloat16, libxsmm_bmmfunction> xsmm_bfloat16(int64_t m, int64_t k, int64_t n) {
  return {libxsmm_bmmdispatch, LIBXSMM_GEMM_FLAG_VNNI_A, 2, m, k, n};
}

/// w [n, k] as libxsmm's VNNI A operand: a copy (twice the weight bytes, as a folded kernel).
torch::Tensor vnni(const torch::Tensor& w) {
  return w.t().reshape({w.size(1) / 2, 2, w.size(0)}).permute({0, 2, 1}).contiguous();
}

/// Each of `paths` (a projection computed from weight copy `i`) must give `expected` within
/// `tolerance` from copy 0, `y` (which some write into) zeroed first; else the benchmark is
/// skipped, naming the path. Then they are timed with time_rotating, each cycling through
/// `copies` copies; `missing` (the paths not run here) becomes the label.
using IndexedPath = std::function<torch::Tensor(std::size_t)>;
void check_and_time(benchmark::State& state,
                    const std::vector<std::pair<std::string, IndexedPath>>& paths,
                    std::size_t copies, torch::Tensor y, const torch::Tensor& expected,
                    double tolerance, const std::string& missing) {
  for (const auto& [name, path] : paths) {
    y.zero_();
    if ((path(0).to(torch::kFloat) - expected).abs().max().item<double>() > tolerance) {
      state.SkipWithError((name + " differs from the reference").c_str());
      return;
    }
  }
  if (!missing.empty()) state.SetLabel("not run:" + missing);
  std::vector<std::pair<std::string, std::function<void()>>> runs;
  for (const auto& [name, path] : paths) {
    runs.emplace_back(name, [path = path, copies, cycle = std::size_t{0}]() mutable {
      benchmark::DoNotOptimize(path(cycle++ % copies));
    });
  }
  time_rotating(state, runs, "us", 1e6);
}

/// One projection of `rows` rows, `in` -> `out`, with the weight stored [out, in]
/// (layout 0, torch::nn::Linear) or [in, out] (layout 1, GPT-2's Conv1D), on every path that
/// applies, timed interleaved; ratios to the first (OpenBLAS through LibTorch). The weights are
/// cycled through copies that together exceed the L3 cache, as in a forward through several
/// layers.
void BM_GemmLibraries(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const bool kn = state.range(0) == 1;
  const int64_t rows = state.range(1), in = state.range(2), out = state.range(3);
  const int64_t copies = std::max<int64_t>(2, (64 << 20) / (in * out * 4));
  std::vector<torch::Tensor> weights, transposed;  // transposed: the other layout, contiguous
  for (int64_t i = 0; i < copies; ++i) {
    weights.push_back(
        torch::randn(kn ? std::vector<int64_t>{in, out} : std::vector<int64_t>{out, in}) * 0.05);
    transposed.push_back(weights.back().t().contiguous());
  }
  const auto x = torch::randn({rows, in});
  auto y = torch::empty({rows, out});
  const auto layout =
      kn ? fusion::kernels::WeightLayout::in_out : fusion::kernels::WeightLayout::out_in;
  const auto expected = kn ? torch::matmul(x, weights[0]) : torch::linear(x, weights[0]);
  // Each path computes the projection from the weight and its transposed copy.
  using Path = std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>;
  std::vector<std::pair<std::string, Path>> paths;
  std::string missing;
  paths.emplace_back("openblas", [&, kn](const torch::Tensor& w, const torch::Tensor&) {
    return kn ? torch::matmul(x, w) : torch::linear(x, w);
  });
  paths.emplace_back("project", [&](const torch::Tensor& w, const torch::Tensor&) {
    return fusion::kernels::project(x, w, {}, layout);
  });
  if (!kn) {
    paths.emplace_back("onednn", [&](const torch::Tensor& w, const torch::Tensor&) {
      return at::mkldnn_linear(x.to_mkldnn(), w, {}).to_dense();
    });
  }
  if (fusion::kernels::avx512_enabled()) {
    paths.emplace_back("hand_written", [&, kn](const torch::Tensor& w, const torch::Tensor&) {
      (kn ? fusion::detail::small_gemm_kn : fusion::detail::small_gemm)(
          x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, in, out);
      return y;
    });
  } else {
    missing += " hand_written (no AVX-512 loops: the CPU lacks them or FUSION_NO_AVX512 is set);";
  }
  const fusion::detail::XsmmGemm xsmm(rows, in, out, kn);
  if (xsmm.ok()) {
    paths.emplace_back("libxsmm", [&](const torch::Tensor& w, const torch::Tensor&) {
      xsmm(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>());
      return y;
    });
  } else {
    missing += " libxsmm (no kernel for this shape);";
  }
  const auto xsmm_copy = xsmm_float(rows, in, out);
  if (!kn && xsmm_copy.ok()) {
    // libxsmm's own layout for the weight: a transposed copy, as a folded kernel would keep.
    paths.emplace_back("libxsmm_copy", [&](const torch::Tensor&, const torch::Tensor& wt) {
      xsmm_copy(x.data_ptr<float>(), wt.data_ptr<float>(), y.data_ptr<float>());
      return y;
    });
  }
  if (blis().gemm != nullptr) {
    blis().set_threads(at::get_num_threads());
    paths.emplace_back("blis", [&, kn](const torch::Tensor& w, const torch::Tensor&) {
      float one = 1, zero = 0;
      // The weight as the [in, out] operand through BLIS's strides: no copy for either layout.
      const inc_t row_stride = kn ? out : 1, column_stride = kn ? 1 : in;
      blis().gemm(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, rows, out, in, &one, x.data_ptr<float>(),
                  in, 1, w.data_ptr<float>(), row_stride, column_stride, &zero, y.data_ptr<float>(),
                  out, 1);
      return y;
    });
  } else {
    missing += " blis (libblis.so.4 not found);";
  }
  std::vector<std::pair<std::string, IndexedPath>> indexed;
  for (const auto& [name, path] : paths) {
    indexed.emplace_back(
        name, [&, path = path](std::size_t i) { return path(weights[i], transposed[i]); });
  }
  check_and_time(state, indexed, weights.size(), y, expected, 1e-4, missing);
}
BENCHMARK(BM_GemmLibraries)
    ->ArgNames({"in_out", "rows", "in", "out"})
    // Llama shapes at hidden 512 (q/k/v packed, gate/up packed, down) and hidden 64.
    ->ArgsProduct({{0}, {1, 16, 128}, {512}, {1536, 3072}})
    ->ArgsProduct({{0}, {1, 16, 128}, {1536}, {512}})
    ->ArgsProduct({{0}, {1, 16, 128}, {64}, {384}})
    // GPT-2 shapes (weights [in, out]): c_attn, c_fc, c_proj of the MLP, at hidden 512 and 64.
    ->ArgsProduct({{1}, {1, 16, 128}, {512}, {1536, 2048}})
    ->ArgsProduct({{1}, {1, 16, 128}, {2048}, {512}})
    ->ArgsProduct({{1}, {1, 16, 128}, {64}, {256}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.5);

/// One bfloat16 projection of `rows` rows, `in` -> `out`, weight [out, in] (a model converted
/// with `to(torch::kBFloat16)`): linear (oneDNN's bfloat16 matmul, what the unfused model runs),
/// the hand-written AVX512_BF16 loops (detail::gemv_bf16), libxsmm's bfloat16 kernels on a VNNI
/// copy of the weight, and fusion::kernels::project; timed interleaved, ratios to linear, the
/// weights cycled through copies that together exceed the L3 cache.
void BM_GemmBFloat16(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t rows = state.range(0), in = state.range(1), out = state.range(2);
  const int64_t copies = std::max<int64_t>(2, (64 << 20) / (in * out * 2));
  std::vector<torch::Tensor> weights, vnni_weights;
  for (int64_t i = 0; i < copies; ++i) {
    weights.push_back((torch::randn({out, in}) * 0.05).to(torch::kBFloat16));
    vnni_weights.push_back(vnni(weights.back()));
  }
  const auto x = torch::randn({rows, in}).to(torch::kBFloat16);
  auto y = torch::empty({rows, out}, x.options());
  const auto expected = torch::linear(x.to(torch::kFloat), weights[0].to(torch::kFloat));
  const auto bits = [](const torch::Tensor& t) { return fusion::detail::bf16_bits(t); };
  std::vector<std::pair<std::string, IndexedPath>> paths;
  std::string missing;
  paths.emplace_back("onednn", [&](std::size_t i) { return torch::linear(x, weights[i]); });
  paths.emplace_back("project",
                     [&](std::size_t i) { return fusion::kernels::project(x, weights[i]); });
  if (fusion::kernels::avx512_enabled() && fusion::detail::cpu_has_avx512_bf16()) {
    paths.emplace_back("hand_written", [&](std::size_t i) {
      fusion::detail::gemv_bf16(bits(x), bits(weights[i]), nullptr, bits(y), rows, in, out);
      return y;
    });
  } else {
    missing += " hand_written (no AVX512_BF16 here, or FUSION_NO_AVX512 is set);";
  }
  const auto xsmm = xsmm_bfloat16(rows, in, out);
  if (xsmm.ok()) {
    paths.emplace_back("libxsmm_vnni_copy", [&](std::size_t i) {
      xsmm(reinterpret_cast<const libxsmm_bfloat16*>(bits(x)),
           reinterpret_cast<const libxsmm_bfloat16*>(bits(vnni_weights[i])),
           reinterpret_cast<libxsmm_bfloat16*>(bits(y)));
      return y;
    });
  } else {
    missing += " libxsmm (no bfloat16 JIT kernel for this shape or CPU);";
  }
  // Tolerance: two bfloat16 roundings and float32 summation order of the float32 product of the
  // same values.
  check_and_time(state, paths, weights.size(), y, expected,
                 1e-2 * expected.abs().max().item<double>(), missing);
}
BENCHMARK(BM_GemmBFloat16)
    ->ArgNames({"rows", "in", "out"})
    // Llama shapes at hidden 512 (q/k/v packed, gate/up packed, down, lm_head) and hidden 64.
    ->ArgsProduct({{1, 2, 4, 16}, {512}, {1024, 3072, 4096}})
    ->ArgsProduct({{1, 2, 4, 16}, {1536}, {512}})
    ->ArgsProduct({{1, 2, 4, 16}, {64}, {384}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.5);

}  // namespace

FUSION_BENCHMARK_MAIN();
