#include <torch/torch.h>
#include <fusion/fusion.hpp>

#include <iostream>

struct NetImpl : torch::nn::Module {
  NetImpl() {
    first = fusion::register_slot(*this, "first", torch::nn::Linear(4, 4));
    second = fusion::register_slot(*this, "second", torch::nn::Linear(4, 2));
  }
  torch::Tensor forward(const torch::Tensor& x) { return second(first(x)); }
  fusion::Slot<torch::nn::Linear> first, second;
};
TORCH_MODULE(Net);

int main() {
  Net net;
  const auto x = torch::randn({3, 4});
  const auto original = net(x);
  fusion::fuse_modules(net, {"first", "second"},
                       {fusion::ModuleSpec{{"x"}, {"y"}}, fusion::ModuleSpec{{"y"}, {"z"}}});
  const bool same = torch::equal(net(x), original) && fusion::fused_chains(net).size() == 1;
  std::cout << (same ? "consumer: fused output identical\n" : "consumer: MISMATCH\n");
  return same ? 0 : 1;
}
