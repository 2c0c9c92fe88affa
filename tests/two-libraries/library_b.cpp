#include "pair.hpp"

std::size_t fuse_in_b(PairImpl& model) {
  fusion::FuseOptions options;
  options.kernel = "two_libraries.doubling";
  return fusion::fuse_modules(model, {"first", "second"},
                              {fusion::ModuleSpec{{"x"}, {"x"}}, fusion::ModuleSpec{{"x"}, {"x"}}},
                              options)
      .size();
}

std::vector<std::string> kernels_seen_by_b() { return fusion::registered_kernels(); }

std::string report_from_b(PairImpl& model) { return fusion::report(model); }
