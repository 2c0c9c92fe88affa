// What verify does around the runs it compares: a run's result as something comparable, the
// state each run starts from and is put back to, the training flags, and one run with its
// gradients.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/ivalue.h>
#include <fmt/format.h>
#include <torch/torch.h>

#include "fusion/detail/boxing.hpp"
#include "fusion/detail/compare.hpp"
#include "fusion/detail/traits.hpp"

namespace fusion::detail {

template <typename T>
struct is_pair : std::false_type {};
template <typename A, typename B>
struct is_pair<std::pair<A, B>> : std::true_type {};
template <typename T>
struct is_sequence : std::false_type {};
template <typename T, typename A>
struct is_sequence<std::vector<T, A>> : std::true_type {};
template <typename T, std::size_t N>
struct is_sequence<std::array<T, N>> : std::true_type {};
template <typename T>
struct is_map : std::false_type {};
template <typename K, typename V, typename C, typename A>
struct is_map<std::map<K, V, C, A>> : std::true_type {};
template <typename K, typename V, typename H, typename E, typename A>
struct is_map<std::unordered_map<K, V, H, E, A>> : std::true_type {};
template <typename T, typename = void>
struct is_ivalue_convertible : std::false_type {};  // c10::List<T>, c10::Dict<K, V>
template <typename T>
struct is_ivalue_convertible<c10::List<T>> : std::true_type {};
template <typename K, typename V>
struct is_ivalue_convertible<c10::Dict<K, V>> : std::true_type {};
template <typename T>
struct dependent_false : std::false_type {};

/// A run's result as an IValue that max_abs_diff can walk: tensors, numbers, strings, optionals,
/// and tuples, pairs, vectors, arrays, c10::Lists and maps of them, nested.
template <typename T>
c10::IValue comparable(const T& value) {
  using D = std::decay_t<T>;
  if constexpr (std::is_same_v<D, c10::IValue> || is_ivalue_convertible<D>::value) {
    return c10::IValue(value);
  } else if constexpr (std::is_same_v<D, at::Tensor> || std::is_arithmetic_v<D> ||
                       std::is_same_v<D, std::string>) {
    return box(value);
  } else if constexpr (is_tuple<D>::value || is_pair<D>::value) {
    return std::apply(
        [](const auto&... elements) {
          return c10::IValue(c10::ivalue::Tuple::create({comparable(elements)...}));
        },
        value);
  } else if constexpr (is_sequence<D>::value) {
    c10::impl::GenericList list(c10::AnyType::get());
    for (const auto& element : value) list.push_back(comparable(element));
    return list;
  } else if constexpr (is_map<D>::value) {
    c10::impl::GenericDict dict(c10::AnyType::get(), c10::AnyType::get());
    for (const auto& [key, element] : value) dict.insert(comparable(key), comparable(element));
    return dict;
  } else if constexpr (!std::is_same_v<typename optional_target<D>::type, void>) {
    return value.has_value() ? comparable(*value) : c10::IValue();
  } else {
    static_assert(dependent_false<D>::value,
                  "fusion::verify: run() must return what verify can compare: tensors, numbers, "
                  "strings, optionals, or tuples, pairs, vectors, arrays, c10::Lists and maps of "
                  "them (nested)");
    return {};
  }
}

inline void tensors_in(const c10::IValue& value, std::vector<at::Tensor>& out) {
  if (value.isTensor()) {
    out.push_back(value.toTensor());
  } else if (value.isTuple()) {
    for (const auto& element : value.toTupleRef().elements()) tensors_in(element, out);
  } else if (value.isList()) {
    for (const auto& element : value.toListRef()) tensors_in(element, out);
  } else if (value.isGenericDict()) {
    for (const auto& entry : value.toGenericDict()) tensors_in(entry.value(), out);
  }
}

/// Everything a run may change that verify must put back: parameter and buffer values, the
/// parameters' and inputs' gradients, and the default random generators. Each run starts from
/// the state verify found, so that the unfused and fused runs are compared on equal terms.
class SavedState {
 public:
  SavedState(torch::nn::Module& root, const std::vector<at::Tensor>& inputs) {
    for (const auto& item : root.named_parameters()) {
      names_.push_back("'" + item.key() + "'");
      gradient_owners_.push_back(item.value());
    }
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      names_.push_back(fmt::format("input #{}", i));
      gradient_owners_.push_back(inputs[i]);
    }
    for (const at::Tensor& tensor : gradient_owners_) gradients_.push_back(tensor.grad());
    torch::NoGradGuard no_grad;
    for (const auto& tensor : root.parameters()) save_value(tensor);
    for (const auto& tensor : root.buffers()) save_value(tensor);
    generators_.push_back(at::detail::getDefaultCPUGenerator());
    if (torch::cuda::is_available()) {
      // device_count() is size_t in LibTorch 1.13, c10::DeviceIndex in 2.x.
      const auto devices = static_cast<std::size_t>(torch::cuda::device_count());
      for (std::size_t d = 0; d < devices; ++d) {
        generators_.push_back(at::globalContext().defaultGenerator(
            at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(d))));
      }
    }
    for (at::Generator& generator : generators_) {
      std::lock_guard<std::mutex> lock(generator.mutex());
      generator_states_.push_back(generator.get_state());
    }
  }

  const std::vector<std::string>& gradient_names() const { return names_; }

  /// Values and generators as found, no gradients: the state each run starts from.
  void reset_for_run() {
    restore_values();
    for (at::Tensor& tensor : gradient_owners_) tensor.mutable_grad() = at::Tensor();
  }
  /// The gradients the last run left, one per gradient_names() entry (undefined where none).
  std::vector<at::Tensor> gradients() const {
    std::vector<at::Tensor> result;
    for (const at::Tensor& tensor : gradient_owners_) result.push_back(tensor.grad());
    return result;
  }
  /// Everything as found, gradients included.
  void restore() {
    restore_values();
    for (std::size_t i = 0; i < gradient_owners_.size(); ++i) {
      gradient_owners_[i].mutable_grad() = gradients_[i];
    }
  }

 private:
  void save_value(const at::Tensor& tensor) {
    if (!tensor.defined()) return;
    values_.push_back(tensor);
    saved_.push_back(tensor.clone());
  }
  // Compared, not tracked by version counter: some kernels (BatchNorm's running statistics) write
  // without bumping it. Copying only what changed keeps the others' version counters as they were.
  void restore_values() {
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < values_.size(); ++i) {
      if (!values_[i].equal(saved_[i])) values_[i].copy_(saved_[i]);
    }
    for (std::size_t g = 0; g < generators_.size(); ++g) {
      std::lock_guard<std::mutex> lock(generators_[g].mutex());
      generators_[g].set_state(generator_states_[g]);
    }
  }

  std::vector<std::string> names_;
  std::vector<at::Tensor> gradient_owners_, gradients_;
  std::vector<at::Tensor> values_, saved_;
  std::vector<at::Generator> generators_;
  std::vector<at::Tensor> generator_states_;
};

