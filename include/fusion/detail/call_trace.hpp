// One traced run of a model: which Slot was called in which order, inside which other call, and
// which call's result each tensor argument is. fusion::optimize finds its candidate chains here,
// so a candidate is a data-flow chain (the result of one call is the argument of the next), not
// two neighbours by name.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <typeindex>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/core/ivalue.h>

#include "fusion/detail/sites.hpp"
#include "fusion/detail/slot_base.hpp"
#include "fusion/detail/wiring.hpp"

namespace fusion::detail {

/// Output `output` of call `call` fed parameter `param` of a later call, unmodified.
struct Feed {
  std::size_t param;
  std::size_t call;
  std::size_t output;
};

struct TracedCall {
  const Site* site;
  std::size_t parent;  // the traced call this one ran inside, or npos
  std::vector<Feed> feeds;
  std::size_t outputs = 0;    // how many results (tuple elements) it returned
  bool outputs_seen = false;  // false when it ran outside the trace (see CallTrace::call)
};

/// Installs a recording dispatch on every unfused Slot under a root for its lifetime. Runs on one
/// thread, while no other thread runs the model.
class CallTrace {
 public:
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);

  explicit CallTrace(const std::vector<Site>& sites) {
    for (const Site& site : sites) {
      if (site.slot == nullptr || site.slot->is_fused() || site.module == nullptr) continue;
      if (!recorders_.emplace(site.slot, std::make_unique<Recorder>(*this, site)).second) {
        continue;  // one Slot reached by two paths (a shared parent): traced by the first
      }
    }
    for (auto& [slot, recorder] : recorders_) {
      const_cast<SlotBase*>(slot)->dispatch_.store(recorder.get());
    }
  }
  ~CallTrace() {
    for (auto& entry : recorders_) const_cast<SlotBase*>(entry.first)->dispatch_.store(nullptr);
  }
  CallTrace(const CallTrace&) = delete;
  CallTrace& operator=(const CallTrace&) = delete;

  const std::vector<TracedCall>& calls() const noexcept { return calls_; }
  /// How many arguments of outer calls (not nested in another call that took the same value)
  /// took output `output` of call `call`, modified or not.
  std::size_t uses(std::size_t call, std::size_t output) const {
    auto it = uses_.find({call, output});
    return it == uses_.end() ? 0 : it->second;
  }
  /// How many times the Slot was called.
  std::size_t count(const SlotBase* slot) const {
    auto it = counts_.find(slot);
    return it == counts_.end() ? 0 : it->second;
  }

 private:
  struct Produced {
    std::size_t call, output;
    std::int64_t version;
  };

  class Recorder final : public Dispatch {
   public:
    Recorder(CallTrace& trace, const Site& site) : Dispatch(false), trace_(trace), site_(site) {}
    std::vector<c10::IValue>* call(c10::IValue* args, std::size_t count) override {
      return trace_.call(site_, args, count);
    }

   private:
    CallTrace& trace_;
    const Site& site_;
  };

  std::vector<c10::IValue>* call(const Site& site, c10::IValue* args, std::size_t count) {
    const std::size_t index = calls_.size();
    calls_.push_back({&site, stack_.empty() ? npos : stack_.back(), {}, 0, false});
    ++counts_[site.slot];
    for (std::size_t p = 0; p < count; ++p) consume(index, p, args[p]);

    // A call that left out parameters runs through the Slot with C++'s defaults unless the module
    // declares them (FORWARD_HAS_DEFAULT_ARGS): its results are then not seen.
    const SignatureInfo& signature = site.slot->signature();
    std::vector<c10::IValue> full(args, args + count);
    if (count < signature.params.size()) {
      const auto defaults = member_defaults(site, ModuleSpec{}, site.path);
      for (std::size_t p = count; p < defaults.size(); ++p) {
        if (!defaults[p].has_value()) return Dispatch::finish_unfused();
        full.push_back(*defaults[p]);
      }
    }
    std::vector<c10::IValue>& outputs = results_.emplace_back();
    stack_.push_back(index);
    struct Pop {
      std::vector<std::size_t>& stack;
      ~Pop() { stack.pop_back(); }
    } pop{stack_};
    const_cast<SlotBase*>(site.slot)->call_boxed(full.data(), outputs);
    calls_[index].outputs = outputs.size();
    calls_[index].outputs_seen = true;
    for (std::size_t k = 0; k < outputs.size(); ++k) {
      if (!outputs[k].isTensor() || !outputs[k].toTensor().defined()) continue;
      const at::Tensor& tensor = outputs[k].toTensor();
      keep_.push_back(tensor);
      producers_[tensor.unsafeGetTensorImpl()] = {index, k, tensor._version()};
    }
    return &outputs;
  }

  void consume(std::size_t index, std::size_t param, const c10::IValue& arg) {
    if (!arg.isTensor() || !arg.toTensor().defined()) return;
    const at::Tensor& tensor = arg.toTensor();
    keep_.push_back(tensor);  // alive until the trace ends: no other tensor takes its address
    auto it = producers_.find(tensor.unsafeGetTensorImpl());
    if (it == producers_.end()) return;
    const Produced& produced = it->second;
    // An argument inside a call that took the same value (q_proj(x) inside self_attn(x)) is that
    // call's business, not a second use.
    for (std::size_t outer : stack_) {
      for (const Feed& feed : calls_[outer].feeds) {
        if (feed.call == produced.call && feed.output == produced.output) return;
      }
    }
    ++uses_[{produced.call, produced.output}];
    if (tensor._version() == produced.version) {
      calls_[index].feeds.push_back({param, produced.call, produced.output});
    }
  }

  std::map<const SlotBase*, std::unique_ptr<Recorder>> recorders_;
  std::vector<TracedCall> calls_;
  std::deque<std::vector<c10::IValue>> results_;  // stable addresses: a Slot reads them after
  std::vector<at::Tensor> keep_;
  std::vector<std::size_t> stack_;
  std::unordered_map<const c10::TensorImpl*, Produced> producers_;
  std::map<std::pair<std::size_t, std::size_t>, std::size_t> uses_;
  std::map<const SlotBase*, std::size_t> counts_;
};

}  // namespace fusion::detail
