// Shared by the benchmarks. add_blas_context records which BLAS kernels and how many threads a
// benchmark ran with, in the benchmark's context header: Debian's LibTorch links whatever
// libblas.so.3 points to, and OpenBLAS 0.3.21 detects some virtual CPUs as "Prescott" and runs
// generic kernels ~4x slower (OPENBLAS_CORETYPE overrides it).
#pragma once

#include <dlfcn.h>

#include <chrono>
#include <cstdlib>
#include <string>

#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <torch/torch.h>

inline void add_blas_context() {
  using CoreName = char* (*)();
  auto core = reinterpret_cast<CoreName>(::dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  benchmark::AddCustomContext("blas", core != nullptr ? std::string("OpenBLAS, core ") + core()
                                                      : std::string("not OpenBLAS"));
  benchmark::AddCustomContext("torch_threads", std::to_string(at::get_num_threads()));
  const char* wait = std::getenv("OMP_WAIT_POLICY");
  benchmark::AddCustomContext("OMP_WAIT_POLICY", wait != nullptr ? wait : "(unset)");
}

/// Makes `copy` compute with `source`'s parameter tensors, so that an original and a fused model
/// can be timed side by side on the very same weights in memory.
inline void share_parameters(torch::nn::Module& copy, const torch::nn::Module& source) {
  auto from = source.named_parameters();
  for (auto& item : copy.named_parameters()) item.value().set_data(from[item.key()]);
}

/// Times `original()` and `fused()` back to back in every iteration, alternating which goes first,
/// so that machine noise hits both alike. Reports each one's mean time in `unit` (counters
/// original_<unit>, fused_<unit>) and the fused overhead in percent.
template <typename Original, typename Fused>
void time_interleaved(benchmark::State& state, Original&& original, Fused&& fused,
                      const std::string& unit, double per_second) {
  using Clock = std::chrono::steady_clock;
  auto timed = [](auto& run) {
    const auto start = Clock::now();
    run();
    return std::chrono::duration<double>(Clock::now() - start).count();
  };
  double original_s = 0, fused_s = 0;
  bool original_first = true;
  for (auto _ : state) {
    if (original_first) original_s += timed(original);
    fused_s += timed(fused);
    if (!original_first) original_s += timed(original);
    original_first = !original_first;
  }
  const double n = static_cast<double>(state.iterations());
  state.counters["original_" + unit] = per_second * original_s / n;
  state.counters["fused_" + unit] = per_second * fused_s / n;
  state.counters["overhead_pct"] = 100.0 * (fused_s / original_s - 1.0);
}

/// BENCHMARK_MAIN with the BLAS context recorded.
#define FUSION_BENCHMARK_MAIN()                                       \
  int main(int argc, char** argv) {                                   \
    add_blas_context();                                               \
    benchmark::Initialize(&argc, argv);                               \
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1; \
    benchmark::RunSpecifiedBenchmarks();                              \
    benchmark::Shutdown();                                            \
    return 0;                                                         \
  }
