// A user's kernel behind KernelImpl: its member types, free inputs and result read from its
// operator() (and prepare(), applies()) at compile time, checked by static_asserts with messages
// that say what to write.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeindex>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <c10/core/GradMode.h>
#include <c10/util/SmallVector.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/module.h>

#include "fusion/detail/boxing.hpp"
#include "fusion/detail/traits.hpp"
#include "fusion/error.hpp"
#include "fusion/options.hpp"

namespace fusion::detail {

/// One implementation of a named kernel, with its types erased.
class KernelImpl {
 public:
  virtual ~KernelImpl() = default;
  /// Builds the kernel's state from the member modules (null when the kernel has no prepare).
  virtual std::shared_ptr<const void> prepare(void* const* modules) const = 0;
  /// Computes the last member's outputs from the state, the modules and the free inputs.
  virtual void run(const void* state, void* const* modules, const c10::IValue* const* inputs,
                   std::vector<c10::IValue>& outputs) const = 0;
  /// The tensors a state holds, when its type says (a `tensors()` member), for the memory report.
  virtual std::vector<at::Tensor> state_tensors(const void* state) const = 0;
  /// The bytes a state holds outside its tensors, when its type says (an `opaque_bytes()`
  /// member); asked on each report, as such memory may grow with the shapes a kernel meets.
  virtual std::uint64_t state_opaque_bytes(const void* state) const = 0;
  /// The kernel's own per-call verdict on the modules (its `applies`), when it has one.
  virtual bool applies(void* const* modules) const = 0;
  /// What about the modules the kernel cannot take (its `misfit`, asked when it is attached),
  /// empty when it takes them or has no misfit().
  virtual std::string misfit(void* const* modules) const = 0;

  KernelOptions options;
  bool stateful = false;                   // has a prepare(), whose state is kept fresh
  bool checks_applies = false;             // has an applies(), asked on every call
  std::vector<std::type_index> modules{};  // the Impl type of each member, in order
  std::vector<std::string> module_names;
  std::vector<TypeInfo> inputs;   // the free inputs, in order
  std::vector<TypeInfo> outputs;  // the result, split like a member's
};

template <typename T>
constexpr bool is_module_ref_v =
    std::is_lvalue_reference_v<T> && !std::is_const_v<std::remove_reference_t<T>> &&
    std::is_base_of_v<torch::nn::Module, std::remove_reference_t<T>>;

template <typename Tuple, std::size_t I = 0>
constexpr std::size_t leading_modules() {
  if constexpr (I < std::tuple_size_v<Tuple>) {
    if constexpr (is_module_ref_v<std::tuple_element_t<I, Tuple>>) {
      return 1 + leading_modules<Tuple, I + 1>();
    }
  }
  return 0;
}

template <typename K, typename = void>
struct has_prepare : std::false_type {};
template <typename K>
struct has_prepare<K, std::void_t<decltype(&K::prepare)>> : std::true_type {};
template <typename K, typename = void>
struct has_call : std::false_type {};
template <typename K>
struct has_call<K, std::void_t<decltype(&K::operator())>> : std::true_type {};
template <typename K, typename = void>
struct has_applies : std::false_type {};
template <typename K>
struct has_applies<K, std::void_t<decltype(&K::applies)>> : std::true_type {};
template <typename K, typename = void>
struct has_misfit : std::false_type {};
template <typename K>
struct has_misfit<K, std::void_t<decltype(&K::misfit)>> : std::true_type {};
template <typename S, typename = void>
struct has_tensors : std::false_type {};
template <typename S>
struct has_tensors<S, std::void_t<decltype(std::declval<const S&>().tensors())>> : std::true_type {
};
template <typename S, typename = void>
struct has_opaque_bytes : std::false_type {};
template <typename S>
struct has_opaque_bytes<S, std::void_t<decltype(std::declval<const S&>().opaque_bytes())>>
    : std::true_type {};

/// A user kernel `K` behind KernelImpl. K's `operator()` takes, in order: `const State&` when K
/// has `State prepare(Modules&...) const`; the member modules as `Impl&`; the free inputs.
template <typename K>
class TypedKernel final : public KernelImpl {
  static_assert(has_call<K>::value,
                "fusion::register_kernel: the kernel needs one operator() (not overloaded, not a "
                "template): Result operator()([const State&,] Members&..., FreeInputs...) const");
  using Call = signature_of<decltype(&K::operator())>;
  using Params = typename Call::params;
  using Result = typename Call::result;
  static constexpr bool has_state = has_prepare<K>::value;
  static constexpr std::size_t first_module = has_state ? 1 : 0;

