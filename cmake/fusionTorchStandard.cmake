# The C++ standard the LibTorch found needs: 17, or 20 from the releases whose <torch/all.h>
# refuses anything older (2.14 in Debian sid). TorchConfig.cmake records it only as the torch
# target's CXX_STANDARD, which does not reach the targets that link torch; fusion passes it on.
# Used by the build tree and by the installed fusionConfig.cmake, so a consumer gets what its own
# LibTorch needs, and no more than C++17 where that suffices.
function(fusion_torch_cxx_standard out)
  set(standard 17)
  foreach(dir IN LISTS TORCH_INCLUDE_DIRS)
    if(EXISTS "${dir}/torch/all.h")
      file(STRINGS "${dir}/torch/all.h" requires_cxx20 REGEX "__cplusplus < 202002L")
      if(requires_cxx20)
        set(standard 20)
      endif()
      break()
    endif()
  endforeach()
  set(${out} ${standard} PARENT_SCOPE)
endfunction()
