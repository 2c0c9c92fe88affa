// Misuse gets a FusionError that names the culprit, and a failed fuse leaves the model as it was.
#include "catch_compat.hpp"

#include <thread>

#include "models.hpp"

using namespace models;
using fusion_test::Contains;

namespace {

/// Everything fusion could change: which slots are fused, into which chain, and what forward gives.
struct State {
  std::vector<std::string> fused_paths;
  std::vector<std::string> chains;
  torch::Tensor output;
};

State state_of(Stack& model, const torch::Tensor& x) {
  State state;
  for (std::size_t i = 0; i < model->layers->size(); ++i) {
    auto& block = model->block(i);
    if (block.post_attention_layernorm.is_fused())
      state.fused_paths.push_back(std::to_string(i) + ".norm");
    if (block.mlp.is_fused()) state.fused_paths.push_back(std::to_string(i) + ".mlp");
  }
  for (const auto& chain : fusion::fused_chains(model))
    state.chains.push_back(fusion::to_string(chain));
  state.output = model(x);
  return state;
}

void require_unchanged(const State& before, const State& after) {
  CHECK(after.fused_paths == before.fused_paths);
  CHECK(after.chains == before.chains);
  CHECK(torch::equal(after.output, before.output));
}

/// A stack whose last layer's mlp was swapped for a plain (non-Slot) child, so that validation
/// fails only after the first layers were already checked.
struct PlainBlockImpl : torch::nn::Module {
  PlainBlockImpl() {
    post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(16));
    mlp = register_module("mlp", MLP(16, 32));
  }
  RMSNorm post_attention_layernorm{nullptr};
  MLP mlp{nullptr};
};

struct PlainTailImpl : torch::nn::Module {
  PlainTailImpl() {
    layers = register_module("layers", torch::nn::ModuleList());
    layers->push_back(Block());
    layers->push_back(Block());
    layers->push_back(std::make_shared<PlainBlockImpl>());
  }
  torch::nn::ModuleList layers{nullptr};
};

}  // namespace

TEST_CASE("bad fuse requests throw a FusionError naming the culprit and change nothing") {
  torch::manual_seed(10);
  Stack model(3);
  const auto x = torch::randn({2, 16});
  const auto spec = hidden_spec();
  // Part of the model is already fused, so "unchanged" also means "still fused the same way".
  fusion::fuse_modules(model, {"layers.0.post_attention_layernorm", "layers.0.mlp"}, {spec, spec});
  const State before = state_of(model, x);

  auto fails = [&](const std::vector<std::string>& patterns,
                   const std::vector<fusion::ModuleSpec>& specs, const std::string& message) {
    INFO("expecting: " << message);
    CHECK_THROWS_MATCHES(fusion::fuse_modules(model, patterns, specs), fusion::FusionError,
                         fusion_test::Predicate<fusion::FusionError>(
                             [&](const fusion::FusionError& e) {
                               return std::string(e.what()).find(message) != std::string::npos;
                             },
                             "message contains '" + message + "'"));
    require_unchanged(before, state_of(model, x));
  };

  SECTION("fewer than 2 patterns") { fails({"layers.*.mlp"}, {spec}, "at least 2 patterns"); }
  SECTION("patterns and specs of different lengths") {
    fails({"layers.*.post_attention_layernorm", "layers.*.mlp"}, {spec}, "2 patterns but 1 specs");
  }
  SECTION("a malformed pattern") {
    fails({"layers.*.post_attention_layernorm", "layers.*.mlp."}, {spec, spec},
          "malformed pattern 'layers.*.mlp.'");
    fails({".layers.*.post_attention_layernorm", "layers.*.mlp"}, {spec, spec},
          "malformed pattern '.layers.*.post_attention_layernorm'");
  }
  SECTION("a pattern that matches nothing") {
    fails({"layers.*.post_attention_layernorm", "layers.*.feed_forward"}, {spec, spec},
          "pattern 'layers.*.feed_forward' matches no module");
  }
  SECTION("a matched module that is not a slot") {
    fails({"layers.2.mlp", "norm"}, {spec, spec},
          "'norm' (matched by pattern 'norm') is not a fusion::Slot");
  }
  SECTION("an incomplete chain") {
    fails({"layers.*.post_attention_layernorm", "layers.1*.mlp"}, {spec, spec},
          "incomplete chain for binding [0]: 'layers.0.post_attention_layernorm' was matched, but "
          "pattern 'layers.1*.mlp' matches nothing");
  }
  SECTION("a module already fused") {
    fails({"layers.*.post_attention_layernorm", "layers.*.mlp"}, {spec, spec},
          "'layers.0.post_attention_layernorm' (matched by pattern "
          "'layers.*.post_attention_layernorm') is already fused in chain "
          "[layers.0.post_attention_layernorm -> layers.0.mlp]");
  }
  SECTION("a module in two chains, or twice in one") {
    fails({"layers.2.mlp", "layers.2.mlp"}, {spec, spec},
          "'layers.2.mlp' is matched by two patterns of one chain ('layers.2.mlp' and "
          "'layers.2.mlp')");
  }
  SECTION("patterns with different numbers of wildcards") {
    fails({"layers.*.mlp", "norm"}, {spec, spec},
          "pattern 'norm' has 0 wildcard segment(s) but 'layers.*.mlp' has 1");
  }
  SECTION("a spec with more inputs than forward has") {
    fails({"layers.2.post_attention_layernorm", "layers.2.mlp"},
          {fusion::ModuleSpec{{"hidden_states", "mask"}, {"hidden_states"}}, spec},
          "spec #0 (pattern 'layers.2.post_attention_layernorm', module "
          "'layers.2.post_attention_layernorm') names 2 inputs [hidden_states, mask] but forward() "
          "takes 1 parameter(s) (torch::Tensor)");
  }
  SECTION("output names that do not fit the return type") {
    fails({"layers.2.post_attention_layernorm", "layers.2.mlp"},
          {spec, fusion::ModuleSpec{{"hidden_states"}, {"a", "b"}}},
          "spec #1 (pattern 'layers.2.mlp', module 'layers.2.mlp') names 2 output(s) [a, b] but "
          "forward() returns 1 value(s) (torch::Tensor)");
    fails({"layers.2.post_attention_layernorm", "layers.2.mlp"},
          {spec, fusion::ModuleSpec{{"hidden_states"}, {}}}, "names 0 output(s)");
  }
  SECTION("an input that nothing provides") {
    fails(
        {"layers.2.post_attention_layernorm", "layers.2.mlp"},
        {fusion::ModuleSpec{{"x"}, {"normed"}}, spec},
        "parameter #0 ('hidden_states') of 'layers.2.mlp' is provided by nothing: no earlier "
        "member of the chain outputs it (they output [normed]) or takes it as an input (they take "
        "[x]), and its call argument would only be the placeholder returned by "
        "'layers.2.post_attention_layernorm'");
  }
  SECTION("a later member's first parameter left unnamed") {
    fails({"layers.2.post_attention_layernorm", "layers.2.mlp"},
          {spec, fusion::ModuleSpec{{}, {"hidden_states"}}},
          "parameter #0 (not named in its spec) of 'layers.2.mlp' is provided by nothing");
  }
}

