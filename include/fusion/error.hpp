// fusion::FusionError: the one exception type the library throws for misuse.
#pragma once

#include <atomic>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

#include <fmt/format.h>

#include "fusion/detail/abi.hpp"

namespace fusion {

/// Thrown for every mistake the library can detect: a bad pattern or spec at fuse time, a fused
/// chain called out of order at call time. The message names the pattern, path, spec or value at
/// fault. A failed `fuse_modules` leaves the model exactly as it was.
class FUSION_API FusionError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw FusionError(fmt::format(format, std::forward<Args>(args)...));
}

/// A step of an operation that must leave the model as it was if it fails. The tests build with
/// FUSION_FAULT_INJECTION and make the Nth step reached throw std::bad_alloc (fault_countdown()
/// = N; -1, the default, never), to prove it for every step; otherwise it compiles to nothing.
#ifdef FUSION_FAULT_INJECTION
FUSION_API inline std::atomic<long>& fault_countdown() {
  static std::atomic<long> countdown{-1};
  return countdown;
}
inline void fault_point() {
  if (fault_countdown().load() >= 0 && fault_countdown().fetch_sub(1) == 0) throw std::bad_alloc();
}
#else
inline void fault_point() noexcept {}
#endif

}  // namespace detail
}  // namespace fusion
