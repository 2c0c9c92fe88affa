// The documentation's printed examples are what the library prints: the README's `report` of its
// example, and the form of a `verify` line in docs/semantics.md. (That every C++ block of the
// documentation compiles is the docs.snippets test: docs/extract_snippets.cpp.)
#include "catch_compat.hpp"

#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "models.hpp"

using namespace models;

namespace {

/// A file of the source tree, found from this file's path (CMake compiles it by absolute path).
std::string read_doc(const std::string& relative) {
  const std::string here = __FILE__;
  const std::string root = here.substr(0, here.rfind("/tests/"));
  std::ifstream in(root + "/" + relative);
  INFO(root + "/" + relative);
  REQUIRE(in);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

/// The lines of the fenced block that follows `marker` in `text`.
std::vector<std::string> block_after(const std::string& text, const std::string& marker) {
  const auto at = text.find(marker);
  REQUIRE(at != std::string::npos);
  std::istringstream in(text.substr(text.find("```", at)));
  std::vector<std::string> lines;
  std::string line;
  std::getline(in, line);  // the opening fence
  while (std::getline(in, line) && line.rfind("```", 0) != 0) lines.push_back(line);
  return lines;
}

}  // namespace

TEST_CASE("the README's report is what report prints for its example") {
  Stack model(2, 64, 128);  // the README's Block: RMSNorm(64), MLP(64, 128); two layers
  fusion::fuse_modules(model, {"layers.*.post_attention_layernorm", "layers.*.mlp"},
                       {fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}},
                        fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}}});
  std::istringstream printed(fusion::report(model));
  const auto shown = block_after(read_doc("README.md"), "`report` prints:");
  REQUIRE(shown.size() > 2);
  std::string line;
  for (const auto& expected : shown) {
    if (expected == "[1] ...") break;  // the README elides the second chain
    REQUIRE(std::getline(printed, line));
    CHECK(line == expected);
  }
}

TEST_CASE("docs/semantics.md shows a verify line as verify prints one") {
  torch::manual_seed(14);
  Reused model;  // mlp(normed) + normed: the replay skips the second use
  fusion::fuse_modules(model, {"norm", "mlp"}, block_specs());
  const auto x = torch::randn({3, 16});
  const std::string printed = fusion::verify(model, [&] { return model(x); }).to_string();
  const auto snippet = block_after(read_doc("docs/semantics.md"), "Check a model with");
  std::string shown;
  for (const auto& line : snippet) {
    if (line.rfind("// FAIL", 0) == 0) shown = line.substr(3) + "\n";
  }
  const std::regex form(
      R"(FAIL \[(\S+) -> (\S+)\]: max abs diff ([0-9.e+-]+|inf), gradients: max abs diff )"
      R"(([0-9.e+-]+|inf) at '\S+'\n)");
  CHECK(std::regex_match(shown, form));
  INFO(printed);
  CHECK(std::regex_match(printed, form));
}
