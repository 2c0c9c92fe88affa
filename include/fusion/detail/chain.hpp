// A fused chain: its members and how each parameter is wired (Origin), and the replay. The two
// roles a fused Slot dispatches to are in detail/chain_roles.hpp.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/ivalue.h>
#include <c10/util/Optional.h>
#include <fmt/format.h>
#include <torch/nn/module.h>

#include "fusion/detail/boxing.hpp"
#include "fusion/detail/capture.hpp"
#include "fusion/detail/placeholder.hpp"
#include "fusion/detail/slot_base.hpp"
#include "fusion/error.hpp"
#include "fusion/fused_chain.hpp"
#include "fusion/options.hpp"

namespace fusion::detail {

/// Where one parameter of a member comes from during replay.
struct Origin {
  enum class Kind : std::uint8_t {
    call,    // the member's own call argument, else `fallback`
    output,  // output `index` of earlier member `member`
    input,   // the value earlier member `member` received as parameter `index`
  };
  Kind kind = Kind::call;
  int member = -1;
  int index = 0;
  bool last_use = false;                // the value is moved, not copied, into its last consumer
  c10::optional<c10::IValue> fallback;  // default, used when the call passed no argument
};

struct Member {
  SlotBase* slot = nullptr;  // null once the Slot was destroyed
  std::vector<Origin> origins;
  bool inputs_read_later = false;  // a later member is wired to one of this member's inputs
};

/// The options a chain was fused with, kept so that plan_of can reproduce them.
struct FuseOptionsRecord {
  bool skip_incomplete_chains = false;
};

/// What a chain with a kernel attached calls before replaying (implemented in
/// detail/kernel_binding.hpp).
class KernelRunner {
 public:
  virtual ~KernelRunner() = default;
  /// The last member's outputs computed by the kernel, or nullptr: the kernel does not apply to
  /// this call, and the chain replays.
  virtual std::vector<c10::IValue>* try_run(const Chain& chain, Capture& capture) = 0;
  virtual const std::string& name() const noexcept = 0;
  virtual KernelPolicy policy() const noexcept = 0;
  /// KernelOptions::compute_dtype of its implementations (the first that sets one).
  virtual c10::optional<c10::ScalarType> compute_dtype() const noexcept = 0;
  /// Makes the next call rebuild the kernel's prepared state.
  virtual void invalidate() noexcept = 0;
  virtual KernelStats stats() const = 0;
  /// Whether a call now may take and give blocked tensors (KernelOptions::blocked_layout): false
  /// while a first-call check is pending, which compares with a replay on dense tensors.
  virtual bool blocked_layout_now() const noexcept = 0;
};

/// A parameter of a member that no earlier member feeds: what a kernel takes besides the modules.
struct FreeInput {
  std::size_t member;
  std::size_t param;
};

class Chain {
 public:
  friend class Quiesce;
  Chain(FusedChain info, std::vector<Member> members);
  ~Chain() { CaptureIndexPool::instance().release(capture_index_); }
  Chain(const Chain&) = delete;
  Chain& operator=(const Chain&) = delete;

  /// Paths are relative to the root given to fuse_modules; fused_chains re-roots them.
  const FusedChain& info() const noexcept { return info_; }
  std::size_t size() const noexcept { return members_.size(); }
  const SlotBase* member_slot(std::size_t i) const noexcept { return members_[i].slot; }
  bool attached() const noexcept { return attached_; }
  /// Every parameter no earlier member feeds (a call argument, else a default), in member and
  /// parameter order.
  const std::vector<FreeInput>& free_inputs() const noexcept { return free_inputs_; }
  /// The value free input `input` has in this pass: the call argument, else the default; with
  /// neither, a FusionError saying how to give the default.
  const c10::IValue& free_input(Capture& capture, const FreeInput& input) const;
  /// Whether every member's Slot is alive (a destroyed one cannot be run).
  bool complete() const noexcept {
    for (const Member& member : members_) {
      if (member.slot == nullptr) return false;
    }
    return true;
  }

