// fusion::FusedChain: the description of one fused chain, as fuse_modules and fused_chains return
// it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "fusion/spec.hpp"

namespace fusion {

/// What a chain's kernel did since it was attached (see use_kernel).
struct KernelStats {
  std::uint64_t runs = 0;              // calls the kernel computed
  std::uint64_t replays_device = 0;    // replayed: no implementation for the inputs' device
  std::uint64_t replays_training = 0;  // replayed: a member in training mode
  std::uint64_t replays_grad = 0;      // replayed: gradients needed, the kernel has no autograd
  std::uint64_t replays_modes = 0;     // replayed: members called in different autograd modes
  std::uint64_t replays_declined = 0;  // replayed: the kernel's applies() said no
  std::uint64_t exceptions = 0;        // calls on which the kernel threw
  std::uint64_t checks = 0;            // calls also replayed to check the kernel's result
  std::uint64_t prepares = 0;          // times its state was (re)built from the members' tensors
  // Member parameters and buffers that are inference tensors (made under InferenceMode): they
  // keep no version counter, so in-place writes to them are not seen (see refresh_kernels).
  std::uint64_t unversioned_tensors = 0;
  std::uint64_t state_bytes = 0;  // bytes the prepared state holds beyond the model's tensors
  std::uint64_t shared_state_bytes = 0;  // bytes of it that the model's tensors share
};

struct FusedChain {
  std::vector<std::string> paths;     // member paths, relative to the root of the call that
                                      // returned this (fuse_modules, fused_chains, verify)
  std::vector<std::string> patterns;  // the pattern each member matched, as given to fuse_modules
  std::vector<ModuleSpec> specs;      // the spec each member was fused with, same order
  std::vector<std::string> binding;   // the values the patterns' wildcards took for this chain
  std::string kernel;                 // the kernel attached, or empty: the chain replays
  std::string kernel_dtype;  // the dtype it computes in (KernelOptions::compute_dtype), e.g.
                             // "BFloat16"; empty: its inputs'
  KernelStats stats;         // with a kernel: what it did
};

/// One line: "layers.0.norm -> layers.0.mlp".
inline std::string to_string(const FusedChain& chain) {
  return fmt::format("{}", fmt::join(chain.paths, " -> "));
}

}  // namespace fusion
