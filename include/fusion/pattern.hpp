// fusion::Pattern: a dotted glob over module paths ("layers.*.mlp", "**.ln_1", "layers.[0-3].mlp").
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fusion/error.hpp"

namespace fusion {

/// A path pattern relative to the root module, one glob per dotted segment:
/// - `*` as a whole segment matches exactly one segment;
/// - `**` as a whole segment matches any number of segments, none included (`**.ln_1` matches
///   `ln_1` and `h.0.ln_1`);
/// - inside a segment, `*` matches any run of characters, `?` one character, `[abc]`, `[0-3]` one
///   character of a class and `[!0]` (or `[^0]`) one character outside it.
/// Every segment with a wildcard is one element of the match's *binding*: the text it matched
/// (for `**`, the segments it matched joined by '.', possibly empty). Members of one chain are the
/// matches whose bindings are equal (layer 0's norm with layer 0's mlp). Where several `**` could
/// split a path differently, each takes as few segments as it can, left to right.
/// Throws FusionError for an empty pattern or segment, a `**` that is not a whole segment, or an
/// unclosed `[`.
class Pattern {
 public:
  explicit Pattern(std::string text) : text_(std::move(text)) {
    if (text_.empty()) detail::fail("fusion: empty pattern");
    std::size_t offset = 0;
    for (std::string_view segment : split(text_)) {
      check_segment(segment, offset);
      segments_.emplace_back(segment);
      offset += segment.size() + 1;
    }
  }

  const std::string& text() const noexcept { return text_; }
  /// The dotted segments, as written.
  const std::vector<std::string>& segments() const noexcept { return segments_; }

  /// How many segments hold a wildcard: the length of every binding this pattern produces.
  std::size_t wildcards() const {
    std::size_t count = 0;
    for (const auto& segment : segments_) count += has_wildcard(segment) ? 1 : 0;
    return count;
  }

  /// The pattern made of the first `count` segments (diagnostics: how far a pattern got).
  Pattern prefix(std::size_t count) const {
    std::string text;
    for (std::size_t i = 0; i < count && i < segments_.size(); ++i) {
      text += (i == 0 ? "" : ".") + segments_[i];
    }
    return Pattern(std::move(text));
  }

  /// The binding values when `path` matches, else nullopt.
  std::optional<std::vector<std::string>> match(std::string_view path) const {
    const std::vector<std::string_view> parts = split(path);
    std::vector<std::string> binding;
    std::vector<bool> failed((segments_.size() + 1) * (parts.size() + 1), false);
    if (!match_from(0, parts, 0, binding, failed)) return std::nullopt;
    return binding;
  }

  /// Whether a segment holds a wildcard (`*`, `?`, a class): it then binds what it matched.
  static bool has_wildcard(std::string_view segment) {
    return segment.find_first_of("*?[") != std::string_view::npos;
  }

  /// A dotted path's segments, empty ones included (check_segment refuses those in patterns).
  static std::vector<std::string_view> split(std::string_view path) {
    std::vector<std::string_view> parts;
    std::size_t start = 0;
    while (true) {
      const std::size_t dot = path.find('.', start);
      parts.push_back(path.substr(start, dot == std::string_view::npos ? dot : dot - start));
      if (dot == std::string_view::npos) break;
      start = dot + 1;
    }
    return parts;
  }

 private:
  void check_segment(std::string_view segment, std::size_t offset) const {
    if (segment.empty()) {
      detail::fail(
          "fusion: malformed pattern '{}': empty segment at offset {} (leading, trailing or "
          "doubled '.')",
          text_, offset);
    }
    if (segment != "**" && segment.find("**") != std::string::npos) {
      detail::fail(
          "fusion: malformed pattern '{}': '**' must be a whole segment (it matches any number "
          "of segments), but segment '{}' has it among other characters",
          text_, segment);
    }
    for (std::size_t i = 0; i < segment.size(); ++i) {
      if (segment[i] != '[') continue;
      const std::size_t end = class_end(segment, i);
      if (end == std::string::npos) {
        detail::fail("fusion: malformed pattern '{}': unclosed '[' in segment '{}'", text_,
                     segment);
      }
      i = end - 1;
    }
  }

