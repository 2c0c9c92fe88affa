// From the chains fusion::optimize tried to a plan: which chains form one rule, that rule's
// patterns (generalized where they select exactly those chains), and why a chain failed verify.
#pragma once

#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "fusion/detail/candidates.hpp"
#include "fusion/detail/generalize.hpp"
#include "fusion/error.hpp"
#include "fusion/match.hpp"
#include "fusion/plan.hpp"
#include "fusion/verify.hpp"

namespace fusion::detail {

/// What chains share to form one rule: kernel, specs and path shapes.
inline std::string group_key(const Candidate& candidate) {
  std::string key = candidate.kernel;
  for (std::size_t m = 0; m < candidate.members.size(); ++m) {
    key += fmt::format("|{}({})->({})", path_shape(candidate.members[m]->path),
                       fmt::join(candidate.specs[m].inputs, ","),
                       fmt::join(candidate.specs[m].outputs, ","));
  }
  return key;
}

/// One rule for the chains of a group: generalized patterns if they select exactly these chains,
/// else one rule per chain with its own paths.
template <typename Root>
std::vector<Rule> rules_for(Root& root, const std::vector<Candidate>& chains) {
  Rule rule{{}, chains.front().specs, {}, {}};
  rule.options.kernel = chains.front().kernel;
  for (const Site* member : chains.front().members)
    rule.types.push_back(type_name_of(*member->slot));
  std::vector<std::vector<std::string>> paths;
  for (const Candidate& chain : chains) paths.push_back(chain.paths());
  rule.patterns = generalize(paths);
  bool exact = false;
  try {
    std::set<std::vector<std::string>> found;
    for (const FusedChain& chain : match_chains(root, rule.patterns, rule.options)) {
      found.insert(chain.paths);
    }
    exact = found == std::set<std::vector<std::string>>(paths.begin(), paths.end());
  } catch (const FusionError&) {
  }
  if (exact) return {rule};
  std::vector<Rule> rules;
  for (const auto& chain_paths : paths) {
    Rule single = rule;
    single.patterns = literal_patterns(chain_paths);
    rules.push_back(std::move(single));
  }
  return rules;
}

inline std::string verify_failure(const ChainCheck& check) {
  if (!check.error.empty()) return "verify: the fused run threw: " + check.error;
  if (!check.kernel_ran) return "verify: the kernel did not run on the sample (the chain replayed)";
  if (!check.worst_gradient.empty() && check.max_grad_diff > check.max_abs_diff) {
    return fmt::format("verify: gradients differ by {:g} at {}", check.max_grad_diff,
                       check.worst_gradient);
  }
  return fmt::format("verify: results differ by {:g}, over the tolerance", check.max_abs_diff);
}

}  // namespace fusion::detail
