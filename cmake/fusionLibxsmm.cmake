# libxsmm (Debian's libxsmm-dev, a static library) as one of the GEMM paths
# fusion::kernels::project measures (include/fusion/detail/libxsmm.hpp). Optional: where it is not
# found, or FUSION_USE_LIBXSMM is OFF, the headers compile without that path.
# Used by the build tree and by the installed fusionConfig.cmake, so a consumer links the
# libxsmm found on its own machine.
#
# libxsmm calls a BLAS for the shapes it has no kernel for; it gets the runtime libblas.so.3, the
# one LibTorch calls (FindBLAS would pick BLIS's once libblis-dev is installed). Its libxsmmnoblas
# must not be linked instead: its stub sgemm_, exported from the executable, would replace the
# BLAS LibTorch calls.
function(fusion_find_libxsmm out_include out_libraries)
  set(${out_include} "" PARENT_SCOPE)
  set(${out_libraries} "" PARENT_SCOPE)
  if(DEFINED FUSION_USE_LIBXSMM AND NOT FUSION_USE_LIBXSMM)
    return()
  endif()
  find_path(FUSION_LIBXSMM_INCLUDE_DIR libxsmm.h)
  find_library(FUSION_LIBXSMM_LIBRARY NAMES xsmm)
  find_library(FUSION_RUNTIME_BLAS NAMES libblas.so.3)
  find_package(Threads)
  if(FUSION_LIBXSMM_INCLUDE_DIR AND FUSION_LIBXSMM_LIBRARY AND FUSION_RUNTIME_BLAS
     AND Threads_FOUND)
    set(${out_include} ${FUSION_LIBXSMM_INCLUDE_DIR} PARENT_SCOPE)
    set(${out_libraries} ${FUSION_LIBXSMM_LIBRARY} ${FUSION_RUNTIME_BLAS} Threads::Threads
        ${CMAKE_DL_LIBS} PARENT_SCOPE)
  endif()
endfunction()
