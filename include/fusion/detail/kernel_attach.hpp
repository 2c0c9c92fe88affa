// Attaching a kernel to a chain: the checks made once, when it is attached (member types, free
// inputs, result), and the binding that then decides per call.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/module.h>

#include "fusion/detail/chain.hpp"
#include "fusion/detail/kernel_binding.hpp"
#include "fusion/detail/kernel_registry.hpp"
#include "fusion/error.hpp"
#include "fusion/options.hpp"

namespace fusion::detail {

/// Whether `impl` takes the chain's member types, free inputs and result; a FusionError naming
/// what differs otherwise. `where` names the kernel and the chain.
inline void check_fit(const KernelImpl& impl, const Chain& chain,
                      const std::vector<std::string>& paths, const std::string& where) {
  if (impl.modules.size() != chain.size()) {
    fail("fusion: {}: the kernel takes {} module(s) ({}), the chain has {} member(s)", where,
         impl.modules.size(), fmt::join(impl.module_names, ", "), chain.size());
  }
  for (std::size_t i = 0; i < chain.size(); ++i) {
    if (impl.modules[i] != chain.member_slot(i)->impl_type()) {
      fail("fusion: {}: member #{} '{}' is a {}, but the kernel takes a {} there", where, i,
           paths[i], c10::demangle(chain.member_slot(i)->impl_type().name()), impl.module_names[i]);
    }
  }
  const auto& free = chain.free_inputs();
  std::vector<std::string> chain_inputs;
  for (const FreeInput& input : free) {
    chain_inputs.push_back(
        fmt::format("{} #{} of '{}'",
                    chain.member_slot(input.member)->signature().params[input.param].type.name,
                    input.param, paths[input.member]));
  }
  if (impl.inputs.size() != free.size()) {
    fail(
        "fusion: {}: the kernel takes {} free input(s) {}, the chain has {}: [{}] (every "
        "parameter no earlier member feeds, in member and parameter order)",
        where, impl.inputs.size(), describe_types(impl.inputs), free.size(),
        fmt::join(chain_inputs, ", "));
  }
  for (std::size_t j = 0; j < free.size(); ++j) {
    const TypeInfo& expected =
        chain.member_slot(free[j].member)->signature().params[free[j].param].type;
    if (impl.inputs[j].type != expected.type) {
      fail("fusion: {}: free input #{} is parameter {}, but the kernel takes a {} there", where, j,
           chain_inputs[j], impl.inputs[j].name);
    }
  }
  const auto& result = chain.member_slot(chain.size() - 1)->signature().outputs;
  bool same_result = result.size() == impl.outputs.size();
  for (std::size_t o = 0; same_result && o < result.size(); ++o) {
    same_result = result[o].type == impl.outputs[o].type;
  }
  if (!same_result) {
    fail("fusion: {}: the kernel returns {}, but the last member '{}' returns {}", where,
         describe_types(impl.outputs), paths.back(), describe_types(result));
  }
}

/// Checks that kernel `name` fits `chain` (member types, free inputs, result) and binds it.
/// `paths` are the members' paths as the caller's messages should show them.
inline std::shared_ptr<KernelRunner> bind_kernel(const Chain& chain,
                                                 const std::vector<std::string>& paths,
                                                 const std::string& name, KernelPolicy policy) {
  const auto impls = KernelRegistry::instance().find(name);
  const std::string where =
      fmt::format("kernel '{}' on chain [{}]", name, fmt::join(paths, " -> "));
  if (impls.empty()) {
    fail("fusion: unknown kernel '{}'; registered kernels: [{}]", name,
         fmt::join(KernelRegistry::instance().names(), ", "));
  }
  check_fit(*impls.front(), chain, paths, where);
  std::vector<void*> members;
  for (std::size_t i = 0; i < chain.size(); ++i) members.push_back(chain.member_slot(i)->impl());
  for (const auto& impl : impls) {
    const std::string misfit = impl->misfit(members.data());
    if (!misfit.empty()) fail("fusion: {}: {}", where, misfit);
  }
  std::vector<at::Tensor> tensors;
  for (std::size_t i = 0; i < chain.size(); ++i) {
    torch::nn::Module* module = chain.member_slot(i)->module();
    for (const auto& tensor : module->parameters()) tensors.push_back(tensor);
    for (const auto& tensor : module->buffers()) tensors.push_back(tensor);
  }
  if (const auto unversioned = KernelBinding::unversioned_tensors(tensors)) {
    TORCH_WARN("fusion: ", where, ": ", unversioned, " of the members' ", tensors.size(),
               " parameters and buffers are inference tensors (made under InferenceMode), which "
               "keep no version counter: an in-place write to one (copy_, mul_) is not seen, and "
               "the kernel keeps the state it prepared. Call fusion::refresh_kernels after such "
               "a write");
  }
  return std::make_shared<KernelBinding>(name, impls, std::move(tensors), policy);
}

}  // namespace fusion::detail