TEST_CASE("validation fails late without leaving earlier chains fused") {
  torch::manual_seed(11);
  auto model = std::make_shared<PlainTailImpl>();
  CHECK_THROWS_WITH(fusion::fuse_modules(*model, block_patterns(), block_specs()),
                    Contains("'layers.2.post_attention_layernorm' (matched by pattern "
                             "'layers.*.post_attention_layernorm') is not a fusion::Slot"));
  CHECK_FALSE(model->layers->at<BlockImpl>(0).mlp.is_fused());
  CHECK_FALSE(model->layers->at<BlockImpl>(1).post_attention_layernorm.is_fused());
  CHECK(fusion::fused_chains(*model).empty());
}

TEST_CASE("a module that two chains would share is rejected") {
  struct InnerImpl : torch::nn::Module {
    explicit InnerImpl(bool with_a) {
      if (with_a) a = fusion::register_slot(*this, "a", RMSNorm(16));
      b = fusion::register_slot(*this, "b", RMSNorm(16));
    }
    fusion::Slot<RMSNorm> a, b;
  };
  struct OuterImpl : torch::nn::Module {
    OuterImpl() {
      register_module("a", std::make_shared<InnerImpl>(true));
      register_module("b", std::make_shared<InnerImpl>(false));
    }
  };
  auto model = std::make_shared<OuterImpl>();
  // "a.*" binds a.a to [a] and a.b to [b]; "*.b" binds a.b to [a] and b.b to [b]: chain [a] is
  // a.a -> a.b and chain [b] is a.b -> b.b, so a.b would be in both.
  CHECK_THROWS_WITH(fusion::fuse_modules(*model, {"a.*", "*.b"}, block_specs()),
                    Contains("'a.b' would be a member of two chains, for bindings [a] and [b]"));
  CHECK(fusion::fused_chains(*model).empty());
}

