// Compile-time facts about a module's forward(): its result and parameter types.
#pragma once

#include <cstddef>
#include <tuple>
#include <type_traits>

namespace fusion::detail {

template <typename T>
struct is_tuple : std::false_type {};
template <typename... Ts>
struct is_tuple<std::tuple<Ts...>> : std::true_type {};

/// Result and parameters of a function type, or of a member-function pointer of any qualification.
template <typename F>
struct signature_of;

template <typename R, typename... Params>
struct signature_of<R(Params...)> {
  using result = R;
  using params = std::tuple<Params...>;
  static constexpr std::size_t arity = sizeof...(Params);
  static constexpr bool has_mutable_reference_param =
      ((std::is_lvalue_reference_v<Params> && !std::is_const_v<std::remove_reference_t<Params>>) ||
       ...);
  static constexpr bool has_rvalue_reference_param = (std::is_rvalue_reference_v<Params> || ...);
};
template <typename R, typename... Params>
struct signature_of<R(Params...) noexcept> : signature_of<R(Params...)> {};
template <typename C, typename R, typename... Params>
struct signature_of<R (C::*)(Params...)> : signature_of<R(Params...)> {};
template <typename C, typename R, typename... Params>
struct signature_of<R (C::*)(Params...) const> : signature_of<R(Params...)> {};
template <typename C, typename R, typename... Params>
struct signature_of<R (C::*)(Params...) noexcept> : signature_of<R(Params...)> {};
template <typename C, typename R, typename... Params>
struct signature_of<R (C::*)(Params...) const noexcept> : signature_of<R(Params...)> {};

template <typename Impl, typename = void>
struct has_unique_forward : std::false_type {};
template <typename Impl>
struct has_unique_forward<Impl, std::void_t<decltype(&Impl::forward)>> : std::true_type {};

template <typename Impl, bool Unique = has_unique_forward<Impl>::value>
struct deduced_forward {
  using type = int(int);  // stand-in so that only the static_assert below reports the problem
};
template <typename Impl>
struct deduced_forward<Impl, true> {
  using type = decltype(&Impl::forward);
};

/// The signature a Slot dispatches on: `Sig` when given, else deduced from `&Impl::forward`.
template <typename Impl, typename Sig>
struct forward_signature {
  using type = signature_of<Sig>;
};
template <typename Impl>
struct forward_signature<Impl, void> {
  static_assert(has_unique_forward<Impl>::value,
                "fusion::Slot: cannot deduce the signature of forward(): it is overloaded or a "
                "template. Name the one to fuse: fusion::Slot<Holder, Result(Params...)>");
  using type = signature_of<typename deduced_forward<Impl>::type>;
};

template <typename Signature>
struct checked_signature : Signature {
  static_assert(Signature::arity > 0,
                "fusion::Slot: forward() takes no parameters, so there is nothing to capture or "
                "wire: such a module cannot be a member of a fused chain");
  static_assert(!Signature::has_mutable_reference_param,
                "fusion::Slot: forward() takes a non-const lvalue reference (for example Tensor&): "
                "a fused replay would write into a copy. Take the parameter by value or const&");
  static_assert(!Signature::has_rvalue_reference_param,
                "fusion::Slot: forward() takes an rvalue reference (for example Tensor&&): a fused "
                "replay passes captured values that later members may still read, so it cannot "
                "hand them over as rvalues. Take the parameter by value or const&");
  static_assert(!std::is_void_v<typename Signature::result>,
                "fusion::Slot: forward() returns void, so it has no output to wire into the next "
                "member of a chain");
};

template <std::size_t I, typename Signature>
using param_t = std::decay_t<std::tuple_element_t<I, typename Signature::params>>;

}  // namespace fusion::detail
