// The rounds of fusion::optimize over the candidates of one traced run: fuse, verify, time, keep.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "fusion/detail/candidates.hpp"
#include "fusion/detail/found_rules.hpp"
#include "fusion/detail/generalize.hpp"
#include "fusion/detail/interleaved_timing.hpp"
#include "fusion/detail/sites.hpp"
#include "fusion/fuse.hpp"
#include "fusion/match.hpp"
#include "fusion/optimized_plan.hpp"
#include "fusion/verify.hpp"

namespace fusion::detail {

/// The rounds of fusion::optimize over the candidates of one traced run. Each round fuses the
/// untried candidates whose modules are free, verifies them, and times each group of survivors
/// that would form one rule; what is rejected frees its modules for the next round.
template <typename Run>
class PlanSearch {
 public:
  using Clock = std::chrono::steady_clock;

  PlanSearch(torch::nn::Module& module, const std::vector<Site>& sites, Run& run,
             const OptimizeOptions& options, Clock::time_point started, OptimizedPlan& result)
      : module_(module),
        sites_(sites),
        run_(run),
        options_(options),
        started_(started),
        result_(result) {
    verify_options_.tolerance = options.tolerance;
  }

  void search(std::vector<Candidate> candidates) {
    candidates_ = std::move(candidates);
    tried_.assign(candidates_.size(), false);
    while (true) {
      const std::vector<Candidate> round = fuse_round();
      if (round.empty()) return;
      const auto groups = verify_round(round);
      for (const auto& chain : chains_under(sites_)) chain->detach();  // each group timed alone
      groups_left_ += groups.size();
      for (const auto& group : groups) time_group(group);
      for (const auto& chain : chains_under(sites_)) chain->attach();
    }
  }

  /// Unfuses the trial chains and writes the kept groups as the plan's rules.
  void write_plan() {
    unfuse_modules(module_);
    for (auto& [members, kept] : kept_) {
      for (Rule& rule : rules_for(module_, members)) {
        kept.rule = result_.rules.size();
        kept.chains = match_chains(module_, rule.patterns, rule.options).size();
        result_.kept.push_back(kept);
        result_.rules.push_back(std::move(rule));
      }
    }
  }

 private:
  struct Survivor {
    Candidate candidate;
    double max_abs_diff;
  };

  /// Fuses, with their kernels, the untried candidates on modules that neither a kept chain nor
  /// an earlier candidate of this round has.
  std::vector<Candidate> fuse_round() {
    std::vector<Candidate> round;
    std::set<const SlotBase*> in_round;
    for (std::size_t c = 0; c < candidates_.size(); ++c) {
      const Candidate& candidate = candidates_[c];
      if (tried_[c]) continue;
      bool free = true;
      for (const Site* m : candidate.members) {
        if (taken_.count(m->slot) != 0 || in_round.count(m->slot) != 0) free = false;
      }
      const SlotBase* inside = nullptr;  // a kept chain's member this candidate runs inside
      for (const SlotBase* slot : candidate.enclosing) {
        if (taken_.count(slot) != 0) inside = slot;
        if (in_round.count(slot) != 0) free = false;  // decided once that one is
      }
      if (inside != nullptr) {
        tried_[c] = true;
        result_.rejected.push_back(
            {candidate.paths(), candidate.kernel,
             "runs inside a kept chain's member, whose kernel computes it without calling it"});
        continue;
      }
      if (!free) continue;
      tried_[c] = true;
      FuseOptions fuse;
      fuse.kernel = candidate.kernel;
      try {
        fuse_modules(module_, literal_patterns(candidate.paths()), candidate.specs, fuse);
      } catch (const FusionError& error) {
        reject(candidate, std::string("cannot be fused: ") + error.what());
        continue;
      }
      for (const Site* m : candidate.members) in_round.insert(m->slot);
      round.push_back(candidate);
    }
    return round;
  }

