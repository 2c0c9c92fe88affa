// fusion::FusedChain: the description of one fused chain, as fuse_modules and fused_chains return
// it.
#pragma once

#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "fusion/spec.hpp"

namespace fusion {

struct FusedChain {
  std::vector<std::string> paths;     // member paths, relative to the root of the call that
                                      // returned this (fuse_modules, fused_chains, verify)
  std::vector<std::string> patterns;  // the pattern each member matched, as given to fuse_modules
  std::vector<ModuleSpec> specs;      // the spec each member was fused with, same order
  std::vector<std::string> binding;   // the values the patterns' wildcards took for this chain
};

/// One line: "layers.0.norm -> layers.0.mlp".
inline std::string to_string(const FusedChain& chain) {
  return fmt::format("{}", fmt::join(chain.paths, " -> "));
}

}  // namespace fusion
