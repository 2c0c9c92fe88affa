// The LibTorch internals the library relies on beyond its public API, each behind one function
// here (docs/compatibility.md lists them; tests/docs-test.cpp guards each, failing with a message
// that names the internal when a LibTorch changes it). The others: the AnyModuleHolder
// specialisation (default_args.hpp) and the prepacked oneDNN ops (folding.hpp).
#pragma once

#include <cstdint>

#include <ATen/ATen.h>
#include <c10/core/AutogradState.h>
#include <c10/core/Storage.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/SmallVector.h>
#include <c10/util/intrusive_ptr.h>

namespace fusion::detail {

/// A view of `scalar`'s one element with the given sizes and all strides 0, made directly
/// (at::detail::make_tensor): through the dispatcher, `expand` costs several times more, and a
/// placeholder is made on every fused call.
inline at::Tensor expanded_view(const at::Tensor& scalar, c10::IntArrayRef sizes) {
  at::Tensor view = at::detail::make_tensor<c10::TensorImpl>(
      c10::TensorImpl::VIEW, c10::Storage(scalar.storage()), scalar.key_set(), scalar.dtype());
  const c10::SmallVector<int64_t, 8> strides(sizes.size(), 0);
  view.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides);
  return view;
}

/// The StorageImpl a tensor's bytes live in, or null (no storage, or an opaque one): an identity
/// that a replaced storage does not share while something holds the old one (weak_storage).
inline const c10::StorageImpl* storage_of(const at::Tensor& tensor) {
  return tensor.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
}

/// A weak reference to the tensor's StorageImpl: keeps the object (so its address is not reused)
/// but not the bytes, which are freed when the last tensor lets go of them.
inline c10::weak_intrusive_ptr<c10::StorageImpl> weak_storage(const at::Tensor& tensor) {
  const c10::Storage& storage = tensor.unsafeGetTensorImpl()->unsafe_storage();
  return storage
             ? storage.getWeakStorageImpl()
             : c10::weak_intrusive_ptr<c10::StorageImpl>(c10::intrusive_ptr<c10::StorageImpl>());
}

/// The target a weak_storage() reference names (compared with storage_of, never dereferenced).
inline const c10::StorageImpl* target_of(const c10::weak_intrusive_ptr<c10::StorageImpl>& weak) {
  return weak._unsafe_get_target();
}

/// The tensor's version counter, moved by every in-place write; -1 for an inference tensor, which
/// has none.
inline std::int64_t version_of(const at::Tensor& tensor) {
  c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
  return impl->is_inference()
             ? -1
             : static_cast<std::int64_t>(impl->version_counter().current_version());
}

/// This thread's grad mode and inference mode, in one thread-local read.
inline const c10::AutogradState& autograd_state() { return c10::AutogradState::get_tls_state(); }

}  // namespace fusion::detail
