// Which GEMM a float32 or bfloat16 projection on the CPU runs: measured, not guessed. The same
// shape is fastest on different paths on different machines (OpenBLAS 0.3.21 runs generic kernels
// on some AVX-512 CPUs and its AVX-512 ones on others; oneDNN's matmul wins on large shapes, the
// hand-written loops on a few rows, BLIS on [in, out] weights), so the first call of each shape
// times every path that can compute it on that call's own operands and keeps the fastest for the
// rest of the process.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>

#include "fusion/detail/abi.hpp"

namespace fusion::kernels {
/// The ways fusion::kernels::project can compute a float32 projection on the CPU.
enum class GemmPath {
  blas,          // at::linear / at::addmm: the BLAS LibTorch links (OpenBLAS on Debian)
  hand_written,  // small_gemm / small_gemm_kn: AVX-512 loops reading the weight in place
  onednn,        // at::mkldnn_linear: oneDNN's matmul on the weight as it is ([out, in] only)
  blis,     // BLIS's sgemm, where the system has libblis (detail/blis.hpp), the weight in place
  libxsmm,  // libxsmm's generated kernels, where the build found it (detail/libxsmm.hpp)
};
}  // namespace fusion::kernels

namespace fusion::detail {

inline namespace FUSION_ABI_VERSION {
/// The path chosen per shape (layout: 0 float32 [out, in], 1 float32 [in, out], 2 bfloat16
/// [out, in]; row bucket, in, out, threads), and a path forced by force_gemm_path. One table per
/// process (FUSION_API).
struct FUSION_API GemmChoices {
  static GemmChoices& instance() {
    static auto* choices = new GemmChoices();  // leaked: kernels may run during static destruction
    return *choices;
  }
  std::mutex mutex;
  std::map<std::tuple<int, int64_t, int64_t, int64_t, int>, kernels::GemmPath> chosen;
  std::optional<kernels::GemmPath> forced;
};
}  // namespace FUSION_ABI_VERSION

/// Rows grouped so that a prompt of any length costs few measurements: exact up to 16, then
/// powers of two.
inline int64_t row_bucket(int64_t rows) {
  if (rows <= 16) return rows;
  int64_t bucket = 32;
  while (bucket < rows) bucket *= 2;
  return bucket;
}

/// The path for this shape among `paths` (each computes the same product; the first, the BLAS,
/// always can): the forced one when it is among them; else the one measured fastest the first
/// time the shape came: each path run once to warm up, then timed in three rounds that take the
/// paths in turn (so that a drift of the machine's speed does not favour one), its fastest run
/// counting. Another path than the BLAS is kept only when it was at least 5% faster: the unfused
/// model runs the BLAS, and paths within a few percent of each other on these warm operands can
/// come out in either order inside a model, where the weight and the output come from memory.
/// After the first call of a shape: one lookup, no allocation.
template <std::size_t N, typename Run>
kernels::GemmPath choose_gemm(int layout, int64_t rows, int64_t in, int64_t out,
                              const std::array<kernels::GemmPath, N>& paths, std::size_t count,
                              Run&& run) {
  auto& choices = GemmChoices::instance();
  const auto key = std::make_tuple(layout, row_bucket(rows), in, out, at::get_num_threads());
  // A path this call cannot take (forced, or chosen while the AVX-512 loops were on) gives way
  // to the first, the BLAS.
  const auto available = [&](kernels::GemmPath path) {
    for (std::size_t i = 0; i < count; ++i) {
      if (paths[i] == path) return path;
    }
    return paths[0];
  };
  {
    std::lock_guard<std::mutex> lock(choices.mutex);
    if (choices.forced) return available(*choices.forced);
    const auto it = choices.chosen.find(key);
    if (it != choices.chosen.end()) return available(it->second);
  }
  if (count == 1) return paths[0];
  using Clock = std::chrono::steady_clock;
  std::array<double, N> fastest{};
  for (std::size_t i = 0; i < count; ++i) run(paths[i]);
  for (int round = 0; round < 3; ++round) {
    for (std::size_t i = 0; i < count; ++i) {
      const auto start = Clock::now();
      run(paths[i]);
      const double took = std::chrono::duration<double>(Clock::now() - start).count();
      fastest[i] = round == 0 ? took : std::min(fastest[i], took);
    }
  }
  const auto fastest_at = std::min_element(fastest.begin(), fastest.begin() + count);
  const auto best =
      *fastest_at < 0.95 * fastest[0] ? paths[fastest_at - fastest.begin()] : paths[0];
  std::lock_guard<std::mutex> lock(choices.mutex);
  return choices.chosen.emplace(key, best).first->second;
}

}  // namespace fusion::detail
