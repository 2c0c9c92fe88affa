// What a kernel's prepared state was derived from, and the check, on every call with a prepared
// state, that every member tensor is still what it was.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>
#include <c10/core/Storage.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include "fusion/detail/libtorch.hpp"

namespace fusion::detail {

/// One parameter or buffer of a chain's members, as a prepared state saw it.
///
/// A data pointer alone cannot tell a new buffer from the old one: `set_data` and `to()` keep the
/// tensor's version counter, and the allocator may hand the new bytes the old address. So the
/// stamp holds a weak reference to the StorageImpl: while it is held, that object cannot be freed,
/// so no other storage can get its address, yet the weak count does not keep the bytes alive
/// (`release_resources` frees them when the last strong reference goes). A replaced storage,
/// whatever address its bytes get, is another StorageImpl. Beside it: the offset and element
/// count (a re-pointed view into the same storage), the version counter (in-place writes), the
/// dtype. Inference tensors have no version counter: in-place writes to them are not seen.
struct TensorStamp {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage{c10::intrusive_ptr<c10::StorageImpl>()};
  const void* data = nullptr;  // the storage's bytes: set_data_ptr on the same StorageImpl
  std::int64_t offset = 0, numel = -1;
  std::int64_t version = -1;  // -1: an inference tensor, which tracks no version
  c10::ScalarType dtype = c10::ScalarType::Undefined;

  static TensorStamp of(const at::Tensor& tensor) {
    TensorStamp stamp;
    if (!tensor.defined()) return stamp;
    c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
    stamp.storage = weak_storage(tensor);
    stamp.data = data_of(impl);
    stamp.offset = impl->storage_offset();
    stamp.numel = impl->numel();
    stamp.version = version_of(tensor);
    stamp.dtype = tensor.scalar_type();
    return stamp;
  }

  /// Whether `tensor` still has this stamp. On every call with a prepared state, for every member
  /// tensor: read straight from the TensorImpl (bench: BM_KernelDispatch8Sources).
  bool matches(const at::Tensor& tensor) const {
    if (!tensor.defined()) return numel < 0;
    c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
    // No device compare: a tensor moved to another device has another storage.
    return version_of(tensor) == version && storage_of(tensor) == target_of(storage) &&
           data_of(impl) == data && impl->storage_offset() == offset && impl->numel() == numel &&
           c10::typeMetaToScalarType(impl->dtype()) == dtype;
  }

 private:
  static const void* data_of(c10::TensorImpl* impl) {
    const c10::Storage& storage = impl->unsafe_storage();
    return storage ? storage.data() : nullptr;
  }
};

}  // namespace fusion::detail
