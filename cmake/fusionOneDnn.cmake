# oneDNN's own convolution primitives (Debian's libdnnl-dev, the library Debian's LibTorch links,
# and libideep-dev, the headers of the oneDNN tensor type LibTorch's blocked tensors hold), for the
# folded convolutions on blocked inputs (include/fusion/detail/onednn_conv.hpp): Winograd and
# post-ops that LibTorch's own ops do not offer. Optional: where either is missing, oneDNN is not
# version 2 or 3 (LibTorch 1.13 on bookworm links 2.6; 2.14 on sid links 3.12), or
# FUSION_USE_ONEDNN is OFF, the headers compile without that path and the convolutions run through
# LibTorch's ops.
# Used by the build tree and by the installed fusionConfig.cmake.
function(fusion_find_onednn out_include out_libraries)
  set(${out_include} "" PARENT_SCOPE)
  set(${out_libraries} "" PARENT_SCOPE)
  if(DEFINED FUSION_USE_ONEDNN AND NOT FUSION_USE_ONEDNN)
    return()
  endif()
  find_path(FUSION_DNNL_INCLUDE_DIR oneapi/dnnl/dnnl.hpp)
  find_path(FUSION_IDEEP_INCLUDE_DIR ideep.hpp)
  find_library(FUSION_DNNL_LIBRARY NAMES dnnl)
  if(NOT (FUSION_DNNL_INCLUDE_DIR AND FUSION_IDEEP_INCLUDE_DIR AND FUSION_DNNL_LIBRARY))
    return()
  endif()
  file(STRINGS "${FUSION_DNNL_INCLUDE_DIR}/oneapi/dnnl/dnnl_version.h" major
       REGEX "^#define DNNL_VERSION_MAJOR [0-9]+")
  if(NOT major MATCHES " [23]$")
    return()
  endif()
  set(${out_include} ${FUSION_DNNL_INCLUDE_DIR} ${FUSION_IDEEP_INCLUDE_DIR} PARENT_SCOPE)
  set(${out_libraries} ${FUSION_DNNL_LIBRARY} PARENT_SCOPE)
endfunction()