  template <typename Kernel, bool = has_prepare<Kernel>::value>
  struct Prepare {
    using State = void;
    static constexpr std::size_t arity = 0;
  };
  template <typename Kernel>
  struct Prepare<Kernel, true> {
    using Signature = signature_of<decltype(&Kernel::prepare)>;
    using State = std::decay_t<typename Signature::result>;
    static constexpr std::size_t arity = Signature::arity;
  };

 public:
  using State = typename Prepare<K>::State;
  static constexpr std::size_t module_count =
      has_state ? Prepare<K>::arity : leading_modules<Params>();
  static constexpr std::size_t first_input = first_module + module_count;
  static constexpr std::size_t input_count = Call::arity - first_input;
  template <std::size_t I>
  using Module = std::remove_reference_t<std::tuple_element_t<first_module + I, Params>>;
  template <std::size_t I>
  using Input = std::decay_t<std::tuple_element_t<first_input + I, Params>>;

  static_assert(!std::is_void_v<Result>, "fusion::register_kernel: the kernel returns void");
  static_assert(module_count > 0,
                "fusion::register_kernel: operator() must take the chain's member modules, each "
                "as a non-const `Impl&`, before the free inputs");
  static_assert(Call::arity >= first_input,
                "fusion::register_kernel: operator() takes fewer parameters than prepare() has "
                "modules");

  TypedKernel(K kernel, KernelOptions kernel_options) : kernel_(std::move(kernel)) {
    if constexpr (has_state) {
      static_assert(std::is_same_v<std::tuple_element_t<0, Params>, const State&>,
                    "fusion::register_kernel: with prepare(), operator()'s first parameter must "
                    "be `const State&`, State being what prepare() returns");
      check_prepare_modules(std::make_index_sequence<module_count>{});
    }
    if constexpr (has_applies<K>::value) check_applies(std::make_index_sequence<module_count>{});
    if constexpr (has_misfit<K>::value) check_misfit(std::make_index_sequence<module_count>{});
    options = std::move(kernel_options);
    stateful = has_state;
    checks_applies = has_applies<K>::value;
    fill_modules(std::make_index_sequence<module_count>{});
    fill_inputs(std::make_index_sequence<input_count>{});
    outputs = output_types<std::decay_t<Result>>::get();
  }

  std::shared_ptr<const void> prepare(void* const* members) const override {
    if constexpr (has_state) {
      return prepare_impl(members, std::make_index_sequence<module_count>{});
    } else {
      return nullptr;
    }
  }

  void run(const void* state, void* const* members, const c10::IValue* const* args,
           std::vector<c10::IValue>& out) const override {
    run_impl(state, members, args, out, std::make_index_sequence<module_count>{},
             std::make_index_sequence<input_count>{});
  }

  bool applies(void* const* members) const override {
    if constexpr (has_applies<K>::value) {
      return applies_impl(members, std::make_index_sequence<module_count>{});
    } else {
      return true;
    }
  }

  std::string misfit(void* const* members) const override {
    if constexpr (has_misfit<K>::value) {
      return misfit_impl(members, std::make_index_sequence<module_count>{});
    } else {
      return {};
    }
  }

