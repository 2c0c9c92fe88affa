// fusion::FusionError: the one exception type the library throws for misuse.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include <fmt/format.h>

namespace fusion {

/// Thrown for every mistake the library can detect: a bad pattern or spec at fuse time, a fused
/// chain called out of order at call time. The message names the pattern, path, spec or value at
/// fault. A failed `fuse_modules` leaves the model exactly as it was.
class FusionError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw FusionError(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace detail
}  // namespace fusion
