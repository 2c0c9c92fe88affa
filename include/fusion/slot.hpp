// fusion::Slot: a child module the parent calls exactly like its holder, and that fuse_modules can
// redirect. LibTorch parents call children through typed members resolved at compile time, and
// Module::replace_module only changes children_, so a fused module must be reached through a call
// site the library controls: this one.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeindex>
#include <typeinfo>
#include <utility>
#include <vector>

#include <ATen/core/ivalue.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "fusion/detail/boxing.hpp"
#include "fusion/detail/chain.hpp"
#include "fusion/detail/placeholder.hpp"
#include "fusion/detail/traits.hpp"
#include "fusion/error.hpp"

namespace fusion {

namespace detail {
/// What register_slot returns; assigning it to a Slot binds the Slot at its final address.
template <typename Holder>
struct SlotBinding {
  const torch::nn::Module* parent;
  std::string name;
  Holder holder;
};
}  // namespace detail

/// A fusable child module. Declare it as a member, bind it with register_slot, and call it as you
/// would the holder: `h = mlp(norm(h));`, `mlp->gate_proj`. Unfused, a call is the holder's call
/// (default arguments and overloads work as usual). Fused, the call goes to the chain (see
/// fuse_modules).
///
/// `Holder` is a TORCH_MODULE holder (`torch::nn::Linear`, your `MLP`). `Sig` names the forward()
/// signature to fuse, `Result(Params...)`, when forward is overloaded or a template; by default it
/// is deduced from `&Impl::forward`. A forward with a non-const lvalue reference parameter, with no
/// parameters or returning void cannot be fused and fails to compile.
template <typename Holder, typename Sig = void>
class Slot final : public detail::SlotBase {
 public:
  using Impl = typename Holder::ContainedType;
  using Signature = detail::checked_signature<typename detail::forward_signature<Impl, Sig>::type>;
  using Result = typename Signature::result;
  static constexpr std::size_t arity = Signature::arity;

  Slot() = default;
  /// `fusion::Slot<MLP> mlp{nullptr};`, the habit from holders: an empty slot, bound later.
  Slot(std::nullptr_t) {}  // NOLINT(google-explicit-constructor): mirrors ModuleHolder
  Slot(const Slot& other) : SlotBase(other), holder_(other.holder_) {}
  // Cloneable::clone_ copy-assigns a fresh clone into the existing module: take its holder, keep
  // this Slot's registration (same parent and name) and fusion state.
  Slot& operator=(const Slot& other) {
    holder_ = other.holder_;
    return *this;
  }

  Slot& operator=(detail::SlotBinding<Holder>&& binding) {
    if (is_fused()) {
      detail::fail("fusion: cannot rebind slot '{}' while it is fused; call unfuse_modules first",
                   binding.name);
    }
    holder_ = std::move(binding.holder);
    bind(binding.parent, std::move(binding.name));
    return *this;
  }

  template <typename... Args>
  decltype(auto) operator()(Args&&... args) {
    detail::Dispatch* dispatch = dispatch_.load(std::memory_order_acquire);
    if constexpr (calls_signature<Args...>()) {
      if (dispatch == nullptr) return Result(holder_->forward(std::forward<Args>(args)...));
      return call_fused(std::index_sequence_for<Args...>{}, std::forward<Args>(args)...);
    } else {  // another overload of forward(), reachable unfused (or traced) only
      if (dispatch != nullptr && is_fused()) {
        detail::fail(
            "fusion::Slot: a fused slot was called with arguments ({}) that do not fit the "
            "signature it was fused with, {}",
            detail::type_name<std::tuple<std::decay_t<Args>...>>(),
            detail::type_name<typename Signature::params>());
      }
      return holder_->forward(std::forward<Args>(args)...);
    }
  }

  Impl* operator->() const { return holder_.ptr().get(); }
  Impl& operator*() const { return *holder_.ptr(); }
  const Holder& holder() const noexcept { return holder_; }
  bool is_empty() const noexcept { return holder_.is_empty(); }

  torch::nn::Module* module() const noexcept override {
    return holder_.is_empty() ? nullptr : holder_.ptr().get();
  }
  void* impl() const noexcept override {
    return holder_.is_empty() ? nullptr : holder_.ptr().get();
  }
  std::type_index impl_type() const noexcept override { return typeid(Impl); }
  const detail::SignatureInfo& signature() const override {
    static const detail::SignatureInfo info{params_info(std::make_index_sequence<arity>{}),
                                            detail::output_types<Result>::get(), has_placeholder()};
    return info;
  }
  void call_boxed(c10::IValue* args, std::vector<c10::IValue>& outputs) override {
    invoke_boxed(args, outputs, std::make_index_sequence<arity>{});
  }

 private:
  template <std::size_t I>
  using Param = detail::param_t<I, Signature>;

