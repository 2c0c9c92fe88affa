// A kernel attached to one chain: the per-call decision whether it applies, its prepared state
// kept in step with the members' tensors, the check of its results against the replay, and the
// counters report shows.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/module.h>

#include "fusion/detail/blocked_layout.hpp"
#include "fusion/detail/chain.hpp"
#include "fusion/detail/compare.hpp"
#include "fusion/detail/kernel_registry.hpp"
#include "fusion/detail/stamp.hpp"
#include "fusion/error.hpp"
#include "fusion/options.hpp"

namespace fusion::detail {

class KernelBinding final : public KernelRunner {
 public:
  KernelBinding(std::string name, std::vector<std::shared_ptr<const KernelImpl>> impls,
                std::vector<at::Tensor> tensors, KernelPolicy policy)
      : name_(std::move(name)),
        impls_(std::move(impls)),
        tensors_(std::move(tensors)),
        policy_(policy) {
    for (const auto& impl : impls_) {
      blocked_layout_ = blocked_layout_ || impl->options.blocked_layout;
      stateless_ = stateless_ && !impl->stateful;
      if (!compute_dtype_ && impl->options.compute_dtype) {
        compute_dtype_ = *impl->options.compute_dtype;
      }
    }
  }

  const std::string& name() const noexcept override { return name_; }
  KernelPolicy policy() const noexcept override { return policy_; }
  c10::optional<c10::ScalarType> compute_dtype() const noexcept override { return compute_dtype_; }
  bool blocked_layout_now() const noexcept override {
    if (!blocked_layout_ || policy_ == KernelPolicy::checked || unchecked_.load() ||
        dirty_.load(std::memory_order_acquire)) {
      return false;
    }
    const Prepared* prepared = current_.load();  // stale: the next call prepares and checks
    return prepared == nullptr ? stateless_ : fresh(*prepared, *prepared->impl);
  }
  /// The next call rebuilds the state. Called for every call that needs gradients: LibTorch's SGD
  /// writes parameters through `.data()`, whose version counter is a separate one, so its step is
  /// seen by no stamp, but a training step runs a forward with gradients first.
  void invalidate() noexcept override { dirty_.store(true, std::memory_order_release); }

  KernelStats stats() const override {
    KernelStats stats;
    stats.runs = runs_.load(std::memory_order_relaxed);
    stats.replays_device = replays_[device].load(std::memory_order_relaxed);
    stats.replays_training = replays_[training].load(std::memory_order_relaxed);
    stats.replays_grad = replays_[grad].load(std::memory_order_relaxed);
    stats.replays_modes = replays_[modes].load(std::memory_order_relaxed);
    stats.replays_declined = replays_[declined].load(std::memory_order_relaxed);
    stats.exceptions = exceptions_.load(std::memory_order_relaxed);
    stats.checks = checks_.load(std::memory_order_relaxed);
    stats.prepares = prepares_.load(std::memory_order_relaxed);
    stats.unversioned_tensors = unversioned_tensors(tensors_);
    std::lock_guard<std::mutex> lock(rebuild_mutex_);
    if (const Prepared* prepared = current_.load()) {
      stats.state_bytes =
          prepared->own_bytes + prepared->impl->state_opaque_bytes(prepared->state.get());
      stats.shared_state_bytes = prepared->shared_bytes;
    }
    return stats;
  }

  static std::uint64_t unversioned_tensors(const std::vector<at::Tensor>& tensors) {
    std::uint64_t count = 0;
    for (const at::Tensor& tensor : tensors) {
      if (tensor.defined() && tensor.is_inference()) ++count;
    }
    return count;
  }

  std::vector<c10::IValue>* try_run(const Chain& chain, Capture& capture) override {
    if (!chain.complete()) return nullptr;  // the replay reports the destroyed member
    Call call;
    if (const auto reason = choose(chain, capture, call)) {
      return decline(chain, capture, *reason);
    }
    struct Reading {  // while set, no prepared state this call may use is freed
      std::atomic<int>* readers;
      ~Reading() {
        if (readers != nullptr) readers->fetch_sub(1);
      }
    } reading{nullptr};
    const Prepared* prepared = nullptr;
    if (call.impl->stateful) {
      readers_.fetch_add(1);
      reading.readers = &readers_;
      prepared = current(*call.impl, call.members.data());
    }
    // The first call after a prepare is checked against a replay, which gives dense tensors.
    // Not a call with a free input of a user type (a KV cache the attention appends to): the
    // replay would change it a second time. The first call without one is checked.
    const bool check_values = policy_ == KernelPolicy::checked && call.replayable;
    if (check_values || (!call.training_mode && call.replayable && unchecked_.load())) {
      BlockedHandOff::take_grant();
    }
    const ClearOnThrow guard{capture};
    auto& outputs = capture.outputs.back();
    outputs.clear();
    try {
      call.impl->run(prepared != nullptr ? prepared->state.get() : nullptr, call.members.data(),
                     call.inputs.data(), outputs);
    } catch (...) {
      exceptions_.fetch_add(1, std::memory_order_relaxed);
      throw;
    }
    runs_.fetch_add(1, std::memory_order_relaxed);
    // The first call after each prepare (the first call at all, for a kernel without state) is
    // checked against the replay, outside training mode, where replaying has side effects (batch
    // statistics): a kernel whose result has the wrong shape would otherwise be broadcast by the
    // parent's next op, silently.
    if (check_values || (!call.training_mode && call.replayable && unchecked_.exchange(false))) {
      return check(chain, capture, check_values);
    }
    for (auto& args : capture.args) args.clear();
    capture.next = 0;
    return &outputs;
  }

