// The machinery behind fused kernels: a typed kernel erased behind KernelImpl, the registry of
// kernels by name, and KernelBinding, which decides per call whether a chain's kernel applies and
// keeps its prepared state in step with the members' tensors.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeindex>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <c10/core/GradMode.h>
#include <c10/util/SmallVector.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/module.h>

#include "fusion/detail/boxing.hpp"
#include "fusion/detail/chain.hpp"
#include "fusion/detail/traits.hpp"
#include "fusion/error.hpp"

namespace fusion {

/// Where and when a kernel may run in place of its chain's replay.
struct KernelOptions {
  /// Device types this implementation computes on. A name may have one implementation per device
  /// type (register_kernel once per implementation); a call on another device replays.
  std::vector<c10::DeviceType> devices = {c10::DeviceType::CPU};
  /// May run while a member is in training mode (else the chain replays: batch statistics,
  /// dropout).
  bool training = false;
  /// Differentiable with respect to the inputs and the members' parameters (built from
  /// differentiable ops on the original tensors). Else, when grad mode is on and an input or a
  /// parameter requires grad, the chain replays.
  bool autograd = false;
};

namespace detail {

/// One implementation of a named kernel, with its types erased.
class KernelImpl {
 public:
  virtual ~KernelImpl() = default;
  /// Builds the kernel's state from the member modules (null when the kernel has no prepare).
  virtual std::shared_ptr<const void> prepare(void* const* modules) const = 0;
  /// Computes the last member's outputs from the state, the modules and the free inputs.
  virtual void run(const void* state, void* const* modules, const c10::IValue* const* inputs,
                   std::vector<c10::IValue>& outputs) const = 0;
  /// The tensors a state holds, when its type says (a `tensors()` member), for the memory report.
  virtual std::vector<at::Tensor> state_tensors(const void* state) const = 0;
  /// The kernel's own per-call verdict on the modules (its `applies`), when it has one.
  virtual bool applies(void* const* modules) const = 0;

  KernelOptions options;
  bool stateful = false;                   // has a prepare(), whose state is kept fresh
  bool checks_applies = false;             // has an applies(), asked on every call
  std::vector<std::type_index> modules{};  // the Impl type of each member, in order
  std::vector<std::string> module_names;
  std::vector<TypeInfo> inputs;   // the free inputs, in order
  std::vector<TypeInfo> outputs;  // the result, split like a member's
};

template <typename T>
constexpr bool is_module_ref_v =
    std::is_lvalue_reference_v<T> && !std::is_const_v<std::remove_reference_t<T>> &&
    std::is_base_of_v<torch::nn::Module, std::remove_reference_t<T>>;

template <typename Tuple, std::size_t I = 0>
constexpr std::size_t leading_modules() {
  if constexpr (I < std::tuple_size_v<Tuple>) {
    if constexpr (is_module_ref_v<std::tuple_element_t<I, Tuple>>) {
      return 1 + leading_modules<Tuple, I + 1>();
    }
  }
  return 0;
}

template <typename K, typename = void>
struct has_prepare : std::false_type {};
template <typename K>
struct has_prepare<K, std::void_t<decltype(&K::prepare)>> : std::true_type {};
template <typename K, typename = void>
struct has_call : std::false_type {};
template <typename K>
struct has_call<K, std::void_t<decltype(&K::operator())>> : std::true_type {};
template <typename K, typename = void>
struct has_applies : std::false_type {};
template <typename K>
struct has_applies<K, std::void_t<decltype(&K::applies)>> : std::true_type {};
template <typename S, typename = void>
struct has_tensors : std::false_type {};
template <typename S>
struct has_tensors<S, std::void_t<decltype(std::declval<const S&>().tensors())>> : std::true_type {
};

/// A user kernel `K` behind KernelImpl. K's `operator()` takes, in order: `const State&` when K
/// has `State prepare(Modules&...) const`; the member modules as `Impl&`; the free inputs.
template <typename K>
class TypedKernel final : public KernelImpl {
  static_assert(has_call<K>::value,
                "fusion::register_kernel: the kernel needs one operator() (not overloaded, not a "
                "template): Result operator()([const State&,] Members&..., FreeInputs...) const");
  using Call = signature_of<decltype(&K::operator())>;
  using Params = typename Call::params;
  using Result = typename Call::result;
  static constexpr bool has_state = has_prepare<K>::value;
  static constexpr std::size_t first_module = has_state ? 1 : 0;

