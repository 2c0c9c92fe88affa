// A folded 2d convolution on a blocked input, run by a oneDNN primitive the library makes
// (FUSION_HAS_ONEDNN; detail/onednn.hpp) instead of LibTorch's op, for what LibTorch's ops do not
// give:
// - Winograd for stride-1 3x3 convolutions on AVX-512: oneDNN 2.x's algorithm, or where oneDNN
//   has none (oneDNN 3 dropped it on CPUs) the library's own in float32 (detail/winograd.hpp). It
//   computes the same convolution with fewer multiplications and another rounding: within float32
//   tolerance of the direct convolution, not bitwise equal to it (docs/kernels.md). It is one of
//   the paths measured per shape (detail/blocked_conv_choice.hpp), kept only where it is faster.
// - Post-ops: the activation, and in a residual block the residual added (oneDNN's sum post-op)
//   with the ReLU after it, in the convolution's own pass over its output instead of two more.
// - The weight reordered once per layout an implementation reads (ReorderedWeights), shared by
//   the primitives of every input shape, algorithm and post-op made from that weight, and made
//   only for an algorithm that runs: one that lost the measurement of its shape is released.
// - In bfloat16 (a bfloat16 weight; float32 bias and accumulation), the same post-ops, where
//   LibTorch's bfloat16 convolutions have none, and the input's layout kept (Layout::input).
#pragma once

#if defined(FUSION_HAS_ONEDNN)

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/types.h>

#include "fusion/detail/blocked_conv_choice.hpp"
#include "fusion/detail/onednn.hpp"
#include "fusion/detail/onednn_post_ops.hpp"
#include "fusion/detail/onednn_weights.hpp"
#include "fusion/detail/winograd.hpp"

namespace fusion::detail {

class OneDnnConv2d {
 public:
  enum class Algorithm { direct, winograd };
  /// Where the input and the result lie: in the layouts oneDNN prefers for the shape (an input
  /// in another is reordered first), or in the input's own, the result in the same format,
  /// where that is channel-blocked or channels-last (see keeps).
  enum class Layout { chosen, input };
  static constexpr std::size_t kShapes = 8;  // input shapes kept, least recently used out first

  /// `weight`: float32 or bfloat16 [out, in / groups, kh, kw], the dtype the primitive computes
  /// in (its input, result and residual); `bias`: float32 [out] or undefined. With `sum`, each
  /// call adds a residual to the result before `eltwise`. `reordered`: the copies of this weight
  /// that another primitive made from it holds, to share (null: its own).
  OneDnnConv2d(torch::Tensor weight, torch::Tensor bias, std::vector<int64_t> stride,
               std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
               std::optional<OneDnnEltwise> eltwise, bool sum, Layout layout = Layout::chosen,
               std::shared_ptr<const ReorderedWeights> reordered = nullptr)
      : weight_(weight.contiguous()),
        bias_(std::move(bias)),
        stride_(std::move(stride)),
        padding_(std::move(padding)),
        dilation_(std::move(dilation)),
        groups_(groups),
        eltwise_(eltwise),
        sum_(sum),
        layout_(layout),
        data_type_(weight_.scalar_type() == torch::kBFloat16 ? dnnl::memory::data_type::bf16
                                                             : dnnl::memory::data_type::f32),
        reordered_(reordered ? std::move(reordered)
                             : std::make_shared<const ReorderedWeights>(weight_, groups_)) {
    // The library's Winograd computes the ReLU and the sum only, and gives aBcd16b.
    const bool relu =
        eltwise_ && eltwise_->algorithm == dnnl::algorithm::eltwise_relu && eltwise_->alpha == 0.f;
    if ((!eltwise_ || relu) && layout_ == Layout::chosen &&
        WinogradConv2d::applies(weight_, stride_, padding_, dilation_, groups_)) {
      winograd_ = std::make_shared<const WinogradConv2d>(reordered_, bias_, relu, sum_);
    }
  }

  /// The weight's reordered copies, for another primitive made from the same weight to share.
  const std::shared_ptr<const ReorderedWeights>& reordered() const { return reordered_; }

