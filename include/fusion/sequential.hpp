// fusion::Sequential: torch::nn::Sequential whose entries are fusable. torch::nn::Sequential calls
// its entries through AnyModule, a call site the library cannot redirect; here every entry is a
// Slot, so `features.0` + `features.1` can form a chain like any two Slot members.
#pragma once

#include <algorithm>
#include <array>
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

#include "fusion/detail/boxing.hpp"
#include "fusion/detail/chain.hpp"
#include "fusion/detail/hand_off.hpp"
#include "fusion/error.hpp"
#include "fusion/slot.hpp"

namespace fusion {

namespace detail {

struct SequenceStep;

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
    std::vector<torch::nn::AnyValue> args;
    args.reserve(sizeof...(Inputs));
    (args.emplace_back(std::forward<Inputs>(inputs)), ...);
    bool blocked = false;
    torch::nn::AnyValue value = run(std::move(args), blocked, /*followed=*/false);
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

  friend struct detail::SequenceStep;

  /// Calls the entries in turn, handing tensors on in oneDNN's blocked layout between consecutive
  /// entries whose kernels take it (detail/hand_off.hpp). `blocked`: in, whether args[0] was
  /// handed on so; out, whether the result is. `followed`: whether what comes after the last entry
  /// takes a blocked argument; otherwise the result is dense.
  torch::nn::AnyValue run(std::vector<torch::nn::AnyValue>&& args, bool& blocked, bool followed) {
    if (entries_.empty()) detail::fail("fusion::Sequential: forward() on an empty Sequential");
    const auto call = [&](std::size_t index, std::vector<torch::nn::AnyValue>& in) {
      detail::SequentialEntry& entry = *entries_[index];
      const bool next = index + 1 < entries_.size()
                            ? detail::takes_blocked(entries_[index + 1]->slot())
                            : followed;
      return detail::call_handing_on(entry.slot(), in.data(), blocked, next,
                                     [&] { return entry.call(std::move(in), index); });
    };
    torch::nn::AnyValue value = call(0, args);
    for (std::size_t i = 1; i < entries_.size(); ++i) {
      std::vector<torch::nn::AnyValue> next;
      next.push_back(std::move(value));
      value = call(i, next);
    }
    if (blocked && !followed) {
      detail::to_dense(value);
      blocked = false;
    }
    return value;
  }
  /// Whether the first entry takes a blocked argument now (detail::takes_blocked).
  bool takes_blocked() {
    return !entries_.empty() && detail::takes_blocked(entries_.front()->slot());
  }

  std::vector<std::shared_ptr<detail::SequentialEntry>> entries_;
  std::vector<torch::nn::AnyModule> modules_;
  std::vector<std::string> names_;
};
TORCH_MODULE(Sequential);

namespace detail {

/// One step of fusion::sequence on `value`, handing it on blocked as fusion::Sequential hands it
/// from entry to entry.
struct SequenceStep {
  torch::Tensor& value;
  bool& blocked;

  /// Whether `step` takes a blocked argument now (detail::takes_blocked).
  template <typename Step>
  static bool takes_blocked(Step& step) {
    using Type = std::decay_t<Step>;
    if constexpr (std::is_base_of_v<SlotBase, Type>) {
      return detail::takes_blocked(step);
    } else if constexpr (std::is_same_v<Type, Sequential>) {
      return step->takes_blocked();
    } else {
      return false;
    }
  }

  /// Calls `step`; `followed`: whether the next step takes a blocked argument.
  template <typename Step>
  void operator()(Step&& step, bool followed) {
    using Type = std::decay_t<Step>;
    if constexpr (std::is_base_of_v<SlotBase, Type>) {
      static_assert(std::is_same_v<std::decay_t<typename Type::Result>, torch::Tensor>,
                    "fusion::sequence: a Slot step must return one tensor");
      value = call_handing_on(step, &value, blocked, followed,
                              [&] { return torch::Tensor(step(value)); });
    } else if constexpr (std::is_same_v<Type, Sequential>) {
      std::vector<torch::nn::AnyValue> args;
      args.emplace_back(std::move(value));
      torch::nn::AnyValue result = step->run(std::move(args), blocked, followed);
      auto* tensor = result.try_get<torch::Tensor>();
      if (tensor == nullptr) {
        fail("fusion::sequence: a fusion::Sequential step returned a {}, not a tensor",
             c10::demangle(result.type_info().name()));
      }
      value = std::move(*tensor);
    } else {  // anything else callable gets what the unfused model gives it
      if (blocked) to_dense(value);
      blocked = false;
      value = step(value);
    }
  }
};

}  // namespace detail

/// Calls `steps` in order, each on the result of the one before, and returns the last result:
/// `sequence(x, a, b, c)` is `c(b(a(x)))`, written as a list so that the library knows what follows
/// what. A step is a Slot, a fusion::Sequential or anything callable with a tensor (a module
/// holder, a lambda); each takes and returns one tensor. Where a chain's kernel hands its result on
/// in oneDNN's blocked layout (a CNN's folded blocks), consecutive steps keep it blocked as the
/// entries of one fusion::Sequential do, across the steps' own boundaries: one reorder on the way
/// in, one on the way out. Any other step, and the caller, get dense tensors, as unfused. Use it
/// where a model's forward() calls its stages in a row, as torchvision's ResNet calls conv1 ..
/// maxpool and layer1 .. layer4, without putting them in one container (which would change their
/// module paths).
template <typename... Steps>
torch::Tensor sequence(torch::Tensor x, Steps&&... steps) {
  static_assert(sizeof...(Steps) > 0, "fusion::sequence: no steps");
  bool blocked = false;
  detail::SequenceStep step{x, blocked};
  const std::array<bool, sizeof...(Steps) + 1> takes{detail::SequenceStep::takes_blocked(steps)...,
                                                     false};
  std::size_t next = 0;
  (step(std::forward<Steps>(steps), takes[++next]), ...);
  if (blocked) detail::to_dense(x);
  return x;
}

}  // namespace fusion