TEST_CASE("wiring and defaults are type-checked at fuse time") {
  TupleChain tuple_model;
  CHECK_THROWS_WITH(
      fusion::fuse_modules(
          tuple_model, {"split", "gate"},
          {fusion::ModuleSpec{{"x"}, {"value"}}, fusion::ModuleSpec{{"gate", "value"}, {"out"}}}),
      Contains("spec #0 (pattern 'split', module 'split') names 1 output(s) [value] but forward() "
               "returns 2 value(s) (torch::Tensor, torch::Tensor)"));

  ArgsChain args_model;
  CHECK_THROWS_WITH(
      fusion::fuse_modules(args_model, {"mix", "tagged"},
                           {fusion::ModuleSpec{{"x", "bias", "repeat", "alpha", "negate"}, {"x"}},
                            fusion::ModuleSpec{{"x", "x"}, {"y"}}}),
      Contains("input 'x' of 'tagged' (parameter #1, models::Tag) would receive output 'x' of "
               "'mix', which is a torch::Tensor"));

  DefaultsChain defaults_model;
  CHECK_THROWS_WITH(
      fusion::fuse_modules(
          defaults_model, {"norm", "power"},
          {fusion::ModuleSpec{{"x"}, {"x"}},
           fusion::ModuleSpec{{"x"}, {"x"}, {{1, fusion::box(std::string("3"))}}}}),
      Contains("gives parameter #1 a default of kind String, but forward() takes double there"));
  CHECK(fusion::fused_chains(defaults_model).empty());
}

TEST_CASE("a parameter the call leaves to a C++ default needs a default the library can see") {
  torch::manual_seed(16);
  DefaultsChain model;
  const auto x = torch::randn({2, 16});
  const auto original = model(x);  // power(...) relies on its C++ default exponent
  // Fusing is allowed: a call site may pass every argument. Only a call that passes none fails,
  // naming the parameter and saying how to give the default.
  fusion::fuse_modules(model, {"scale", "power"},
                       {fusion::ModuleSpec{{"x"}, {"x"}}, fusion::ModuleSpec{{"x"}, {"x"}}});
  CHECK_THROWS_MATCHES(
      model(x), fusion::FusionError,
      fusion_test::Predicate<fusion::FusionError>(
          [](const fusion::FusionError& e) {
            const std::string what = e.what();
            return what.find(
                       "fused chain [scale -> power]: parameter #1 (double) of 'power' has no "
                       "value") != std::string::npos &&
                   what.find("ModuleSpec{inputs, outputs, {{1, fusion::box(value)}}}") !=
                       std::string::npos;
          },
          "names the parameter and gives the advice"));
  // A call that passes the argument works without a default.
  const auto passed = model->power(model->scale(model->norm(x)), 2.0);
  fusion::unfuse_modules(model);
  CHECK(torch::equal(passed, model->power(model->scale(model->norm(x)), 2.0)));
  // Following the advice works for the call that relied on the C++ default.
  fusion::fuse_modules(model, {"scale", "power"},
                       {fusion::ModuleSpec{{"x"}, {"x"}},
                        fusion::ModuleSpec{{"x"}, {"x"}, {{1, fusion::box(3)}}}});  // int -> double
  CHECK(torch::equal(model(x), original));
}

TEST_CASE("call-time misuse throws a FusionError naming the chain") {
  torch::manual_seed(12);
  Triple model;
  fusion::fuse_modules(model, {"norm", "proj", "mlp"},
                       {fusion::ModuleSpec{{"x"}, {"x"}}, fusion::ModuleSpec{{"x"}, {"x"}},
                        fusion::ModuleSpec{{"x"}, {"x"}}});
  const auto x = torch::randn({2, 16});
  const auto expected = model(x);

  // A member called outside a pass of its chain (no earlier member before it on this thread) has
  // real arguments: it computes what the unfused member computes.
  SECTION("the fused module called on its own runs unfused") {
    CHECK(torch::equal(model->mlp(x), model->mlp->forward(x)));
    CHECK(torch::equal(model->proj(x), model->proj->forward(x)));
  }
  SECTION("collectors called on another thread do not start a pass on this one") {
    std::thread([&] {
      model->norm(x);
      model->proj(x);
    }).join();
    CHECK(torch::equal(model->mlp(x), model->mlp->forward(x)));
  }
  SECTION("a placeholder used outside its chain") {
    const auto placeholder = model->proj(model->norm(x));
    model->mlp(placeholder);  // the pass ends here
    CHECK_THROWS_WITH(model->mlp(placeholder),
                      Contains("fused chain [norm -> proj -> mlp]: 'mlp' was called with a "
                               "placeholder as argument #0, outside a pass of its chain"));
  }
  SECTION("a member called twice in one pass") {
    model->norm(x);
    model->proj(x);
    CHECK_THROWS_WITH(model->proj(x), Contains("fused chain [norm -> proj -> mlp]: 'proj' was "
                                               "called twice in one pass"));
  }
  SECTION("members called out of order") {
    model->norm(x);
    CHECK_THROWS_WITH(model->mlp(x), Contains("the fused module 'mlp' was called before 'proj'"));
  }
  // After each error, the next forward on this thread works.
  CHECK(torch::equal(model(x), expected));
}

