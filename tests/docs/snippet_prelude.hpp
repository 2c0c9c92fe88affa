// What the documentation's C++ snippets may assume: the library, the test models (RMSNorm and MLP
// as the README writes them) and the names it uses for the user's things.
#pragma once

#include <iostream>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <fusion/fusion.hpp>
#include <fusion/kernels/batch_norm_folding.hpp>
#include <fusion/kernels/bfloat16.hpp>
#include <fusion/kernels/transformer.hpp>
#include <fusion/optimize.hpp>
#include <fusion/plan_json.hpp>

#include "gpt2.hpp"       // examples/gpt2/README.md declares its kernels
#include "mobilenet.hpp"  // docs/kernels.md declares block kernels for its InvertedResidual
#include "models.hpp"
#include "resnet.hpp"  // docs/kernels.md declares a residual block kernel for its BasicBlock

namespace fusion_docs {
using namespace models;
// `model` in a statement snippet: a stack of norm + MLP blocks, children layers.0, layers.1, ...
using Model = Stack;
}  // namespace fusion_docs