  template <typename Kernel, bool = has_prepare<Kernel>::value>
  struct Prepare {
    using State = void;
    static constexpr std::size_t arity = 0;
  };
  template <typename Kernel>
  struct Prepare<Kernel, true> {
    using Signature = signature_of<decltype(&Kernel::prepare)>;
    using State = std::decay_t<typename Signature::result>;
    static constexpr std::size_t arity = Signature::arity;
  };

 public:
  using State = typename Prepare<K>::State;
  static constexpr std::size_t module_count =
      has_state ? Prepare<K>::arity : leading_modules<Params>();
  static constexpr std::size_t first_input = first_module + module_count;
  static constexpr std::size_t input_count = Call::arity - first_input;
  template <std::size_t I>
  using Module = std::remove_reference_t<std::tuple_element_t<first_module + I, Params>>;
  template <std::size_t I>
  using Input = std::decay_t<std::tuple_element_t<first_input + I, Params>>;

  static_assert(!std::is_void_v<Result>, "fusion::register_kernel: the kernel returns void");
  static_assert(module_count > 0,
                "fusion::register_kernel: operator() must take the chain's member modules, each "
                "as a non-const `Impl&`, before the free inputs");
  static_assert(Call::arity >= first_input,
                "fusion::register_kernel: operator() takes fewer parameters than prepare() has "
                "modules");

  TypedKernel(K kernel, KernelOptions kernel_options) : kernel_(std::move(kernel)) {
    if constexpr (has_state) {
      static_assert(std::is_same_v<std::tuple_element_t<0, Params>, const State&>,
                    "fusion::register_kernel: with prepare(), operator()'s first parameter must "
                    "be `const State&`, State being what prepare() returns");
      check_prepare_modules(std::make_index_sequence<module_count>{});
    }
    if constexpr (has_applies<K>::value) check_applies(std::make_index_sequence<module_count>{});
    options = std::move(kernel_options);
    stateful = has_state;
    checks_applies = has_applies<K>::value;
    fill_modules(std::make_index_sequence<module_count>{});
    fill_inputs(std::make_index_sequence<input_count>{});
    outputs = output_types<std::decay_t<Result>>::get();
  }

  std::shared_ptr<const void> prepare(void* const* members) const override {
    if constexpr (has_state) {
      return prepare_impl(members, std::make_index_sequence<module_count>{});
    } else {
      return nullptr;
    }
  }

  void run(const void* state, void* const* members, const c10::IValue* const* args,
           std::vector<c10::IValue>& out) const override {
    run_impl(state, members, args, out, std::make_index_sequence<module_count>{},
             std::make_index_sequence<input_count>{});
  }

  bool applies(void* const* members) const override {
    if constexpr (has_applies<K>::value) {
      return applies_impl(members, std::make_index_sequence<module_count>{});
    } else {
      return true;
    }
  }

  std::vector<at::Tensor> state_tensors(const void* state) const override {
    if constexpr (has_state) {
      if constexpr (has_tensors<State>::value) {
        if (state != nullptr) return static_cast<const State*>(state)->tensors();
      }
    }
    return {};
  }

