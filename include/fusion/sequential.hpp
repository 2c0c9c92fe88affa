// fusion::Sequential: torch::nn::Sequential whose entries are fusable. torch::nn::Sequential calls
// its entries through AnyModule, a call site the library cannot redirect; here every entry is a
// Slot, so `features.0` + `features.1` can form a chain like any two Slot members.
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/pimpl.h>

#include "fusion/detail/blocked_layout.hpp"
#include "fusion/detail/boxing.hpp"
#include "fusion/detail/chain.hpp"
#include "fusion/error.hpp"
#include "fusion/slot.hpp"

namespace fusion {

namespace detail {

/// One entry: its Slot (the call site fusion redirects) and an AnyModule (what iteration yields,
/// as torch::nn::Sequential's does).
class SequentialEntry {
 public:
  virtual ~SequentialEntry() = default;
  /// Calls the entry through its Slot with `args`, unboxed to its forward()'s parameter types.
  virtual torch::nn::AnyValue call(std::vector<torch::nn::AnyValue>&& args, std::size_t index) = 0;
  /// A copy of this entry's module (Module::clone), as an entry bound to `parent` under `name`.
  virtual std::unique_ptr<SequentialEntry> clone_into(
      torch::nn::Module& parent, const std::string& name,
      const c10::optional<torch::Device>& device) const = 0;
  /// Takes `other`'s module (same type), keeping this entry's registration and fusion state.
  virtual void adopt(const SequentialEntry& other) = 0;
  virtual const torch::nn::AnyModule& any() const noexcept = 0;
  virtual SlotBase& slot() noexcept = 0;
};

template <typename Holder>
class TypedSequentialEntry final : public SequentialEntry {
  using Entry = Slot<Holder>;
  using Impl = typename Entry::Impl;
  template <std::size_t I>
  using Param = std::decay_t<detail::param_t<I, typename Entry::Signature>>;

 public:
  TypedSequentialEntry(torch::nn::Module& parent, std::string name, Holder holder) : any_(holder) {
    slot_ = register_slot(parent, std::move(name), std::move(holder));
  }

  torch::nn::AnyValue call(std::vector<torch::nn::AnyValue>&& args, std::size_t index) override {
    torch::nn::AnyValue result{0};
    const bool called =
        call_with_count(args, index, result, std::make_index_sequence<Entry::arity + 1>{});
    if (!called) {
      fail(
          "fusion::Sequential: entry #{} ({}) cannot be called with {} argument(s): its forward() "
          "takes {}, without defaults for the rest",
          index, type_name<Impl>(), args.size(), Entry::arity);
    }
    return result;
  }

  std::unique_ptr<SequentialEntry> clone_into(
      torch::nn::Module& parent, const std::string& name,
      const c10::optional<torch::Device>& device) const override {
    auto copy = std::dynamic_pointer_cast<Impl>(slot_->clone(device));
    return std::make_unique<TypedSequentialEntry>(parent, name, Holder(std::move(copy)));
  }

  void adopt(const SequentialEntry& other) override {
    const auto& source = dynamic_cast<const TypedSequentialEntry&>(other);
    slot_ = source.slot_;
    any_ = source.any_;
  }

  const torch::nn::AnyModule& any() const noexcept override { return any_; }
  SlotBase& slot() noexcept override { return slot_; }

 private:
  // Whether forward() can be called with its first N parameters (the rest defaulted).
  template <std::size_t... I>
  static auto callable_with(std::index_sequence<I...>)
      -> decltype(std::declval<Impl&>().forward(std::declval<Param<I>>()...));
  template <std::size_t N, typename = void>
  struct Callable : std::false_type {};
  template <std::size_t N>
  struct Callable<N, std::void_t<decltype(callable_with(std::make_index_sequence<N>{}))>>
      : std::true_type {};

  template <std::size_t... N>
  bool call_with_count(std::vector<torch::nn::AnyValue>& args, std::size_t index,
                       torch::nn::AnyValue& result, std::index_sequence<N...>) {
    return ((args.size() == N && N > 0 && call_n<N>(args, index, result)) || ...);
  }
  template <std::size_t N>
  bool call_n(std::vector<torch::nn::AnyValue>& args, std::size_t index,
              torch::nn::AnyValue& result) {
    if constexpr (N == 0 || !Callable<N>::value) {
      return false;
    } else {
      result = call_unboxed(args, index, std::make_index_sequence<N>{});
      return true;
    }
  }
  template <std::size_t... I>
  torch::nn::AnyValue call_unboxed(std::vector<torch::nn::AnyValue>& args, std::size_t index,
                                   std::index_sequence<I...>) {
    return torch::nn::AnyValue(slot_(std::move(unbox<I>(args[I], index))...));
  }
  template <std::size_t I>
  static Param<I>& unbox(torch::nn::AnyValue& value, std::size_t index) {
    if (auto* typed = value.try_get<Param<I>>()) return *typed;
    fail("fusion::Sequential: entry #{} ({}) takes {} as argument #{}, but was given a {}", index,
         type_name<Impl>(), type_name<Param<I>>(), I, c10::demangle(value.type_info().name()));
  }

