// fusion::ModuleSpec: how one member of a chain is wired to the others, by name.
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/ivalue.h>

#include "fusion/detail/boxing.hpp"

namespace fusion {

/// Names the values flowing into and out of one chain member.
///
/// `inputs` names the leading parameters of the member's `forward`, in order. When the chain is
/// replayed, each named input takes the output of the same name from the nearest earlier member;
/// failing that, the member's own call argument; failing that, its default. Parameters past
/// `inputs` take the call argument when one was passed, else their default: a
/// `FORWARD_HAS_DEFAULT_ARGS` default of the module, or one given here in `defaults`.
///
/// `outputs` names what `forward` returns: one name, or one per element of a returned std::tuple.
///
///     fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}}
///     fusion::ModuleSpec{{"x", "mask"}, {"y"}, {{2, fusion::box(0.5)}}}  // parameter 2 defaults
///     to 0.5
struct ModuleSpec {
  std::vector<std::string> inputs;
  std::vector<std::string> outputs;
  std::map<std::size_t, c10::IValue> defaults = {};  // parameter index -> default value
};

/// Boxes any value as a ModuleSpec default: IValue-native values (tensors, numbers, None) as
/// themselves, other types (a user struct) in a capsule that the parameter of that type unboxes.
template <typename T>
c10::IValue box(T&& value) {
  return detail::box(std::forward<T>(value));
}

}  // namespace fusion