  /// Whether the activation runs as the primitive's post-op.
  bool has_eltwise() const { return eltwise_.has_value(); }

  /// Whether a call on `input` keeps its layout: made with Layout::input, and the input not in
  /// the plain layout (`x.to_mkldnn()`'s), where oneDNN 2.x convolves with its much slower
  /// GEMM-based implementation; such an input is reordered as with Layout::chosen.
  bool keeps(const torch::Tensor& input) const {
    return layout_ == Layout::input && keeps(onednn::memory_of(input).get_desc());
  }

  /// Whether `algorithm` has an implementation for this blocked input. The first call of an
  /// input shape asks oneDNN for its implementations; a primitive and its weight are made on
  /// the first call that runs it.
  bool offers(const torch::Tensor& input, Algorithm algorithm) const {
    return prepared(input)->algorithms[static_cast<int>(algorithm)] != nullptr ||
           own_winograd(input, algorithm);
  }

  /// Frees the primitive `algorithm` made for inputs like `input`, and its weight where no other
  /// primitive reads that layout: for a path that lost the measurement of its shape (see
  /// release_lost). A later call that runs it makes them again.
  void release(const torch::Tensor& input, Algorithm algorithm) const {
    if (own_winograd(input, algorithm)) return winograd_->release();
    const auto shape = prepared(input);
    const auto& chosen = shape->algorithms[static_cast<int>(algorithm)];
    if (!chosen) return;
    std::lock_guard<std::mutex> lock(mutex_);
    chosen->made.reset();
  }

  /// The sizes of the result for an input of `input`'s sizes.
  std::vector<int64_t> output_sizes(const torch::Tensor& input) const {
    std::vector<int64_t> sizes{input.size(0), weight_.size(0), 0, 0};
    for (int d = 0; d < 2; ++d) {
      const int64_t span = dilation_[d] * (weight_.size(2 + d) - 1) + 1;
      sizes[2 + d] = (input.size(2 + d) + 2 * padding_[d] - span) / stride_[d] + 1;
    }
    return sizes;
  }

  /// The convolution of a blocked input (+ `residual`, a blocked tensor of the result's sizes,
  /// where made with `sum`), then the activation: a new blocked tensor in the weight's dtype; or,
  /// with `overwrite_residual`, `residual` itself, computed over its own memory (the caller owns
  /// it; in the weight's dtype). An input or residual in the other dtype is converted first.
  /// `algorithm` must be offered for the input.
  torch::Tensor operator()(const torch::Tensor& input, Algorithm algorithm,
                           const torch::Tensor& residual = {},
                           bool overwrite_residual = false) const {
    if (own_winograd(input, algorithm)) {
      return (*winograd_)(input, residual, overwrite_residual);
    }
    const auto shape = prepared(input);
    const auto& chosen = shape->algorithms[static_cast<int>(algorithm)];
    TORCH_INTERNAL_ASSERT(chosen, "OneDnnConv2d: an algorithm not offered for this input");
    // The sum post-op reads the result's memory: without a residual it would add what is there.
    TORCH_INTERNAL_ASSERT(residual.defined() == sum_,
                          "OneDnnConv2d: a residual where made with sum");
    const Prepared& p = *chosen;
    const std::shared_ptr<const Made> made = make(p);
    dnnl::stream& stream = onednn::stream();
    dnnl::memory src = onednn::memory_of(input);
    if (src.get_desc() != p.src) {
      dnnl::memory reordered(p.src, onednn::engine());  // owns its buffer
      dnnl::reorder(src, reordered).execute(stream, src, reordered);
      src = reordered;
    }
    ideep::tensor fresh;
    dnnl::memory dst;
    if (residual.defined()) {
      dnnl::memory added = onednn::memory_of(residual);
      if (overwrite_residual && added.get_desc() == p.dst) {
        dst = added;  // the same memory
      } else {
        overwrite_residual = false;
        fresh = onednn::new_memory(p.dst);
        dst = fresh;
        dnnl::reorder(added, dst).execute(stream, added, dst);
      }
    } else {
      overwrite_residual = false;
      fresh = onednn::new_memory(p.dst);
      dst = fresh;
    }
    std::unordered_map<int, dnnl::memory> args{
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, *made->weights}, {DNNL_ARG_DST, dst}};
    if (bias_.defined()) {
      args.emplace(DNNL_ARG_BIAS, dnnl::memory({{weight_.size(0)},
                                                dnnl::memory::data_type::f32,
                                                dnnl::memory::format_tag::x},
                                               onednn::engine(), bias_.data_ptr()));
    }
    made->primitive.execute(stream, args);
    stream.wait();
    return overwrite_residual ? residual : onednn::as_blocked(std::move(fresh));
  }