 private:
  enum Reason { device, training, grad, modes, declined, reasons };

  /// What one call runs the kernel with.
  struct Call {
    const KernelImpl* impl = nullptr;
    c10::SmallVector<const c10::IValue*, 8> inputs;  // the free inputs, in order
    c10::SmallVector<void*, 8> members;              // the member modules, as Impl*
    bool training_mode = false;
    bool replayable = true;  // no free input is of a user type (a capsule), which a replay could
                             // change a second time
  };

  /// Whether the kernel applies to this call, the cheap checks first; fills `call` if it does.
  c10::optional<Reason> choose(const Chain& chain, Capture& capture, Call& call) {
    const Mode mode = capture.modes.back();
    for (const Mode& member_mode : capture.modes) {
      if (!(member_mode == mode)) return modes;
    }
    // The inputs, and the device of the first tensor among them.
    c10::DeviceType device_type = c10::DeviceType::CPU;
    bool found_device = false, input_requires_grad = false;
    for (const FreeInput& free : chain.free_inputs()) {
      const c10::IValue& value = chain.free_input(capture, free);
      call.inputs.push_back(&value);
      call.replayable = call.replayable && !value.isCapsule();
      if (!value.isTensor()) continue;
      const at::Tensor& tensor = value.toTensor();
      if (!tensor.defined()) continue;
      if (!found_device) device_type = tensor.device().type(), found_device = true;
      input_requires_grad = input_requires_grad || tensor.requires_grad();
    }
    if (!found_device && !tensors_.empty() && tensors_[0].defined()) {
      device_type = tensors_[0].device().type();
    }
    for (const auto& candidate : impls_) {
      for (c10::DeviceType supported : candidate->options.devices) {
        if (supported == device_type) call.impl = candidate.get();
      }
    }
    if (call.impl == nullptr) return device;
    for (std::size_t i = 0; i < chain.size(); ++i) {
      const SlotBase* slot = chain.member_slot(i);
      call.training_mode = call.training_mode || slot->module()->is_training();
      call.members.push_back(slot->impl());
    }
    if (call.training_mode && !call.impl->options.training) return training;
    if (call.impl->checks_applies && !call.impl->applies(call.members.data())) return declined;
    if (mode.grad && !mode.inference) {
      bool needs_grad = input_requires_grad;
      for (std::size_t s = 0; s < tensors_.size() && !needs_grad; ++s) {
        needs_grad = tensors_[s].requires_grad();
      }
      if (needs_grad) {
        if (!call.impl->options.autograd) return grad;
        invalidate();
      }
    }
    return c10::nullopt;
  }

  struct Prepared {
    const KernelImpl* impl = nullptr;
    std::shared_ptr<const void> state;
    std::vector<TensorStamp> stamps;
    std::uint64_t own_bytes = 0, shared_bytes = 0;
  };

  std::vector<c10::IValue>* decline(const Chain& chain, Capture& capture, Reason reason) {
    replays_[reason].fetch_add(1, std::memory_order_relaxed);
    // The replay in training mode may update what no stamp sees (BatchNorm's running statistics
    // move without a version bump); one with gradients may precede an optimizer step.
    if (reason == training || reason == grad) invalidate();
    if (policy_ == KernelPolicy::strict) {
      static constexpr const char* why[] = {
          "no implementation for the inputs' device",
          "a member is in training mode and the kernel is not registered for training",
          "gradients are needed and the kernel is not registered with autograd",
          "the members were called in different autograd modes",
          "the kernel declined these modules (its applies() returned false)"};
      chain.fail_call(capture, fmt::format("kernel '{}' does not apply (strict policy): {}", name_,
                                           why[reason]));
    }
    return nullptr;
  }

