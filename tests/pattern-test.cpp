#include "catch_compat.hpp"

#include <fusion/pattern.hpp>

#include <string>
#include <vector>

using fusion::Pattern;
using fusion_test::Contains;
using Binding = std::vector<std::string>;

TEST_CASE("a whole-segment * matches exactly one segment and binds it") {
  Pattern pattern("layers.*.mlp");
  CHECK(pattern.match("layers.0.mlp") == Binding{"0"});
  CHECK(pattern.match("layers.12.mlp") == Binding{"12"});
  CHECK_FALSE(pattern.match("layers.0.1.mlp"));
  CHECK_FALSE(pattern.match("layers.mlp"));
  CHECK_FALSE(pattern.match("layers.0.mlp.gate_proj"));
  CHECK_FALSE(pattern.match("model.layers.0.mlp"));
}

TEST_CASE("* and ? inside a segment match characters; the segment is the binding") {
  CHECK(Pattern("layers.1*.mlp").match("layers.1.mlp") == Binding{"1"});
  CHECK(Pattern("layers.1*.mlp").match("layers.17.mlp") == Binding{"17"});
  CHECK_FALSE(Pattern("layers.1*.mlp").match("layers.21.mlp"));
  CHECK(Pattern("layers.?.mlp").match("layers.3.mlp") == Binding{"3"});
  CHECK_FALSE(Pattern("layers.?.mlp").match("layers.13.mlp"));
  CHECK(Pattern("*.*_proj").match("mlp.gate_proj") == Binding{"mlp", "gate_proj"});
  CHECK(Pattern("a*b*c").match("aXbYbZc") == Binding{"aXbYbZc"});
  CHECK_FALSE(Pattern("a*b*c").match("aXbYbZ"));
}

TEST_CASE("a pattern without wildcards matches one path and binds nothing") {
  CHECK(Pattern("encoder.norm").match("encoder.norm") == Binding{});
  CHECK_FALSE(Pattern("encoder.norm").match("encoder.norm2"));
  CHECK_FALSE(Pattern("encoder.norm").match("encoder"));
}

TEST_CASE("malformed patterns are rejected with the pattern named") {
  for (const char* bad : {"", ".layers", "layers.", "layers..mlp", "."}) {
    INFO("pattern '" << bad << "'");
    CHECK_THROWS_AS(Pattern(bad), fusion::FusionError);
  }
  CHECK_THROWS_WITH(Pattern("layers..mlp"), Contains("'layers..mlp'") && Contains("empty segment"));
}

TEST_CASE("** as a whole segment matches any number of segments, none included") {
  Pattern any("**.ln_1");
  CHECK(any.match("ln_1") == Binding{""});
  CHECK(any.match("h.0.ln_1") == Binding{"h.0"});
  CHECK(any.match("encoder.h.11.ln_1") == Binding{"encoder.h.11"});
  CHECK_FALSE(any.match("h.0.ln_1.weight"));
  CHECK_FALSE(any.match("h.0.ln_12"));

  Pattern middle("encoder.**.mlp");
  CHECK(middle.match("encoder.mlp") == Binding{""});
  CHECK(middle.match("encoder.layers.3.mlp") == Binding{"layers.3"});
  CHECK_FALSE(middle.match("decoder.layers.3.mlp"));

  // Not the same as `*`: layers.**.ln_1 reaches any depth below layers.
  CHECK(Pattern("layers.**.ln_1").match("layers.0.block.ln_1") == Binding{"0.block"});
  CHECK_FALSE(Pattern("layers.*.ln_1").match("layers.0.block.ln_1"));
  CHECK(Pattern("layers.**.ln_1").wildcards() == 1);

  // Several: each takes as few segments as it can, left to right.
  CHECK(Pattern("**.a.**").match("x.a.y.a.z") == Binding{"x", "y.a.z"});
  CHECK(Pattern("**").match("a.b.c") == Binding{"a.b.c"});
}

TEST_CASE("character classes match one character of a set, a range, or outside it") {
  CHECK(Pattern("layers.[0-3].mlp").match("layers.2.mlp") == Binding{"2"});
  CHECK_FALSE(Pattern("layers.[0-3].mlp").match("layers.4.mlp"));
  CHECK_FALSE(Pattern("layers.[0-3].mlp").match("layers.12.mlp"));
  CHECK(Pattern("layers.[!0].mlp").match("layers.1.mlp") == Binding{"1"});
  CHECK_FALSE(Pattern("layers.[!0].mlp").match("layers.0.mlp"));
  CHECK_FALSE(Pattern("layers.[^0].mlp").match("layers.0.mlp"));
  CHECK(Pattern("layers.[13579]*.mlp").match("layers.17.mlp") == Binding{"17"});
  CHECK_FALSE(Pattern("layers.[13579]*.mlp").match("layers.27.mlp"));
  CHECK(Pattern("[a-cx]_proj").match("x_proj") == Binding{"x_proj"});
  CHECK(Pattern("[]]").match("]") == Binding{"]"});
  CHECK(Pattern("[a-]").match("-") == Binding{"-"});
  CHECK(Pattern("*[0-9]").match("layer10") == Binding{"layer10"});
}

TEST_CASE("** among other characters and unclosed classes are malformed") {
  CHECK_THROWS_WITH(Pattern("layers.a**.mlp"), Contains("'**' must be a whole segment"));
  CHECK_THROWS_WITH(Pattern("***.mlp"), Contains("'**' must be a whole segment"));
  CHECK_THROWS_WITH(Pattern("layers.[0-3.mlp"), Contains("unclosed '['"));
  CHECK_THROWS_WITH(Pattern("layers.[!].mlp"), Contains("unclosed '['"));
}

TEST_CASE("prefix is the pattern of the first segments") {
  CHECK(Pattern("layers.*.mlp").prefix(2).text() == "layers.*");
  CHECK(Pattern("a.**.b").segments() == std::vector<std::string>{"a", "**", "b"});
}

TEST_CASE("many ** segments match in polynomial time, with the same bindings") {
  // Found by the fuzzer: each ** tried every split, so a path with no match took exponential time.
  std::string text;
  for (int i = 0; i < 24; ++i) text += "**.";
  std::string path;
  for (int i = 0; i < 80; ++i) path += (i == 0 ? "" : ".") + std::string("a");
  CHECK_FALSE(Pattern(text + "x").match(path));
  const auto binding = Pattern(text + "a").match(path);
  REQUIRE(binding);
  CHECK(binding->size() == 24);
  CHECK(binding->front().empty());
  CHECK(binding->back().size() == 79 * 2 - 1);  // the last ** takes all but the final "a"
  CHECK(Pattern("**.*.**.b").match("a.b.c.b") == Binding{"", "a", "b.c"});
}
