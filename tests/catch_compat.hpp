// What the tests use of Catch2, from Catch2 2 (Debian bookworm) or Catch2 3 (trixie, sid).
// A guard, not #pragma once: GCC may see this file twice, once through the precompiled header.
#ifndef FUSION_TESTS_CATCH_COMPAT_HPP
#define FUSION_TESTS_CATCH_COMPAT_HPP

// LibTorch before Catch, always: glog (LibTorch 1.13) and c10 (2.x) define a one-argument CHECK
// that logs and carries on, and whichever header comes last owns the name. Included first, theirs
// is replaced by Catch's; included after Catch, a failing CHECK would pass silently.
#include <torch/torch.h>

// Which Catch2: the one CMake found (FUSION_CATCH2_MAJOR), not whichever headers the include path
// reaches first (a CUDA image may hold Catch2 3 headers beside the Catch2 2 package found).
#ifndef FUSION_CATCH2_MAJOR
#if __has_include(<catch2/catch_test_macros.hpp>)
#define FUSION_CATCH2_MAJOR 3
#else
#define FUSION_CATCH2_MAJOR 2
#endif
#endif

#if FUSION_CATCH2_MAJOR >= 3
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_predicate.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#else
#include <catch2/catch.hpp>
#endif

#include <string>

namespace fusion_test {

/// A string matcher: the text contains `part` (Catch2 3 renamed it ContainsSubstring).
inline auto Contains(const std::string& part) {
#if FUSION_CATCH2_MAJOR >= 3
  return Catch::Matchers::ContainsSubstring(part);
#else
  return Catch::Matchers::Contains(part);
#endif
}
using Catch::Matchers::Predicate;
using Catch::Matchers::StartsWith;
#if FUSION_CATCH2_MAJOR >= 3
using Catch::Approx;
#else
using Catch::Detail::Approx;
#endif

}  // namespace fusion_test

#endif  // FUSION_TESTS_CATCH_COMPAT_HPP
