// Two shared libraries built with -fvisibility=hidden, both including the library: a model built
// and run in one is fused in the other with a kernel the first registered. Each step needs one
// slot table, one kernel registry and one capture store per process (detail/abi.hpp).
#include <algorithm>
#include <iostream>

#include "pair.hpp"

int main() {
  auto model = make_pair_model();
  register_doubling_kernel();
  const auto seen = kernels_seen_by_b();
  bool ok = std::find(seen.begin(), seen.end(), "two_libraries.doubling") != seen.end();
  std::cout << "b sees a's kernel: " << (ok ? "yes" : "NO") << "\n";
  const bool ran_again = register_once_in_b();
  std::cout << "a group registered in a, once in b: " << (ran_again ? "RAN AGAIN" : "not again")
            << "\n";
  ok = ok && !ran_again;
  try {
    ok = fuse_in_b(*model) == 1 && ok;  // b finds a's Slots and a's kernel
    model->eval();
    torch::NoGradGuard no_grad;
    const auto x = torch::ones({2, 3});
    const auto y = run_in_a(*model, x);  // a's Slots dispatch to b's roles and kernel binding
    const bool doubled = torch::equal(y, x * 2);
    std::cout << "fused in b, run in a, kernel ran: " << (doubled ? "yes" : "NO") << "\n";
    std::cout << report_from_b(*model);
    ok = ok && doubled;
  } catch (const fusion::FusionError& e) {  // caught across the libraries: one type
    std::cout << "FusionError: " << e.what() << "\n";
    ok = false;
  }
  std::cout << (ok ? "one library state per process\n" : "FAILED\n");
  return ok ? 0 : 1;
}
