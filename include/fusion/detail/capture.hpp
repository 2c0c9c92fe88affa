// Per-thread storage for the inputs collectors capture until their chain's fused module replays.
// Thread-local because one model may be called from many threads at once: each forward pass
// captures and replays on its own thread (a shared store raced and crashed in the prototype).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <vector>

#include <ATen/core/ivalue.h>
#include <c10/core/AutogradState.h>
#include <c10/core/InferenceMode.h>

#include "fusion/detail/abi.hpp"
#include "fusion/detail/libtorch.hpp"

namespace fusion::detail {

/// The thread-local autograd mode a member was called in. The replay runs each member in its own
/// mode: a parent may call one member under NoGradGuard (a frozen norm) and the next one with
/// gradients, and replaying both in the last member's mode would change the gradients.
struct Mode {
  bool grad = true;
  bool inference = false;

  static Mode current() noexcept {
    const c10::AutogradState& state = autograd_state();  // one TLS read
    return {state.get_grad_mode(), state.get_inference_mode()};
  }
  bool operator==(const Mode& other) const noexcept {
    return grad == other.grad && inference == other.inference;
  }
};

/// What one thread holds for one chain during a pass.
struct Capture {
  Capture() = default;
  Capture(const Capture&) = delete;
  Capture& operator=(const Capture&) = delete;
  ~Capture() { end_pass(); }  // a thread that ends with an interrupted pass

  std::uint64_t owner = 0;  // uid of the chain this state belongs to
  std::size_t next = 0;     // how many members have been called in the current pass
  // The owner's count of passes in flight (see Chain::passes), which this thread's pass is in
  // while `in_pass`. Shared: a pass an exception interrupted is ended when this thread next calls
  // the chain, or when it exits, and the chain may be gone by then.
  std::shared_ptr<std::atomic<int>> passes;
  bool in_pass = false;
  // Per member: its call arguments; during the replay, the full argument list it was called with
  // (later members may be wired to these inputs).
  std::vector<std::vector<c10::IValue>> args;
  std::vector<std::vector<c10::IValue>> outputs;  // replay outputs, per member
  std::vector<Mode> modes;                        // the mode each member was called in
  std::vector<c10::IValue> scratch;               // the argument list being assembled

  void begin_pass(const std::shared_ptr<std::atomic<int>>& count) {
    if (passes != count) passes = count;  // a copy only when the owner changes
    passes->fetch_add(1);
    in_pass = true;
  }
  void end_pass() noexcept {
    if (!in_pass) return;
    in_pass = false;
    passes->fetch_sub(1);
  }

  /// Ends the pass and drops every captured value (so tensors are freed at once) but keeps the
  /// capacity.
  void clear() noexcept {
    end_pass();
    next = 0;
    for (auto& values : args) values.clear();
    for (auto& values : outputs) values.clear();
    scratch.clear();
  }
};

/// Clears a capture when its scope is left by an exception (one thrown between capture and
/// replay, or by a member or kernel): what it held must not poison the next pass.
class ClearOnThrow {
 public:
  explicit ClearOnThrow(Capture& capture) noexcept
      : capture_(capture), exceptions_(std::uncaught_exceptions()) {}
  ~ClearOnThrow() {
    if (std::uncaught_exceptions() > exceptions_) capture_.clear();
  }
  ClearOnThrow(const ClearOnThrow&) = delete;
  ClearOnThrow& operator=(const ClearOnThrow&) = delete;

 private:
  Capture& capture_;
  int exceptions_;
};

inline namespace FUSION_ABI_VERSION {

/// Chains get small dense indices into the thread-local stores, recycled when a chain goes away;
/// a uid that is never reused tells a recycled slot's stale state from the current chain's.
class FUSION_API CaptureIndexPool {
 public:
  static CaptureIndexPool& instance() {
    static auto* pool = new CaptureIndexPool();  // leaked: chains may outlive static destruction
    return *pool;
  }
  std::size_t acquire() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) return size_++;
    std::size_t index = free_.back();
    free_.pop_back();
    return index;
  }
  void release(std::size_t index) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(index);
  }
  static std::uint64_t next_uid() {
    static std::atomic<std::uint64_t> uid{0};
    return ++uid;
  }

 private:
  std::mutex mutex_;
  std::vector<std::size_t> free_;
  std::size_t size_ = 0;
};

/// This thread's capture for the chain (index, uid) with `members` members. A deque keeps
/// references stable while a nested chain (a chain inside a member being replayed) grows it.
FUSION_API inline Capture& capture_for(std::size_t index, std::uint64_t uid, std::size_t members) {
  thread_local std::deque<Capture> store;
  while (store.size() <= index) store.emplace_back();
  Capture& capture = store[index];
  if (capture.owner != uid) {
    capture.clear();
    capture.owner = uid;
    capture.args.resize(members);
    capture.outputs.resize(members);
    capture.modes.resize(members);
  }
  return capture;
}

}  // namespace FUSION_ABI_VERSION

}  // namespace fusion::detail
