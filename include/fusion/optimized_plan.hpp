// fusion::OptimizeOptions and fusion::OptimizedPlan: what fusion::optimize (fusion/optimize.hpp)
// takes and returns.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "fusion/plan.hpp"

namespace fusion {

struct OptimizeOptions {
  /// Passed to verify: unset, the per-dtype default tolerances (see VerifyOptions::tolerance).
  std::optional<double> tolerance = std::nullopt;
  /// A rule is kept only if the whole run with its kernels is at least this much faster than
  /// unfused (0.02: 2%), as the median of interleaved rounds. A rule whose chains are a small
  /// part of the run gains little of the whole: 0 keeps every rule not measured slower.
  double min_speedup = 0.02;
  /// Intra-op threads while optimizing (at::set_num_threads, restored after); 0: as they are.
  int threads = 0;
  /// Time for optimize as a whole; the timing rounds share what tracing and verifying leave, one
  /// share per rule. Each rule still gets at least eight rounds of its three variants, so a slow
  /// run can take longer.
  std::chrono::milliseconds time_budget{15000};
  /// Only these kernels (exact names); empty: every registered kernel that computes in its
  /// inputs' dtype (a reduced-precision one, KernelOptions::compute_dtype, only when named here).
  std::vector<std::string> kernels = {};
};

/// How a rule's chains were timed over the whole sample run (fusion::optimize).
struct RuleTiming {
  double unfused_ms = 0;  // medians over the rounds
  double replay_ms = 0;
  double kernel_ms = 0;
  double speedup = 0;         // median over the rounds of unfused / kernel
  double replay_speedup = 0;  // median over the rounds of unfused / replay
  // The uncertainty of `speedup`: half the interquartile range of the rounds' speed-ups over
  // the square root of the rounds (a standard error, robust to the odd slow round).
  double spread = 0;
  std::size_t rounds = 0;
};

/// A rule optimize kept, with what it measured on the sample.
struct KeptRule {
  std::size_t rule;    // index in OptimizedPlan::rules
  std::size_t chains;  // how many chains it fuses
  RuleTiming timing;
  double max_abs_diff = 0;        // over its chains, from verify
  std::uint64_t state_bytes = 0;  // the kernels' prepared state beyond the model's tensors
};

/// A chain optimize tried with a kernel and did not keep.
struct Rejection {
  std::vector<std::string> paths;
  std::string kernel;
  std::string reason;
};

/// The plan optimize found (a Plan: fuse_modules and save_plan take it as one), and its account.
struct OptimizedPlan : Plan {
  std::vector<KeptRule> kept;
  std::vector<Rejection> rejected;
  std::vector<std::string> notes;  // Slots not proposed, and why
  double seconds = 0;              // what optimize took
};

inline std::string to_string(const OptimizedPlan& plan) {
  std::string text =
      fmt::format("fusion::optimize: {} rule(s) kept, {} chain(s) rejected, in {:.1f} s\n",
                  plan.rules.size(), plan.rejected.size(), plan.seconds);
  auto out = std::back_inserter(text);
  for (const KeptRule& kept : plan.kept) {
    const Rule& rule = plan.rules[kept.rule];
    const RuleTiming& t = kept.timing;
    fmt::format_to(out,
                   "  kept  {}  kernel {}: {} chain(s); speed-up {:.3f}x over unfused ({:.3f} vs "
                   "{:.3f} ms, +-{:.3f} over {} rounds; replay {:.3f}x); max abs diff {:g}; state "
                   "{} B\n",
                   fmt::join(rule.patterns, " -> "), rule.options.kernel, kept.chains, t.speedup,
                   t.kernel_ms, t.unfused_ms, t.spread, t.rounds, t.replay_speedup,
                   kept.max_abs_diff, kept.state_bytes);
  }
  for (const Rejection& r : plan.rejected) {
    fmt::format_to(out, "  rejected  {}  kernel {}: {}\n", fmt::join(r.paths, " -> "), r.kernel,
                   r.reason);
  }
  for (const std::string& note : plan.notes) fmt::format_to(out, "  not proposed: {}\n", note);
  return text;
}

inline std::ostream& operator<<(std::ostream& stream, const OptimizedPlan& plan) {
  return stream << to_string(plan);
}

}  // namespace fusion