 private:
  template <std::size_t... I>
  static void check_applies(std::index_sequence<I...>) {
    using Signature = signature_of<decltype(&K::applies)>;
    static_assert(std::is_same_v<typename Signature::result, bool> &&
                      std::is_same_v<typename Signature::params,
                                     std::tuple<std::tuple_element_t<first_module + I, Params>...>>,
                  "fusion::register_kernel: applies() must be `bool applies(Members&...) const`, "
                  "taking the member modules as operator() does");
  }
  template <std::size_t... I>
  bool applies_impl(void* const* members, std::index_sequence<I...>) const {
    return kernel_.applies(*static_cast<Module<I>*>(members[I])...);
  }
  template <std::size_t... I>
  static void check_prepare_modules(std::index_sequence<I...>) {
    using PrepareParams = typename Prepare<K>::Signature::params;
    static_assert((std::is_same_v<std::tuple_element_t<I, PrepareParams>,
                                  std::tuple_element_t<first_module + I, Params>> &&
                   ...),
                  "fusion::register_kernel: prepare() must take the same member modules, as "
                  "`Impl&`, as operator() takes after its state");
  }
  template <std::size_t... I>
  void fill_modules(std::index_sequence<I...>) {
    static_assert((is_module_ref_v<std::tuple_element_t<first_module + I, Params>> && ...),
                  "fusion::register_kernel: each member module must be taken as a non-const "
                  "`Impl&` (the module type a Slot holds, e.g. MLPImpl&)");
    modules = {std::type_index(typeid(Module<I>))...};
    module_names = {type_name<Module<I>>()...};
  }
  template <std::size_t... J>
  void fill_inputs(std::index_sequence<J...>) {
    inputs = {TypeInfo::of<Input<J>>()...};
  }
  template <std::size_t... I>
  std::shared_ptr<const void> prepare_impl(void* const* members, std::index_sequence<I...>) const {
    torch::NoGradGuard no_grad;
    return std::make_shared<const State>(kernel_.prepare(*static_cast<Module<I>*>(members[I])...));
  }
  template <std::size_t... I, std::size_t... J>
  void run_impl(const void* state, void* const* members, const c10::IValue* const* args,
                std::vector<c10::IValue>& out, std::index_sequence<I...>,
                std::index_sequence<J...>) const {
    if constexpr (has_state) {
      split(kernel_(*static_cast<const State*>(state), *static_cast<Module<I>*>(members[I])...,
                    Boxing<Input<J>>::arg(*args[J])...),
            out);
    } else {
      (void)state;
      split(kernel_(*static_cast<Module<I>*>(members[I])..., Boxing<Input<J>>::arg(*args[J])...),
            out);
    }
  }

  mutable K kernel_;  // mutable: a non-const operator() still compiles; it must be thread-safe
};

/// Kernels by name; each name has one implementation per set of device types.
class KernelRegistry {
 public:
  static KernelRegistry& instance() {
    static auto* registry = new KernelRegistry();  // leaked: chains may outlive static destruction
    return *registry;
  }

  void add(const std::string& name, std::shared_ptr<const KernelImpl> impl) {
    if (name.empty()) fail("fusion::register_kernel: a kernel needs a non-empty name");
    if (impl->options.devices.empty()) {
      fail("fusion::register_kernel: kernel '{}' lists no device type", name);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    auto& impls = kernels_[name];
    for (const auto& other : impls) {
      if (other->modules != impl->modules || !same_types(other->inputs, impl->inputs) ||
          !same_types(other->outputs, impl->outputs)) {
        fail(
            "fusion::register_kernel: kernel '{}' is already registered with other types; every "
            "implementation of one name takes the same modules and inputs and returns the same "
            "result",
            name);
      }
      for (c10::DeviceType device : impl->options.devices) {
        for (c10::DeviceType taken : other->options.devices) {
          if (device == taken) {
            fail("fusion::register_kernel: kernel '{}' already has an implementation for {}", name,
                 c10::DeviceTypeName(device, /*lower_case=*/true));
          }
        }
      }
    }
    impls.push_back(std::move(impl));
  }

  std::vector<std::shared_ptr<const KernelImpl>> find(const std::string& name) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = kernels_.find(name);
    return it == kernels_.end() ? std::vector<std::shared_ptr<const KernelImpl>>{} : it->second;
  }

  std::vector<std::string> names() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::string> result;
    for (const auto& entry : kernels_) result.push_back(entry.first);
    return result;
  }

 private:
  static bool same_types(const std::vector<TypeInfo>& a, const std::vector<TypeInfo>& b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
      if (a[i].type != b[i].type) return false;
    }
    return true;
  }

  mutable std::mutex mutex_;
  std::map<std::string, std::vector<std::shared_ptr<const KernelImpl>>> kernels_;
};

