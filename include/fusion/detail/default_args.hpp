// Reads the defaults a module declared with FORWARD_HAS_DEFAULT_ARGS, so that a replay can fill
// parameters the call site left out. Module keeps the accessors protected and befriends every
// AnyModuleHolder specialisation (that is how Sequential reaches them); this specialisation is
// ours.
#pragma once

#include <cstddef>
#include <vector>

#include <c10/util/Optional.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any_module_holder.h>
#include <torch/nn/modules/container/any_value.h>

namespace fusion::detail {
struct DefaultArgsAccess;
}

namespace torch::nn {
template <>
struct AnyModuleHolder<fusion::detail::DefaultArgsAccess> {
  /// One entry per forward() parameter: the declared default, or nullopt.
  static std::vector<c10::optional<AnyValue>> defaults(Module& module, std::size_t arity) {
    std::vector<c10::optional<AnyValue>> result(arity);
    if (!module._forward_has_default_args()) return result;
    const std::size_t required = module._forward_num_required_args();
    std::vector<AnyValue> arguments;
    for (std::size_t i = 0; i < required; ++i) arguments.emplace_back(0);  // stand-ins, dropped
    std::vector<AnyValue> all = module._forward_populate_default_args(std::move(arguments));
    for (std::size_t i = required; i < all.size() && i < arity; ++i) result[i] = std::move(all[i]);
    return result;
  }
};
}  // namespace torch::nn

namespace fusion::detail {
inline std::vector<c10::optional<torch::nn::AnyValue>> forward_defaults(torch::nn::Module& module,
                                                                        std::size_t arity) {
  return torch::nn::AnyModuleHolder<DefaultArgsAccess>::defaults(module, arity);
}
}  // namespace fusion::detail
