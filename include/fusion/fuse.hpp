// fusion::fuse_modules / unfuse_modules: find chains of Slots by path patterns and fuse them.
#pragma once

#include <cstddef>
#include <iterator>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "fusion/detail/chain.hpp"
#include "fusion/detail/default_args.hpp"
#include "fusion/error.hpp"
#include "fusion/fused_chain.hpp"
#include "fusion/pattern.hpp"
#include "fusion/slot.hpp"
#include "fusion/spec.hpp"

namespace fusion {

struct FuseOptions {
  /// Skip bindings that some pattern lacks (a layer without the module) instead of failing.
  bool skip_incomplete_chains = false;
};

namespace detail {

inline torch::nn::Module& module_of(torch::nn::Module& module) { return module; }
template <typename Impl>
torch::nn::Module& module_of(const torch::nn::ModuleHolder<Impl>& holder) {
  return *holder.ptr();
}

/// A child module as seen from the root: its path, its parent, and the Slot bound to it, if any.
struct Site {
  std::string path;
  torch::nn::Module* parent;
  std::string name;
  torch::nn::Module* module;
  SlotBase* slot;
};

// Walks children_ directly: named_modules(include_self) would need the root held by a shared_ptr.
inline void collect_sites(torch::nn::Module& parent, const std::string& prefix,
                          std::vector<Site>& sites) {
  const SlotTable& table = SlotTable::instance();
  for (const auto& child : parent.named_children()) {
    std::string path = prefix.empty() ? child.key() : prefix + "." + child.key();
    SlotBase* slot = table.find(&parent, child.key());
    if (slot != nullptr && slot->module() != child.value().get()) slot = nullptr;  // rebound child
    sites.push_back({path, &parent, child.key(), child.value().get(), slot});
    collect_sites(*child.value(), path, sites);
  }
}

inline std::vector<Site> sites_under(torch::nn::Module& root) {
  std::vector<Site> sites;
  collect_sites(root, "", sites);
  return sites;
}

/// The fused chains with a member under `root`, in module order, with the members' paths.
inline std::vector<std::shared_ptr<Chain>> chains_under(const std::vector<Site>& sites) {
  std::vector<std::shared_ptr<Chain>> chains;
  std::set<const Chain*> seen;
  for (const Site& site : sites) {
    if (site.slot != nullptr && site.slot->is_fused() &&
        seen.insert(site.slot->chain().get()).second) {
      chains.push_back(site.slot->chain());
    }
  }
  return chains;
}

inline std::string describe_names(const std::vector<std::string>& names) {
  return fmt::format("[{}]", fmt::join(names, ", "));
}

inline std::string describe_types(const std::vector<TypeInfo>& types) {
  std::vector<std::string> names;
  for (const TypeInfo& type : types) names.push_back(type.name);
  return fmt::format("({})", fmt::join(names, ", "));
}

inline std::string describe_params(const SignatureInfo& signature) {
  std::vector<TypeInfo> types;
  for (const ParamInfo& param : signature.params) types.push_back(param.type);
  return describe_types(types);
}

/// Plans where every parameter of member `i` comes from; throws FusionError if it cannot be wired.
inline std::vector<Source> plan_member(const std::vector<Site*>& members,
                                       const std::vector<ModuleSpec>& specs,
                                       const std::vector<std::string>& patterns, std::size_t i) {
  const Site& site = *members[i];
  const ModuleSpec& spec = specs[i];
  const SignatureInfo& signature = site.slot->signature();
  const std::size_t arity = signature.params.size();
  const std::string where =
      fmt::format("spec #{} (pattern '{}', module '{}')", i, patterns[i], site.path);

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

  std::vector<Source> sources(arity);
  auto module_defaults = forward_defaults(*site.module, arity);
  for (std::size_t p = 0; p < arity; ++p) {
    const ParamInfo& param = signature.params[p];
    if (module_defaults[p].has_value()) {
      sources[p].fallback = param.from_any(*module_defaults[p]);
      if (!sources[p].fallback.has_value()) {
        fail(
            "fusion::fuse_modules: the FORWARD_HAS_DEFAULT_ARGS default of parameter #{} of '{}' "
            "holds a {}, but forward() takes {}",
            p, site.path, c10::demangle(module_defaults[p]->type_info().name()), param.type.name);
      }
    }
  }
  for (const auto& [index, value] : spec.defaults) {
    if (index >= arity) {
      fail(
          "fusion::fuse_modules: {} gives a default for parameter #{}, but forward() takes {} "
          "parameter(s)",
          where, index, arity);
    }
    if (!signature.params[index].holds(value)) {
      fail(
          "fusion::fuse_modules: {} gives parameter #{} a default of kind {}, but forward() takes "
          "{} there",
          where, index, value.tagKind(), signature.params[index].type.name);
    }
    sources[index].fallback = value;
  }

  for (std::size_t p = 0; p < arity; ++p) {
    Source& source = sources[p];
    const ParamInfo& param = signature.params[p];
    if (p >= spec.inputs.size()) {
      if (!source.fallback.has_value()) {
        fail(
            "fusion::fuse_modules: parameter #{} ({}) of '{}' is not named in {} and has no "
            "default: name it in the spec's inputs, or give it a default",
            p, param.type.name, site.path, where);
      }
      continue;
    }
    const std::string& name = spec.inputs[p];
    for (std::size_t k = i; k-- > 0;) {  // the most recent producer wins
      const auto& outputs = specs[k].outputs;
      for (std::size_t o = 0; o < outputs.size(); ++o) {
        if (outputs[o] != name) continue;
        const TypeInfo& produced = members[k]->slot->signature().outputs[o];
        if (!param.type.accepts(produced)) {
          fail(
              "fusion::fuse_modules: input '{}' of '{}' (parameter #{}, {}) would receive output "
              "'{}' of '{}', which is a {}",
              name, site.path, p, param.type.name, name, members[k]->path, produced.name);
        }
        source.producer = static_cast<int>(k);
        source.output = static_cast<int>(o);
        break;
      }
      if (source.producer >= 0) break;
    }
    if (source.producer < 0 && i > 0 && p == 0) {
      // The call argument is the placeholder the previous collector returned, not a real value.
      std::vector<std::string> available;
      for (std::size_t k = 0; k < i; ++k) {
        for (const auto& output : specs[k].outputs) available.push_back(output);
      }
      fail(
          "fusion::fuse_modules: input '{}' of '{}' is provided by nothing: no earlier member "
          "of the chain outputs '{}' (they output {}), and its call argument would only be the "
          "placeholder returned by '{}'",
          name, site.path, name, describe_names(available), members[i - 1]->path);
    }
  }
  return sources;
}

/// Marks the last consumer of each output, so the replay moves instead of copying and frees
/// intermediate tensors as early as it can.
inline void mark_last_uses(std::vector<Member>& members) {
  std::map<std::pair<int, int>, Source*> last;
  for (Member& member : members) {
    for (Source& source : member.sources) {
      if (source.producer >= 0) last[{source.producer, source.output}] = &source;
    }
  }
  for (auto& entry : last) entry.second->last_use = true;
}

inline std::vector<FusedChain> fuse(torch::nn::Module& root,
                                    const std::vector<std::string>& patterns,
                                    const std::vector<ModuleSpec>& specs,
                                    const FuseOptions& options) {
  if (patterns.size() < 2) {
    fail("fusion::fuse_modules: a chain needs at least 2 patterns, got {} {}", patterns.size(),
         describe_names(patterns));
  }
  if (patterns.size() != specs.size()) {
    fail("fusion::fuse_modules: {} patterns but {} specs; give one spec per pattern, in order",
         patterns.size(), specs.size());
  }
  std::vector<Pattern> parsed;
  for (const std::string& text : patterns) parsed.emplace_back(text);
  for (const Pattern& pattern : parsed) {
    if (pattern.wildcards() != parsed[0].wildcards()) {
      fail(
          "fusion::fuse_modules: pattern '{}' has {} wildcard segment(s) but '{}' has {}; chain "
          "members are grouped by their wildcard values, so every pattern needs as many",
          pattern.text(), pattern.wildcards(), parsed[0].text(), parsed[0].wildcards());
    }
  }

  std::vector<Site> sites = sites_under(root);

  // Group matches by binding, chains in module order.
  std::vector<std::vector<std::string>> bindings;
  std::vector<std::vector<Site*>> chains;
  std::map<std::vector<std::string>, std::size_t> chain_of;
  std::vector<std::size_t> match_count(patterns.size(), 0);
  for (Site& site : sites) {
    for (std::size_t p = 0; p < parsed.size(); ++p) {
      auto binding = parsed[p].match(site.path);
      if (!binding.has_value()) continue;
      ++match_count[p];
      auto [it, added] = chain_of.emplace(*binding, chains.size());
      if (added) {
        bindings.push_back(*binding);
        chains.emplace_back(patterns.size(), nullptr);
      }
      chains[it->second][p] = &site;
    }
  }
  for (std::size_t p = 0; p < patterns.size(); ++p) {
    if (match_count[p] == 0) {
      std::vector<std::string> examples;
      for (std::size_t s = 0; s < sites.size() && examples.size() < 6; ++s) {
        examples.push_back(sites[s].path);
      }
      fail(
          "fusion::fuse_modules: pattern '{}' matches no module under the root (paths look like "
          "{})",
          patterns[p], describe_names(examples));
    }
  }

  std::vector<std::size_t> complete;
  for (std::size_t c = 0; c < chains.size(); ++c) {
    for (std::size_t p = 0; p < patterns.size(); ++p) {
      if (chains[c][p] != nullptr) continue;
      if (options.skip_incomplete_chains) break;
      const Site* present = nullptr;
      for (const Site* member : chains[c]) present = present != nullptr ? present : member;
      fail(
          "fusion::fuse_modules: incomplete chain for binding {}: '{}' was matched, but pattern "
          "'{}' matches nothing for that binding",
          describe_names(bindings[c]), present->path, patterns[p]);
    }
    bool full = true;
    for (const Site* member : chains[c]) full = full && member != nullptr;
    if (full) complete.push_back(c);
  }
  if (complete.empty()) {
    fail("fusion::fuse_modules: no complete chain for patterns {}", describe_names(patterns));
  }

  std::map<const SlotBase*, std::pair<std::size_t, std::size_t>> owner;  // -> (chain, pattern)
  for (std::size_t c : complete) {
    for (std::size_t p = 0; p < patterns.size(); ++p) {
      const Site& site = *chains[c][p];
      if (site.slot == nullptr) {
        fail(
            "fusion::fuse_modules: '{}' (matched by pattern '{}') is not a fusion::Slot: declare "
            "the member as fusion::Slot<Holder> and bind it with fusion::register_slot",
            site.path, patterns[p]);
      }
      if (site.slot->is_fused()) {
        fail(
            "fusion::fuse_modules: '{}' (matched by pattern '{}') is already fused in chain [{}]; "
            "unfuse it first",
            site.path, patterns[p], to_string(site.slot->chain()->info()));
      }
      auto [it, added] = owner.emplace(site.slot, std::make_pair(c, p));
      if (added) continue;
      const auto [other_chain, other_pattern] = it->second;
      if (other_chain == c) {
        fail(
            "fusion::fuse_modules: '{}' is matched by two patterns of one chain ('{}' and '{}'); "
            "a module can be in one chain, once",
            site.path, patterns[other_pattern], patterns[p]);
      }
      fail(
          "fusion::fuse_modules: '{}' would be a member of two chains, for bindings {} and {}; "
          "a module can be in one chain, once",
          site.path, describe_names(bindings[other_chain]), describe_names(bindings[c]));
    }
  }

  // Everything is checked; build the chains, then switch them on (which cannot fail).
  std::vector<std::shared_ptr<Chain>> built;
  std::vector<FusedChain> infos;
  for (std::size_t c : complete) {
    std::vector<Member> members;
    FusedChain info{{}, patterns, specs, bindings[c]};
    for (std::size_t p = 0; p < patterns.size(); ++p) {
      members.push_back({chains[c][p]->slot, plan_member(chains[c], specs, patterns, p)});
      info.paths.push_back(chains[c][p]->path);
    }
    mark_last_uses(members);
    infos.push_back(info);
    built.push_back(std::make_shared<Chain>(std::move(info), std::move(members)));
  }
  for (const auto& chain : built) Chain::fuse(chain);
  return infos;
}

}  // namespace detail

/// Fuses every chain the patterns find under `root` (a torch::nn::Module or any ModuleHolder).
///
/// Patterns are dotted paths relative to `root` (see Pattern); one spec per pattern, same order.
/// Matches whose wildcards took the same values form one chain, members in pattern order. Every
/// member but the last becomes a RegistryCollector (captures its call arguments, returns a
/// placeholder); the last becomes a FusedModule that replays the chain's original modules from
/// the captures, wiring inputs to outputs by the names in the specs. Parameters, buffers and
/// children_ are untouched. Returns one FusedChain per chain, in module order.
///
/// Throws FusionError, naming the culprit, and leaves the model unchanged, if a pattern is
/// malformed or matches nothing, a chain is incomplete, a match is not a Slot, a module is already
/// fused or would be in two chains, or a spec does not fit its module's forward().
template <typename Root>
std::vector<FusedChain> fuse_modules(Root& root, const std::vector<std::string>& patterns,
                                     const std::vector<ModuleSpec>& specs,
                                     const FuseOptions& options = {}) {
  return detail::fuse(detail::module_of(root), patterns, specs, options);
}

/// Puts the original modules back in every fused chain under `root`. Returns how many chains.
template <typename Root>
std::size_t unfuse_modules(Root& root) {
  auto chains = detail::chains_under(detail::sites_under(detail::module_of(root)));
  for (auto& chain : chains) detail::Chain::unfuse(chain);
  return chains.size();
}

/// Unfuses only the chains with a member whose path under `root` matches one of `patterns`.
template <typename Root>
std::size_t unfuse_modules(Root& root, const std::vector<std::string>& patterns) {
  std::vector<Pattern> parsed;
  for (const std::string& text : patterns) parsed.emplace_back(text);
  auto sites = detail::sites_under(detail::module_of(root));
  std::set<const detail::Chain*> selected;
  for (const auto& site : sites) {
    if (site.slot == nullptr || !site.slot->is_fused()) continue;
    for (const Pattern& pattern : parsed) {
      if (pattern.match(site.path)) selected.insert(site.slot->chain().get());
    }
  }
  std::size_t count = 0;
  for (auto& chain : detail::chains_under(sites)) {
    if (selected.count(chain.get()) == 0) continue;
    detail::Chain::unfuse(chain);
    ++count;
  }
  return count;
}

/// The fused chains under `root`, in module order.
template <typename Root>
std::vector<FusedChain> fused_chains(Root& root) {
  std::vector<FusedChain> infos;
  auto& module = detail::module_of(root);
  for (const auto& chain : detail::chains_under(detail::sites_under(module))) {
    infos.push_back(chain->info());
  }
  return infos;
}

/// A readable account of the fused chains under `root`: members, their wiring and roles.
template <typename Root>
std::string report(Root& root) {
  const auto chains = fused_chains(root);
  std::string text =
      fmt::format("{} fused chain{}\n", chains.size(), chains.size() == 1 ? "" : "s");
  for (std::size_t c = 0; c < chains.size(); ++c) {
    const FusedChain& chain = chains[c];
    fmt::format_to(std::back_inserter(text), "[{}] {}  (binding {})\n", c, to_string(chain),
                   detail::describe_names(chain.binding));
    for (std::size_t m = 0; m < chain.paths.size(); ++m) {
      fmt::format_to(std::back_inserter(text), "    {:<14} {}: ({}) -> ({})\n",
                     m + 1 == chain.paths.size() ? "FusedModule" : "Collector", chain.paths[m],
                     fmt::join(chain.specs[m].inputs, ", "),
                     fmt::join(chain.specs[m].outputs, ", "));
    }
  }
  return text;
}

}  // namespace fusion
