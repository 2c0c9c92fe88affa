// Wiring a chain at fuse time: where each parameter of each member takes its value from when the
// chain replays, checked once so that a call only follows the plan.
#pragma once

#include <cstddef>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "fusion/detail/chain.hpp"
#include "fusion/detail/default_args.hpp"
#include "fusion/detail/sites.hpp"
#include "fusion/error.hpp"
#include "fusion/spec.hpp"

namespace fusion::detail {

inline std::string describe_params(const SignatureInfo& signature) {
  std::vector<TypeInfo> types;
  for (const ParamInfo& param : signature.params) types.push_back(param.type);
  return describe_types(types);
}

/// The defaults of member `site`'s parameters: FORWARD_HAS_DEFAULT_ARGS, overridden by the spec.
inline std::vector<c10::optional<c10::IValue>> member_defaults(const Site& site,
                                                               const ModuleSpec& spec,
                                                               const std::string& where) {
  const SignatureInfo& signature = site.slot->signature();
  const std::size_t arity = signature.params.size();
  std::vector<c10::optional<c10::IValue>> defaults(arity);
  auto module_defaults = forward_defaults(*site.module, arity);
  for (std::size_t p = 0; p < arity; ++p) {
    if (!module_defaults[p].has_value()) continue;
    defaults[p] = signature.params[p].from_any(*module_defaults[p]);
    if (!defaults[p].has_value()) {
      fail(
          "fusion::fuse_modules: the FORWARD_HAS_DEFAULT_ARGS default of parameter #{} of '{}' "
          "holds a {}, but forward() takes {}",
          p, site.path, c10::demangle(module_defaults[p]->type_info().name()),
          signature.params[p].type.name);
    }
  }
  for (const auto& [index, value] : spec.defaults) {
    if (index >= arity) {
      fail(
          "fusion::fuse_modules: {} gives a default for parameter #{}, but forward() takes {} "
          "parameter(s)",
          where, index, arity);
    }
    defaults[index] = signature.params[index].convert(value);
    if (!defaults[index].has_value()) {
      fail(
          "fusion::fuse_modules: {} gives parameter #{} a default of kind {}, but forward() takes "
          "{} there",
          where, index, value.tagKind(), signature.params[index].type.name);
    }
  }
  return defaults;
}

/// Whether member `i`'s spec fits its forward(): input and output counts, names, and a
/// placeholder to return if it is a collector. `where` names the spec.
inline void check_spec(const std::vector<Site*>& members, const std::vector<ModuleSpec>& specs,
                       const std::vector<std::string>& patterns, std::size_t i,
                       const std::string& where) {
  const Site& site = *members[i];
  const ModuleSpec& spec = specs[i];
  const SignatureInfo& signature = site.slot->signature();
  const std::size_t arity = signature.params.size();

  if (spec.inputs.size() > arity) {
    fail("fusion::fuse_modules: {} names {} inputs {} but forward() takes {} parameter(s) {}",
         where, spec.inputs.size(), describe_names(spec.inputs), arity, describe_params(signature));
  }
  if (spec.outputs.size() != signature.outputs.size()) {
    fail("fusion::fuse_modules: {} names {} output(s) {} but forward() returns {} value(s) {}",
         where, spec.outputs.size(), describe_names(spec.outputs), signature.outputs.size(),
         describe_types(signature.outputs));
  }
  std::set<std::string> output_names;
  for (const std::string& name : spec.outputs) {
    if (name.empty() || !output_names.insert(name).second) {
      fail("fusion::fuse_modules: {} has an empty or repeated output name '{}'", where, name);
    }
  }
  for (const std::string& name : spec.inputs) {
    if (name.empty()) fail("fusion::fuse_modules: {} has an empty input name", where);
  }
  if (i + 1 < members.size() && !signature.has_placeholder) {
    fail(
        "fusion::fuse_modules: '{}' (pattern '{}') cannot be a collector: forward() returns {}, "
        "which is neither its first parameter's type nor default-constructible, so there is no "
        "placeholder to return in its place. It can only be the last member of a chain",
        site.path, patterns[i], describe_types(signature.outputs));
  }
}

/// Plans where every parameter of member `i` comes from; throws FusionError if it cannot be wired.
/// A parameter named in the spec takes the output of that name of the nearest earlier member;
/// failing that, the input of that name of the nearest earlier member (what that member received,
/// e.g. `x` for both `router(x)` and `experts(x, weights)`); failing that, like an unnamed
/// parameter, the call argument, else the default (checked at call time: C++ default arguments
/// are invisible here).
inline std::vector<Origin> wire_member(const std::vector<Site*>& members,
                                       const std::vector<ModuleSpec>& specs,
                                       const std::vector<std::string>& patterns, std::size_t i) {
  const Site& site = *members[i];
  const ModuleSpec& spec = specs[i];
  const SignatureInfo& signature = site.slot->signature();
  const std::size_t arity = signature.params.size();
  const std::string where =
      fmt::format("spec #{} (pattern '{}', module '{}')", i, patterns[i], site.path);
  check_spec(members, specs, patterns, i, where);

  std::vector<Origin> origins(arity);
  const auto defaults = member_defaults(site, spec, where);
  for (std::size_t p = 0; p < arity; ++p) {
    Origin& origin = origins[p];
    origin.fallback = defaults[p];
    if (p >= spec.inputs.size()) continue;
    const std::string& name = spec.inputs[p];
    const ParamInfo& param = signature.params[p];
    // An earlier member's output of that name, the nearest winning; then an earlier input.
    for (const Origin::Kind kind : {Origin::Kind::output, Origin::Kind::input}) {
      for (std::size_t k = i; k-- > 0 && origin.kind == Origin::Kind::call;) {
        const bool outputs = kind == Origin::Kind::output;
        const auto& names = outputs ? specs[k].outputs : specs[k].inputs;
        for (std::size_t o = 0; o < names.size(); ++o) {
          if (names[o] != name) continue;
          const SignatureInfo& producer = members[k]->slot->signature();
          const TypeInfo& produced = outputs ? producer.outputs[o] : producer.params[o].type;
          if (!param.type.accepts(produced)) {
            fail(
                "fusion::fuse_modules: input '{}' of '{}' (parameter #{}, {}) would receive {} "
                "'{}' of '{}', which is a {}",
                name, site.path, p, param.type.name, outputs ? "output" : "input", name,
                members[k]->path, produced.name);
          }
          origin = Origin{kind, static_cast<int>(k), static_cast<int>(o), false, origin.fallback};
          break;
        }
      }
    }
  }
  if (i > 0 && origins[0].kind == Origin::Kind::call) {
    // The call argument is the placeholder the previous collector returned, not a real value.
    std::vector<std::string> outputs, inputs;
    for (std::size_t k = 0; k < i; ++k) {
      outputs.insert(outputs.end(), specs[k].outputs.begin(), specs[k].outputs.end());
      inputs.insert(inputs.end(), specs[k].inputs.begin(), specs[k].inputs.end());
    }
    fail(
        "fusion::fuse_modules: parameter #0 ({}) of '{}' is provided by nothing: no earlier member "
        "of the chain outputs it (they output {}) or takes it as an input (they take {}), and its "
        "call argument would only be the placeholder returned by '{}'",
        spec.inputs.empty() ? std::string("not named in its spec") : "'" + spec.inputs[0] + "'",
        site.path, describe_names(outputs), describe_names(inputs), members[i - 1]->path);
  }
  return origins;
}

/// Marks the last consumer of each wired value, so the replay moves instead of copying and frees
/// intermediate tensors as early as it can; marks the members whose inputs a later one reads.
inline void mark_last_uses(std::vector<Member>& members) {
  std::map<std::tuple<Origin::Kind, int, int>, Origin*> last;
  for (Member& member : members) {
    for (Origin& origin : member.origins) {
      if (origin.kind == Origin::Kind::call) continue;
      last[{origin.kind, origin.member, origin.index}] = &origin;
      if (origin.kind == Origin::Kind::input) members[origin.member].inputs_read_later = true;
    }
  }
  for (auto& entry : last) entry.second->last_use = true;
}

}  // namespace fusion::detail
