// A model both shared libraries of this test know: a pair of Slots over Identity modules.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <fusion/fusion.hpp>

#define TWO_LIBRARIES_EXPORT __attribute__((visibility("default")))

struct PairImpl : torch::nn::Module {
  PairImpl() {
    first = fusion::register_slot(*this, "first", torch::nn::Identity());
    second = fusion::register_slot(*this, "second", torch::nn::Identity());
  }
  torch::Tensor forward(const torch::Tensor& x) { return second(first(x)); }
  fusion::Slot<torch::nn::Identity> first, second;
};

// Library a: builds the model (its Slots register in a's code) and registers a kernel.
TWO_LIBRARIES_EXPORT std::shared_ptr<PairImpl> make_pair_model();
TWO_LIBRARIES_EXPORT void register_doubling_kernel();
TWO_LIBRARIES_EXPORT torch::Tensor run_in_a(PairImpl& model, const torch::Tensor& x);
// Library b: fuses the model with a's kernel, and reports.
TWO_LIBRARIES_EXPORT std::size_t fuse_in_b(PairImpl& model);
TWO_LIBRARIES_EXPORT bool register_once_in_b();
TWO_LIBRARIES_EXPORT std::vector<std::string> kernels_seen_by_b();
TWO_LIBRARIES_EXPORT std::string report_from_b(PairImpl& model);
