// How a float32 2d convolution on a blocked (oneDNN-layout) input runs: measured, not guessed.
// LibTorch 1.13 packs a weight (mkldnn_reorder_conv2d_weight) in the layout that its convolution
// on blocked activations then reads. LibTorch 2.14 (oneDNN 3.x) packs it for another of oneDNN's
// implementations than the one that runs, and the convolution reorders the whole weight on every
// call, a cost that grows with the weight, not with the activations (docs/performance.md).
// TorchScript's prepacked op packs for the convolution it runs, but takes and gives dense tensors.
// So the first blocked call of each shape times both ways, the blocked convolution and the round
// trip (input made dense, the prepacked op, the result blocked again), and keeps the round trip
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

#include <ATen/Parallel.h>
#include <torch/types.h>

#include "fusion/detail/abi.hpp"

namespace fusion::kernels {
/// The ways a folded float32 2d convolution computes a blocked input on the CPU.
enum class BlockedConvPath {
  blocked,     // at::mkldnn_convolution on the blocked input, the weight packed once
  round_trip,  // the input made dense, TorchScript's prepacked convolution, the result blocked
};
}  // namespace fusion::kernels

namespace fusion::detail {

/// What decides which path is faster: the weight's sizes, stride, padding, dilation, groups, the
/// input's sizes (a 2d convolution: 4 + 2 + 2 + 2 + 1 + 4) and the thread count.
using BlockedConvKey = std::array<int64_t, 16>;

inline BlockedConvKey blocked_conv_key(c10::IntArrayRef weight, c10::IntArrayRef stride,
                                       c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                       int64_t groups, c10::IntArrayRef input) {
  BlockedConvKey key{};
  std::size_t n = 0;
  for (const auto values : {weight, stride, padding, dilation, c10::IntArrayRef(groups), input}) {
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

/// Runs `blocked()` or `round_trip()`, the same convolution, as chosen for `key`. The first call
/// of a key runs each once to warm up, then three rounds that take them in turn, the fastest run
/// of each counting; later calls: one lookup, no allocation.
template <typename Blocked, typename RoundTrip>
torch::Tensor run_blocked_conv(const BlockedConvKey& key, Blocked&& blocked,
                               RoundTrip&& round_trip) {
  using kernels::BlockedConvPath;
  auto& choices = BlockedConvChoices::instance();
  std::optional<BlockedConvPath> path;
  {
    std::lock_guard<std::mutex> lock(choices.mutex);
    if (choices.forced) {
      path = choices.forced;
    } else if (const auto it = choices.chosen.find(key); it != choices.chosen.end()) {
      path = it->second;
    }
  }
  if (!path) {
    using Clock = std::chrono::steady_clock;
    double fastest[2] = {std::numeric_limits<double>::infinity(),
                         std::numeric_limits<double>::infinity()};
    for (int round = 0; round < 4; ++round) {
      for (int i = 0; i < 2; ++i) {
        const int which = (round + i) % 2;  // each goes first in turn
        const auto start = Clock::now();
        if (which == 0) {
          blocked();
        } else {
          round_trip();
        }
        const double took = std::chrono::duration<double>(Clock::now() - start).count();
        if (round > 0) fastest[which] = std::min(fastest[which], took);
      }
    }
    const auto best =
        fastest[1] < 0.95 * fastest[0] ? BlockedConvPath::round_trip : BlockedConvPath::blocked;
    std::lock_guard<std::mutex> lock(choices.mutex);
    path = choices.chosen.emplace(key, best).first->second;
  }
  return *path == BlockedConvPath::round_trip ? round_trip() : blocked();
}

}  // namespace fusion::detail