  // Whether a call with these arguments is a call of the fused signature: at most `arity`
  // arguments, each convertible to its parameter, and forward() returning Result for them.
  template <typename... Args>
  static constexpr bool calls_signature() {
    if constexpr (sizeof...(Args) > arity) {
      return false;
    } else {
      return converts_to_params<Args...>(std::index_sequence_for<Args...>{}) &&
             std::is_same_v<
                 std::decay_t<decltype(std::declval<Impl&>().forward(std::declval<Args>()...))>,
                 std::decay_t<Result>>;
    }
  }
  template <typename... Args, std::size_t... I>
  static constexpr bool converts_to_params(std::index_sequence<I...>) {
    return (std::is_convertible_v<Args, Param<I>> && ...);
  }

  template <std::size_t... I, typename... Args>
  Result call_fused(std::index_sequence<I...>, Args&&... args) {
    struct Leave {
      SlotBase& slot;
      ~Leave() { slot.leave(); }
    };
    detail::Dispatch* const entered = enter();  // the dispatch, held against fusion changes
    const Leave leave{*this};
    if (entered == nullptr) return Result(holder_->forward(std::forward<Args>(args)...));
    detail::Dispatch& dispatch = *entered;
    std::array<c10::IValue, sizeof...(Args)> boxes{
        detail::Boxing<Param<I>>::box(Param<I>(std::forward<Args>(args)))...};
    if (dispatch.collects) {
      Result result = placeholder(boxes);
      if (dispatch.call(boxes.data(), boxes.size()) != detail::Dispatch::finish_unfused()) {
        return result;
      }
    } else {
      std::vector<c10::IValue>* outputs = dispatch.call(boxes.data(), boxes.size());
      if (outputs != detail::Dispatch::finish_unfused()) return detail::join<Result>(*outputs);
    }
    // Called outside a pass of its chain (Chain::outside_pass): its arguments are real values.
    return Result(holder_->forward(detail::Boxing<Param<I>>::arg(boxes[I])...));
  }

  static constexpr bool has_placeholder() {
    return std::is_same_v<Result, Param<0>> || std::is_default_constructible_v<Result>;
  }

  // What a collector returns in place of its real output, which only the replay computes: a
  // stand-in for the first argument when it has the result type, a tuple whose first element is
  // that stand-in, else a default-constructed result. A tensor stand-in has the argument's shape,
  // dtype and device but never its memory (see detail::placeholder_for): what the parent does with
  // it is not replayed, and must not write into the caller's tensor.
  template <typename Boxes>
  static Result placeholder(const Boxes& boxes) {
    if constexpr (std::is_same_v<Result, Param<0>>) {
      return detail::placeholder_for(detail::Boxing<Param<0>>::arg(boxes[0]));
    } else if constexpr (!std::is_default_constructible_v<Result>) {
      // fuse_modules refuses such a module as a collector (SignatureInfo::has_placeholder).
      detail::fail("fusion::Slot: {} cannot be default-constructed as a placeholder",
                   detail::type_name<Result>());
    } else if constexpr (detail::is_tuple<Result>::value) {
      Result result{};
      if constexpr (std::is_same_v<std::tuple_element_t<0, Result>, Param<0>>) {
        std::get<0>(result) = detail::placeholder_for(detail::Boxing<Param<0>>::arg(boxes[0]));
      }
      return result;
    } else {
      return Result{};
    }
  }

  template <std::size_t... I>
  void invoke_boxed(c10::IValue* args, std::vector<c10::IValue>& outputs,
                    std::index_sequence<I...>) {
    detail::split(holder_->forward(detail::Boxing<Param<I>>::arg(args[I])...), outputs);
  }

  template <std::size_t I>
  static detail::ParamInfo param_info() {
    return {detail::TypeInfo::of<Param<I>>(), &detail::Boxing<Param<I>>::convert,
            [](torch::nn::AnyValue& value) -> c10::optional<c10::IValue> {
              if (auto* typed = value.try_get<Param<I>>()) {
                return detail::Boxing<Param<I>>::box(*typed);
              }
              return c10::nullopt;
            }};
  }
  template <std::size_t... I>
  static std::vector<detail::ParamInfo> params_info(std::index_sequence<I...>) {
    return {param_info<I>()...};
  }

  Holder holder_{nullptr};
};

/// Registers `holder` as the child `name` of `parent` (an ordinary register_module, so parameters,
/// to(), train(), save/load and clone() see it as before) and returns a binding to assign to the
/// Slot member:  `mlp = fusion::register_slot(*this, "mlp", MLP(cfg));`
template <typename Holder>
[[nodiscard]] detail::SlotBinding<Holder> register_slot(torch::nn::Module& parent, std::string name,
                                                        Holder holder) {
  if (name.empty() || name.find('.') != std::string::npos) {
    detail::fail(
        "fusion::register_slot: invalid child name '{}': it must be non-empty and "
        "contain no '.'",
        name);
  }
  parent.register_module(name, holder);
  return {&parent, std::move(name), std::move(holder)};
}

}  // namespace fusion
