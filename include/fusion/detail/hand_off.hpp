// One call in a known sequence of calls (fusion::Sequential's entries, fusion::sequence's steps):
// the Slot's result stays in oneDNN's blocked layout when its kernel can give it so and something
// follows, and a blocked argument reaches the Slot only when its kernel takes it
// (detail/blocked_layout.hpp says who may see a blocked tensor).
#pragma once

#include <utility>

#include <torch/nn/modules/container/any_value.h>
#include <torch/types.h>

#include "fusion/detail/blocked_layout.hpp"
#include "fusion/detail/chain.hpp"
#include "fusion/detail/slot_base.hpp"

namespace fusion::detail {

/// What the unfused model gives in place of a blocked tensor: dense float32 (a bfloat16 kernel's
/// blocked result included, since blocked tensors come only from float32 models).
inline void to_dense(torch::Tensor& tensor) {
  if (tensor.is_mkldnn()) tensor = tensor.to_dense(torch::kFloat);
}
inline void to_dense(torch::nn::AnyValue& value) {
  if (auto* tensor = value.try_get<torch::Tensor>()) to_dense(*tensor);
}
inline const torch::Tensor* as_tensor(const torch::Tensor& tensor) { return &tensor; }
inline const torch::Tensor* as_tensor(torch::nn::AnyValue& value) {  // try_get is not const
  return value.try_get<torch::Tensor>();
}

/// Whether the entered `slot` is the last member of a chain whose kernel takes and gives blocked
/// tensors now.
inline bool gives_blocked(const SlotBase& slot) {
  const auto& chain = slot.chain();
  return chain != nullptr && slot.member_index() + 1 == chain->size() &&
         chain->kernel() != nullptr && chain->kernel()->blocked_layout_now();
}

/// Whether `slot` takes a blocked argument now: it is the only member of a chain whose kernel
/// takes blocked tensors. A hint for the call before it, which asks for a blocked result only where
/// the next call would not reorder it back at once; the next call's own check decides.
inline bool takes_blocked(SlotBase& slot) {
  if (!slot.dispatching()) return false;
  const bool takes = slot.enter() != nullptr && gives_blocked(slot) && slot.chain()->size() == 1;
  slot.leave();
  return takes;
}

/// Calls `slot` by `call()`, whose first argument is `*first` (null: none). `blocked`: in, whether
/// `first` was handed on blocked; out, whether the result is. `followed`: whether the next call
/// takes a blocked argument (takes_blocked).
template <typename Value, typename Call>
auto call_handing_on(SlotBase& slot, Value* first, bool& blocked, bool followed, Call&& call) {
  if (!blocked && !slot.dispatching()) return call();
  struct Leave {  // the Slot stays entered, so no fusion change comes between check and call
    SlotBase& slot;
    ~Leave() {
      BlockedHandOff::request(false);
      BlockedHandOff::hand_in(false);
      slot.leave();
    }
  };
  // The Slot is a chain's last member whose kernel may give a blocked result; and takes a blocked
  // argument, as the chain's only member.
  const bool gives = slot.enter() != nullptr && gives_blocked(slot);
  const Leave leave{slot};
  const bool takes = gives && slot.chain()->size() == 1;
  if (blocked && !takes) to_dense(*first);  // blocked: there is a first argument
  const bool handed_in = blocked && takes;
  BlockedHandOff::hand_in(handed_in);
  BlockedHandOff::request(gives && followed);
  BlockedHandOff::take_gave();
  auto result = call();
  const bool gave = BlockedHandOff::take_gave();
  // Blocked because of a hand-off: the kernel reordered it (gave), or computed it from a blocked
  // input it was handed. A blocked result of anything else is the caller's own layout.
  const torch::Tensor* tensor = as_tensor(result);
  blocked = gives && (gave || handed_in) && tensor != nullptr && tensor->is_mkldnn();
  return result;
}

}  // namespace fusion::detail
