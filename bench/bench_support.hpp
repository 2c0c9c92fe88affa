// Shared by the benchmarks. add_blas_context records which BLAS kernels and how many threads a
// benchmark ran with, in the benchmark's context header: Debian's LibTorch links whatever
// libblas.so.3 points to, and OpenBLAS 0.3.21 detects some virtual CPUs as "Prescott" and runs
// generic kernels, much slower (docs/performance.md; OPENBLAS_CORETYPE overrides it).
#pragma once

#include <dlfcn.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <fusion/detail/blis.hpp>
#include <fusion/detail/libxsmm.hpp>

/// The CPU's model name, family, and whether it has AVX-512F and AVX512_BF16 (from /proc/cpuinfo).
inline std::string cpu_description() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line, model = "?", family = "?", flags;
  while (std::getline(cpuinfo, line)) {
    const auto value =
        line.substr(line.find(':') == std::string::npos ? line.size() : line.find(':') + 1);
    const auto trimmed = value.empty() || value[0] != ' ' ? value : value.substr(1);
    if (line.rfind("model name", 0) == 0) model = trimmed;
    if (line.rfind("cpu family", 0) == 0) family = trimmed;
    if (line.rfind("flags", 0) == 0) {
      flags = " " + trimmed + " ";
      break;
    }
  }
  const bool avx512 = flags.find(" avx512f ") != std::string::npos;
  const bool bf16 = flags.find(" avx512_bf16 ") != std::string::npos;
  return model + ", family " + family + (avx512 ? ", AVX-512" : ", no AVX-512") +
         (bf16 ? ", AVX512_BF16" : "");
}

inline void add_blas_context() {
  benchmark::AddCustomContext("cpu", cpu_description());
  const char* no_avx512 = std::getenv("FUSION_NO_AVX512");
  benchmark::AddCustomContext("fusion_avx512_loops", no_avx512 != nullptr
                                                         ? "off (FUSION_NO_AVX512)"
                                                         : "on where the CPU has them");
  using CoreName = char* (*)();
  auto core = reinterpret_cast<CoreName>(::dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  benchmark::AddCustomContext("blas", core != nullptr ? std::string("OpenBLAS, core ") + core()
                                                      : std::string("not OpenBLAS"));
  benchmark::AddCustomContext("blis",
                              fusion::detail::Blis::instance().available()
                                  ? std::string("BLIS ") + fusion::detail::Blis::instance().version
                                  : std::string("not found (or FUSION_NO_BLIS)"));
  benchmark::AddCustomContext("libxsmm", fusion::detail::libxsmm_available()
                                             ? "compiled in"
                                             : "not compiled in (or FUSION_NO_LIBXSMM)");
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

/// Times every entry of `runs` once per iteration, rotating which goes first, so that machine
/// noise hits them alike. Reports each one's mean time in `unit` (counter <name>_<unit>) and its
/// ratio to the first entry (counter <name>_x).
inline void time_rotating(benchmark::State& state,
                          const std::vector<std::pair<std::string, std::function<void()>>>& runs,
                          const std::string& unit, double per_second) {
  using Clock = std::chrono::steady_clock;
  std::vector<double> seconds(runs.size(), 0.0);
  std::size_t first = 0;
  for (auto _ : state) {
    for (std::size_t k = 0; k < runs.size(); ++k) {
      const std::size_t i = (first + k) % runs.size();
      const auto start = Clock::now();
      runs[i].second();
      seconds[i] += std::chrono::duration<double>(Clock::now() - start).count();
    }
    first = (first + 1) % runs.size();
  }
  const double n = static_cast<double>(state.iterations());
  for (std::size_t i = 0; i < runs.size(); ++i) {
    state.counters[runs[i].first + "_" + unit] = per_second * seconds[i] / n;
    if (i > 0) state.counters[runs[i].first + "_x"] = seconds[i] / seconds[0];
  }
}

/// Times `original()` and `fused()` with time_rotating; also reports the fused overhead in percent.
template <typename Original, typename Fused>
void time_interleaved(benchmark::State& state, Original&& original, Fused&& fused,
                      const std::string& unit, double per_second) {
  time_rotating(state, {{"original", original}, {"fused", fused}}, unit, per_second);
  state.counters["overhead_pct"] = 100.0 * (state.counters["fused_x"] - 1.0);
  state.counters.erase("fused_x");
}

/// A prompt forward of `ids` through three language models with the same weights, `unfused`,
/// `replay` and `kernel` (each with `forward(ids, cache)`), timed with time_rotating after
/// checking that the kernel's logits are the unfused model's within 1e-3.
template <typename Model>
void time_chain_variants(benchmark::State& state, Model& unfused, Model& replay, Model& kernel,
                         const torch::Tensor& ids) {
  const torch::Tensor expected = unfused->forward(ids, nullptr);
  const torch::Tensor got = kernel->forward(ids, nullptr);
  if ((got - expected).abs().max().item<double>() > 1e-3) {
    state.SkipWithError("kernel logits differ");
    return;
  }
  time_rotating(state,
                {{"unfused", [&] { benchmark::DoNotOptimize(unfused->forward(ids, nullptr)); }},
                 {"replay", [&] { benchmark::DoNotOptimize(replay->forward(ids, nullptr)); }},
                 {"kernel", [&] { benchmark::DoNotOptimize(kernel->forward(ids, nullptr)); }}},
                "ms", 1e3);
}

/// This process's resident memory in bytes (Linux), for memory comparisons.
inline double resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  double pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<double>(::sysconf(_SC_PAGESIZE));
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
