// The machinery behind a fused chain: the type-erased view of a Slot the fuse code works with, the
// table that finds a Slot from a module path, and the two roles a fused Slot dispatches to
// (RegistryCollector for members 0..n-2, FusedModule for the last).
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <typeindex>
#include <utility>
#include <vector>

#include <ATen/core/ivalue.h>
#include <c10/util/Optional.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any_value.h>

#include "fusion/detail/boxing.hpp"
#include "fusion/detail/capture.hpp"
#include "fusion/detail/placeholder.hpp"
#include "fusion/error.hpp"
#include "fusion/fused_chain.hpp"
#include "fusion/kernel_options.hpp"

namespace fusion::detail {

class Chain;
class SlotBase;

/// One forward() parameter, as fuse-time checks and the replay see it.
struct ParamInfo {
  TypeInfo type;
  // A spec default converted to this parameter's type as C++ would, or nullopt if it cannot be.
  c10::optional<c10::IValue> (*convert)(const c10::IValue&);
  c10::optional<c10::IValue> (*from_any)(
      torch::nn::AnyValue&);  // a FORWARD_HAS_DEFAULT_ARGS default
};

struct SignatureInfo {
  std::vector<ParamInfo> params;
  std::vector<TypeInfo> outputs;  // one per tuple element, else one
  bool has_placeholder = true;    // whether the Slot can stand in for its result as a collector
};

/// What a fused Slot calls instead of its module.
class Dispatch {
 public:
  explicit Dispatch(bool is_collector) : collects(is_collector) {}
  virtual ~Dispatch() = default;
  /// Takes the boxed call arguments (moving from them). A collector returns nullptr and the Slot
  /// returns a placeholder; the fused module returns the last member's boxed outputs. Either
  /// returns finish_unfused(), leaving the arguments, for a pass that began before the chain was
  /// fused: the Slot then calls its module with them.
  virtual std::vector<c10::IValue>* call(c10::IValue* args, std::size_t count) = 0;
  static std::vector<c10::IValue>* finish_unfused() noexcept { return &finish_unfused_; }
  const bool collects;

 private:
  static inline std::vector<c10::IValue> finish_unfused_;  // only its address is used
};

/// Finds the Slot bound to a child from (parent module, child name). Keyed by the `Module`
/// subobject, which is what named_modules() hands out.
class SlotTable {
 public:
  static SlotTable& instance() {
    static auto* table = new SlotTable();  // leaked: static models may be destroyed after it
    return *table;
  }
  void insert(const torch::nn::Module* parent, const std::string& name, SlotBase* slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    slots_[{parent, name}] = slot;
  }
  void erase(const torch::nn::Module* parent, const std::string& name, const SlotBase* slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = slots_.find({parent, name});
    if (it != slots_.end() && it->second == slot) slots_.erase(it);
  }
  SlotBase* find(const torch::nn::Module* parent, const std::string& name) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = slots_.find({parent, name});
    return it == slots_.end() ? nullptr : it->second;
  }

 private:
  mutable std::mutex mutex_;
  std::map<std::pair<const torch::nn::Module*, std::string>, SlotBase*> slots_;
};

/// The part of a Slot that does not depend on its module type.
class SlotBase {
 public:
  SlotBase() = default;
  // A copy (Cloneable::clone copy-constructs the parent) is neither registered nor fused: the
  // clone's reset() binds it again with register_slot.
  SlotBase(const SlotBase&) noexcept {}
  SlotBase& operator=(const SlotBase&) noexcept { return *this; }
  virtual ~SlotBase();

  bool is_fused() const noexcept { return chain_ != nullptr; }
  const std::shared_ptr<Chain>& chain() const noexcept { return chain_; }
  std::size_t member_index() const noexcept { return member_index_; }

  virtual torch::nn::Module* module() const noexcept = 0;
  /// The module as its own type (`Impl*`), for kernels, whose type impl_type() names.
  virtual void* impl() const noexcept = 0;
  virtual std::type_index impl_type() const noexcept = 0;
  virtual const SignatureInfo& signature() const = 0;
  /// Calls the original forward() with every parameter boxed in `args`; appends the outputs.
  virtual void call_boxed(c10::IValue* args, std::vector<c10::IValue>& outputs) = 0;

