// fusion::save_plan / load_plan: a Plan (what fusion::optimize found, or one written by hand) as a
// JSON file, so that a deployment applies it without re-tuning:
//
//   fusion::save_plan(fusion::optimize(model, run), "model.plan.json");
//   fusion::fuse_modules(model, fusion::load_plan("model.plan.json"));
//
// The optional part of the library: it needs nlohmann/json (Debian's nlohmann-json3-dev; link
// nlohmann_json::nlohmann_json), which the rest does not.
#pragma once

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/core/ivalue.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "fusion/error.hpp"
#include "fusion/plan.hpp"

namespace fusion {

/// The format's name and version, written in every file and checked when one is read.
inline constexpr const char* kPlanFormat = "torch-module-fusion plan";
inline constexpr int kPlanVersion = 1;

namespace detail {

inline const char* policy_name(KernelPolicy policy) {
  switch (policy) {
    case KernelPolicy::strict:
      return "strict";
    case KernelPolicy::checked:
      return "checked";
    case KernelPolicy::fallback:
      break;
  }
  return "fallback";
}

inline nlohmann::json default_to_json(const c10::IValue& value, std::size_t rule,
                                      std::size_t member, std::size_t param) {
  if (value.isNone()) return nullptr;
  if (value.isBool()) return value.toBool();
  if (value.isInt()) return value.toInt();
  if (value.isDouble()) return value.toDouble();
  if (value.isString()) return value.toStringRef();
  fail(
      "fusion::save_plan: rule #{}, member #{}: the default of parameter #{} is a {}; a plan "
      "file holds None, bool, int, float and string defaults",
      rule, member, param, value.tagKind());
}

inline c10::IValue default_from_json(const nlohmann::json& value) {
  if (value.is_null()) return c10::IValue();
  if (value.is_boolean()) return value.get<bool>();
  if (value.is_number_integer()) return value.get<std::int64_t>();
  if (value.is_number_float()) return value.get<double>();
  if (value.is_string()) return value.get<std::string>();
  fail("a default must be null, a boolean, a number or a string, not {}", value.dump());
}

}  // namespace detail

/// The plan as JSON text (see save_plan).
inline std::string plan_to_json(const Plan& plan) {
  nlohmann::json rules = nlohmann::json::array();
  for (std::size_t r = 0; r < plan.rules.size(); ++r) {
    const Rule& rule = plan.rules[r];
    nlohmann::json specs = nlohmann::json::array();
    for (std::size_t m = 0; m < rule.specs.size(); ++m) {
      const ModuleSpec& spec = rule.specs[m];
      nlohmann::json defaults = nlohmann::json::object();
      for (const auto& [param, value] : spec.defaults) {
        defaults[std::to_string(param)] = detail::default_to_json(value, r, m, param);
      }
      specs.push_back({{"inputs", spec.inputs}, {"outputs", spec.outputs}, {"defaults", defaults}});
    }
    rules.push_back({{"patterns", rule.patterns},
                     {"specs", specs},
                     {"kernel", rule.options.kernel},
                     {"policy", detail::policy_name(rule.options.policy)},
                     {"skip_incomplete_chains", rule.options.skip_incomplete_chains},
                     {"types", rule.types}});
  }
  const nlohmann::json document{
      {"format", kPlanFormat}, {"version", kPlanVersion}, {"rules", rules}};
  return document.dump(2);
}

/// The plan in `text` (as plan_to_json writes it). Throws FusionError naming what is wrong: not
/// JSON, another format or version, a missing or mistyped field.
inline Plan plan_from_json(const std::string& text, const std::string& where = "the JSON text") {
  Plan plan;
  std::string context;
  try {
    const nlohmann::json document = nlohmann::json::parse(text);
    if (!document.is_object() || !document.contains("format") ||
        document.at("format") != nlohmann::json(kPlanFormat)) {
      detail::fail("it is not a {} (no \"format\": \"{}\")", kPlanFormat, kPlanFormat);
    }
    const int version = document.at("version").get<int>();
    if (version != kPlanVersion) {
      detail::fail("it has version {}, and this library reads version {}", version, kPlanVersion);
    }
    const auto& rules = document.at("rules");
    for (std::size_t r = 0; r < rules.size(); ++r) {
      context = fmt::format("rule #{}: ", r);
      const auto& entry = rules.at(r);
      Rule rule;
      rule.patterns = entry.at("patterns").get<std::vector<std::string>>();
      for (const auto& spec_entry : entry.at("specs")) {
        ModuleSpec spec{spec_entry.at("inputs").get<std::vector<std::string>>(),
                        spec_entry.at("outputs").get<std::vector<std::string>>()};
        const nlohmann::json defaults = spec_entry.value("defaults", nlohmann::json::object());
        for (const auto& [param, value] : defaults.items()) {
          spec.defaults[std::stoul(param)] = detail::default_from_json(value);
        }
        rule.specs.push_back(std::move(spec));
      }
      rule.options.kernel = entry.value("kernel", "");
      const std::string policy = entry.value("policy", "fallback");
      if (policy == "strict") {
        rule.options.policy = KernelPolicy::strict;
      } else if (policy == "checked") {
        rule.options.policy = KernelPolicy::checked;
      } else if (policy != "fallback") {
        detail::fail("policy '{}' is none of fallback, strict, checked", policy);
      }
      rule.options.skip_incomplete_chains = entry.value("skip_incomplete_chains", false);
      rule.types = entry.value("types", std::vector<std::string>{});
      plan.rules.push_back(std::move(rule));
    }
  } catch (const std::exception& error) {  // nlohmann's and ours, with where it happened
    detail::fail("fusion::load_plan: {}: {}{}", where, context, error.what());
  }
  return plan;
}

/// Writes `plan` to `path` as JSON. Throws FusionError if the file cannot be written or a spec
/// default is not a None, bool, int, float or string.
inline void save_plan(const Plan& plan, const std::string& path) {
  const std::string text = plan_to_json(plan);
  std::ofstream file(path);
  file << text << '\n';
  if (!file) detail::fail("fusion::save_plan: cannot write '{}'", path);
}

/// Reads a plan saved by save_plan. Throws FusionError if the file cannot be read or is not such
/// a plan. Applying it (fuse_modules) checks it against the model: a pattern that matches
/// nothing, a kernel not registered, a member of another type (Rule::types) are refused there,
/// changing nothing.
inline Plan load_plan(const std::string& path) {
  std::ifstream file(path);
  if (!file) detail::fail("fusion::load_plan: cannot read '{}'", path);
  std::stringstream text;
  text << file.rdbuf();
  return plan_from_json(text.str(), "'" + path + "'");
}

}  // namespace fusion
