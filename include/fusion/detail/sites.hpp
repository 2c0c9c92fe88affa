// The module tree as fusion sees it: every child's path under a root, its parent and its Slot.
#pragma once

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "fusion/detail/chain.hpp"
#include "fusion/fused_chain.hpp"
#include "fusion/pattern.hpp"

namespace fusion::detail {

inline torch::nn::Module& module_of(torch::nn::Module& module) { return module; }
template <typename Impl>
torch::nn::Module& module_of(const torch::nn::ModuleHolder<Impl>& holder) {
  return *holder.ptr();
}

/// A child module as seen from the root: its path, its parent, and the Slot bound to it, if any.
struct Site {
  std::string path;
  torch::nn::Module* parent;
  std::string name;
  torch::nn::Module* module;
  SlotBase* slot;
};

// Walks children_ directly: named_modules(include_self) would need the root held by a shared_ptr.
inline void collect_sites(torch::nn::Module& parent, const std::string& prefix,
                          std::vector<Site>& sites) {
  const SlotTable& table = SlotTable::instance();
  for (const auto& child : parent.named_children()) {
    std::string path = prefix.empty() ? child.key() : prefix + "." + child.key();
    SlotBase* slot = table.find(&parent, child.key());
    if (slot != nullptr && slot->module() != child.value().get()) slot = nullptr;  // rebound child
    sites.push_back({path, &parent, child.key(), child.value().get(), slot});
    collect_sites(*child.value(), path, sites);
  }
}

inline std::vector<Site> sites_under(torch::nn::Module& root) {
  std::vector<Site> sites;
  collect_sites(root, "", sites);
  return sites;
}

/// The fused chains with a member under `root`, in module order.
inline std::vector<std::shared_ptr<Chain>> chains_under(const std::vector<Site>& sites) {
  std::vector<std::shared_ptr<Chain>> chains;
  std::set<const Chain*> seen;
  for (const Site& site : sites) {
    if (site.slot != nullptr && site.slot->is_fused() &&
        seen.insert(site.slot->chain().get()).second) {
      chains.push_back(site.slot->chain());
    }
  }
  return chains;
}

/// The fused chains under `root` (as `sites`) with a member whose path matches one of
/// `patterns`, in module order.
inline std::vector<std::shared_ptr<Chain>> chains_matching(
    const std::vector<Site>& sites, const std::vector<std::string>& patterns) {
  std::vector<Pattern> parsed;
  for (const std::string& text : patterns) parsed.emplace_back(text);
  std::set<const Chain*> selected;
  for (const Site& site : sites) {
    if (site.slot == nullptr || !site.slot->is_fused()) continue;
    for (const Pattern& pattern : parsed) {
      if (pattern.match(site.path)) selected.insert(site.slot->chain().get());
    }
  }
  std::vector<std::shared_ptr<Chain>> chains;
  for (auto& chain : chains_under(sites)) {
    if (selected.count(chain.get()) != 0) chains.push_back(std::move(chain));
  }
  return chains;
}

/// For a selection of patterns that found no fused chain: what they match instead.
inline std::string unfused_matches(const std::vector<Site>& sites,
                                   const std::vector<std::string>& patterns) {
  std::vector<Pattern> parsed;
  for (const std::string& text : patterns) parsed.emplace_back(text);
  std::vector<std::string> matched;
  for (const Site& site : sites) {
    for (const Pattern& pattern : parsed) {
      if (pattern.match(site.path)) {
        matched.push_back(site.path);
        break;
      }
    }
  }
  if (matched.empty()) return "they match no module";
  const std::size_t count = matched.size();
  if (matched.size() > 4) matched.resize(4), matched.push_back("...");
  return fmt::format("they match {} module(s) [{}], none of them fused (fuse_modules first)", count,
                     fmt::join(matched, ", "));
}

/// `info` with the name and counters of `chain`'s kernel, if it has one.
inline FusedChain with_kernel(FusedChain info, const Chain& chain) {
  if (const auto& kernel = chain.kernel()) {
    info.kernel = kernel->name();
    info.stats = kernel->stats();
    if (const auto dtype = kernel->compute_dtype()) info.kernel_dtype = c10::toString(*dtype);
  }
  return info;
}

/// A chain's description with member paths relative to the root that `sites` were collected
/// from. A member outside that root keeps the path it had under the root it was fused through,
/// marked "(outside) ".
inline FusedChain info_under(const Chain& chain, const std::vector<Site>& sites) {
  FusedChain info = chain.info();
  for (std::size_t m = 0; m < chain.size(); ++m) {
    const SlotBase* slot = chain.member_slot(m);
    std::string path = "(outside) " + info.paths[m];
    for (const Site& site : sites) {
      if (slot != nullptr && site.slot == slot) {
        path = site.path;
        break;
      }
    }
    info.paths[m] = std::move(path);
  }
  return with_kernel(std::move(info), chain);
}

inline std::string describe_names(const std::vector<std::string>& names) {
  return fmt::format("[{}]", fmt::join(names, ", "));
}

}  // namespace fusion::detail