  /// Starts a call through the dispatch: counts it, so that no fusion change (Quiesce) runs
  /// meanwhile, and returns the dispatch to use, or nullptr if the Slot is no longer fused (call
  /// the module). A change in progress is waited out: it takes microseconds. Pair with leave().
  Dispatch* enter() noexcept {
    while (true) {
      if ((guard_.fetch_add(1) & kChanging) == 0) return dispatch_.load();
      guard_.fetch_sub(1);
      while ((guard_.load() & kChanging) != 0) std::this_thread::yield();
    }
  }
  void leave() noexcept { guard_.fetch_sub(1); }

 protected:
  void bind(const torch::nn::Module* parent, std::string name) {
    unbind();
    parent_ = parent;
    name_ = std::move(name);
    SlotTable::instance().insert(parent_, name_, this);
  }
  void unbind() noexcept {
    if (parent_ != nullptr) SlotTable::instance().erase(parent_, name_, this);
    parent_ = nullptr;
  }

  std::atomic<Dispatch*> dispatch_{nullptr};

 private:
  friend class Chain;
  friend class Quiesce;
  // Fused calls in flight through this Slot, plus kChanging while a fusion change holds it. One
  // word, so a call and a change see each other whichever comes first.
  static constexpr std::uint32_t kChanging = 1u << 31;
  std::atomic<std::uint32_t> guard_{0};
  std::shared_ptr<Chain> chain_;
  std::size_t member_index_ = 0;
  const torch::nn::Module* parent_ = nullptr;
  std::string name_;
};

/// Where one parameter of a member comes from during replay.
struct Source {
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
  std::vector<Source> sources;
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
  /// Makes the next call rebuild the kernel's prepared state.
  virtual void invalidate() noexcept = 0;
  virtual KernelStats stats() const = 0;
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
      if (holds_stand_in(args[a])) {
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

/// Members 0..n-2: stores the call arguments and mode for the replay; the Slot returns a
/// placeholder.
class RegistryCollector final : public Dispatch {
 public:
  RegistryCollector(const Chain& chain, std::size_t index)
      : Dispatch(true), chain_(chain), index_(index) {}

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
      if (std::vector<c10::IValue>* outputs = kernel->try_run(chain_, capture)) return outputs;
    }
    return chain_.replay(capture);
  }

 private:
  const Chain& chain_;
};

inline Chain::Chain(FusedChain info, std::vector<Member> members)
    : info_(std::move(info)), members_(std::move(members)) {
  for (std::size_t i = 0; i + 1 < members_.size(); ++i) {
    roles_.push_back(std::make_unique<RegistryCollector>(*this, i));
  }
  roles_.push_back(std::make_unique<FusedModule>(*this));
  for (std::size_t i = 0; i < members_.size(); ++i) {
    for (std::size_t p = 0; p < members_[i].sources.size(); ++p) {
      if (members_[i].sources[p].kind == Source::Kind::call) free_inputs_.push_back({i, p});
    }
  }
}

inline const c10::IValue& Chain::free_input(Capture& capture, const FreeInput& input) const {
  const auto& call_args = capture.args[input.member];
  if (input.param < call_args.size()) return call_args[input.param];
  const Source& source = members_[input.member].sources[input.param];
  if (source.fallback.has_value()) return *source.fallback;
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
  for (std::size_t p = 0; p < member.sources.size(); ++p) {
    const Source& source = member.sources[p];
    switch (source.kind) {
      case Source::Kind::output:
      case Source::Kind::input: {
        auto& from = source.kind == Source::Kind::output ? capture.outputs[source.member]
                                                         : capture.args[source.member];
        c10::IValue& value = from[source.index];
        args.push_back(source.last_use ? std::move(value) : value);
        break;
      }
      case Source::Kind::call:
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

/// Holds the member Slots of `chains` while one fusion change (fuse, unfuse, a kernel attached,
/// verify switching a chain) is made: fused calls through them wait until it is released.
///
/// With `wait` zero, throws FusionError, holding nothing, when a chain is running on another
/// thread (a call in flight, or a pass between its first and last member) or another thread is
/// changing it: changing the fusion of a running model is refused, never a race. With a `wait`,
/// new passes wait at each chain's first member, passes in flight finish, then the change is made;
/// a FusionError only when that takes longer than `wait`. An interrupted pass on this thread (an
/// exception between members) is ended here, as the next call would end it.
class Quiesce {
 public:
  Quiesce(const std::vector<std::shared_ptr<Chain>>& chains, const char* operation,
          std::chrono::milliseconds wait = std::chrono::milliseconds(0))
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

inline SlotBase::~SlotBase() {
  unbind();
  if (chain_ != nullptr) {
    dispatch_.store(nullptr);
    chain_->forget(member_index_);
  }
}

}  // namespace fusion::detail
