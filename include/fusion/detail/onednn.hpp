// The bridge between LibTorch's blocked tensors and oneDNN's own primitives, where the build has
// oneDNN and ideep (FUSION_HAS_ONEDNN, cmake/fusionOneDnn.cmake): oneDNN 2.x with LibTorch 1.13
// (Debian bookworm), 3.x with LibTorch 2.x (sid's 2.14 links oneDNN 3.12).
// A blocked tensor (`x.to_mkldnn()`, the result of a blocked kernel) holds an ideep::tensor, which
// is a dnnl::memory. LibTorch exports the two functions that reach one and wrap one (declared in
// its ATen/native/mkldnn/MKLDNNCommon.h, which Debian does not install) and the oneDNN engine its
// ops run on. These are LibTorch internals (docs/compatibility.md lists them; the oneDNN
// convolution tests in tests/conv-kernel-test.cpp fail if one changes), and Debian builds LibTorch
// against the same libideep-dev and libdnnl the library is built with.
#pragma once

#if defined(FUSION_HAS_ONEDNN)

#include <utility>

#include <ATen/ATen.h>
#include <ideep.hpp>

namespace at::native {
TORCH_API ideep::tensor& itensor_from_mkldnn(const at::Tensor& tensor);
TORCH_API at::Tensor new_with_itensor_mkldnn(ideep::tensor&& it,
                                             c10::optional<c10::ScalarType> dtype,
                                             c10::optional<c10::Device> device);
}  // namespace at::native

namespace fusion::detail::onednn {

/// LibTorch's oneDNN engine (one per process, exported by LibTorch), and a stream on it.
inline const dnnl::engine& engine() { return ideep::engine::cpu_engine(); }
inline dnnl::stream& stream() {
  static thread_local dnnl::stream stream(ideep::engine::cpu_engine());
  return stream;
}

/// The oneDNN memory a blocked tensor holds (no copy).
inline const ideep::tensor& memory_of(const at::Tensor& blocked) {
  at::AutoDispatchBelowADInplaceOrView below;  // itensor_from_mkldnn asserts it
  return at::native::itensor_from_mkldnn(blocked);
}

/// A memory desc's dims and data type: oneDNN 3 renamed the accessors.
inline dnnl::memory::dims dims_of(const dnnl::memory::desc& desc) {
#if DNNL_VERSION_MAJOR >= 3
  return desc.get_dims();
#else
  return desc.dims();
#endif
}
inline dnnl::memory::data_type data_type_of(const dnnl::memory::desc& desc) {
#if DNNL_VERSION_MAJOR >= 3
  return desc.get_data_type();
#else
  return desc.data_type();
#endif
}

/// New memory in oneDNN's layout `desc`, for a result: the ideep::tensor owns the bytes (a
/// dnnl::memory copied from it does not), and as_blocked hands them to LibTorch.
inline ideep::tensor new_memory(const dnnl::memory::desc& desc) { return ideep::tensor(desc); }

/// `memory` (float32 or bfloat16) as a blocked tensor of its dtype (its owner from then on).
inline at::Tensor as_blocked(ideep::tensor memory) {
  at::AutoDispatchBelowADInplaceOrView below;
  const auto dtype =
      memory.get_data_type() == dnnl::memory::data_type::bf16 ? at::kBFloat16 : at::kFloat;
  return at::native::new_with_itensor_mkldnn(std::move(memory), dtype, at::Device(at::kCPU));
}

}  // namespace fusion::detail::onednn

namespace fusion::detail {

/// The format of `desc` among the plain, channels-last and channel-blocked ones LibTorch's blocked
/// tensors take; `any` for another.
inline dnnl::memory::format_tag format_of(const dnnl::memory::desc& desc) {
  using tag = dnnl::memory::format_tag;
  const auto dims = onednn::dims_of(desc);
  if (dims.size() != 4) return tag::any;
  for (const tag format : {tag::aBcd16b, tag::aBcd8b, tag::acdb, tag::abcd}) {
    if (dnnl::memory::desc(dims, onednn::data_type_of(desc), format) == desc) return format;
  }
  return tag::any;
}

}  // namespace fusion::detail

#endif
