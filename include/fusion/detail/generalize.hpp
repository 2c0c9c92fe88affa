// Patterns from the paths of chains that one kernel fuses alike: `layers.0.mlp` ... `layers.3.mlp`
// become `layers.*.mlp`, so that a found plan reads like a hand-written one and applies to the same
// architecture at another depth.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "fusion/pattern.hpp"

namespace fusion::detail {

/// A segment that matches only itself: characters a Pattern reads as wildcards go in brackets.
inline std::string literal_segment(std::string_view text) {
  std::string out;
  for (char c : text) {
    if (c == '*' || c == '?' || c == '[' || c == ']') {
      out += std::string("[") + c + "]";
    } else {
      out += c;
    }
  }
  return out;
}

/// A pattern that matches exactly `path`.
inline std::string literal_pattern(const std::string& path) {
  std::string pattern;
  for (std::string_view segment : Pattern::split(path)) {
    pattern += (pattern.empty() ? "" : ".") + literal_segment(segment);
  }
  return pattern;
}

inline std::vector<std::string> literal_patterns(const std::vector<std::string>& paths) {
  std::vector<std::string> patterns;
  for (const std::string& path : paths) patterns.push_back(literal_pattern(path));
  return patterns;
}

/// One segment for all `values`: the value when they agree, else their common prefix and suffix
/// around a `*` (`layer1`, `layer2` -> `layer*`).
inline std::string segment_for(const std::vector<std::string>& values) {
  const std::string& first = values.front();
  if (std::all_of(values.begin(), values.end(), [&](const std::string& v) { return v == first; })) {
    return literal_segment(first);
  }
  std::size_t prefix = first.size();
  std::size_t suffix = first.size();
  for (const std::string& v : values) {
    std::size_t p = 0;
    while (p < prefix && p < v.size() && v[p] == first[p]) ++p;
    prefix = p;
    std::size_t s = 0;
    while (s < suffix && s < v.size() && v[v.size() - 1 - s] == first[first.size() - 1 - s]) ++s;
    suffix = s;
  }
  for (const std::string& v : values) suffix = std::min(suffix, v.size() - prefix);
  return literal_segment(first.substr(0, prefix)) + "*" +
         literal_segment(first.substr(first.size() - suffix));
}

/// What chains must share to be one rule: besides kernel and specs, each member's path with the
/// digits of every segment but the last blurred (`layers.#.mlp`); the last segment names the
/// member's role (`conv1`, `bn1`) and must agree.
inline std::string path_shape(const std::string& path) {
  const auto segments = Pattern::split(path);
  std::string shape;
  for (std::size_t s = 0; s < segments.size(); ++s) {
    if (s > 0) shape += '.';
    if (s + 1 == segments.size()) {
      shape += segments[s];
      continue;
    }
    for (std::size_t i = 0; i < segments[s].size(); ++i) {
      const bool digit = std::isdigit(static_cast<unsigned char>(segments[s][i])) != 0;
      if (!digit) shape += segments[s][i];
      if (digit && (i == 0 || std::isdigit(static_cast<unsigned char>(segments[s][i - 1])) == 0)) {
        shape += '#';
      }
    }
  }
  return shape;
}

/// One pattern per member for chains of the same shape (`chains[c][m]`: member m's path in chain
/// c). The caller checks that they select these chains and no other.
inline std::vector<std::string> generalize(const std::vector<std::vector<std::string>>& chains) {
  std::vector<std::string> patterns;
  for (std::size_t m = 0; m < chains.front().size(); ++m) {
    std::vector<std::vector<std::string_view>> segments;
    for (const auto& chain : chains) segments.push_back(Pattern::split(chain[m]));
    std::string pattern;
    for (std::size_t s = 0; s < segments.front().size(); ++s) {
      std::vector<std::string> values;
      for (const auto& path : segments) values.emplace_back(path[s]);
      pattern += (s > 0 ? "." : "") + segment_for(values);
    }
    patterns.push_back(pattern);
  }
  return patterns;
}

}  // namespace fusion::detail
