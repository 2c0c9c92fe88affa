#include "pair.hpp"

std::size_t fuse_in_b(PairImpl& model) {
  fusion::FuseOptions options;
  options.kernel = "two_libraries.doubling";
  return fusion::fuse_modules(model, {"first", "second"},
                              {fusion::ModuleSpec{{"x"}, {"x"}}, fusion::ModuleSpec{{"x"}, {"x"}}},
                              options)
      .size();
}

namespace {
struct Tripling {
  torch::Tensor operator()(torch::nn::IdentityImpl&, torch::nn::IdentityImpl&,
                           const torch::Tensor& x) const {
    return x * 3;
  }
};
}  // namespace

bool register_once_in_b() {
  // The same group as a's registration: already run there, so this does nothing (a static in
  // each library would run it twice, and the second registration of the name would fail).
  return fusion::register_kernels_once(
      "two_libraries", [] { fusion::register_kernel("two_libraries.doubling", Tripling{}); });
}

std::vector<std::string> kernels_seen_by_b() { return fusion::registered_kernels(); }

std::string report_from_b(PairImpl& model) { return fusion::report(model); }
