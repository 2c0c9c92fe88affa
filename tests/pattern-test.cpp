#include <catch2/catch.hpp>

#include <fusion/pattern.hpp>

using fusion::Pattern;
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
  CHECK_THROWS_WITH(Pattern("layers..mlp"),
                    Catch::Contains("'layers..mlp'") && Catch::Contains("empty segment"));
}
