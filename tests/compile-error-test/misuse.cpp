// Each FUSION_CASE is a misuse that must fail to compile with the static_assert named in
// tests/CMakeLists.txt. FUSION_CASE 0 is the control: it must compile, proving the harness works.
#include <torch/torch.h>
#include <memory>

#include <fusion/fusion.hpp>

struct MutatesImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor& x) { return x.add_(1); }
};
TORCH_MODULE(Mutates);

struct OverloadedImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) { return x; }
  torch::Tensor forward(const torch::Tensor& x, double s) { return x * s; }
};
TORCH_MODULE(Overloaded);

struct NullaryImpl : torch::nn::Module {
  torch::Tensor forward() { return torch::ones({1}); }
};
TORCH_MODULE(Nullary);

struct TakesRvalueImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor&& x) { return x; }
};
TORCH_MODULE(TakesRvalue);

struct TakesUniqueImpl : torch::nn::Module {
  torch::Tensor forward(std::unique_ptr<int> p) { return torch::ones({*p}); }
};
TORCH_MODULE(TakesUnique);

struct FineImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) { return x; }
};
TORCH_MODULE(Fine);

#if FUSION_CASE >= 6
// Kernels over a FineImpl, each wrong in one way.
struct OverloadedKernel {
  torch::Tensor operator()(FineImpl&, const torch::Tensor& x) const { return x; }
  torch::Tensor operator()(FineImpl&, const torch::Tensor& x, double) const { return x; }
};
struct ConstModuleKernel {
  torch::Tensor operator()(const FineImpl&, const torch::Tensor& x) const { return x; }
};
struct StatelessCallKernel {  // prepare() without `const State&` first in operator()
  struct State {};
  State prepare(FineImpl&) const { return {}; }
  torch::Tensor operator()(FineImpl&, const torch::Tensor& x) const { return x; }
};
struct Opaque {};
#endif

struct ParentImpl : torch::nn::Module {
  ParentImpl() {
#if FUSION_CASE == 5
    fusion::register_slot(*this, "fine", Fine());  // forgot `fine =`
#else
    fine = fusion::register_slot(*this, "fine", Fine());
#endif
  }
  fusion::Slot<Fine> fine{nullptr};
};

int main() {
  ParentImpl parent;
#if FUSION_CASE == 0
  fusion::Slot<Fine> slot;
  fusion::Slot<Overloaded, torch::Tensor(const torch::Tensor&)> named;
#elif FUSION_CASE == 1
  fusion::Slot<Mutates> slot;
#elif FUSION_CASE == 2
  fusion::Slot<Overloaded> slot;
#elif FUSION_CASE == 3
  fusion::Slot<Nullary> slot;
#elif FUSION_CASE == 4
  fusion::Slot<TakesRvalue> slot;
#elif FUSION_CASE == 6
  fusion::register_kernel("overloaded", OverloadedKernel{});
#elif FUSION_CASE == 7
  fusion::register_kernel("const_module", ConstModuleKernel{});
#elif FUSION_CASE == 8
  fusion::register_kernel("stateless_call", StatelessCallKernel{});
#elif FUSION_CASE == 9
  fusion::verify(parent, [] { return Opaque{}; });
#elif FUSION_CASE == 10
  fusion::Slot<TakesUnique> slot;
#endif
  return 0;
}