  std::vector<at::Tensor> state_tensors(const void* state) const override {
    if constexpr (has_state) {
      if constexpr (has_tensors<State>::value) {
        if (state != nullptr) return static_cast<const State*>(state)->tensors();
      }
    }
    return {};
  }

  std::uint64_t state_opaque_bytes(const void* state) const override {
    if constexpr (has_state) {
      if constexpr (has_opaque_bytes<State>::value) {
        if (state != nullptr) return static_cast<const State*>(state)->opaque_bytes();
      }
    }
    return 0;
  }

 private:
  template <std::size_t... I>
  static void check_applies(std::index_sequence<I...>) {
    using Signature = signature_of<decltype(&K::applies)>;
    static_assert(std::is_same_v<typename Signature::result, bool> &&
                      std::is_same_v<typename Signature::params,
                                     std::tuple<std::tuple_element_t<first_module + I, Params>...>>,
                  "fusion::register_kernel: applies() must be `bool applies(Members&...) const`, "
                  "taking the member modules as operator() does");
  }
  template <std::size_t... I>
  static void check_misfit(std::index_sequence<I...>) {
    using Signature = signature_of<decltype(&K::misfit)>;
    static_assert(std::is_same_v<typename Signature::result, std::string> &&
                      std::is_same_v<typename Signature::params,
                                     std::tuple<std::tuple_element_t<first_module + I, Params>...>>,
                  "fusion::register_kernel: misfit() must be `std::string misfit(Members&...) "
                  "const`, taking the member modules as operator() does");
  }
  template <std::size_t... I>
  std::string misfit_impl(void* const* members, std::index_sequence<I...>) const {
    return kernel_.misfit(*static_cast<Module<I>*>(members[I])...);
  }
  template <std::size_t... I>
  bool applies_impl(void* const* members, std::index_sequence<I...>) const {
    return kernel_.applies(*static_cast<Module<I>*>(members[I])...);
  }
  template <std::size_t... I>
  static void check_prepare_modules(std::index_sequence<I...>) {
    using PrepareParams = typename Prepare<K>::Signature::params;
    static_assert((std::is_same_v<std::tuple_element_t<I, PrepareParams>,
                                  std::tuple_element_t<first_module + I, Params>> &&
                   ...),
                  "fusion::register_kernel: prepare() must take the same member modules, as "
                  "`Impl&`, as operator() takes after its state");
  }
  template <std::size_t... I>
  void fill_modules(std::index_sequence<I...>) {
    static_assert((is_module_ref_v<std::tuple_element_t<first_module + I, Params>> && ...),
                  "fusion::register_kernel: each member module must be taken as a non-const "
                  "`Impl&` (the module type a Slot holds, e.g. MLPImpl&)");
    modules = {std::type_index(typeid(Module<I>))...};
    module_names = {type_name<Module<I>>()...};
  }
  template <std::size_t... J>
  void fill_inputs(std::index_sequence<J...>) {
    inputs = {TypeInfo::of<Input<J>>()...};
  }
  template <std::size_t... I>
  std::shared_ptr<const void> prepare_impl(void* const* members, std::index_sequence<I...>) const {
    torch::NoGradGuard no_grad;
    return std::make_shared<const State>(kernel_.prepare(*static_cast<Module<I>*>(members[I])...));
  }
  template <std::size_t... I, std::size_t... J>
  void run_impl(const void* state, void* const* members, const c10::IValue* const* args,
                std::vector<c10::IValue>& out, std::index_sequence<I...>,
                std::index_sequence<J...>) const {
    if constexpr (has_state) {
      split(kernel_(*static_cast<const State*>(state), *static_cast<Module<I>*>(members[I])...,
                    Boxing<Input<J>>::arg(*args[J])...),
            out);
    } else {
      (void)state;
      split(kernel_(*static_cast<Module<I>*>(members[I])..., Boxing<Input<J>>::arg(*args[J])...),
            out);
    }
  }

  mutable K kernel_;  // mutable: a non-const operator() still compiles; it must be thread-safe
};

}  // namespace fusion::detail
