// A convolution weight reordered into the layouts the library's oneDNN primitives read
// (detail/onednn_conv.hpp), one copy per layout, shared by the primitives made from the weight.
#pragma once

#if defined(FUSION_HAS_ONEDNN)

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include <torch/types.h>

#include "fusion/detail/onednn.hpp"

namespace fusion::detail {

/// A 2d convolution weight reordered into the layouts primitives read: one copy per layout,
/// shared by every primitive made from the weight, freed with the last of them. Primitives for
/// other input sizes, or with other post-ops, mostly read the same layout; without the sharing
/// each would hold its own copy.
class ReorderedWeights {
 public:
  /// `weight`: float32 or bfloat16 [out, in / groups, kh, kw].
  ReorderedWeights(torch::Tensor weight, int64_t groups)
      : weight_(weight.contiguous()), groups_(groups) {}

  /// The weight in layout `desc` (of the weight's dims, grouped [groups, out / groups, ...]
  /// where groups > 1), reordered where no primitive holds it yet.
  std::shared_ptr<const dnnl::memory> in(const dnnl::memory::desc& desc) const {
    return made(desc, [&](dnnl::memory& copy) {
      using tag = dnnl::memory::format_tag;
      dnnl::memory plain(
          {onednn::dims_of(desc), onednn::data_type_of(desc), groups_ > 1 ? tag::goihw : tag::oihw},
          onednn::engine(), weight_.data_ptr());
      dnnl::reorder(plain, copy).execute(onednn::stream(), plain, copy);
      onednn::stream().wait();
    });
  }

  /// A form of the weight that `make(memory)` writes into new memory of `desc`, made where no
  /// primitive holds one of that desc yet: a layout oneDNN reorders to (in), or one only the
  /// library computes (the Winograd transform, detail/winograd.hpp), whose dims tell it apart.
  template <typename Make>
  std::shared_ptr<const dnnl::memory> made(const dnnl::memory::desc& desc, Make&& make) const {
    std::lock_guard<std::mutex> lock(mutex_);
    copies_.erase(std::remove_if(copies_.begin(), copies_.end(),
                                 [](const auto& copy) { return copy.expired(); }),
                  copies_.end());
    for (const auto& held : copies_) {
      auto copy = held.lock();
      if (copy && copy->get_desc() == desc) return copy;
    }
    auto copy = std::make_shared<dnnl::memory>(desc, onednn::engine());  // owns its buffer
    make(*copy);
    copies_.push_back(copy);
    return copy;
  }

  /// The weight as given.
  const torch::Tensor& weight() const { return weight_; }

  /// The bytes of the copies primitives hold.
  std::uint64_t bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::uint64_t total = 0;
    for (const auto& held : copies_) {
      if (const auto copy = held.lock()) total += copy->get_desc().get_size();
    }
    return total;
  }

 private:
  torch::Tensor weight_;
  int64_t groups_;
  mutable std::mutex mutex_;
  mutable std::vector<std::weak_ptr<const dnnl::memory>> copies_;
};

}  // namespace fusion::detail

#endif
