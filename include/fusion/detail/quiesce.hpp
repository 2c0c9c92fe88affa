// Quiesce: holds a set of chains' Slots while one fusion change is made, so that no forward on
// another thread sees half of it (the protocol: docs/internals.md).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "fusion/detail/chain.hpp"
#include "fusion/detail/slot_base.hpp"
#include "fusion/error.hpp"
#include "fusion/fused_chain.hpp"

namespace fusion::detail {

/// Holds the member Slots of `chains` while one fusion change (fuse, unfuse, a kernel attached,
/// verify switching a chain) is made: fused calls through them wait until it is released.
///
/// With `wait` zero, throws FusionError, holding nothing, when a chain is running on another
/// thread (a call in flight, or a pass between its first and last member) or another thread is
/// changing it: changing the fusion of a running model is refused, never a race. With a `wait`,
/// new passes wait at each chain's first member, passes in flight finish, then the change is made;
/// a FusionError only when that takes longer than `wait`. An interrupted pass on this thread (an
/// exception between members) is ended here, as the next call would end it.
///
/// Fusing (`drain` false) only holds the Slots against other changes: its Slots are not fused, so
/// a call in flight through one runs the module itself, and a pass that straddles the fuse
/// finishes unfused (Chain::outside_pass).
class Quiesce {
 public:
  Quiesce(const std::vector<std::shared_ptr<Chain>>& chains, const char* operation,
          std::chrono::milliseconds wait = std::chrono::milliseconds(0), bool drain = true)
      : operation_(operation), wait_(wait), deadline_(std::chrono::steady_clock::now() + wait) {
    std::size_t members = 0;
    for (const auto& chain : chains) members += chain->size();
    held_.reserve(members);  // before any Slot is held: push_back below cannot throw
    for (const auto& chain : chains) {
      Capture& own = chain->capture();
      if (own.in_pass) own.clear();
    }
    // First members first: a pass in flight goes on through the later members and ends.
    for (const auto& chain : chains) {
      if (SlotBase* first = chain->members_.front().slot) hold(*chain, first);
    }
    if (!drain) {
      for (const auto& chain : chains) {
        for (std::size_t m = 1; m < chain->members_.size(); ++m) {
          if (SlotBase* slot = chain->members_[m].slot) hold(*chain, slot);
        }
      }
      return;
    }
    for (const auto& chain : chains) {
      if (SlotBase* first = chain->members_.front().slot) {
        until(*chain, "a call of one of its members is in flight",
              [&] { return (first->guard_.load() & ~SlotBase::kChanging) == 0; });
      }
      until(*chain, "a forward pass through it is in flight",
            [&] { return chain->passes()->load() == 0; });
    }
    for (const auto& chain : chains) {
      for (std::size_t m = 1; m < chain->members_.size(); ++m) {
        SlotBase* slot = chain->members_[m].slot;
        if (slot == nullptr) continue;
        hold(*chain, slot);
        until(*chain, "a call of one of its members is in flight",
              [&] { return (slot->guard_.load() & ~SlotBase::kChanging) == 0; });
      }
    }
  }
  ~Quiesce() { release(); }
  Quiesce(const Quiesce&) = delete;
  Quiesce& operator=(const Quiesce&) = delete;

 private:
  void hold(const Chain& chain, SlotBase* slot) {
    until(chain, "another thread is changing its fusion at the same time",
          [&] { return (slot->guard_.fetch_or(SlotBase::kChanging) & SlotBase::kChanging) == 0; });
    held_.push_back(slot);
  }
  template <typename Done>
  void until(const Chain& chain, const char* why, Done done) {
    while (!done()) {
      if (std::chrono::steady_clock::now() >= deadline_) refuse(chain, why);
      std::this_thread::yield();
    }
  }
  void release() noexcept {
    for (SlotBase* slot : held_) slot->guard_.fetch_and(~SlotBase::kChanging);
    held_.clear();
  }
  [[noreturn]] void refuse(const Chain& chain, const char* why) {
    release();
    if (wait_.count() == 0) {
      fail(
          "fusion::{}: fused chain [{}] is in use on another thread ({}); change the fusion of a "
          "model only while no thread runs it, or give the change a wait. Nothing was changed",
          operation_, to_string(chain.info()), why);
    }
    fail(
        "fusion::{}: fused chain [{}] was still in use on another thread after {} ms ({}). "
        "Nothing was changed",
        operation_, to_string(chain.info()), wait_.count(), why);
  }

  const char* operation_;
  std::chrono::milliseconds wait_;
  std::chrono::steady_clock::time_point deadline_;
  std::vector<SlotBase*> held_;
};

}  // namespace fusion::detail
