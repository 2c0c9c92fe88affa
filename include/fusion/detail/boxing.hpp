// Boxing forward() arguments and results into c10::IValue, so that a chain's values can be stored
// and wired without knowing their types. IValue holds tensors, scalars and None natively and is the
// torch::jit::Stack element type; other types (a user struct, a cache object) go into a capsule.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <typeindex>
#include <utility>
#include <vector>

#include <ATen/core/ivalue.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>
#include <c10/util/Type.h>

#include "fusion/detail/traits.hpp"
#include "fusion/error.hpp"

namespace fusion::detail {

template <typename T>
std::string type_name();

/// Type names as users write them in a forward() signature: `int64_t`, not `long`;
/// `std::string`, not `std::__cxx11::basic_string<...>`. Other types fall back to the demangled
/// name.
template <typename T, typename = void>
struct TypeName {
  static std::string get() { return c10::demangle(typeid(T).name()); }
};
#define FUSION_TYPE_NAME(type, text)          \
  template <>                                 \
  struct TypeName<type> {                     \
    static std::string get() { return text; } \
  };
FUSION_TYPE_NAME(at::Tensor, "torch::Tensor")
FUSION_TYPE_NAME(std::int64_t, "int64_t")
FUSION_TYPE_NAME(std::int32_t, "int32_t")
FUSION_TYPE_NAME(std::int16_t, "int16_t")
FUSION_TYPE_NAME(std::int8_t, "int8_t")
FUSION_TYPE_NAME(std::uint64_t, "uint64_t")
FUSION_TYPE_NAME(std::uint32_t, "uint32_t")
FUSION_TYPE_NAME(std::uint8_t, "uint8_t")
FUSION_TYPE_NAME(std::string, "std::string")
#undef FUSION_TYPE_NAME
template <typename T>
struct TypeName<c10::optional<T>> {
  // On LibTorch 2.x c10::optional is an alias of std::optional, the name users write there.
  static std::string get() {
    constexpr bool is_std = std::is_same_v<std::optional<T>, c10::optional<T>>;
    return (is_std ? "std::optional<" : "c10::optional<") + type_name<T>() + ">";
  }
};
template <typename T>
struct TypeName<std::optional<T>,
                std::enable_if_t<!std::is_same_v<std::optional<T>, c10::optional<T>>>> {
  static std::string get() { return "std::optional<" + type_name<T>() + ">"; }
};
template <typename T>
struct TypeName<std::vector<T>> {
  static std::string get() { return "std::vector<" + type_name<T>() + ">"; }
};
template <typename T>
struct TypeName<c10::ArrayRef<T>> {
  static std::string get() { return "c10::ArrayRef<" + type_name<T>() + ">"; }
};
template <typename... Ts>
struct TypeName<std::tuple<Ts...>> {
  static std::string get() {
    std::string names;
    ((names += (names.empty() ? "" : ", ") + type_name<Ts>()), ...);
    return "std::tuple<" + names + ">";
  }
};

template <typename T>
std::string type_name() {
  return TypeName<T>::get();
}

/// Holds a value of a type IValue cannot represent.
template <typename T>
struct Box final : torch::CustomClassHolder {
  explicit Box(T v) : value(std::move(v)) {}
  T value;
};

/// The generic case: any copyable type, boxed in a capsule and recognised by dynamic_cast.
template <typename T, typename = void>
struct Boxing {
  static_assert(std::is_copy_constructible_v<T>,
                "fusion: a forward() parameter or result type must be copy-constructible");
  static c10::IValue box(T v) {
    return c10::IValue::make_capsule(c10::make_intrusive<Box<T>>(std::move(v)));
  }
  static Box<T>* box_of(const c10::IValue& v) {
    return v.isCapsule() ? dynamic_cast<Box<T>*>(v.toCapsule().get()) : nullptr;
  }
  static bool holds(const c10::IValue& v) { return box_of(v) != nullptr; }
  /// `v` as this type would take it, converting as C++ would (an int where a double is expected),
  /// or nullopt: how a ModuleSpec default is checked and stored.
  static c10::optional<c10::IValue> convert(const c10::IValue& v) {
    return holds(v) ? c10::optional<c10::IValue>(v) : c10::nullopt;
  }
  /// The argument to pass to forward(): a reference that lives as long as `v`.
  static const T& arg(const c10::IValue& v) {
    Box<T>* box = box_of(v);
    if (box == nullptr) {
      fail("fusion: expected a boxed {}, got an IValue of kind {}", type_name<T>(), v.tagKind());
    }
    return box->value;
  }
  static T take(c10::IValue&& v) { return arg(v); }
};

template <>
struct Boxing<at::Tensor> {
  static c10::IValue box(at::Tensor v) { return c10::IValue(std::move(v)); }
  static bool holds(const c10::IValue& v) { return v.isTensor(); }
  static c10::optional<c10::IValue> convert(const c10::IValue& v) {
    return holds(v) ? c10::optional<c10::IValue>(v) : c10::nullopt;
  }
  static const at::Tensor& arg(const c10::IValue& v) { return v.toTensor(); }
  static at::Tensor take(c10::IValue&& v) { return std::move(v).toTensor(); }
};

template <typename T>
struct Boxing<T, std::enable_if_t<std::is_arithmetic_v<T>>> {
  static c10::IValue box(T v) {
    if constexpr (std::is_same_v<T, bool>) {
      return c10::IValue(v);
    } else if constexpr (std::is_integral_v<T>) {
      return c10::IValue(static_cast<int64_t>(v));
    } else {
      return c10::IValue(static_cast<double>(v));
    }
  }
  static bool holds(const c10::IValue& v) {
    if constexpr (std::is_same_v<T, bool>) {
      return v.isBool();
    } else if constexpr (std::is_integral_v<T>) {
      return v.isInt();
    } else {
      return v.isDouble();
    }
  }
  static c10::optional<c10::IValue> convert(const c10::IValue& v) {
    if (holds(v)) return v;
    if constexpr (std::is_floating_point_v<T>) {
      if (v.isInt()) return c10::IValue(static_cast<double>(v.toInt()));
    }
    return c10::nullopt;
  }
  static T arg(const c10::IValue& v) {
    if constexpr (std::is_same_v<T, bool>) {
      return v.toBool();
    } else if constexpr (std::is_integral_v<T>) {
      return static_cast<T>(v.toInt());
    } else {
      return static_cast<T>(v.toDouble());
    }
  }
  static T take(c10::IValue&& v) { return arg(v); }
};

template <>
struct Boxing<std::string> {
  static c10::IValue box(std::string v) { return c10::IValue(std::move(v)); }
  static bool holds(const c10::IValue& v) { return v.isString(); }
  static c10::optional<c10::IValue> convert(const c10::IValue& v) {
    return holds(v) ? c10::optional<c10::IValue>(v) : c10::nullopt;
  }
  static const std::string& arg(const c10::IValue& v) { return v.toStringRef(); }
  static std::string take(c10::IValue&& v) { return v.toStringRef(); }
};

template <typename Optional, typename T>
struct OptionalBoxing {
  static c10::IValue box(Optional v) {
    return v.has_value() ? Boxing<T>::box(std::move(*v)) : c10::IValue();
  }
  static bool holds(const c10::IValue& v) { return v.isNone() || Boxing<T>::holds(v); }
  static c10::optional<c10::IValue> convert(const c10::IValue& v) {
    return v.isNone() ? c10::optional<c10::IValue>(v) : Boxing<T>::convert(v);
  }
  static Optional arg(const c10::IValue& v) {
    if (v.isNone()) return Optional();
    return Optional(Boxing<T>::arg(v));
  }
  static Optional take(c10::IValue&& v) {
    if (v.isNone()) return Optional();
    return Optional(Boxing<T>::take(std::move(v)));
  }
};
template <typename T>
struct Boxing<c10::optional<T>> : OptionalBoxing<c10::optional<T>, T> {};
// On LibTorch 2.x c10::optional is std::optional; on 1.13 they are two types, and both work.
template <typename T>
struct Boxing<std::optional<T>,
              std::enable_if_t<!std::is_same_v<std::optional<T>, c10::optional<T>>>>
    : OptionalBoxing<std::optional<T>, T> {};

/// `c10::nullopt` / `std::nullopt` (a ModuleSpec default): None.
template <typename T>
struct Boxing<
    T, std::enable_if_t<std::is_same_v<T, c10::nullopt_t> || std::is_same_v<T, std::nullopt_t>>> {
  static c10::IValue box(T) { return c10::IValue(); }
  static bool holds(const c10::IValue& v) { return v.isNone(); }
};

/// An ArrayRef is a view: box a copy of the elements and hand out a view of that copy.
template <typename T>
struct Boxing<c10::ArrayRef<T>> {
  using Owner = Boxing<std::vector<T>>;
  static c10::IValue box(c10::ArrayRef<T> v) { return Owner::box(v.vec()); }
  static bool holds(const c10::IValue& v) { return Owner::holds(v); }
  static c10::optional<c10::IValue> convert(const c10::IValue& v) { return Owner::convert(v); }
  static c10::ArrayRef<T> arg(const c10::IValue& v) { return Owner::arg(v); }
};

/// A value can stand where an optional of its type is expected.
template <typename T, typename = void>
struct optional_target {
  using type = void;
};
template <typename T>
struct optional_target<c10::optional<T>> {
  using type = T;
};
template <typename T>
struct optional_target<std::optional<T>,
                       std::enable_if_t<!std::is_same_v<std::optional<T>, c10::optional<T>>>> {
  using type = T;
};

/// What fuse-time checks need to know about one parameter or output type.
struct TypeInfo {
  std::type_index type;
  std::type_index optional_of;  // T for c10::optional<T>, else void
  std::string name;

