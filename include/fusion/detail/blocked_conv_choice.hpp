// How a folded 2d convolution on a blocked (oneDNN-layout) input runs: measured, not guessed.
// LibTorch 1.13 packs a weight (mkldnn_reorder_conv2d_weight) in the layout that its convolution
// on blocked activations then reads. LibTorch 2.14 (oneDNN 3.x) packs it for another of oneDNN's
// implementations than the one that runs, and the convolution reorders the whole weight on every
// call, a cost that grows with the weight, not with the activations (docs/performance.md).
// TorchScript's prepacked op packs for the convolution it runs, but takes and gives dense tensors.
// Where the build has oneDNN 2.x, the library's own oneDNN primitives (detail/onednn_conv.hpp)
// are two more ways, direct and Winograd, each faster for some shapes and slower for others. So
// the first blocked call of each shape times each way offered and keeps another than the first
// only where it was at least 5% faster, as choose_gemm keeps its paths.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <utility>

#include <ATen/Parallel.h>
#include <torch/types.h>

#include "fusion/detail/abi.hpp"

namespace fusion::kernels {
/// The ways a folded 2d convolution computes a blocked input on the CPU (round_trip and winograd
/// in float32 only).
enum class BlockedConvPath {
  blocked,     // at::mkldnn_convolution on the blocked input, the weight packed once
  round_trip,  // the input made dense, TorchScript's prepacked convolution, the result blocked
  onednn,      // oneDNN's direct convolution as a primitive the library makes, with the
               // activation (and a residual block's add) as post-ops (builds with oneDNN)
  winograd,    // the same with oneDNN's Winograd algorithm (stride-1 3x3 convolutions on
               // AVX-512): within float32 tolerance of the direct convolution, not bitwise equal
};
}  // namespace fusion::kernels

namespace fusion::detail {

/// What decides which path is faster: the weight's sizes, stride, padding, dilation, groups, the
/// input's sizes (a 2d convolution: 4 + 2 + 2 + 2 + 1 + 4) and dtype, the caller's variant (the
/// paths it offers, its post-ops) and the thread count.
using BlockedConvKey = std::array<int64_t, 18>;

inline BlockedConvKey blocked_conv_key(c10::IntArrayRef weight, c10::IntArrayRef stride,
                                       c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                       int64_t groups, const torch::Tensor& input,
                                       int64_t variant = 0) {
  BlockedConvKey key{};
  std::size_t n = 0;
  const auto dtype = static_cast<int64_t>(input.scalar_type());
  for (const auto values : {weight, stride, padding, dilation, c10::IntArrayRef(groups),
                            input.sizes(), c10::IntArrayRef(dtype), c10::IntArrayRef(variant)}) {
    for (const int64_t value : values) {
      if (n + 1 < key.size()) key[n++] = value;  // the last is the thread count
    }
  }
  key.back() = at::get_num_threads();
  return key;
}

inline namespace FUSION_ABI_VERSION {
/// The path chosen per convolution and input shape, and a path forced by
/// force_blocked_conv_path. One table per process (FUSION_API).
struct FUSION_API BlockedConvChoices {
  static BlockedConvChoices& instance() {
    static auto* choices = new BlockedConvChoices();  // leaked: kernels may run at exit
    return *choices;
  }
  std::mutex mutex;
  std::map<BlockedConvKey, kernels::BlockedConvPath> chosen;
  std::optional<kernels::BlockedConvPath> forced;
};
}  // namespace FUSION_ABI_VERSION
}  // namespace fusion::detail

namespace fusion::kernels {

/// Makes the folded 2d convolutions take `path` for blocked inputs (std::nullopt: measure per
/// shape, the default); returns the previous setting. For tests and benchmarks of one path.
inline std::optional<BlockedConvPath> force_blocked_conv_path(std::optional<BlockedConvPath> path) {
  auto& choices = detail::BlockedConvChoices::instance();
  std::lock_guard<std::mutex> lock(choices.mutex);
  std::swap(choices.forced, path);
  return path;
}

}  // namespace fusion::kernels

namespace fusion::detail {

/// Returns `run(path, false)` for the path chosen for `key` among `offered` (the first: the
/// default). The first call of a key first calls `run(path, true)` for each offered path once to
/// warm up, then in three rounds that take them in turn, the fastest run of each counting (those
/// results are dropped), then `lost(path)` for each path not chosen, which may free what only it
/// uses; later calls: one lookup, no allocation. A forced path that is not offered runs the
/// default.
template <typename Run, typename Lost>
torch::Tensor run_blocked_conv(const BlockedConvKey& key,
                               c10::ArrayRef<kernels::BlockedConvPath> offered, Run&& run,
                               Lost&& lost) {
  using kernels::BlockedConvPath;
  const auto is_offered = [&](BlockedConvPath path) {
    return std::find(offered.begin(), offered.end(), path) != offered.end();
  };
  auto& choices = BlockedConvChoices::instance();
  std::optional<BlockedConvPath> path;
  {
    std::lock_guard<std::mutex> lock(choices.mutex);
    if (choices.forced) {
      path = is_offered(*choices.forced) ? *choices.forced : offered[0];
    } else if (const auto it = choices.chosen.find(key); it != choices.chosen.end()) {
      // Chosen for an input of these sizes in another layout, where this path may not be offered.
      path = is_offered(it->second) ? it->second : offered[0];
    }
  }
  if (!path && offered.size() == 1) path = offered[0];
  if (!path) {
    using Clock = std::chrono::steady_clock;
    std::array<double, 4> fastest;
    fastest.fill(std::numeric_limits<double>::infinity());
    const std::size_t n = std::min(offered.size(), fastest.size());
    for (std::size_t round = 0; round < 4; ++round) {
      for (std::size_t i = 0; i < n; ++i) {
        const std::size_t which = (round + i) % n;  // each goes first in turn
        const auto start = Clock::now();
        run(offered[which], /*measuring=*/true);
        const double took = std::chrono::duration<double>(Clock::now() - start).count();
        if (round > 0) fastest[which] = std::min(fastest[which], took);
      }
    }
    std::size_t best = 0;
    for (std::size_t i = 1; i < n; ++i) {
      if (fastest[i] < 0.95 * fastest[0] && fastest[i] < fastest[best]) best = i;
    }
    {
      std::lock_guard<std::mutex> lock(choices.mutex);
      path = choices.chosen.emplace(key, offered[best]).first->second;
    }
    for (const auto other : offered) {
      if (other != *path) lost(other);
    }
  }
  return run(*path, /*measuring=*/false);
}

}  // namespace fusion::detail
