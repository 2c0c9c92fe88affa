// The chains fusion::optimize tries: data-flow chains of a traced run whose member types are those
// of a registered kernel, each with the specs that wire it as it ran.
#pragma once

#include <algorithm>
#include <cstddef>
#include <map>
#include <set>
#include <string>
#include <typeindex>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "fusion/detail/call_trace.hpp"
#include "fusion/detail/generalize.hpp"
#include "fusion/detail/kernel_registry.hpp"
#include "fusion/spec.hpp"

namespace fusion::detail {

struct Candidate {
  std::vector<const Site*> members;
  std::vector<ModuleSpec> specs;
  std::string kernel;
  // The Slots whose calls the members' calls ran inside: a kernel over one of them computes this
  // chain without calling it.
  std::set<const SlotBase*> enclosing;

  std::vector<std::string> paths() const {
    std::vector<std::string> result;
    for (const Site* member : members) result.push_back(member->path);
    return result;
  }
};

namespace candidates {

/// Call `to` takes output `output` of the call before it at parameter `param`.
struct Link {
  std::size_t to, param, output;
};

/// The links a chain may follow: the result is used by this one argument only, and neither call
/// is repeated in the run (a chain's members are called once per pass).
inline std::map<std::size_t, std::vector<Link>> links(const CallTrace& trace) {
  std::map<std::size_t, std::vector<Link>> result;
  const auto& calls = trace.calls();
  for (std::size_t to = 0; to < calls.size(); ++to) {
    if (trace.count(calls[to].site->slot) != 1) continue;
    for (const Feed& feed : calls[to].feeds) {
      const TracedCall& from = calls[feed.call];
      if (trace.count(from.site->slot) != 1 || !from.outputs_seen) continue;
      bool only_use = trace.uses(feed.call, feed.output) == 1;
      for (std::size_t k = 0; k < from.outputs; ++k) {
        if (k != feed.output && trace.uses(feed.call, k) != 0) only_use = false;
      }
      if (only_use) result[feed.call].push_back({to, feed.param, feed.output});
    }
  }
  return result;
}

/// Specs that wire each member's result into the parameter of the next that took it, and leave
/// every other parameter to the call argument: `{{"x0"}, {"x1"}}, {{"x1"}, {"x2"}}` for the
/// common one-tensor chain.
inline std::vector<ModuleSpec> specs_for(const CallTrace& trace,
                                         const std::vector<std::size_t>& calls,
                                         const std::vector<Link>& steps) {
  std::vector<ModuleSpec> specs(calls.size());
  for (std::size_t m = 0; m < calls.size(); ++m) {
    ModuleSpec& spec = specs[m];
    const std::size_t fed = m == 0 ? 0 : steps[m - 1].param;
    for (std::size_t p = 0; p < fed; ++p) spec.inputs.push_back(fmt::format("m{}.arg{}", m, p));
    spec.inputs.push_back(fmt::format("x{}", m));
    const std::size_t feeds = m + 1 < calls.size() ? steps[m].output : 0;
    for (std::size_t k = 0; k < trace.calls()[calls[m]].outputs; ++k) {
      spec.outputs.push_back(k == feeds ? fmt::format("x{}", m + 1)
                                        : fmt::format("m{}.out{}", m, k));
    }
  }
  return specs;
}

inline void extend(const CallTrace& trace, const std::map<std::size_t, std::vector<Link>>& links,
                   const std::vector<std::type_index>& types, std::vector<std::size_t>& calls,
                   std::vector<Link>& steps, const std::string& kernel,
                   std::vector<Candidate>& found) {
  if (calls.size() == types.size()) {
    Candidate candidate{{}, specs_for(trace, calls, steps), kernel, {}};
    for (std::size_t call : calls) {
      candidate.members.push_back(trace.calls()[call].site);
      for (std::size_t up = trace.calls()[call].parent; up != CallTrace::npos;
           up = trace.calls()[up].parent) {
        candidate.enclosing.insert(trace.calls()[up].site->slot);
      }
    }
    found.push_back(std::move(candidate));
    return;
  }
  auto next = links.find(calls.back());
  if (next == links.end()) return;
  for (const Link& link : next->second) {
    if (trace.calls()[link.to].site->slot->impl_type() != types[calls.size()]) continue;
    calls.push_back(link.to);
    steps.push_back(link);
    extend(trace, links, types, calls, steps, kernel, found);
    calls.pop_back();
    steps.pop_back();
  }
}

}  // namespace candidates

/// Every (chain, kernel) pair whose member types are those of a kernel registered (and listed in
/// `allowed`, when it is not empty; a reduced-precision kernel only when listed there), longest
/// chains first, then kernels by name. `notes` gets a line for each Slot that would fit a kernel
/// but is called more than once per run.
inline std::vector<Candidate> find_candidates(const CallTrace& trace,
                                              const std::vector<std::string>& allowed,
                                              std::vector<std::string>& notes) {
  const auto links = candidates::links(trace);
  std::vector<Candidate> found;
  std::set<std::type_index> kernel_types;
  for (const auto& [name, types] : KernelRegistry::instance().member_types()) {
    const bool listed = std::find(allowed.begin(), allowed.end(), name) != allowed.end();
    if (!listed && (!allowed.empty() || KernelRegistry::instance().only_where_named(name))) {
      continue;
    }
    kernel_types.insert(types.begin(), types.end());
    for (std::size_t c = 0; c < trace.calls().size(); ++c) {
      const TracedCall& call = trace.calls()[c];
      if (call.site->slot->impl_type() != types.front() || trace.count(call.site->slot) != 1) {
        continue;
      }
      std::vector<std::size_t> calls{c};
      std::vector<candidates::Link> steps;
      candidates::extend(trace, links, types, calls, steps, name, found);
    }
  }
  // One note per kind of repeated Slot (`layer*.*.relu`), not one per Slot.
  std::set<const SlotBase*> noted;
  std::vector<std::pair<std::string, std::size_t>> kinds;  // (path shape, count), in call order
  std::map<std::pair<std::string, std::size_t>, std::vector<std::vector<std::string>>> paths;
  for (const TracedCall& call : trace.calls()) {
    const std::size_t count = trace.count(call.site->slot);
    if (count > 1 && kernel_types.count(call.site->slot->impl_type()) != 0 &&
        noted.insert(call.site->slot).second) {
      const std::pair<std::string, std::size_t> kind{path_shape(call.site->path), count};
      if (paths[kind].empty()) kinds.push_back(kind);
      paths[kind].push_back({call.site->path});
    }
  }
  for (const auto& kind : kinds) {
    const auto& group = paths[kind];
    notes.push_back(fmt::format(
        "'{}'{} called {} times in one run: a chain's members are called once per pass",
        generalize(group).front(),
        group.size() == 1 ? " is" : fmt::format(" ({} Slots) are", group.size()), kind.second));
  }
  // Outer chains first (a kept one makes those inside it pointless), then the longest.
  std::stable_sort(found.begin(), found.end(), [](const Candidate& a, const Candidate& b) {
    if (a.enclosing.size() != b.enclosing.size()) return a.enclosing.size() < b.enclosing.size();
    return a.members.size() > b.members.size();
  });
  return found;
}

}  // namespace fusion::detail
