// fusion::Plan: the fusion of a whole model as data, applied all-or-nothing, read back with
// plan_of, so that a clone (or a replica of data_parallel) can be fused the same way.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "fusion/detail/chain.hpp"
#include "fusion/detail/sites.hpp"
#include "fusion/error.hpp"
#include "fusion/fused_chain.hpp"
#include "fusion/match.hpp"
#include "fusion/pattern.hpp"
#include "fusion/spec.hpp"

namespace fusion {

/// One fuse_modules call: patterns, specs, and options (the kernel among them).
struct Rule {
  std::vector<std::string> patterns;
  std::vector<ModuleSpec> specs;
  FuseOptions options = {};
  /// Each member's module type, as c10::demangle names it (`MLPImpl`, `torch::nn::Conv2dImpl`),
  /// checked when the plan is applied; empty: not checked. fusion::optimize records them, so that
  /// a saved plan is refused by a model whose modules changed type.
  std::vector<std::string> types = {};
};

struct Plan {
  std::vector<Rule> rules;
};

/// Applies every rule of `plan` under `root`, all or nothing: every rule is checked (as
/// fuse_modules checks it, kernels included) and no module may be taken by two rules before any
/// chain is fused. Returns the chains, rule by rule, in module order.
template <typename Root>
std::vector<FusedChain> fuse_modules(Root& root, const Plan& plan) {
  auto& module = detail::module_of(root);
  std::vector<std::shared_ptr<detail::Chain>> chains;
  std::map<const detail::SlotBase*, std::size_t> taken;  // slot -> rule
  for (std::size_t r = 0; r < plan.rules.size(); ++r) {
    detail::fault_point();
    const Rule& rule = plan.rules[r];
    if (!rule.types.empty() && rule.types.size() != rule.patterns.size()) {
      detail::fail("fusion::fuse_modules(plan): rule #{} has {} patterns but {} types", r,
                   rule.patterns.size(), rule.types.size());
    }
    for (auto& chain : detail::build_chains(module, rule.patterns, rule.specs, rule.options)) {
      for (std::size_t m = 0; m < chain->size(); ++m) {
        const std::string type = detail::type_name_of(*chain->member_slot(m));
        if (!rule.types.empty() && type != rule.types[m]) {
          detail::fail("fusion::fuse_modules(plan): rule #{} takes a {} at '{}', but it is a {}", r,
                       rule.types[m], chain->info().paths[m], type);
        }
        auto [it, added] = taken.emplace(chain->member_slot(m), r);
        if (!added) {
          detail::fail("fusion::fuse_modules(plan): '{}' is taken by rule #{} and by rule #{}",
                       chain->info().paths[m], it->second, r);
        }
      }
      chains.push_back(std::move(chain));
    }
  }
  return detail::fuse_all(chains);
}

/// The plan in force under `root`: one rule per fuse_modules call (or plan rule) and kernel,
/// with patterns relative to `root`. Where only some of a call's chains remain, or carry a
/// kernel, each of those becomes a rule of its own, with its members' paths as patterns.
/// Throws FusionError for a chain with a member outside `root`.
namespace detail {

/// The chain's patterns, re-rooted by `prefix`, with each wildcard segment pinned to the text it
/// bound for this chain (`*` -> `[0]`), so that they select this chain alone with the same
/// binding. A `**` segment becomes the segments it matched (its binding element is then lost).
inline std::vector<std::string> pinned(const FusedChain& chain, const std::string& prefix) {
  std::vector<std::string> result;
  for (const std::string& text : chain.patterns) {
    std::string out = prefix;
    std::size_t bound = 0;
    const Pattern pattern(text);
    for (const std::string& segment : pattern.segments()) {
      std::string piece = segment;
      if (segment == "**") {
        piece = chain.binding[bound++];
      } else if (Pattern::has_wildcard(segment)) {
        piece.clear();
        for (char c : chain.binding[bound]) piece += std::string("[") + c + "]";
        ++bound;
      }
      if (piece.empty()) continue;
      out += (out.empty() || out.back() == '.' ? "" : ".") + piece;
    }
    result.push_back(out);
  }
  return result;
}

}  // namespace detail

template <typename Root>
Plan plan_of(Root& root) {
  const auto sites = detail::sites_under(detail::module_of(root));
  std::vector<std::pair<std::uint64_t, std::string>> order;
  std::map<std::pair<std::uint64_t, std::string>, std::vector<std::shared_ptr<detail::Chain>>>
      groups;
  for (const auto& chain : detail::chains_under(sites)) {
    const auto& kernel = chain->kernel();
    std::pair<std::uint64_t, std::string> key{chain->origin(), kernel ? kernel->name() : ""};
    if (groups[key].empty()) order.push_back(key);
    groups[key].push_back(chain);
  }
  Plan plan;
  for (const auto& key : order) {
    const auto& chains = groups[key];
    const detail::Chain& first = *chains.front();
    Rule rule{first.info().patterns, first.info().specs, {}};
    rule.options.skip_incomplete_chains = first.options().skip_incomplete_chains;
    rule.options.kernel = key.second;
    if (first.kernel()) rule.options.policy = first.kernel()->policy();
    const auto rooted = detail::info_under(first, sites);
    for (const auto& path : rooted.paths) {
      if (path.rfind("(outside) ", 0) == 0) {
        detail::fail("fusion::plan_of: chain [{}] has members outside the root", to_string(rooted));
      }
    }
    // The path from `root` to the root the chains were fused through.
    auto prefix_of = [&](const detail::Chain& chain) {
      const std::string from_root = detail::info_under(chain, sites).paths[0];
      return from_root.substr(0, from_root.size() - chain.info().paths[0].size());
    };
    if (chains.size() == first.origin_size()) {
      // Every chain of that call, with one kernel: its patterns, re-rooted.
      const std::string prefix = prefix_of(first);
      for (auto& pattern : rule.patterns) pattern = prefix + pattern;
      plan.rules.push_back(std::move(rule));
      continue;
    }
    for (const auto& chain : chains) {
      Rule single = rule;
      single.patterns = detail::pinned(detail::info_under(*chain, sites), prefix_of(*chain));
      plan.rules.push_back(std::move(single));
    }
  }
  return plan;
}

}  // namespace fusion
