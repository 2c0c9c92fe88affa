// Small models the tests fuse: a decoder-like stack of norm + MLP blocks, and modules with
// tuple results, non-tensor and user-struct parameters, and default arguments.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <torch/torch.h>
#include <fusion/fusion.hpp>

namespace models {

struct RMSNormImpl : torch::nn::Cloneable<RMSNormImpl> {
  explicit RMSNormImpl(int64_t size, double epsilon = 1e-6) : dim(size), eps(epsilon) { reset(); }
  void reset() override { weight = register_parameter("weight", torch::rand({dim}) + 0.5); }
  torch::Tensor forward(const torch::Tensor& x) {
    auto xf = x.to(torch::kFloat);
    return (xf * torch::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type()) * weight;
  }
  int64_t dim;
  double eps;
  torch::Tensor weight;
};
TORCH_MODULE(RMSNorm);

struct MLPImpl : torch::nn::Cloneable<MLPImpl> {
  MLPImpl(int64_t hidden_size, int64_t intermediate_size)
      : hidden(hidden_size), intermediate(intermediate_size) {
    reset();
  }
  void reset() override {
    auto linear = [](int64_t in, int64_t out) {
      return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false));
    };
    gate_proj = register_module("gate_proj", linear(hidden, intermediate));
    up_proj = register_module("up_proj", linear(hidden, intermediate));
    down_proj = register_module("down_proj", linear(intermediate, hidden));
    calls = register_buffer("calls", torch::zeros({1}));
  }
  torch::Tensor forward(torch::Tensor x) {
    return down_proj(torch::silu(gate_proj(x)) * up_proj(x));
  }
  int64_t hidden, intermediate;
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  torch::Tensor calls;  // a buffer, so that state tests see one
};
TORCH_MODULE(MLP);

struct BlockImpl : torch::nn::Cloneable<BlockImpl> {
  explicit BlockImpl(int64_t hidden_size = 16, int64_t intermediate_size = 32)
      : hidden(hidden_size), intermediate(intermediate_size) {
    reset();
  }
  void reset() override {
    post_attention_layernorm =
        fusion::register_slot(*this, "post_attention_layernorm", RMSNorm(hidden));
    mlp = fusion::register_slot(*this, "mlp", MLP(hidden, intermediate));
  }
  torch::Tensor forward(torch::Tensor h) {
    auto normed = post_attention_layernorm(h);
    if (between) between();
    if (throw_between) throw std::runtime_error("thrown between the chain's members");
    return h + mlp(normed);
  }
  int64_t hidden, intermediate;
  fusion::Slot<RMSNorm> post_attention_layernorm;
  fusion::Slot<MLP> mlp;
  bool throw_between = false;
  std::function<void()> between;  // runs between the chain's members (a pass in flight)
};
TORCH_MODULE(Block);

struct StackImpl : torch::nn::Cloneable<StackImpl> {
  explicit StackImpl(int64_t layer_count = 3, int64_t hidden_size = 16,
                     int64_t intermediate_size = 32)
      : num_layers(layer_count), hidden(hidden_size), intermediate(intermediate_size) {
    reset();
  }
  void reset() override {
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < num_layers; ++i) layers->push_back(Block(hidden, intermediate));
    norm = register_module("norm", RMSNorm(hidden));
  }
  torch::Tensor forward(torch::Tensor h) {
    // Through the ModuleList, not a typed vector: clone() replaces the list's contents.
    for (const auto& layer : *layers) h = layer->as<BlockImpl>()->forward(h);
    return norm(h);
  }
  int64_t num_layers, hidden, intermediate;
  BlockImpl& block(std::size_t i) { return layers->at<BlockImpl>(i); }
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};  // a plain child, not a Slot
};
TORCH_MODULE(Stack);

