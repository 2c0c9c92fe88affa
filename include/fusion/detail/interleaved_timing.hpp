// How fusion::optimize times a group of chains: the whole run, unfused, replayed and with the
// kernel, interleaved round by round (so that drift in the machine's speed hits all three alike),
// until the spread of the rounds is small against the margin that decides, or the time is up.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <memory>
#include <vector>

#include "fusion/detail/chain.hpp"
#include "fusion/optimized_plan.hpp"

namespace fusion::detail {

inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

inline double half_iqr(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return (values[(3 * n) / 4 < n ? (3 * n) / 4 : n - 1] - values[n / 4]) / 2;
}

/// Times `run` with `chains` (each attached with its kernel on entry) unfused, replayed and with
/// their kernels; leaves them attached with their kernels. A run shorter than 10 ms is repeated
/// to about that within each measurement (one timer read per measurement, less jitter). At least
/// `min_rounds` rounds, then
/// more until the spread (see Timing) is under a quarter of `margin` (the speed-up that decides,
/// minus one), the median is clear of the decision by three spreads, or `budget` has passed.
template <typename Run>
RuleTiming time_interleaved(const std::vector<std::shared_ptr<Chain>>& chains, Run& run,
                            double margin, std::chrono::duration<double> budget,
                            std::size_t min_rounds = 8, std::size_t max_rounds = 60) {
  std::vector<std::shared_ptr<KernelRunner>> kernels;
  for (const auto& chain : chains) kernels.push_back(chain->kernel());
  auto set = [&](int variant) {  // 0 unfused, 1 replay, 2 kernel
    for (std::size_t c = 0; c < chains.size(); ++c) {
      if (variant == 0) {
        chains[c]->detach();
        continue;
      }
      chains[c]->set_kernel(variant == 2 ? kernels[c] : nullptr);
      chains[c]->attach();
    }
  };
  struct Restore {
    decltype(set)& set_variant;
    ~Restore() { set_variant(2); }
  } restore{set};
  using Clock = std::chrono::steady_clock;
  std::size_t repeats = 1;  // runs per measurement: a short run is repeated to about 10 ms
  auto once = [&](int variant) {
    set(variant);
    const auto start = Clock::now();
    for (std::size_t r = 0; r < repeats; ++r) run();
    return std::chrono::duration<double, std::milli>(Clock::now() - start).count() /
           static_cast<double>(repeats);
  };
  for (int variant = 0; variant < 3; ++variant) once(variant);  // warm: prepares, GEMM choices
  const double unfused = once(0);
  repeats =
      static_cast<std::size_t>(std::clamp(std::ceil(10.0 / std::max(unfused, 1e-3)), 1.0, 1000.0));
  const auto start = Clock::now();
  std::vector<double> times[3], speedups, replay_speedups;
  RuleTiming timing;
  while (true) {
    double round[3];
    for (int i = 0; i < 3; ++i) {
      const int variant = static_cast<int>((timing.rounds + i) % 3);
      round[variant] = once(variant);
    }
    for (int v = 0; v < 3; ++v) times[v].push_back(round[v]);
    speedups.push_back(round[0] / round[2]);
    replay_speedups.push_back(round[0] / round[1]);
    ++timing.rounds;
    if (timing.rounds < min_rounds) continue;
    timing.speedup = median(speedups);
    timing.spread = half_iqr(speedups) / std::sqrt(static_cast<double>(timing.rounds));
    const bool settled =
        timing.spread < margin / 4 || std::abs(timing.speedup - (1 + margin)) > 3 * timing.spread;
    if (settled || timing.rounds >= max_rounds || Clock::now() - start > budget) break;
  }
  timing.unfused_ms = median(times[0]);
  timing.replay_ms = median(times[1]);
  timing.kernel_ms = median(times[2]);
  timing.replay_speedup = median(replay_speedups);
  return timing;
}

}  // namespace fusion::detail