/// One run: its result, and with gradients on, every gradient it produced.
struct RunOutcome {
  c10::IValue result;
  std::vector<at::Tensor> gradients;
};

template <typename Run>
RunOutcome run_once(Run& run, SavedState& state, bool gradients) {
  state.reset_for_run();
  RunOutcome outcome{comparable(run()), {}};
  if (!gradients || !torch::GradMode::is_enabled()) return outcome;
  std::vector<at::Tensor> tensors;
  tensors_in(outcome.result, tensors);
  // A fixed random projection of every differentiable output: the same in every run.
  at::Generator generator = at::detail::createCPUGenerator(20241130);
  at::Tensor loss;
  for (const at::Tensor& tensor : tensors) {
    if (!tensor.defined() || !tensor.requires_grad() || !tensor.is_floating_point()) continue;
    const at::Tensor weights =
        at::randn(tensor.sizes(), generator, at::TensorOptions(at::kFloat)).to(tensor.device());
    const at::Tensor term = (tensor.to(at::kFloat) * weights).sum().cpu();
    loss = loss.defined() ? loss + term : term;
  }
  if (loss.defined()) {
    loss.backward();
    outcome.gradients = state.gradients();
  }
  return outcome;
}

/// The training flag of every module under a root, to put back after verify ran in eval().
class TrainingFlags {
 public:
  explicit TrainingFlags(torch::nn::Module& root)
      : root_(root), root_training_(root.is_training()) {
    for (const auto& module : root.modules(/*include_self=*/false)) {
      modules_.push_back(module);
      training_.push_back(module->is_training());
    }
  }
  bool any_training() const {
    if (root_training_) return true;
    for (bool flag : training_) {
      if (flag) return true;
    }
    return false;
  }
  /// Every module in eval mode.
  void all_eval() { root_.eval(); }
  /// Module::train is recursive: set in pre-order, each module after its ancestors.
  void restore() {
    root_.train(root_training_);
    for (std::size_t i = 0; i < modules_.size(); ++i) modules_[i]->train(training_[i]);
  }

 private:
  torch::nn::Module& root_;
  bool root_training_;
  std::vector<std::shared_ptr<torch::nn::Module>> modules_;
  std::vector<bool> training_;
};

}  // namespace fusion::detail