  // Whether segments [s, end) match parts [p, end); on success the binding of those segments is
  // appended, on failure `binding` is left as it was. Whether (s, p) matches does not depend on
  // how the earlier segments split the path, so a failed (s, p) is remembered in `failed`: without
  // that, several `**` backtrack exponentially ("**.**.**.x" against a long path that has no x).
  bool match_from(std::size_t s, const std::vector<std::string_view>& parts, std::size_t p,
                  std::vector<std::string>& binding, std::vector<bool>& failed) const {
    if (s == segments_.size()) return p == parts.size();
    const std::size_t state = s * (parts.size() + 1) + p;
    if (failed[state]) return false;
    const std::string& segment = segments_[s];
    const std::size_t mark = binding.size();
    if (segment == "**") {
      // As few segments as it can take, so the earliest `**` takes the fewest.
      for (std::size_t take = 0; p + take <= parts.size(); ++take) {
        if (!match_from(s + 1, parts, p + take, binding, failed)) continue;
        std::string joined;
        for (std::size_t k = 0; k < take; ++k) {
          joined += (k == 0 ? "" : ".");
          joined += parts[p + k];
        }
        binding.insert(binding.begin() + static_cast<std::ptrdiff_t>(mark), std::move(joined));
        return true;
      }
    } else if (p < parts.size() && glob(segment, parts[p]) &&
               match_from(s + 1, parts, p + 1, binding, failed)) {
      if (has_wildcard(segment)) {
        binding.insert(binding.begin() + static_cast<std::ptrdiff_t>(mark), std::string(parts[p]));
      }
      return true;
    }
    failed[state] = true;
    return false;
  }

  // One past the ']' closing the class that opens at `open`, or npos. A ']' right after '[' (or
  // after '[!') is a member, as in shell globs.
  static std::size_t class_end(std::string_view pattern, std::size_t open) {
    std::size_t i = open + 1;
    if (i < pattern.size() && (pattern[i] == '!' || pattern[i] == '^')) ++i;
    if (i < pattern.size() && pattern[i] == ']') ++i;
    const std::size_t close = pattern.find(']', i);
    return close == std::string_view::npos ? close : close + 1;
  }

  // Whether `c` is in the class [open, end): members, ranges `a-z`, negation with '!' or '^'.
  static bool in_class(std::string_view pattern, std::size_t open, std::size_t end, char c) {
    const std::size_t close = end - 1;
    std::size_t i = open + 1;
    const bool negate = pattern[i] == '!' || pattern[i] == '^';
    if (negate) ++i;
    bool found = false;
    while (i < close) {
      if (i + 2 < close && pattern[i + 1] == '-') {
        found = found || (pattern[i] <= c && c <= pattern[i + 2]);
        i += 3;
      } else {
        found = found || pattern[i] == c;
        ++i;
      }
    }
    return found != negate;
  }

  // Wildcard matching with one backtrack point (the last '*'): linear for segments this short.
  static bool glob(std::string_view pattern, std::string_view text) {
    constexpr std::size_t none = std::string_view::npos;
    std::size_t p = 0, t = 0, star = none, resume = 0;
    while (t < text.size()) {
      if (p < pattern.size()) {
        const char c = pattern[p];
        if (c == '*') {
          star = p++;
          resume = t;
          continue;
        }
        if (c == '[') {
          const std::size_t end = class_end(pattern, p);
          if (in_class(pattern, p, end, text[t])) {
            p = end;
            ++t;
            continue;
          }
        } else if (c == '?' || c == text[t]) {
          ++p;
          ++t;
          continue;
        }
      }
      if (star == none) return false;
      p = star + 1;
      t = ++resume;
    }
    while (p < pattern.size() && pattern[p] == '*') ++p;
    return p == pattern.size();
  }

  std::string text_;
  std::vector<std::string> segments_;
};

}  // namespace fusion