  /// Verifies the round; returns the survivors grouped by the rule they would form.
  std::vector<std::vector<Survivor>> verify_round(const std::vector<Candidate>& round) {
    std::map<std::vector<std::string>, const ChainCheck*> checks;
    const VerifyReport report = verify(module_, run_, verify_options_);
    for (const ChainCheck& check : report.chains) checks[check.chain.paths] = &check;
    std::vector<std::vector<Survivor>> groups;
    std::map<std::string, std::size_t> group_of;
    for (const Candidate& candidate : round) {
      const ChainCheck& check = *checks.at(candidate.paths());
      if (!check.ok) {
        reject(candidate, verify_failure(check));
        continue;
      }
      const auto [it, added] = group_of.emplace(group_key(candidate), groups.size());
      if (added) groups.emplace_back();
      groups[it->second].push_back({candidate, check.max_abs_diff});
    }
    return groups;
  }

  /// Times a group's chains alone (the others are off) and keeps or rejects them together.
  void time_group(const std::vector<Survivor>& group) {
    std::vector<std::string> patterns;
    for (const Survivor& s : group) {
      for (const auto& path : s.candidate.paths()) patterns.push_back(literal_pattern(path));
    }
    const auto chains = chains_matching(sites_, patterns);
    for (const auto& chain : chains) chain->attach();
    const std::chrono::duration<double> elapsed = Clock::now() - started_;
    const auto left = std::max(std::chrono::duration<double>(0),
                               std::chrono::duration<double>(options_.time_budget) - elapsed);
    const std::uint64_t runs_before = chains.front()->kernel()->stats().runs;
    const RuleTiming timing = time_interleaved(chains, run_, options_.min_speedup,
                                               left / static_cast<double>(groups_left_));
    --groups_left_;
    for (const auto& chain : chains) chain->detach();
    const bool ran = chains.front()->kernel()->stats().runs > runs_before;
    if (ran && timing.speedup >= 1 + options_.min_speedup) {
      KeptRule kept{0, group.size(), timing, 0, 0};
      std::vector<Candidate> members;
      for (const Survivor& s : group) {
        members.push_back(s.candidate);
        kept.max_abs_diff = std::max(kept.max_abs_diff, s.max_abs_diff);
        for (const Site* m : s.candidate.members) taken_.insert(m->slot);
      }
      for (const auto& chain : chains) kept.state_bytes += chain->kernel()->stats().state_bytes;
      kept_.emplace_back(std::move(members), kept);
      return;
    }
    const std::string reason =
        !ran ? std::string(
                   "timing: the kernel does not run in the sample's mode (it ran only in "
                   "verify's eval() check); the chain would replay")
             : fmt::format(
                   "timing: {:.3f}x of unfused (+-{:.3f} over {} rounds; replay {:.3f}x), needs "
                   "{:.3f}x",
                   timing.speedup, timing.spread, timing.rounds, timing.replay_speedup,
                   1 + options_.min_speedup);
    for (const Survivor& s : group) reject(s.candidate, reason);
  }

  void reject(const Candidate& candidate, std::string reason) {
    result_.rejected.push_back({candidate.paths(), candidate.kernel, std::move(reason)});
    unfuse_modules(module_, literal_patterns(candidate.paths()));
  }

  torch::nn::Module& module_;
  const std::vector<Site>& sites_;
  Run& run_;
  const OptimizeOptions& options_;
  Clock::time_point started_;  // when optimize began: time_budget counts from there
  OptimizedPlan& result_;
  VerifyOptions verify_options_;
  std::vector<Candidate> candidates_;
  std::vector<bool> tried_;
  std::set<const SlotBase*> taken_;  // the modules of kept chains
  std::vector<std::pair<std::vector<Candidate>, KeptRule>> kept_;
  std::size_t groups_left_ = 0;  // groups still to be timed this round, for the budget's shares
};

}  // namespace fusion::detail