  Slot<Holder> slot_;
  torch::nn::AnyModule any_;
};

}  // namespace detail

/// A drop-in for torch::nn::Sequential whose entries fuse: entries are named "0", "1", ... (or as
/// given), so parameter names and archives are those of torch::nn::Sequential. forward() passes
/// its inputs to the first entry and each entry's result to the next, and returns the last
/// result as ReturnType (torch::Tensor by default). Entries are added as module holders
/// (`torch::nn::Conv2d(...)`, your `MLP(...)`) or shared_ptrs to Impl; their type must be known,
/// so AnyModule entries are not accepted.
class SequentialImpl : public torch::nn::Cloneable<SequentialImpl> {
 public:
  using Iterator = std::vector<torch::nn::AnyModule>::iterator;

  SequentialImpl() = default;
  template <
      typename... Holders,
      typename = std::enable_if_t<(sizeof...(Holders) > 0) &&
                                  !(std::is_same_v<std::decay_t<Holders>, SequentialImpl> || ...)>>
  explicit SequentialImpl(Holders&&... holders) {
    (push_back(std::forward<Holders>(holders)), ...);
  }
  // Cloneable needs both. The copy constructor only makes Cloneable's own clone() compile:
  // clone() below replaces it and builds the copy entry by entry. When a Cloneable parent
  // clones, its clone_ assigns a deep clone of the source to the Sequential its reset() made:
  // adopt that clone's modules, keeping this Sequential's Slots (registration, fusion state).
  SequentialImpl(const SequentialImpl&) = default;
  SequentialImpl& operator=(const SequentialImpl& other) {
    if (names_ != other.names_) {
      detail::fail("fusion::Sequential: cannot clone entries [{}] into entries [{}]",
                   fmt::join(other.names_, ", "), fmt::join(names_, ", "));
    }
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      replace_module(names_[i], other.ptr(i));
      entries_[i]->adopt(*other.entries_[i]);
      modules_[i] = other.modules_[i];
    }
    return *this;
  }

  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device = c10::nullopt) const override {
    auto copy = std::make_shared<SequentialImpl>();
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      copy->add(entries_[i]->clone_into(*copy, names_[i], device), names_[i]);
    }
    return copy;
  }
  void reset() override {}

  /// Adds a holder (or a shared_ptr to an Impl) as the next entry, named by its index.
  template <typename Holder>
  void push_back(Holder holder) {
    push_back(std::to_string(entries_.size()), std::move(holder));
  }
  template <typename Holder>
  void push_back(std::string name, Holder holder) {
    if (std::find(names_.begin(), names_.end(), name) != names_.end()) {
      detail::fail("fusion::Sequential: an entry named '{}' exists already", name);
    }
    if constexpr (std::is_base_of_v<torch::detail::ModuleHolderIndicator, Holder>) {
      add(std::make_unique<detail::TypedSequentialEntry<Holder>>(*this, name, std::move(holder)),
          name);
    } else {  // std::shared_ptr<Impl>
      using Typed = torch::nn::ModuleHolder<typename Holder::element_type>;
      add(std::make_unique<detail::TypedSequentialEntry<Typed>>(*this, name,
                                                                Typed(std::move(holder))),
          name);
    }
  }

  template <typename ReturnType = torch::Tensor, typename... Inputs>
  ReturnType forward(Inputs&&... inputs) {
    if (entries_.empty()) detail::fail("fusion::Sequential: forward() on an empty Sequential");
    std::vector<torch::nn::AnyValue> args;
    args.reserve(sizeof...(Inputs));
    (args.emplace_back(std::forward<Inputs>(inputs)), ...);
    bool blocked = false;  // the value was handed on in oneDNN's blocked layout
    torch::nn::AnyValue value = call(0, std::move(args), blocked);
    for (std::size_t i = 1; i < entries_.size(); ++i) {
      std::vector<torch::nn::AnyValue> next;
      next.push_back(std::move(value));
      value = call(i, std::move(next), blocked);
    }
    if (blocked) to_dense(value);  // a kernel handed a blocked input keeps it blocked
    if constexpr (std::is_same_v<ReturnType, torch::nn::AnyValue>) {
      return value;
    } else {
      if (auto* typed = value.try_get<ReturnType>()) return std::move(*typed);
      detail::fail("fusion::Sequential: forward<{}>() but the last entry returned a {}",
                   detail::type_name<ReturnType>(), c10::demangle(value.type_info().name()));
    }
  }

  std::size_t size() const noexcept { return entries_.size(); }
  bool is_empty() const noexcept { return entries_.empty(); }
  /// Entry `index` as a Module, as torch::nn::Sequential's operator[] and ptr().
  std::shared_ptr<torch::nn::Module> operator[](std::size_t index) const { return ptr(index); }
  std::shared_ptr<torch::nn::Module> ptr(std::size_t index) const {
    return modules_.at(index).ptr();
  }
  /// Entry `index` as a T (its Impl type); a FusionError if it is not one.
  template <typename T>
  std::shared_ptr<T> ptr(std::size_t index) const {
    auto typed = std::dynamic_pointer_cast<T>(ptr(index));
    if (!typed) {
      detail::fail("fusion::Sequential: entry #{} is a {}, not a {}", index, ptr(index)->name(),
                   detail::type_name<T>());
    }
    return typed;
  }
  template <typename T>
  T& at(std::size_t index) {
    return *ptr<T>(index);
  }
  /// Iterates the entries as AnyModule, as torch::nn::Sequential does. Calling one directly runs
  /// its module's forward(), bypassing fusion; forward() of the Sequential goes through it.
  Iterator begin() { return modules_.begin(); }
  Iterator end() { return modules_.end(); }

 private:
  void add(std::shared_ptr<detail::SequentialEntry> entry, const std::string& name) {
    modules_.push_back(entry->any());
    names_.push_back(name);
    entries_.push_back(std::move(entry));
  }

  /// Calls entry `index`; hands tensors on in oneDNN's blocked layout between consecutive entries
  /// whose kernels take it (detail/blocked_layout.hpp). `blocked`: in, whether args[0] is such a
  /// tensor; out, whether the result is.
  torch::nn::AnyValue call(std::size_t index, std::vector<torch::nn::AnyValue>&& args,
                           bool& blocked) {
    detail::SequentialEntry& entry = *entries_[index];
    detail::SlotBase& slot = entry.slot();
    if (!blocked && !slot.dispatching()) return entry.call(std::move(args), index);
    using detail::BlockedHandOff;
    struct Leave {  // the Slot stays entered, so no fusion change comes between check and call
      detail::SlotBase& slot;
      ~Leave() {
        BlockedHandOff::request(false);
        BlockedHandOff::hand_in(false);
        slot.leave();
      }
    };
    // The Slot is a chain's last member whose kernel may give a blocked result; and takes a
    // blocked argument, as the chain's only member.
    const bool gives = slot.enter() != nullptr && gives_blocked(slot);
    const Leave leave{slot};
    const bool takes = gives && slot.chain()->size() == 1;
    if (blocked && !takes) to_dense(args[0]);
    const bool handed_in = blocked && takes;
    BlockedHandOff::hand_in(handed_in);
    BlockedHandOff::request(gives && index + 1 < entries_.size());
    BlockedHandOff::take_gave();
    torch::nn::AnyValue result = entry.call(std::move(args), index);
    const bool gave = BlockedHandOff::take_gave();
    // Blocked because of a hand-off: the kernel reordered it (gave), or computed it from a blocked
    // input it was handed. A blocked result of anything else is the caller's own layout.
    const auto* tensor = result.try_get<torch::Tensor>();
    blocked = gives && (gave || handed_in) && tensor != nullptr && tensor->is_mkldnn();
    return result;
  }
  /// Whether the entered `slot` is the last member of a chain whose kernel takes and gives blocked
  /// tensors now.
  static bool gives_blocked(const detail::SlotBase& slot) {
    const auto& chain = slot.chain();
    return chain != nullptr && slot.member_index() + 1 == chain->size() &&
           chain->kernel() != nullptr && chain->kernel()->blocked_layout_now();
  }
  /// Blocked tensors come only from float32 models, blocked in float32 or, from a bfloat16
  /// kernel, in bfloat16: what follows gets float32, as unfused.
  static void to_dense(torch::nn::AnyValue& value) {
    if (auto* tensor = value.try_get<torch::Tensor>()) {
      if (tensor->is_mkldnn()) *tensor = tensor->to_dense(torch::kFloat);
    }
  }

  std::vector<std::shared_ptr<detail::SequentialEntry>> entries_;
  std::vector<torch::nn::AnyModule> modules_;
  std::vector<std::string> names_;
};
TORCH_MODULE(Sequential);

}  // namespace fusion