/// What a prepared state was derived from: one entry per parameter and buffer of the members.
/// `torch::load` swaps a parameter's data (data pointer), an in-place write (an optimizer step,
/// `mul_`) moves its version, `to()` changes data, dtype and device.
struct TensorStamp {
  const void* data = nullptr;
  std::int64_t version = -1;  // -1: an inference tensor, which tracks no version
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  c10::Device device = c10::Device(c10::DeviceType::CPU);

  static TensorStamp of(const at::Tensor& tensor) {
    if (!tensor.defined()) return {};
    c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
    return {impl->has_storage() ? impl->storage().data() : nullptr,
            impl->is_inference() ? -1 : static_cast<std::int64_t>(tensor._version()),
            tensor.scalar_type(), tensor.device()};
  }
  /// Whether `tensor` still has this stamp. On every call with a prepared state, for every
  /// member tensor, so read straight from the TensorImpl (bench: BM_KernelDispatch8Sources).
  bool matches(const at::Tensor& tensor) const {
    if (!tensor.defined()) return data == nullptr && dtype == c10::ScalarType::Undefined;
    c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
    if (version >= 0) {
      if (impl->is_inference() ||
          static_cast<std::int64_t>(impl->version_counter().current_version()) != version) {
        return false;
      }
    } else if (!impl->is_inference()) {
      return false;
    }
    // No device compare: a tensor moved to another device has another data pointer.
    return (impl->has_storage() ? impl->storage().data() : nullptr) == data &&
           c10::typeMetaToScalarType(impl->dtype()) == dtype;
  }
};

/// A kernel attached to one chain: the per-call decision, the counters, the prepared state.
class KernelBinding final : public KernelRunner {
 public:
  KernelBinding(std::string name, std::vector<std::shared_ptr<const KernelImpl>> impls,
                std::vector<at::Tensor> sources, bool strict)
      : name_(std::move(name)),
        impls_(std::move(impls)),
        sources_(std::move(sources)),
        strict_(strict) {}

  const std::string& name() const noexcept override { return name_; }
  bool strict() const noexcept override { return strict_; }
  /// The next call rebuilds the state. Called for every call in training mode or with gradients:
  /// LibTorch's SGD writes parameters through `.data()`, whose version counter is a separate one,
  /// so an optimizer step is seen by no stamp, but a training step always runs a forward first.
  void invalidate() noexcept override { dirty_.store(true, std::memory_order_release); }

