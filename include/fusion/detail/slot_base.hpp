// The part of a fusable Slot that does not depend on its module type (SlotBase), what it calls
// when fused (Dispatch), the signature facts the checks and the replay read, and the table that
// finds a Slot from its parent and child name.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <typeindex>
#include <utility>
#include <vector>

#include <ATen/core/ivalue.h>
#include <c10/util/Optional.h>
#include <c10/util/Type.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any_value.h>

#include "fusion/detail/abi.hpp"
#include "fusion/detail/boxing.hpp"

namespace fusion::detail {

class CallTrace;
class Chain;
class Quiesce;
class SlotBase;

/// One forward() parameter, as fuse-time checks and the replay see it.
struct ParamInfo {
  TypeInfo type;
  // A spec default converted to this parameter's type as C++ would, or nullopt if it cannot be.
  c10::optional<c10::IValue> (*convert)(const c10::IValue&);
  c10::optional<c10::IValue> (*from_any)(
      torch::nn::AnyValue&);  // a FORWARD_HAS_DEFAULT_ARGS default
};

struct SignatureInfo {
  std::vector<ParamInfo> params;
  std::vector<TypeInfo> outputs;  // one per tuple element, else one
  bool has_placeholder = true;    // whether the Slot can stand in for its result as a collector
};

inline namespace FUSION_ABI_VERSION {

/// What a fused Slot calls instead of its module.
class FUSION_API Dispatch {
 public:
  explicit Dispatch(bool is_collector) : collects(is_collector) {}
  virtual ~Dispatch() = default;
  /// Takes the boxed call arguments (moving from them). A collector returns nullptr and the Slot
  /// returns a placeholder; the fused module returns the last member's boxed outputs. Either
  /// returns finish_unfused(), leaving the arguments, for a pass that began before the chain was
  /// fused: the Slot then calls its module with them.
  virtual std::vector<c10::IValue>* call(c10::IValue* args, std::size_t count) = 0;
  static std::vector<c10::IValue>* finish_unfused() noexcept { return &finish_unfused_; }
  const bool collects;

 private:
  static inline std::vector<c10::IValue> finish_unfused_;  // only its address is used
};

/// Finds the Slot bound to a child from (parent module, child name). Keyed by the `Module`
/// subobject, which is what named_modules() hands out.
class FUSION_API SlotTable {
 public:
  static SlotTable& instance() {
    static auto* table = new SlotTable();  // leaked: static models may be destroyed after it
    return *table;
  }
  void insert(const torch::nn::Module* parent, const std::string& name, SlotBase* slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    slots_[{parent, name}] = slot;
  }
  void erase(const torch::nn::Module* parent, const std::string& name, const SlotBase* slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = slots_.find({parent, name});
    if (it != slots_.end() && it->second == slot) slots_.erase(it);
  }
  SlotBase* find(const torch::nn::Module* parent, const std::string& name) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = slots_.find({parent, name});
    return it == slots_.end() ? nullptr : it->second;
  }

 private:
  mutable std::mutex mutex_;
  std::map<std::pair<const torch::nn::Module*, std::string>, SlotBase*> slots_;
};

}  // namespace FUSION_ABI_VERSION

/// The part of a Slot that does not depend on its module type.
class SlotBase {
 public:
  SlotBase() = default;
  // A copy (Cloneable::clone copy-constructs the parent) is neither registered nor fused: the
  // clone's reset() binds it again with register_slot.
  SlotBase(const SlotBase&) noexcept {}
  SlotBase& operator=(const SlotBase&) noexcept { return *this; }
  virtual ~SlotBase();

  bool is_fused() const noexcept { return chain_ != nullptr; }
  const std::shared_ptr<Chain>& chain() const noexcept { return chain_; }
  std::size_t member_index() const noexcept { return member_index_; }

  virtual torch::nn::Module* module() const noexcept = 0;
  /// The module as its own type (`Impl*`), for kernels, whose type impl_type() names.
  virtual void* impl() const noexcept = 0;
  virtual std::type_index impl_type() const noexcept = 0;
  virtual const SignatureInfo& signature() const = 0;
  /// Calls the original forward() with every parameter boxed in `args`; appends the outputs.
  virtual void call_boxed(c10::IValue* args, std::vector<c10::IValue>& outputs) = 0;

  /// Starts a call through the dispatch: counts it, so that no fusion change (Quiesce) runs
  /// meanwhile, and returns the dispatch to use, or nullptr if the Slot is no longer fused (call
  /// the module). A change in progress is waited out: it takes microseconds. Pair with leave().
  Dispatch* enter() noexcept {
    while (true) {
      if ((guard_.fetch_add(1) & kChanging) == 0) return dispatch_.load();
      guard_.fetch_sub(1);
      while ((guard_.load() & kChanging) != 0) std::this_thread::yield();
    }
  }
  void leave() noexcept { guard_.fetch_sub(1); }
  /// Whether calls go through a dispatch now (unguarded: a hint; enter() says for sure).
  bool dispatching() const noexcept { return dispatch_.load(std::memory_order_acquire) != nullptr; }

 protected:
  void bind(const torch::nn::Module* parent, std::string name) {
    unbind();
    parent_ = parent;
    name_ = std::move(name);
    SlotTable::instance().insert(parent_, name_, this);
  }
  void unbind() noexcept {
    if (parent_ != nullptr) SlotTable::instance().erase(parent_, name_, this);
    parent_ = nullptr;
  }

  std::atomic<Dispatch*> dispatch_{nullptr};

 private:
  friend class CallTrace;
  friend class Chain;
  friend class Quiesce;
  // Fused calls in flight through this Slot, plus kChanging while a fusion change holds it. One
  // word, so a call and a change see each other whichever comes first.
  static constexpr std::uint32_t kChanging = 1u << 31;
  std::atomic<std::uint32_t> guard_{0};
  std::shared_ptr<Chain> chain_;
  std::size_t member_index_ = 0;
  const torch::nn::Module* parent_ = nullptr;
  std::string name_;
};

/// The module type of a Slot as a plan records it (Rule::types).
inline std::string type_name_of(const SlotBase& slot) {
  return c10::demangle(slot.impl_type().name());
}

}  // namespace fusion::detail
