// torch-module-fusion: fuse adjacent submodules of a LibTorch model into one fused module.
//
//   fusion::Slot<MLP> mlp;                              // a child the library can redirect
//   mlp = fusion::register_slot(*this, "mlp", MLP(c));  // registered as an ordinary child
//   fusion::fuse_modules(model, {"layers.*.norm", "layers.*.mlp"}, {spec, spec});
//   fusion::unfuse_modules(model);
#pragma once

#include "fusion/error.hpp"
#include "fusion/fuse.hpp"
#include "fusion/fused_chain.hpp"
#include "fusion/kernel.hpp"
#include "fusion/match.hpp"
#include "fusion/options.hpp"
#include "fusion/pattern.hpp"
#include "fusion/plan.hpp"
#include "fusion/sequential.hpp"
#include "fusion/slot.hpp"
#include "fusion/spec.hpp"
#include "fusion/verify.hpp"
