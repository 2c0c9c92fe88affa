// libFuzzer target: the glob pattern parser and matcher. Input: a pattern, a newline, then paths
// (one per line) to match against it. Bad patterns must fail with FusionError, nothing else; a
// match must bind one value per wildcard segment.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <fusion/pattern.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::size_t newline = input.find('\n');
  const std::string text(input.substr(0, newline));
  try {
    const fusion::Pattern pattern(text);
    std::string_view rest = newline == std::string_view::npos ? "" : input.substr(newline + 1);
    while (!rest.empty()) {
      const std::size_t end = rest.find('\n');
      const std::string path(rest.substr(0, end));
      if (const auto binding = pattern.match(path)) {
        if (binding->size() != pattern.wildcards()) __builtin_trap();
      }
      (void)pattern.prefix(pattern.segments().size() / 2).match(path);
      rest = end == std::string_view::npos ? "" : rest.substr(end + 1);
    }
  } catch (const fusion::FusionError&) {
    // A clear error is the expected outcome for a malformed pattern.
  }
  return 0;
}
