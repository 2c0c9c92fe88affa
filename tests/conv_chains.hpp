// What the tests of the convolution kernels share (cnn-test.cpp, bfloat16-test.cpp): chains of
// `fusion::Sequential` entries that each take and give one tensor, fused by index, with a kernel.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <fusion/fusion.hpp>

#include "catch_compat.hpp"

namespace fusion_test {

/// Requires `got` to have `expected`'s shape and dtype and to be within `relative_tolerance` of the
/// larger of 1 and `expected`'s largest magnitude; returns the largest absolute difference.
inline double require_within(const torch::Tensor& got, const torch::Tensor& expected,
                             double relative_tolerance) {
  REQUIRE(got.sizes() == expected.sizes());
  REQUIRE(got.dtype() == expected.dtype());
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  const double diff = (got - expected).abs().max().item<double>();
  INFO("max abs diff " << diff << ", largest output " << scale);
  REQUIRE(diff <= relative_tolerance * scale);
  return diff;
}

/// Random affine parameters and running statistics, so folding has something to fold.
inline void randomize_batch_norm(torch::nn::Module& bn) {
  torch::NoGradGuard no_grad;
  for (auto& item : bn.named_parameters()) item.value().uniform_(0.5, 1.5);
  for (auto& item : bn.named_buffers()) {
    if (item.key() == "running_mean") item.value().normal_(0, 0.5);
    if (item.key() == "running_var") item.value().uniform_(0.5, 2.0);
  }
}

inline fusion::ModuleSpec tensor_spec() { return fusion::ModuleSpec{{"x"}, {"x"}}; }

/// `n` members that each take and give one tensor.
inline std::vector<fusion::ModuleSpec> specs(std::size_t n) {
  return std::vector<fusion::ModuleSpec>(n, tensor_spec());
}

/// The paths of a Sequential's first `n` entries: "0", "1", ...
inline std::vector<std::string> member_paths(std::size_t n) {
  std::vector<std::string> paths;
  for (std::size_t i = 0; i < n; ++i) paths.push_back(std::to_string(i));
  return paths;
}

inline fusion::FuseOptions kernel(const std::string& name) {
  fusion::FuseOptions options;
  options.kernel = name;
  return options;
}

}  // namespace fusion_test
