// fusion::Pattern: a dotted glob over module paths ("layers.*.mlp", "layers.1?.norm").
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fusion/error.hpp"

namespace fusion {

/// A path pattern relative to the root module. `*` as a whole segment matches exactly one segment;
/// inside a segment `*` matches any run of characters and `?` one character. Every segment with a
/// wildcard is a binding: members of one chain are the matches whose bindings are equal
/// (layer 0's norm with layer 0's mlp). Throws FusionError for an empty pattern or segment.
class Pattern {
 public:
  explicit Pattern(std::string text) : text_(std::move(text)) {
    if (text_.empty()) detail::fail("fusion: empty pattern");
    std::size_t start = 0;
    while (true) {
      const std::size_t dot = text_.find('.', start);
      std::string segment = text_.substr(start, dot == std::string::npos ? dot : dot - start);
      if (segment.empty()) {
        detail::fail(
            "fusion: malformed pattern '{}': empty segment at offset {} (leading, "
            "trailing or doubled '.')",
            text_, start);
      }
      segments_.push_back(std::move(segment));
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
  }

  const std::string& text() const noexcept { return text_; }

  /// How many segments hold a wildcard: the length of every binding this pattern produces.
  std::size_t wildcards() const {
    std::size_t count = 0;
    for (const auto& segment : segments_) count += has_wildcard(segment) ? 1 : 0;
    return count;
  }

  /// The binding values when `path` matches, else nullopt.
  std::optional<std::vector<std::string>> match(std::string_view path) const {
    std::vector<std::string> binding;
    std::size_t start = 0;
    for (std::size_t i = 0; i < segments_.size(); ++i) {
      if (start > path.size()) return std::nullopt;
      const std::size_t dot = path.find('.', start);
      const bool last = i + 1 == segments_.size();
      if (last != (dot == std::string_view::npos)) return std::nullopt;  // segment count differs
      std::string_view segment = path.substr(start, last ? path.npos : dot - start);
      if (!glob(segments_[i], segment)) return std::nullopt;
      if (has_wildcard(segments_[i])) binding.emplace_back(segment);
      start = last ? path.size() : dot + 1;
    }
    return binding;
  }

 private:
  static bool has_wildcard(std::string_view segment) {
    return segment.find_first_of("*?") != std::string_view::npos;
  }

  // Classic wildcard matching with one backtrack point: linear for patterns this short.
  static bool glob(std::string_view pattern, std::string_view text) {
    std::size_t p = 0, t = 0, star = std::string_view::npos, resume = 0;
    while (t < text.size()) {
      if (p < pattern.size() && (pattern[p] == '?' || pattern[p] == text[t])) {
        ++p;
        ++t;
      } else if (p < pattern.size() && pattern[p] == '*') {
        star = p++;
        resume = t;
      } else if (star != std::string_view::npos) {
        p = star + 1;
        t = ++resume;
      } else {
        return false;
      }
    }
    while (p < pattern.size() && pattern[p] == '*') ++p;
    return p == pattern.size();
  }

  std::string text_;
  std::vector<std::string> segments_;
};

}  // namespace fusion
