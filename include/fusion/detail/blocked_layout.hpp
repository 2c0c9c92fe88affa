// How a result stays in oneDNN's blocked layout from one kernel to the next (a CNN's activations
// reordered once on the way in and once on the way out, not around every kernel), while no code
// that is not such a kernel ever sees a blocked tensor it did not make.
//
// Only fusion::Sequential and fusion::sequence hand results on, because only they know what follows
// a call (detail/hand_off.hpp): for a Slot that is the last member of a chain with a kernel
// registered with KernelOptions::blocked_layout (and no first-call check pending), followed by a
// Slot whose kernel takes a blocked input, they request a blocked result before the call. The
// chain's call takes the request at once and grants it to its kernel only
// (detail/chain_roles.hpp), so a module the kernel's code calls never sees it; a kernel that
// reorders its result into the blocked layout says so. The next call gets the blocked tensor only
// if it is such a chain of one member (its kernel then reads it as its input; if the kernel
// declines the call, the replay gets it dense); any other call, and the caller, get it reordered
// to dense. All of it happens while the Slots are entered, so no fusion change can come between
// the check and the call.
#pragma once

#include <utility>

#include "fusion/detail/abi.hpp"

namespace fusion::detail {
inline namespace FUSION_ABI_VERSION {

class FUSION_API BlockedHandOff {
 public:
  /// fusion::Sequential, fusion::sequence: the Slot about to be called may keep its result blocked.
  static void request(bool value) noexcept { state().requested = value; }
  /// fusion::Sequential, fusion::sequence: the argument of the Slot about to be called was handed
  /// on blocked.
  static void hand_in(bool value) noexcept { state().handed_in = value; }
  /// A chain's call, first thing: whether its kernel may keep the result blocked.
  static bool take_request() noexcept { return std::exchange(state().requested, false); }
  /// A chain's call, first thing: whether its input came blocked from the call before.
  static bool take_handed_in() noexcept { return std::exchange(state().handed_in, false); }

  /// Set by a chain's call around its kernel's run only: what a kernel reads with take_grant.
  class Grant {
   public:
    explicit Grant(bool value) noexcept { state().granted = value; }
    ~Grant() { state().granted = false; }
    Grant(const Grant&) = delete;
    Grant& operator=(const Grant&) = delete;
  };
  /// A kernel, before it calls any module: whether it may keep its result blocked.
  static bool take_grant() noexcept { return std::exchange(state().granted, false); }
  /// A kernel that kept its result blocked says so; detail/hand_off.hpp takes it after the call.
  static void gave_blocked() noexcept { state().gave = true; }
  static bool take_gave() noexcept { return std::exchange(state().gave, false); }

 private:
  struct State {
    bool requested = false, handed_in = false, granted = false, gave = false;
  };
  static State& state() noexcept {
    static thread_local State value;
    return value;
  }
};

}  // namespace FUSION_ABI_VERSION
}  // namespace fusion::detail