  template <typename T>
  static TypeInfo of() {
    return {typeid(T), typeid(typename optional_target<T>::type), type_name<T>()};
  }
  /// Whether an output of type `from` can be passed where `*this` is expected.
  bool accepts(const TypeInfo& from) const { return type == from.type || optional_of == from.type; }
};

/// "(T1, T2)": the names of `types`, for messages.
inline std::string describe_types(const std::vector<TypeInfo>& types) {
  std::string names;
  for (const TypeInfo& type : types) names += (names.empty() ? "" : ", ") + type.name;
  return "(" + names + ")";
}

template <typename T>
c10::IValue box(T&& value) {
  return Boxing<std::decay_t<T>>::box(std::forward<T>(value));
}

/// Appends one box per output: one per element of a tuple, else one.
template <typename R>
void split(R&& result, std::vector<c10::IValue>& out) {
  using Result = std::decay_t<R>;
  if constexpr (is_tuple<Result>::value) {
    std::apply(
        [&out](auto&&... elements) {
          (out.push_back(box(std::forward<decltype(elements)>(elements))), ...);
        },
        std::forward<R>(result));
  } else {
    out.push_back(box(std::forward<R>(result)));
  }
}

template <typename R, std::size_t... I>
R join_tuple(std::vector<c10::IValue>& boxes, std::index_sequence<I...>) {
  return R(Boxing<std::tuple_element_t<I, R>>::take(std::move(boxes[I]))...);
}

/// Rebuilds a result from the boxes `split` made, moving out of them.
template <typename R>
R join(std::vector<c10::IValue>& boxes) {
  if constexpr (is_tuple<R>::value) {
    return join_tuple<R>(boxes, std::make_index_sequence<std::tuple_size_v<R>>{});
  } else {
    return Boxing<R>::take(std::move(boxes[0]));
  }
}

template <typename R>
struct output_types {
  static std::vector<TypeInfo> get() { return {TypeInfo::of<R>()}; }
};
template <typename... Ts>
struct output_types<std::tuple<Ts...>> {
  static std::vector<TypeInfo> get() { return {TypeInfo::of<Ts>()...}; }
};

}  // namespace fusion::detail
