// fusion::match_chains: which chains fuse_modules would build, checked, without changing anything.
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "fusion/detail/chain_selection.hpp"
#include "fusion/fused_chain.hpp"
#include "fusion/options.hpp"
#include "fusion/spec.hpp"

namespace fusion {

/// A dry run of fuse_modules: the chains it would fuse under `root`, in module order, after every
/// check it makes (the same FusionErrors), with nothing changed.
template <typename Root>
std::vector<FusedChain> match_chains(Root& root, const std::vector<std::string>& patterns,
                                     const std::vector<ModuleSpec>& specs,
                                     const FuseOptions& options = {}) {
  std::vector<FusedChain> infos;
  for (const auto& chain :
       detail::build_chains(detail::module_of(root), patterns, specs, options)) {
    infos.push_back(chain->info());
  }
  return infos;
}

/// The chains the patterns select under `root`, checked as fuse_modules checks them except for
/// the specs (FusedChain::specs is empty): for exploring patterns before writing specs.
template <typename Root>
std::vector<FusedChain> match_chains(Root& root, const std::vector<std::string>& patterns,
                                     const FuseOptions& options = {}) {
  detail::Matches found = detail::match(detail::module_of(root), patterns, options);
  std::vector<FusedChain> infos;
  for (std::size_t c = 0; c < found.members.size(); ++c) {
    FusedChain info;
    info.patterns = patterns;
    info.binding = found.bindings[c];
    for (const detail::Site* member : found.members[c]) info.paths.push_back(member->path);
    infos.push_back(std::move(info));
  }
  return infos;
}

}  // namespace fusion
