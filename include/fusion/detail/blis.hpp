// BLIS as one of the GEMM paths fusion::kernels::project measures, where the system has it
// (Debian: libblis4). Loaded at run time, privately: linked, or opened into the global scope, its
// sgemm_ would replace the BLAS LibTorch calls. BLIS picks its kernels for the CPU it runs on
// (one build for every x86-64 generation), which is what makes it worth measuring where
// OpenBLAS 0.3.21 runs generic kernels on an AVX-512 CPU; and it takes any row and column strides,
// so a weight stored [out, in] or [in, out] is read in place.
#pragma once

#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>

#include "fusion/detail/abi.hpp"

namespace fusion::detail {

/// bli_sgemm and bli_thread_set_num_threads from libblis (BLIS's typed API, stable since 0.5:
/// trans_t an enum, dim_t and inc_t 64-bit on 64-bit targets).
struct Blis {
  using Gemm = void (*)(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                        const float* alpha, const float* a, int64_t a_row_stride,
                        int64_t a_column_stride, const float* b, int64_t b_row_stride,
                        int64_t b_column_stride, const float* beta, float* c, int64_t c_row_stride,
                        int64_t c_column_stride);
  using SetThreads = void (*)(int64_t threads);
  using Version = const char* (*)();
  Gemm gemm = nullptr;
  SetThreads set_threads = nullptr;
  const char* version = "none";

  /// Whether BLIS was found (and FUSION_NO_BLIS is unset).
  bool available() const { return gemm != nullptr && set_threads != nullptr; }

  static const Blis& instance() {
    static const Blis blis = load();
    return blis;
  }

 private:
  static Blis load() {
    Blis blis;
    if (std::getenv("FUSION_NO_BLIS") != nullptr || sizeof(void*) != 8) return blis;
    for (const char* name : {"libblis.so.4", "libblis.so.5", "libblis.so"}) {
      void* library = ::dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (library == nullptr) continue;
      blis.gemm = reinterpret_cast<Gemm>(::dlsym(library, "bli_sgemm"));
      blis.set_threads =
          reinterpret_cast<SetThreads>(::dlsym(library, "bli_thread_set_num_threads"));
      if (auto version = reinterpret_cast<Version>(::dlsym(library, "bli_info_get_version_str"))) {
        blis.version = version();
      }
      if (blis.available()) return blis;
      blis = Blis();
    }
    return blis;
  }
};

/// y [m, n] = x [m, k] times the weight, all float32 row-major; the weight stored [n, k]
/// (`in_out` false) or [k, n]; on `threads` threads.
inline void blis_gemm(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n,
                      bool in_out, int threads) {
  const auto& blis = Blis::instance();
  const float one = 1, zero = 0;
  // BLIS's thread count is process-wide; every call sets the one it runs with.
  blis.set_threads(threads);
  blis.gemm(/*BLIS_NO_TRANSPOSE*/ 0, 0, m, n, k, &one, x, k, 1, w, in_out ? n : 1, in_out ? 1 : k,
            &zero, y, n, 1);
}

}  // namespace fusion::detail