 private:
  using Key = std::array<int64_t, 5>;  // the input's sizes and the thread count
  struct Made {
    dnnl::convolution_forward primitive;
    std::shared_ptr<const dnnl::memory> weights;  // in the layout the primitive reads
  };
  struct Prepared {
    dnnl::convolution_forward::primitive_desc pd;
    dnnl::memory::desc src, dst;
    mutable std::shared_ptr<const Made> made;  // null until it runs, and once released; mutex_
  };
  struct Shape {
    Key key;
    dnnl::memory::desc input;  // a kept input's layout; zero: any other (reordered)
    std::array<std::shared_ptr<const Prepared>, 2> algorithms;  // by Algorithm; null: none
  };

  std::shared_ptr<const Shape> prepared(const torch::Tensor& input) const {
    const Key key{input.size(0), input.size(1), input.size(2), input.size(3),
                  at::get_num_threads()};
    // Only a kept input's layout decides the primitive: any other is reordered to the one it
    // reads, so its primitives serve inputs of these sizes in every other layout.
    dnnl::memory::desc layout = onednn::memory_of(input).get_desc();
    if (!keeps(layout)) layout = dnnl::memory::desc();
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = shapes_.begin(); it != shapes_.end(); ++it) {
      if ((*it)->key == key && (*it)->input == layout) {
        std::rotate(it, it + 1, shapes_.end());  // most recently used last
        return shapes_.back();
      }
    }
    auto shape = std::make_shared<Shape>();
    shape->key = key;
    shape->input = layout;
    shape->algorithms[0] = prepare(key, layout, dnnl::algorithm::convolution_direct);
    shape->algorithms[1] = prepare(key, layout, dnnl::algorithm::convolution_winograd);
    if (shapes_.size() == kShapes) shapes_.erase(shapes_.begin());
    shapes_.push_back(std::move(shape));
    return shapes_.back();
  }

  /// The primitive for inputs of `key`'s sizes, or null where `algorithm` has none for them
  /// worth measuring (oneDNN's reference implementations never are). With Layout::chosen, oneDNN
  /// chooses the layouts of its input and result: an input in another is reordered first. So a
  /// result may come in a layout that a convolution LibTorch runs next must reorder, a cost no
  /// measurement of this call sees: ConvBatchNorm and ResidualBlock without grouped convolutions
  /// use them so, where every convolution they run can take what the one before gave.
  std::shared_ptr<const Prepared> prepare(const Key& key, const dnnl::memory::desc& input,
                                          dnnl::algorithm algorithm) const {
    using dnnl::memory;
    const auto f32 = memory::data_type::f32;  // the bias's
    const auto dt = data_type_;
    const auto any = memory::format_tag::any;
    const memory::dims src_dims{key[0], key[1], key[2], key[3]};
    memory::dims dst_dims{key[0], weight_.size(0), 0, 0};
    memory::dims strides, dilates, padding;
    for (int d = 0; d < 2; ++d) {
      const int64_t span = dilation_[d] * (weight_.size(2 + d) - 1) + 1;
      dst_dims[2 + d] = (key[2 + d] + 2 * padding_[d] - span) / stride_[d] + 1;  // output_sizes
      strides.push_back(stride_[d]);
      dilates.push_back(dilation_[d] - 1);  // oneDNN counts the gaps
      padding.push_back(padding_[d]);
    }
    // The weight as it is: [out, in / groups, kh, kw], or grouped [groups, out / groups, ...].
    const auto w = weight_.sizes();
    const bool grouped = groups_ > 1;
    const memory::dims weight_dims = grouped
                                         ? memory::dims{groups_, w[0] / groups_, w[1], w[2], w[3]}
                                         : memory::dims{w[0], w[1], w[2], w[3]};
    const memory::desc bias_desc =
        bias_.defined() ? memory::desc({w[0]}, f32, memory::format_tag::x) : memory::desc();
    dnnl::post_ops post_ops;
    if (sum_) post_ops.append_sum(1.f);
    if (eltwise_) {
#if DNNL_VERSION_MAJOR >= 3
      post_ops.append_eltwise(eltwise_->algorithm, eltwise_->alpha, eltwise_->beta);
#else
      post_ops.append_eltwise(1.f, eltwise_->algorithm, eltwise_->alpha, eltwise_->beta);
#endif
    }
    dnnl::primitive_attr attr;
    attr.set_post_ops(post_ops);

    dnnl::convolution_forward::primitive_desc pd;
    const bool kept = keeps(input);
    const memory::desc src = kept ? input : memory::desc(src_dims, dt, any),
                       weights(weight_dims, dt, any),
                       dst(dst_dims, dt, kept ? format_of(input) : any);
    const auto inference = dnnl::prop_kind::forward_inference;
    try {
#if DNNL_VERSION_MAJOR >= 3
      pd = dnnl::convolution_forward::primitive_desc(onednn::engine(), inference, algorithm, src,
                                                     weights, bias_desc, dst, strides, dilates,
                                                     padding, padding, attr);
#else
      pd = dnnl::convolution_forward::primitive_desc(
          {inference, algorithm, src, weights, bias_desc, dst, strides, dilates, padding, padding},
          attr, onednn::engine());
#endif
    } catch (const dnnl::error&) {
      return nullptr;  // no implementation for this algorithm, shape and these post-ops
    }
    if (std::string(pd.impl_info_str()).rfind("ref", 0) == 0) {
      return nullptr;
    }
    auto p = std::make_shared<Prepared>();
    p->pd = pd;
    p->src = pd.src_desc();
    p->dst = pd.dst_desc();
    return p;
  }

  /// `p`'s primitive and weight, made where they are not.
  std::shared_ptr<const Made> make(const Prepared& p) const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!p.made) {
      p.made = std::make_shared<const Made>(
          Made{dnnl::convolution_forward(p.pd), reordered_->in(p.pd.weights_desc())});
    }
    return p.made;
  }

  /// Whether `algorithm` for `input` is the library's Winograd: where oneDNN has none.
  bool own_winograd(const torch::Tensor& input, Algorithm algorithm) const {
    return algorithm == Algorithm::winograd && winograd_ &&
           !prepared(input)->algorithms[static_cast<int>(algorithm)];
  }

  bool keeps(const dnnl::memory::desc& input) const {
    using tag = dnnl::memory::format_tag;
    const tag format = format_of(input);
    return layout_ == Layout::input && onednn::data_type_of(input) == data_type_ &&
           (format == tag::aBcd16b || format == tag::aBcd8b || format == tag::acdb);
  }

  torch::Tensor weight_, bias_;
  std::vector<int64_t> stride_, padding_, dilation_;
  int64_t groups_;
  std::optional<OneDnnEltwise> eltwise_;
  bool sum_;
  Layout layout_;
  dnnl::memory::data_type data_type_;
  std::shared_ptr<const ReorderedWeights> reordered_;
  std::shared_ptr<const WinogradConv2d> winograd_;  // null where it does not apply
  mutable std::mutex mutex_;
  mutable std::vector<std::shared_ptr<const Shape>> shapes_;
};

/// For run_blocked_conv's `lost`: releases what `conv` made for `input` to run a path that lost
/// the measurement (the library's primitives'; others hold nothing here).
inline void release_lost(const OneDnnConv2d& conv, const torch::Tensor& input,
                         kernels::BlockedConvPath lost) {
  using Path = kernels::BlockedConvPath;
  using Algorithm = OneDnnConv2d::Algorithm;
  if (lost == Path::onednn) conv.release(input, Algorithm::direct);
  if (lost == Path::winograd) conv.release(input, Algorithm::winograd);
}

}  // namespace fusion::detail

#endif