  /// The kernel, if one is attached. Set only while no thread runs the model (like fusing).
  const std::shared_ptr<KernelRunner>& kernel() const noexcept { return kernel_; }
  void set_kernel(std::shared_ptr<KernelRunner> kernel) noexcept { kernel_ = std::move(kernel); }
  /// The fuse_modules call (or plan rule) that built this chain, and how many chains it built.
  std::uint64_t origin() const noexcept { return origin_; }
  std::size_t origin_size() const noexcept { return origin_size_; }
  void set_origin(std::uint64_t origin, std::size_t size) noexcept {
    origin_ = origin;
    origin_size_ = size;
  }
  const FuseOptionsRecord& options() const noexcept { return options_; }
  void set_options(FuseOptionsRecord options) noexcept { options_ = options; }

  /// Makes the member Slots own `self` and dispatch to it. Cannot fail.
  static void fuse(const std::shared_ptr<Chain>& self) noexcept {
    for (std::size_t i = 0; i < self->members_.size(); ++i) {
      self->members_[i].slot->chain_ = self;
      self->members_[i].slot->member_index_ = i;
    }
    self->attach();
  }
  /// Puts the original modules back and drops the Slots' ownership.
  static void unfuse(std::shared_ptr<Chain> self) noexcept {
    self->detach();
    for (Member& member : self->members_) {
      if (member.slot != nullptr) member.slot->chain_.reset();
    }
  }
  /// Switches the dispatch on or off without dropping the chain (verify uses this).
  /// Switched on last member first and off first member first: a thread whose pass began at a
  /// fused first member finds the rest fused too (a placeholder never reaches an original module).
  void attach() noexcept {
    for (std::size_t i = members_.size(); i-- > 0;) {
      if (members_[i].slot != nullptr) members_[i].slot->dispatch_.store(roles_[i].get());
    }
    attached_ = true;
  }
  void detach() noexcept {
    for (Member& member : members_) {
      if (member.slot != nullptr) member.slot->dispatch_.store(nullptr);
    }
    attached_ = false;
  }
  void forget(std::size_t member) noexcept { members_[member].slot = nullptr; }

  Capture& capture() const { return capture_for(capture_index_, uid_, members_.size()); }
  /// Passes in flight on all threads: from the first member's call to the end of the last one's,
  /// or, for a pass an exception interrupted, until its thread next calls the chain.
  const std::shared_ptr<std::atomic<int>>& passes() const noexcept { return passes_; }
  /// Whether member `index`, called with `args`, is called outside a pass of this chain on this
  /// thread: no earlier member was (a pass that began before the chain was fused, the member
  /// called on its own). Its arguments are then real values, and it runs unfused; a placeholder
  /// among them (a collector's result used elsewhere) throws: the replay never computed it.
  bool outside_pass(Capture& capture, std::size_t index, const c10::IValue* args,
                    std::size_t count) const {
    if (index == 0 || capture.next != 0) return false;
    for (std::size_t a = 0; a < count; ++a) {
      if (holds_placeholder(args[a])) {
        fail_call(capture,
                  fmt::format("'{}' was called with a placeholder as argument #{}, outside a pass "
                              "of its chain: a collector's result used elsewhere than in the "
                              "chain (a value used twice?) was never computed. Unfuse this chain",
                              info_.paths[index], a));
      }
    }
    return true;
  }
  std::vector<c10::IValue>* replay(Capture& capture) const;
  [[noreturn]] void fail_call(Capture& capture, const std::string& why) const {
    capture.clear();
    fail("fusion: fused chain [{}]: {}", to_string(info_), why);
  }

 private:
  void resolve_args(Capture& capture, std::size_t i) const;