  KernelStats stats() const override {
    KernelStats stats;
    stats.runs = runs_.load(std::memory_order_relaxed);
    stats.replays_device = replays_[device].load(std::memory_order_relaxed);
    stats.replays_training = replays_[training].load(std::memory_order_relaxed);
    stats.replays_grad = replays_[grad].load(std::memory_order_relaxed);
    stats.replays_modes = replays_[modes].load(std::memory_order_relaxed);
    stats.replays_declined = replays_[declined].load(std::memory_order_relaxed);
    stats.prepares = prepares_.load(std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(rebuild_mutex_);
    if (const Prepared* prepared = current_.load()) {
      stats.state_bytes = prepared->own_bytes;
      stats.shared_state_bytes = prepared->shared_bytes;
    }
    return stats;
  }

  std::vector<c10::IValue>* try_run(const Chain& chain, Capture& capture) override {
    if (!chain.complete()) return nullptr;  // the replay reports the destroyed member
    const Mode mode = capture.modes.back();
    for (const Mode& member_mode : capture.modes) {
      if (!(member_mode == mode)) return decline(chain, capture, modes);
    }
    // The inputs, and the device of the first tensor among them.
    c10::SmallVector<const c10::IValue*, 8> inputs;
    c10::DeviceType device_type = c10::DeviceType::CPU;
    bool found_device = false, input_requires_grad = false;
    for (const FreeInput& free : chain.free_inputs()) {
      const c10::IValue& value = chain.free_input(capture, free);
      inputs.push_back(&value);
      if (!value.isTensor()) continue;
      const at::Tensor& tensor = value.toTensor();
      if (!tensor.defined()) continue;
      if (!found_device) device_type = tensor.device().type(), found_device = true;
      input_requires_grad = input_requires_grad || tensor.requires_grad();
    }
    if (!found_device && !sources_.empty() && sources_[0].defined()) {
      device_type = sources_[0].device().type();
    }
    const KernelImpl* impl = nullptr;
    for (const auto& candidate : impls_) {
      for (c10::DeviceType supported : candidate->options.devices) {
        if (supported == device_type) impl = candidate.get();
      }
    }
    if (impl == nullptr) return decline(chain, capture, device);
    c10::SmallVector<void*, 8> members;
    bool training_mode = false;
    for (std::size_t i = 0; i < chain.size(); ++i) {
      const SlotBase* slot = chain.member_slot(i);
      training_mode = training_mode || slot->module()->is_training();
      members.push_back(slot->impl());
    }
    if (training_mode && !impl->options.training) return decline(chain, capture, training);
    if (impl->checks_applies && !impl->applies(members.data())) {
      return decline(chain, capture, declined);
    }
    bool needs_grad = false;
    if (mode.grad && !mode.inference) {
      needs_grad = input_requires_grad;
      for (std::size_t s = 0; s < sources_.size() && !needs_grad; ++s) {
        needs_grad = sources_[s].requires_grad();
      }
      if (needs_grad && !impl->options.autograd) return decline(chain, capture, grad);
    }
    if (needs_grad || training_mode) invalidate();

    struct Reading {  // while set, no prepared state this call may use is freed
      std::atomic<int>* readers;
      ~Reading() {
        if (readers != nullptr) readers->fetch_sub(1);
      }
    } reading{nullptr};
    const Prepared* prepared = nullptr;
    if (impl->stateful) {
      readers_.fetch_add(1);
      reading.readers = &readers_;
      prepared = current(*impl, members.data());
    }
    struct ClearOnThrow {
      Capture& capture;
      ~ClearOnThrow() {
        if (std::uncaught_exceptions() > 0) capture.clear();
      }
    } guard{capture};
    auto& outputs = capture.outputs.back();
    outputs.clear();
    impl->run(prepared != nullptr ? prepared->state.get() : nullptr, members.data(), inputs.data(),
              outputs);
    for (auto& args : capture.args) args.clear();
    capture.next = 0;
    runs_.fetch_add(1, std::memory_order_relaxed);
    return &outputs;
  }

 private:
  enum Reason { device, training, grad, modes, declined, reasons };

  struct Prepared {
    const KernelImpl* impl = nullptr;
    std::shared_ptr<const void> state;
    std::vector<TensorStamp> stamps;
    std::uint64_t own_bytes = 0, shared_bytes = 0;
  };

  std::vector<c10::IValue>* decline(const Chain& chain, Capture& capture, Reason reason) {
    replays_[reason].fetch_add(1, std::memory_order_relaxed);
    if (reason == training || reason == grad) invalidate();
    if (strict_) {
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

  bool fresh(const Prepared& prepared, const KernelImpl& impl) const {
    if (prepared.impl != &impl) return false;
    for (std::size_t s = 0; s < sources_.size(); ++s) {
      if (!prepared.stamps[s].matches(sources_[s])) return false;
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
    // their data pointers, and that layout is what later calls must find.
    for (const at::Tensor& source : sources_) next->stamps.push_back(TensorStamp::of(source));
    measure(impl, *next);
    prepares_.fetch_add(1, std::memory_order_relaxed);
    const Prepared* fresh_state = next.get();
    owned_.push_back(std::move(next));
    current_.store(fresh_state);
    if (readers_.load() == 1) {  // only this call: every replaced state can go
      owned_.erase(owned_.begin(), owned_.end() - 1);
    }
    return fresh_state;
  }

  void measure(const KernelImpl& impl, Prepared& prepared) const {
    std::set<const void*> model_storages, counted;
    for (const at::Tensor& source : sources_) {
      if (source.defined() && source.has_storage()) model_storages.insert(source.storage().data());
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
  std::vector<at::Tensor> sources_;  // every parameter and buffer of the members
  bool strict_;
  std::atomic<std::uint64_t> runs_{0}, prepares_{0};
  std::atomic<bool> dirty_{false};
  std::atomic<std::uint64_t> replays_[reasons] = {};
  mutable std::mutex rebuild_mutex_;  // serialises prepare; guards owned_
  std::atomic<const Prepared*> current_{nullptr};
  std::atomic<int> readers_{0};
  std::vector<std::unique_ptr<Prepared>> owned_;  // current_ last; earlier ones until unread
};

/// Checks that kernel `name` fits `chain` (member types, free inputs, result) and binds it.
/// `paths` are the members' paths as the caller's messages should show them.
inline std::shared_ptr<KernelRunner> bind_kernel(const Chain& chain,
                                                 const std::vector<std::string>& paths,
                                                 const std::string& name, bool strict) {
  const auto impls = KernelRegistry::instance().find(name);
  const std::string where =
      fmt::format("kernel '{}' on chain [{}]", name, fmt::join(paths, " -> "));
  if (impls.empty()) {
    fail("fusion: unknown kernel '{}'; registered kernels: [{}]", name,
         fmt::join(KernelRegistry::instance().names(), ", "));
  }
  const KernelImpl& impl = *impls.front();
  if (impl.modules.size() != chain.size()) {
    fail("fusion: {}: the kernel takes {} module(s) ({}), the chain has {} member(s)", where,
         impl.modules.size(), fmt::join(impl.module_names, ", "), chain.size());
  }
  for (std::size_t i = 0; i < chain.size(); ++i) {
    if (impl.modules[i] != chain.member_slot(i)->impl_type()) {
      fail("fusion: {}: member #{} '{}' is a {}, but the kernel takes a {} there", where, i,
           paths[i], c10::demangle(chain.member_slot(i)->impl_type().name()), impl.module_names[i]);
    }
  }
  const auto& free = chain.free_inputs();
  std::vector<std::string> chain_inputs;
  for (const FreeInput& input : free) {
    chain_inputs.push_back(
        fmt::format("{} #{} of '{}'",
                    chain.member_slot(input.member)->signature().params[input.param].type.name,
                    input.param, paths[input.member]));
  }
  if (impl.inputs.size() != free.size()) {
    std::vector<std::string> kernel_inputs;
    for (const TypeInfo& type : impl.inputs) kernel_inputs.push_back(type.name);
    fail(
        "fusion: {}: the kernel takes {} free input(s) ({}), the chain has {}: [{}] (every "
        "parameter no earlier member feeds, in member and parameter order)",
        where, impl.inputs.size(), fmt::join(kernel_inputs, ", "), free.size(),
        fmt::join(chain_inputs, ", "));
  }
  for (std::size_t j = 0; j < free.size(); ++j) {
    const TypeInfo& expected =
        chain.member_slot(free[j].member)->signature().params[free[j].param].type;
    if (impl.inputs[j].type != expected.type) {
      fail("fusion: {}: free input #{} is parameter {}, but the kernel takes a {} there", where, j,
           chain_inputs[j], impl.inputs[j].name);
    }
  }
  const auto& result = chain.member_slot(chain.size() - 1)->signature().outputs;
  bool same_result = result.size() == impl.outputs.size();
  for (std::size_t o = 0; same_result && o < result.size(); ++o) {
    same_result = result[o].type == impl.outputs[o].type;
  }
  if (!same_result) {
    std::vector<std::string> want, got;
    for (const TypeInfo& type : result) want.push_back(type.name);
    for (const TypeInfo& type : impl.outputs) got.push_back(type.name);
    fail("fusion: {}: the kernel returns ({}), but the last member '{}' returns ({})", where,
         fmt::join(got, ", "), paths.back(), fmt::join(want, ", "));
  }
  std::vector<at::Tensor> sources;
  for (std::size_t i = 0; i < chain.size(); ++i) {
    torch::nn::Module* module = chain.member_slot(i)->module();
    for (const auto& tensor : module->parameters()) sources.push_back(tensor);
    for (const auto& tensor : module->buffers()) sources.push_back(tensor);
  }
  return std::make_shared<KernelBinding>(name, impls, std::move(sources), strict);
}

}  // namespace detail
}  // namespace fusion
