// The placeholder a collector returns for a result that only the replay computes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Optional.h>
#include <c10/util/SmallVector.h>

#include "fusion/detail/abi.hpp"
#include "fusion/detail/libtorch.hpp"

namespace fusion::detail {

inline namespace FUSION_ABI_VERSION {

struct PlaceholderStore {
  at::Tensor scalar;  // the one element every placeholder of this dtype and device views
  at::Tensor last;    // the last placeholder made, reused once nothing else holds it
};
/// This thread's placeholder storages: one entry per (dtype, device) it has seen.
FUSION_API inline std::vector<PlaceholderStore>& placeholder_store() {
  thread_local std::vector<PlaceholderStore> cache;
  return cache;
}

}  // namespace FUSION_ABI_VERSION

/// Whether `value` is or holds (in an optional or a list) a tensor placeholder made on this thread.
inline bool holds_placeholder(const c10::IValue& value) {
  if (value.isTensor()) {
    const at::Tensor& tensor = value.toTensor();
    if (!tensor.defined()) return false;
    const c10::StorageImpl* storage = storage_of(tensor);
    for (const PlaceholderStore& entry : placeholder_store()) {
      if (storage != nullptr && storage == storage_of(entry.scalar)) return true;
    }
    return false;
  }
  if (value.isList()) {
    for (const c10::IValue& element : value.toListRef()) {
      if (holds_placeholder(element)) return true;
    }
  }
  return false;
}

/// A tensor with `like`'s shape, dtype and device that shares no memory with it: one element of
/// this thread's placeholder storage for that dtype and device, expanded (all strides 0). A parent
/// may read its metadata and pass it on to the next member. Anything else is not replayed; an
/// in-place write on it fails in ATen ("more than one element of the written-to tensor refers to
/// a single memory location") instead of silently writing into the caller's tensor, and floating
/// placeholders read as NaN, so arithmetic on one shows. Cheap because it is on every fused call:
/// the view is built directly (expanded_view), and reused on the next call when nobody kept it.
inline at::Tensor placeholder_for(const at::Tensor& like) {
  if (!like.defined()) return like;
  // oneDNN's opaque layout has no empty_like (no strides): a fresh tensor of that layout.
  if (like.is_mkldnn()) return at::empty(like.sizes(), like.options());
  if (like.layout() != at::kStrided || like.is_quantized()) return at::empty_like(like);
  std::vector<PlaceholderStore>& cache = placeholder_store();
  PlaceholderStore* entry = nullptr;
  for (PlaceholderStore& candidate : cache) {
    if (candidate.scalar.scalar_type() == like.scalar_type() &&
        candidate.scalar.device() == like.device()) {
      entry = &candidate;
      break;
    }
  }
  if (entry == nullptr) {
    c10::InferenceMode normal(false);  // an ordinary tensor, usable in and out of InferenceMode
    const bool floating =
        at::isFloatingType(like.scalar_type()) || at::isComplexType(like.scalar_type());
    cache.push_back({at::full({}, floating ? std::numeric_limits<double>::quiet_NaN() : 0.0,
                              like.options().requires_grad(false)),
                     at::Tensor()});
    entry = &cache.back();
  }
  // The last placeholder, if only this cache holds it and nothing changed it (a parent may have
  // called a metadata-changing op such as unsqueeze_ or requires_grad_ on it).
  at::Tensor& last = entry->last;
  if (last.defined() && last.use_count() == 1 && last.sizes() == like.sizes() &&
      !last.requires_grad() && last.storage_offset() == 0 &&
      last.unsafeGetTensorImpl()->storage().data() == entry->scalar.data_ptr() &&
      std::all_of(last.strides().begin(), last.strides().end(),
                  [](int64_t stride) { return stride == 0; })) {
    return last;
  }
  at::Tensor view = expanded_view(entry->scalar, like.sizes());
  if (!last.defined() || last.use_count() == 1) last = view;
  return view;
}

/// Values other than tensors are copies already: nothing of the caller's can be written through.
template <typename T>
T placeholder_for(const T& value) {
  return value;
}
template <typename T>
c10::optional<T> placeholder_for(const c10::optional<T>& value) {
  return value.has_value() ? c10::optional<T>(placeholder_for(*value)) : value;
}
// On LibTorch 1.13 std::optional is another type, whose tensor must not be copied either; on 2.x
// it is c10::optional and this overload drops out.
template <typename T,
          typename = std::enable_if_t<!std::is_same_v<std::optional<T>, c10::optional<T>>>>
std::optional<T> placeholder_for(const std::optional<T>& value) {
  return value.has_value() ? std::optional<T>(placeholder_for(*value)) : value;
}

}  // namespace fusion::detail