  FusedChain info_;
  std::vector<Member> members_;
  std::vector<FreeInput> free_inputs_;
  std::vector<std::unique_ptr<Dispatch>> roles_;
  std::shared_ptr<KernelRunner> kernel_;
  std::uint64_t origin_ = 0;
  std::size_t origin_size_ = 0;
  FuseOptionsRecord options_;
  std::shared_ptr<std::atomic<int>> passes_ = std::make_shared<std::atomic<int>>(0);
  std::uint64_t uid_ = CaptureIndexPool::next_uid();
  std::size_t capture_index_ = CaptureIndexPool::instance().acquire();
  bool attached_ = false;
};

inline const c10::IValue& Chain::free_input(Capture& capture, const FreeInput& input) const {
  const auto& call_args = capture.args[input.member];
  if (input.param < call_args.size()) return call_args[input.param];
  const Origin& origin = members_[input.member].origins[input.param];
  if (origin.fallback.has_value()) return *origin.fallback;
  fail_call(capture,
            fmt::format(
                "parameter #{} ({}) of '{}' has no value: no earlier member provides it, the call "
                "passed {} argument(s), and it has no default the library can see (a C++ default "
                "argument is invisible to it). Give the default in the spec, "
                "ModuleSpec{{inputs, outputs, {{{{{}, fusion::box(value)}}}}}}, or with "
                "FORWARD_HAS_DEFAULT_ARGS",
                input.param, members_[input.member].slot->signature().params[input.param].type.name,
                info_.paths[input.member], call_args.size(), input.param));
}

/// Replaces member i's call arguments in `capture.args[i]` by its full argument list.
inline void Chain::resolve_args(Capture& capture, std::size_t i) const {
  const Member& member = members_[i];
  auto& call_args = capture.args[i];
  auto& args = capture.scratch;
  args.clear();
  for (std::size_t p = 0; p < member.origins.size(); ++p) {
    const Origin& origin = member.origins[p];
    switch (origin.kind) {
      case Origin::Kind::output:
      case Origin::Kind::input: {
        auto& from = origin.kind == Origin::Kind::output ? capture.outputs[origin.member]
                                                         : capture.args[origin.member];
        c10::IValue& value = from[origin.index];
        args.push_back(origin.last_use ? std::move(value) : value);
        break;
      }
      case Origin::Kind::call:
        if (p < call_args.size()) {
          args.push_back(std::move(call_args[p]));
        } else {
          args.push_back(free_input(capture, {i, p}));  // the default, or a FusionError
        }
        break;
    }
  }
  std::swap(call_args, args);
  args.clear();
}

inline std::vector<c10::IValue>* Chain::replay(Capture& capture) const {
  const ClearOnThrow guard{capture};

  const Mode mode = capture.modes.back();  // the fused module's: the mode the replay runs in
  for (std::size_t i = 0; i < members_.size(); ++i) {
    const Member& member = members_[i];
    if (member.slot == nullptr) {
      fail_call(capture, fmt::format("the Slot of member '{}' was destroyed", info_.paths[i]));
    }
    resolve_args(capture, i);
    auto& args = capture.args[i];
    capture.outputs[i].clear();
    const Mode& own = capture.modes[i];
    if (own == mode) {
      member.slot->call_boxed(args.data(), capture.outputs[i]);
    } else {
      // Its own mode, as the parent called it (InferenceMode(false) also turns grad mode on).
      c10::InferenceMode inference(own.inference);
      c10::AutoGradMode grad(own.grad);
      member.slot->call_boxed(args.data(), capture.outputs[i]);
    }
    if (!member.inputs_read_later) args.clear();
  }
  for (std::size_t i = 0; i + 1 < members_.size(); ++i) {
    capture.outputs[i].clear();
    capture.args[i].clear();
  }
  capture.args.back().clear();
  capture.next = 0;
  return &capture.outputs.back();
}

inline SlotBase::~SlotBase() {
  unbind();
  if (chain_ != nullptr) {
    dispatch_.store(nullptr);
    chain_->forget(member_index_);
  }
}

}  // namespace fusion::detail