/// Two stacks, encoder (2 layers) and decoder (3): chains across parents and depths.
struct TwoTowersImpl : torch::nn::Module {
  TwoTowersImpl() {
    encoder = register_module("encoder", Stack(2));
    decoder = register_module("decoder", Stack(3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return decoder(encoder(x)); }
  Stack encoder{nullptr}, decoder{nullptr};
};

/// Three members: norm -> linear -> MLP, with a built-in module (torch::nn::Linear) in the middle.
struct TripleImpl : torch::nn::Module {
  TripleImpl() {
    norm = fusion::register_slot(*this, "norm", RMSNorm(16));
    proj = fusion::register_slot(*this, "proj", torch::nn::Linear(16, 16));
    mlp = fusion::register_slot(*this, "mlp", MLP(16, 24));
  }
  torch::Tensor forward(torch::Tensor h) { return h + mlp(proj(norm(h))); }
  fusion::Slot<RMSNorm> norm;
  fusion::Slot<torch::nn::Linear> proj;
  fusion::Slot<MLP> mlp;
};
TORCH_MODULE(Triple);

/// Returns a tuple, whose elements the next member takes by name.
struct SplitImpl : torch::nn::Module {
  SplitImpl() { weight = register_parameter("weight", torch::randn({16})); }
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) {
    return {x * weight, torch::sigmoid(x)};
  }
  torch::Tensor weight;
};
TORCH_MODULE(Split);

struct GateImpl : torch::nn::Module {
  GateImpl() { proj = register_module("proj", torch::nn::Linear(16, 16)); }
  // Takes the tuple's elements in the opposite order, so that only name wiring gets it right.
  torch::Tensor forward(const torch::Tensor& gate, const torch::Tensor& value) {
    return proj(value) * gate;
  }
  torch::nn::Linear proj{nullptr};
};
TORCH_MODULE(Gate);

struct TupleChainImpl : torch::nn::Module {
  TupleChainImpl() {
    split = fusion::register_slot(*this, "split", Split());
    gate = fusion::register_slot(*this, "gate", Gate());
  }
  torch::Tensor forward(const torch::Tensor& h) {
    auto [value, gate_values] = split(h);
    return gate(gate_values, value);
  }
  fusion::Slot<Split> split;
  fusion::Slot<Gate> gate;
};
TORCH_MODULE(TupleChain);

/// A user type: IValue cannot hold it, so it travels in a capsule.
struct Tag {
  std::string name;
  double factor = 1;
};

struct MixImpl : torch::nn::Module {
  MixImpl() { proj = register_module("proj", torch::nn::Linear(16, 16)); }
  torch::Tensor forward(torch::Tensor x, c10::optional<torch::Tensor> bias, int64_t repeat,
                        double alpha, bool negate) {
    auto y = proj(x) * alpha;
    for (int64_t i = 1; i < repeat; ++i) y = y + proj(y) * alpha;
    if (bias.has_value()) y = y + *bias;
    return negate ? -y : y;
  }
  torch::nn::Linear proj{nullptr};
};
TORCH_MODULE(Mix);

struct TaggedImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x, const Tag& tag) {
    return x * (tag.name == "double" ? 2 * tag.factor : tag.factor);
  }
};
TORCH_MODULE(Tagged);

struct ArgsChainImpl : torch::nn::Module {
  ArgsChainImpl() {
    mix = fusion::register_slot(*this, "mix", Mix());
    tagged = fusion::register_slot(*this, "tagged", Tagged());
  }
  torch::Tensor forward(const torch::Tensor& h, c10::optional<torch::Tensor> bias, int64_t repeat,
                        double alpha, bool negate, const Tag& tag) {
    return tagged(mix(h, bias, repeat, alpha, negate), tag);
  }
  fusion::Slot<Mix> mix;
  fusion::Slot<Tagged> tagged;
};
TORCH_MODULE(ArgsChain);

/// forward() defaults declared with FORWARD_HAS_DEFAULT_ARGS.
struct ScaleShiftImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x, double scale = 2.0, int64_t shift = 1) {
    return x * scale + shift;
  }

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(2.0)}, {2, torch::nn::AnyValue(int64_t{1})})
};
TORCH_MODULE(ScaleShift);

/// A C++ default the library cannot see: the spec supplies it.
struct PowerImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x, double exponent = 3.0) { return x.pow(exponent); }
};
TORCH_MODULE(Power);

struct DefaultsChainImpl : torch::nn::Module {
  DefaultsChainImpl() {
    norm = fusion::register_slot(*this, "norm", RMSNorm(16));
    scale = fusion::register_slot(*this, "scale", ScaleShift());
    power = fusion::register_slot(*this, "power", Power());
  }
  torch::Tensor forward(const torch::Tensor& h) { return power(scale(norm(h))); }
  fusion::Slot<RMSNorm> norm;
  fusion::Slot<ScaleShift> scale;
  fusion::Slot<Power> power;
};
TORCH_MODULE(DefaultsChain);

/// Overloaded forward: the Slot names the signature to fuse.
struct OverloadedImpl : torch::nn::Module {
  OverloadedImpl() { proj = register_module("proj", torch::nn::Linear(16, 16)); }
  torch::Tensor forward(const torch::Tensor& x) { return proj(x); }
  torch::Tensor forward(const torch::Tensor& x, double scale) { return proj(x) * scale; }
  torch::nn::Linear proj{nullptr};
};
TORCH_MODULE(Overloaded);

/// Uses the first member's output twice: fusing this chain is wrong, and verify must say so.
struct ReusedImpl : torch::nn::Module {
  ReusedImpl() {
    norm = fusion::register_slot(*this, "norm", RMSNorm(16));
    mlp = fusion::register_slot(*this, "mlp", MLP(16, 24));
  }
  torch::Tensor forward(const torch::Tensor& h) {
    auto normed = norm(h);
    return mlp(normed) + normed;
  }
  fusion::Slot<RMSNorm> norm;
  fusion::Slot<MLP> mlp;
};
TORCH_MODULE(Reused);

inline fusion::ModuleSpec hidden_spec() {
  return fusion::ModuleSpec{{"hidden_states"}, {"hidden_states"}};
}

inline std::vector<std::string> block_patterns() {
  return {"layers.*.post_attention_layernorm", "layers.*.mlp"};
}
inline std::vector<fusion::ModuleSpec> block_specs() { return {hidden_spec(), hidden_spec()}; }

}  // namespace models
