// Choosing chains: which modules the patterns select and how they group into chains (match), the
// chains built and checked from them without changing anything (build_chains), and switching them
// on (fuse_all). fuse_modules, match_chains and plans are built from these.
#pragma once

#include <chrono>
#include <cstddef>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "fusion/detail/chain.hpp"
#include "fusion/detail/chain_roles.hpp"
#include "fusion/detail/kernel_attach.hpp"
#include "fusion/detail/quiesce.hpp"
#include "fusion/detail/sites.hpp"
#include "fusion/detail/wiring.hpp"
#include "fusion/error.hpp"
#include "fusion/fused_chain.hpp"
#include "fusion/options.hpp"
#include "fusion/pattern.hpp"
#include "fusion/spec.hpp"

namespace fusion::detail {

/// Why `pattern` matched nothing: how far along the path it got, and what was there instead.
inline std::string no_match_reason(const Pattern& pattern, const std::vector<Site>& sites) {
  const std::size_t segments = pattern.segments().size();
  for (std::size_t n = segments - 1; n > 0; --n) {
    const Pattern prefix = pattern.prefix(n);
    std::set<const torch::nn::Module*> matched;
    std::vector<std::string> matched_paths;
    for (const Site& site : sites) {
      if (prefix.match(site.path) && matched.insert(site.module).second) {
        matched_paths.push_back(site.path);
      }
    }
    if (matched.empty()) continue;
    std::vector<std::string> children;
    std::set<std::string> seen;
    for (const Site& site : sites) {
      if (matched.count(site.parent) != 0 && seen.insert(site.name).second) {
        children.push_back(site.name);
      }
    }
    if (matched_paths.size() > 4) matched_paths.resize(4), matched_paths.push_back("...");
    if (children.size() > 12) children.resize(12), children.push_back("...");
    return fmt::format(
        "'{}' matched {} module(s) {}, but none of them has a child matching '{}'; children "
        "there: {}",
        prefix.text(), matched.size(), describe_names(matched_paths), pattern.segments()[n],
        describe_names(children));
  }
  std::vector<std::string> top;
  for (const Site& site : sites) {
    if (site.path.find('.') == std::string::npos) top.push_back(site.name);
  }
  return fmt::format("no child of the root matches '{}'; the root's children: {}",
                     pattern.segments()[0], describe_names(top));
}

/// The chains the patterns select under a root, checked for everything but the specs.
struct Matches {
  std::vector<Site> sites;
  std::vector<std::vector<std::string>> bindings;  // one per chain
  std::vector<std::vector<Site*>> members;         // one per chain, members in pattern order
};

/// The patterns parsed, after the checks that need no model: enough of them, as many wildcards.
inline std::vector<Pattern> parse_patterns(const std::vector<std::string>& patterns,
                                           const FuseOptions& options) {
  if (patterns.empty() || (patterns.size() < 2 && options.kernel.empty())) {
    fail("fusion::fuse_modules: a chain needs at least 2 patterns (or 1 with a kernel), got {} {}",
         patterns.size(), describe_names(patterns));
  }
  std::vector<Pattern> parsed;
  for (const std::string& text : patterns) parsed.emplace_back(text);
  for (const Pattern& pattern : parsed) {
    if (pattern.wildcards() != parsed[0].wildcards()) {
      fail(
          "fusion::fuse_modules: pattern '{}' has {} wildcard segment(s) but '{}' has {}; chain "
          "members are grouped by their wildcard values, so every pattern needs as many",
          pattern.text(), pattern.wildcards(), parsed[0].text(), parsed[0].wildcards());
    }
  }
  return parsed;
}

/// Groups the sites the patterns match into chains by binding, in module order, keeping the
/// complete ones (all of them, unless skip_incomplete_chains).
inline void group_chains(Matches& found, const std::vector<Pattern>& parsed,
                         const std::vector<std::string>& patterns, const FuseOptions& options) {
  std::vector<std::vector<Site*>> chains;
  std::vector<std::vector<std::string>> bindings;
  std::map<std::vector<std::string>, std::size_t> chain_of;
  std::vector<std::size_t> match_count(patterns.size(), 0);
  for (Site& site : found.sites) {
    for (std::size_t p = 0; p < parsed.size(); ++p) {
      auto binding = parsed[p].match(site.path);
      if (!binding.has_value()) continue;
      ++match_count[p];
      auto [it, added] = chain_of.emplace(*binding, chains.size());
      if (added) {
        bindings.push_back(*binding);
        chains.emplace_back(patterns.size(), nullptr);
      }
      chains[it->second][p] = &site;
    }
  }
  for (std::size_t p = 0; p < patterns.size(); ++p) {
    if (match_count[p] == 0) {
      fail("fusion::fuse_modules: pattern '{}' matches no module under the root: {}", patterns[p],
           no_match_reason(parsed[p], found.sites));
    }
  }
  for (std::size_t c = 0; c < chains.size(); ++c) {
    bool full = true;
    for (std::size_t p = 0; p < patterns.size() && full; ++p) {
      if (chains[c][p] != nullptr) continue;
      full = false;
      if (options.skip_incomplete_chains) break;
      const Site* present = nullptr;
      for (const Site* member : chains[c]) present = present != nullptr ? present : member;
      fail(
          "fusion::fuse_modules: incomplete chain for binding {}: '{}' was matched, but pattern "
          "'{}' matches nothing for that binding",
          describe_names(bindings[c]), present->path, patterns[p]);
    }
    if (!full) continue;
    found.members.push_back(std::move(chains[c]));
    found.bindings.push_back(std::move(bindings[c]));
  }
  if (found.members.empty()) {
    fail("fusion::fuse_modules: no complete chain for patterns {}", describe_names(patterns));
  }
}

/// Every member is a Slot, not fused, and in one chain once.
inline void check_members(const Matches& found, const std::vector<std::string>& patterns) {
  std::map<const SlotBase*, std::pair<std::size_t, std::size_t>> owner;  // -> (chain, pattern)
  for (std::size_t c = 0; c < found.members.size(); ++c) {
    for (std::size_t p = 0; p < patterns.size(); ++p) {
      const Site& site = *found.members[c][p];
      if (site.slot == nullptr) {
        fail(
            "fusion::fuse_modules: '{}' (matched by pattern '{}') is not a fusion::Slot: declare "
            "the member as fusion::Slot<Holder> and bind it with fusion::register_slot",
            site.path, patterns[p]);
      }
      if (site.slot->is_fused()) {
        fail(
            "fusion::fuse_modules: '{}' (matched by pattern '{}') is already fused in chain [{}]; "
            "unfuse it first",
            site.path, patterns[p], to_string(info_under(*site.slot->chain(), found.sites)));
      }
      auto [it, added] = owner.emplace(site.slot, std::make_pair(c, p));
      if (added) continue;
      const auto [other_chain, other_pattern] = it->second;
      if (other_chain == c) {
        fail(
            "fusion::fuse_modules: '{}' is matched by two patterns of one chain ('{}' and '{}'); "
            "a module can be in one chain, once",
            site.path, patterns[other_pattern], patterns[p]);
      }
      fail(
          "fusion::fuse_modules: '{}' would be a member of two chains, for bindings {} and {}; "
          "a module can be in one chain, once",
          site.path, describe_names(found.bindings[other_chain]),
          describe_names(found.bindings[c]));
    }
  }
}

inline Matches match(torch::nn::Module& root, const std::vector<std::string>& patterns,
                     const FuseOptions& options) {
  const std::vector<Pattern> parsed = parse_patterns(patterns, options);
  Matches found;
  found.sites = sites_under(root);
  group_chains(found, parsed, patterns, options);
  check_members(found, patterns);
  return found;
}

/// Builds (but does not switch on) the chains fuse_modules would fuse, with their kernel bound;
/// throws if any spec or the kernel does not fit.
inline std::vector<std::shared_ptr<Chain>> build_chains(torch::nn::Module& root,
                                                        const std::vector<std::string>& patterns,
                                                        const std::vector<ModuleSpec>& specs,
                                                        const FuseOptions& options) {
  if (patterns.size() != specs.size()) {
    fail("fusion::fuse_modules: {} patterns but {} specs; give one spec per pattern, in order",
         patterns.size(), specs.size());
  }
  Matches found = match(root, patterns, options);
  const std::uint64_t origin = CaptureIndexPool::next_uid();  // chains of one call share it
  std::vector<std::shared_ptr<Chain>> built;
  for (std::size_t c = 0; c < found.members.size(); ++c) {
    fault_point();
    std::vector<Member> members;
    FusedChain info;
    info.patterns = patterns;
    info.specs = specs;
    info.binding = found.bindings[c];
    for (std::size_t p = 0; p < patterns.size(); ++p) {
      members.push_back(
          {found.members[c][p]->slot, wire_member(found.members[c], specs, patterns, p)});
      info.paths.push_back(found.members[c][p]->path);
    }
    mark_last_uses(members);
    auto chain = std::make_shared<Chain>(std::move(info), std::move(members));
    if (!options.kernel.empty()) {
      chain->set_kernel(bind_kernel(*chain, chain->info().paths, options.kernel, options.policy));
    }
    fault_point();
    chain->set_origin(origin, found.members.size());
    chain->set_options({options.skip_incomplete_chains});
    built.push_back(std::move(chain));
  }
  return built;
}

/// Switches on chains that plan() built and checked (this cannot fail); describes them.
/// Fusing changes only Slots that are not fused, so a forward on another thread never holds it
/// up: a pass that straddles it (its first members called before) finishes unfused.
inline std::vector<FusedChain> fuse_all(const std::vector<std::shared_ptr<Chain>>& chains) {
  fault_point();
  const Quiesce quiet(chains, "fuse_modules", std::chrono::milliseconds(0), /*drain=*/false);
  for (const auto& chain : chains) {  // planned while another thread may have fused them
    for (std::size_t m = 0; m < chain->size(); ++m) {
      if (chain->member_slot(m)->is_fused()) {
        fail("fusion::fuse_modules: '{}' was fused by another thread meanwhile; nothing changed",
             chain->info().paths[m]);
      }
    }
  }
  std::vector<FusedChain> infos;
  for (const auto& chain : chains) infos.push_back(with_kernel(chain->info(), *chain));
  fault_point();  // the last step that may fail: from here on, nothing throws
  for (const auto& chain : chains) Chain::fuse(chain);
  return infos;
}

}  // namespace fusion::detail