TEST_CASE("an exception thrown inside a chain does not break the next forward") {
  torch::manual_seed(13);
  Stack model(2);
  const auto x = torch::randn({2, 16});
  const auto expected = model(x);
  fusion::fuse_modules(model, block_patterns(), block_specs());

  SECTION("between a collector and the fused module") {
    model->block(1).throw_between = true;
    CHECK_THROWS_WITH(model(x), Contains("thrown between"));
    model->block(1).throw_between = false;
  }
  SECTION("inside the replay") {
    CHECK_THROWS(model(torch::randn({2, 7})));  // wrong width: the MLP's matmul throws
  }
  CHECK(torch::equal(model(x), expected));
  CHECK(torch::equal(model(x), expected));
}

TEST_CASE(
    "captured tensors are released when the replay ends; an aborted pass's by the next call") {
  torch::manual_seed(16);
  Stack model(2);
  fusion::fuse_modules(model, block_patterns(), block_specs());
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 16});
  const auto baseline = x.use_count();
  model(x);
  CHECK(x.use_count() == baseline);
  model->block(0).throw_between = true;  // block 0's collector captures x itself, then the throw
  CHECK_THROWS_WITH(model(x), Contains("thrown between"));
  model->block(0).throw_between = false;
  CHECK(x.use_count() == baseline + 1);  // the aborted pass's capture still holds x ...
  model(torch::randn({2, 16}));
  CHECK(x.use_count() == baseline);  // ... until the chain's next call on this thread
}

TEST_CASE("verify names the chains whose fused outputs differ") {
  torch::manual_seed(14);
  struct MixedImpl : torch::nn::Module {
    MixedImpl() {
      good = register_module("good", Stack(2));
      bad = register_module("bad", Reused());
    }
    torch::Tensor forward(const torch::Tensor& x) { return bad(good(x)); }
    Stack good{nullptr};
    Reused bad{nullptr};
  };
  auto model = std::make_shared<MixedImpl>();
  const auto x = torch::randn({3, 16});
  fusion::fuse_modules(*model, {"good.layers.*.post_attention_layernorm", "good.layers.*.mlp"},
                       block_specs());
  fusion::fuse_modules(*model, {"bad.norm", "bad.mlp"}, block_specs());

  const auto report = fusion::verify(*model, [&] { return model->forward(x); });
  REQUIRE(report.chains.size() == 3);
  CHECK_FALSE(report.ok());
  CHECK(report.chains[0].ok);
  CHECK(report.chains[1].ok);
  CHECK(report.chains[0].max_abs_diff == 0);
  CHECK_FALSE(report.chains[2].ok);
  CHECK(report.chains[2].chain.paths == std::vector<std::string>{"bad.norm", "bad.mlp"});
  CHECK(report.chains[2].max_abs_diff > 0.1);
  CHECK_THAT(report.to_string(), Contains("FAIL [bad.norm -> bad.mlp]: max abs diff"));
  CHECK_THAT(report.to_string(),
             Contains("ok   [good.layers.0.post_attention_layernorm -> good.layers.0.mlp]"));
  // verify restores the fusion state it found
  CHECK(fusion::fused_chains(*model).size() == 3);
  CHECK(model->bad->mlp.is_fused());

  // A chain whose fused run throws is reported with the error.
  struct TwiceImpl : torch::nn::Module {
    TwiceImpl() {
      norm = fusion::register_slot(*this, "norm", RMSNorm(16));
      mlp = fusion::register_slot(*this, "mlp", MLP(16, 24));
    }
    torch::Tensor forward(const torch::Tensor& h) {
      const auto normed = norm(h);
      return mlp(normed) + mlp(normed);  // the norm's result used twice
    }
    fusion::Slot<RMSNorm> norm;
    fusion::Slot<MLP> mlp;
  };
  auto twice = std::make_shared<TwiceImpl>();
  fusion::fuse_modules(*twice, {"norm", "mlp"}, block_specs());
  const auto twice_report = fusion::verify(*twice, [&] { return twice->forward(x); });
  REQUIRE(twice_report.chains.size() == 1);
  CHECK_FALSE(twice_report.ok());
  CHECK_THAT(twice_report.chains[0].error, Contains("'mlp' was called with a placeholder"));
}
