// The two roles a fused Slot dispatches to: Collector for members 0..n-2 (stores their arguments
// for the replay), FusedModule for the last (runs the kernel, or replays the chain).
#pragma once

#include <cstddef>
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/ivalue.h>
#include <fmt/format.h>

#include "fusion/detail/blocked_layout.hpp"
#include "fusion/detail/capture.hpp"
#include "fusion/detail/chain.hpp"
#include "fusion/detail/slot_base.hpp"

namespace fusion::detail {

/// Members 0..n-2: stores the call arguments and mode for the replay; the Slot returns a
/// placeholder.
class Collector final : public Dispatch {
 public:
  Collector(const Chain& chain, std::size_t index) : Dispatch(true), chain_(chain), index_(index) {}

  std::vector<c10::IValue>* call(c10::IValue* args, std::size_t count) override {
    Capture& capture = chain_.capture();
    if (index_ == 0) {
      // A new pass. A completed replay left the capture clear; anything else is what an aborted
      // pass left (an exception thrown between capture and replay): drop it, so that it cannot
      // poison this forward.
      if (capture.next != 0) capture.clear();
      capture.begin_pass(chain_.passes());
    } else if (chain_.outside_pass(capture, index_, args, count)) {
      return finish_unfused();
    } else if (capture.next != index_) {
      chain_.fail_call(capture, order_error(capture.next));
    }
    auto& stored = capture.args[index_];
    stored.assign(std::make_move_iterator(args), std::make_move_iterator(args + count));
    capture.modes[index_] = Mode::current();
    capture.next = index_ + 1;
    return nullptr;
  }

 private:
  std::string order_error(std::size_t next) const {
    const auto& paths = chain_.info().paths;
    if (next > index_) {
      return fmt::format(
          "'{}' was called twice in one pass (its chain expects each member once, "
          "in order)",
          paths[index_]);
    }
    return fmt::format(
        "'{}' was called before '{}' on this thread; a fused chain's members "
        "must be called in order, in one pass, on one thread",
        paths[index_], paths[next]);
  }

  const Chain& chain_;
  std::size_t index_;
};

/// The last member: replays the whole chain from the captured inputs.
class FusedModule final : public Dispatch {
 public:
  explicit FusedModule(const Chain& chain) : Dispatch(false), chain_(chain) {}

  std::vector<c10::IValue>* call(c10::IValue* args, std::size_t count) override {
    // Taken before anything else runs: they are for this call (detail/blocked_layout.hpp).
    const bool blocked_request = BlockedHandOff::take_request();
    const bool blocked_input = BlockedHandOff::take_handed_in();
    Capture& capture = chain_.capture();
    struct EndPass {
      Capture& capture;
      ~EndPass() { capture.end_pass(); }
    } end_pass{capture};
    const std::size_t last = chain_.size() - 1;
    if (chain_.outside_pass(capture, last, args, count)) return finish_unfused();
    if (capture.next != last) {
      const auto& paths = chain_.info().paths;
      chain_.fail_call(capture, fmt::format("the fused module '{}' was called before '{}'",
                                            paths[last], paths[capture.next]));
    }
    auto& stored = capture.args[last];
    stored.assign(std::make_move_iterator(args), std::make_move_iterator(args + count));
    capture.modes[last] = Mode::current();
    if (const auto& kernel = chain_.kernel()) {
      // Asked only for a hand-off: for a kernel with state it compares the stamps.
      const bool blocked = (blocked_request || blocked_input) && kernel->blocked_layout_now();
      if (blocked_input && !blocked) to_dense(stored);
      const BlockedHandOff::Grant grant(blocked_request && blocked);
      if (std::vector<c10::IValue>* outputs = kernel->try_run(chain_, capture)) return outputs;
    }
    if (blocked_input) to_dense(stored);  // the modules get what the unfused model gives them
    return chain_.replay(capture);
  }

 private:
  /// As detail/hand_off.hpp's: float32, what the unfused model gives (a bfloat16 kernel's blocked
  /// result included).
  static void to_dense(std::vector<c10::IValue>& values) {
    for (auto& value : values) {
      if (value.isTensor() && value.toTensor().is_mkldnn()) {
        value = value.toTensor().to_dense(at::kFloat);
      }
    }
  }

  const Chain& chain_;
};

/// Defined here, after the roles it creates (chain.hpp declares it).
inline Chain::Chain(FusedChain info, std::vector<Member> members)
    : info_(std::move(info)), members_(std::move(members)) {
  for (std::size_t i = 0; i + 1 < members_.size(); ++i) {
    roles_.push_back(std::make_unique<Collector>(*this, i));
  }
  roles_.push_back(std::make_unique<FusedModule>(*this));
  for (std::size_t i = 0; i < members_.size(); ++i) {
    for (std::size_t p = 0; p < members_[i].origins.size(); ++p) {
      if (members_[i].origins[p].kind == Origin::Kind::call) free_inputs_.push_back({i, p});
    }
  }
}

}  // namespace fusion::detail