  /// Replays the chain from the capture and compares the kernel's outputs (in the capture) with
  /// the replay's: structure, shapes, dtypes, devices and layouts, and with `values`, the values
  /// within the default tolerance of their dtype. Returns the kernel's outputs.
  std::vector<c10::IValue>* check(const Chain& chain, Capture& capture, bool values) {
    checks_.fetch_add(1, std::memory_order_relaxed);
    std::vector<c10::IValue> computed = std::move(capture.outputs.back());
    capture.outputs.back().clear();
    try {
      std::vector<c10::IValue>& replayed = *chain.replay(capture);
      if (const auto why = layout_mismatch(replayed, computed)) {
        chain.fail_call(
            capture, fmt::format("kernel '{}' gave a result unlike the replay's: {}", name_, *why));
      }
      for (std::size_t i = 0; values && i < replayed.size(); ++i) {
        const Difference diff = difference(replayed[i], computed[i], c10::nullopt, compute_dtype_);
        if (diff.excess > 1) {
          chain.fail_call(capture,
                          fmt::format("kernel '{}' (checked policy): output #{} differs from the "
                                      "replay by {:g}, more than the default tolerance of its "
                                      "dtype (or the kernel's compute_dtype) allows ({:g})",
                                      name_, i, diff.max_abs, diff.max_abs / diff.excess));
        }
      }
      replayed = std::move(computed);
      return &replayed;
    } catch (...) {
      unchecked_.store(true);  // a failed check is made again on the next call
      throw;
    }
  }

  bool fresh(const Prepared& prepared, const KernelImpl& impl) const {
    if (prepared.impl != &impl) return false;
    for (std::size_t s = 0; s < tensors_.size(); ++s) {
      if (!prepared.stamps[s].matches(tensors_[s])) return false;
    }
    return true;
  }

  /// The prepared state for `impl`, rebuilt first if any member tensor changed since it was made.
  /// The caller counts itself in readers_ first: a state is freed only once replaced and no call
  /// is reading (checked at the next rebuild, and when the binding goes with its chain).
  const Prepared* current(const KernelImpl& impl, void* const* members) {
    const Prepared* prepared = current_.load();
    if (prepared != nullptr && !dirty_.load(std::memory_order_acquire) && fresh(*prepared, impl)) {
      return prepared;
    }
    std::lock_guard<std::mutex> rebuild(rebuild_mutex_);  // one thread prepares, others wait
    prepared = current_.load();
    if (prepared != nullptr && !dirty_.exchange(false, std::memory_order_acq_rel) &&
        fresh(*prepared, impl)) {
      return prepared;
    }
    auto next = std::make_unique<Prepared>();
    next->impl = &impl;
    next->state = impl.prepare(members);
    // Stamped after prepare: a prepare that re-points parameters into a fused layout changes
    // their storages, and that layout is what later calls must find.
    for (const at::Tensor& tensor : tensors_) next->stamps.push_back(TensorStamp::of(tensor));
    measure(impl, *next);
    prepares_.fetch_add(1, std::memory_order_relaxed);
    const Prepared* fresh_state = next.get();
    owned_.push_back(std::move(next));
    current_.store(fresh_state);
    unchecked_.store(true);
    if (readers_.load() == 1) {  // only this call: every replaced state can go
      owned_.erase(owned_.begin(), owned_.end() - 1);
    }
    return fresh_state;
  }

  void measure(const KernelImpl& impl, Prepared& prepared) const {
    std::set<const void*> model_storages, counted;
    for (const at::Tensor& tensor : tensors_) {
      if (tensor.defined() && tensor.has_storage()) model_storages.insert(tensor.storage().data());
    }
    for (const at::Tensor& tensor : impl.state_tensors(prepared.state.get())) {
      if (!tensor.defined() || !tensor.has_storage()) continue;
      const void* storage = tensor.storage().data();
      if (!counted.insert(storage).second) continue;
      const auto bytes = static_cast<std::uint64_t>(tensor.storage().nbytes());
      (model_storages.count(storage) != 0 ? prepared.shared_bytes : prepared.own_bytes) += bytes;
    }
  }

  std::string name_;
  std::vector<std::shared_ptr<const KernelImpl>> impls_;
  std::vector<at::Tensor>
      tensors_;  // every parameter and buffer of the members: what a prepared state derives from
  KernelPolicy policy_;
  bool blocked_layout_ = false;  // an implementation has KernelOptions::blocked_layout
  bool stateless_ = true;        // no implementation prepares a state
  c10::optional<c10::ScalarType> compute_dtype_;
  std::atomic<std::uint64_t> runs_{0}, prepares_{0}, exceptions_{0}, checks_{0};
  std::atomic<bool> dirty_{false};
  std::atomic<bool> unchecked_{true};  // the next run outside training mode is checked
  std::atomic<std::uint64_t> replays_[reasons] = {};
  mutable std::mutex rebuild_mutex_;  // serialises prepare; guards owned_
  std::atomic<const Prepared*> current_{nullptr};
  std::atomic<int> readers_{0};
  std::vector<std::unique_ptr<Prepared>> owned_;  // current_ last; earlier ones until unread
};

}  // namespace fusion::detail
