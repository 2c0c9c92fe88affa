// fusion::verify: catches chains that fusion would compute wrongly.
//
// A replay is exact only when the chain's intermediate values flow solely from one member into the
// next: parent code between two members (`mlp(norm(h) * 2)`) or a member's output used twice is
// skipped by the replay, because a collector's placeholder is thrown away. verify finds such chains
// by running the model on sample inputs unfused and then with one chain fused at a time, comparing
// results and, with gradients on, every parameter's gradient.
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
#include "fusion/fuse.hpp"

namespace fusion {

struct VerifyOptions {
  /// The largest absolute difference accepted, for results and gradients alike. Unset, each
  /// tensor is compared within a tolerance relative to its largest magnitude in the unfused run,
  /// by dtype: 1e-10 for float64, 1e-5 for float32, 1e-2 for float16, 5e-2 for bfloat16; integer
  /// and boolean tensors and other values must be equal. A replay is exact (it runs the same ops);
  /// the defaults are for kernels, whose arithmetic is reordered.
  std::optional<double> tolerance = std::nullopt;
  /// With grad mode on: backpropagate a fixed random projection of the result and compare the
  /// gradients of every parameter under the root and of `inputs`.
  bool gradients = true;
  /// Tensor inputs (leaves that require grad) whose gradients to compare as well.
  std::vector<at::Tensor> inputs = {};
  /// A chain with a kernel passes only if its kernel computed a run: one that replayed compares
  /// the replay with itself. When the kernel does not apply as `run` is called (grad mode on and
  /// no autograd, training mode and not registered for training), verify checks it on a second
  /// pair of runs in eval() under NoGradGuard. False: a chain whose kernel never ran passes on
  /// its replay's result.
  bool require_kernel_run = true;
};

struct ChainCheck {
  FusedChain chain;
  double max_abs_diff = 0;   // over every tensor and number the run returned; inf if shapes differ
  double max_grad_diff = 0;  // over every gradient compared; inf if one exists on one side only
  std::string worst_gradient;   // the parameter or input where max_grad_diff was found
  std::string error;            // what the fused run threw, if it threw
  bool kernel_ran = false;      // with a kernel (chain.kernel): whether it computed the fused run
  bool kernel_in_eval = false;  // it ran only in the second check, in eval() under NoGradGuard
  bool ok = false;
};

struct VerifyReport {
  std::vector<ChainCheck> chains;

  bool ok() const {
    for (const ChainCheck& check : chains) {
      if (!check.ok) return false;
    }
    return true;
  }
  /// One line per chain: "ok" or what went wrong.
  std::string to_string() const {
    std::string text;
    for (const ChainCheck& check : chains) {
      fmt::format_to(std::back_inserter(text), "{} [{}]", check.ok ? "ok  " : "FAIL",
                     fusion::to_string(check.chain));
      if (!check.chain.kernel.empty()) {
        fmt::format_to(std::back_inserter(text), " kernel '{}'{}", check.chain.kernel,
                       !check.kernel_ran      ? " (did not run: not checked)"
                       : check.kernel_in_eval ? " (checked in eval() under NoGradGuard)"
                                              : "");
      }
      text += ": ";
      if (!check.error.empty()) {
        fmt::format_to(std::back_inserter(text), "threw: {}\n", check.error);
        continue;
      }
      fmt::format_to(std::back_inserter(text), "max abs diff {:g}", check.max_abs_diff);
      if (!check.worst_gradient.empty()) {
        fmt::format_to(std::back_inserter(text), ", gradients: max abs diff {:g} at {}",
                       check.max_grad_diff, check.worst_gradient);
      }
      text += '\n';
    }
    return text;
  }
};

namespace detail {

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

/// Compares a fused run with the unfused one into `check` (results, then each gradient).
inline void compare_runs(ChainCheck& check, const RunOutcome& reference, const RunOutcome& fused,
                         const std::vector<std::string>& names, std::optional<double> tolerance) {
  const c10::optional<double> absolute =
      tolerance ? c10::optional<double>(*tolerance) : c10::nullopt;
  const Difference result = difference(reference.result, fused.result, absolute);
  check.max_abs_diff = result.max_abs;
  double excess = result.excess;
  const bool compare = !reference.gradients.empty() || !fused.gradients.empty();
  for (std::size_t g = 0; compare && g < names.size(); ++g) {
    const at::Tensor none;
    const at::Tensor& a = g < reference.gradients.size() ? reference.gradients[g] : none;
    const at::Tensor& b = g < fused.gradients.size() ? fused.gradients[g] : none;
    const Difference diff = difference(a, b, absolute);
    excess = std::max(excess, diff.excess);
    if (check.worst_gradient.empty() || diff.max_abs > check.max_grad_diff) {
      check.max_grad_diff = diff.max_abs;
      check.worst_gradient = names[g];
      if (a.defined() != b.defined()) {
        check.worst_gradient +=
            a.defined() ? " (a gradient unfused, none fused)" : " (a gradient fused, none unfused)";
      }
    }
  }
  check.ok = excess <= 1;
}

}  // namespace detail

/// Runs `run()` (one forward over sample inputs, returning its outputs: a tensor, a tuple, a
/// vector, a map, ...) with every fused chain under `root` switched off, then once per chain with
/// only that chain on, and reports the chains whose results differ by more than the tolerance or
/// that threw. In grad mode it also backpropagates a fixed random projection of each result and
/// compares the gradient of every parameter under `root` (and of `options.inputs`): a chain that
/// changes only gradients fails too. Run it under NoGradGuard to compare results only.
///
/// A chain with a kernel is checked with its kernel: as `run` is called when the kernel applies
/// there, else on a second pair of runs in eval() under NoGradGuard (results only); a kernel that
/// runs in neither fails the check (see VerifyOptions::require_kernel_run). The default
/// tolerances are per dtype (see VerifyOptions::tolerance).
///
/// Each run starts from the state verify found, and verify leaves it so: parameter and buffer
/// values (BatchNorm statistics move in training mode), gradients, the default random generators,
/// and the fusion state, also when `run` throws. It holds a copy of the parameters and buffers
/// while it runs. Check in the mode the model will be used in: in training mode, random draws
/// between chain members (dropout in a collector, `randn_like` in the parent) happen in another
/// order when fused, and verify reports that as a difference.
template <typename Root, typename Run>
VerifyReport verify(Root& root, Run&& run, const VerifyOptions& options) {
  auto& module = detail::module_of(root);
  const auto sites = detail::sites_under(module);
  auto chains = detail::chains_under(sites);
  std::vector<bool> was_attached;
  for (auto& chain : chains) was_attached.push_back(chain->attached());
  detail::SavedState state(module, options.inputs);
  detail::TrainingFlags flags(module);

  struct Restore {
    std::vector<std::shared_ptr<detail::Chain>>& chains;
    std::vector<bool>& attached;
    detail::SavedState& state;
    detail::TrainingFlags& flags;
    ~Restore() {
      for (std::size_t i = 0; i < chains.size(); ++i) {
        if (attached[i])
          chains[i]->attach();
        else
          chains[i]->detach();
      }
      flags.restore();
      state.restore();
    }
  } restore{chains, was_attached, state, flags};

  {
    // verify switches chains on and off between its runs: refused while another thread runs one.
    const detail::Quiesce quiet(chains, "verify");
    for (auto& chain : chains) chain->detach();
  }
  const detail::RunOutcome reference = detail::run_once(run, state, options.gradients);
  std::optional<detail::RunOutcome> eval_reference;  // unfused, in eval() under NoGradGuard
  const bool can_retry_in_eval = torch::GradMode::is_enabled() || flags.any_training();

  VerifyReport report;
  for (auto& chain : chains) {
    ChainCheck check;
    check.chain = detail::info_under(*chain, sites);
    const auto& kernel = chain->kernel();
    const auto runs = [&] { return kernel ? kernel->stats().runs : 0; };
    chain->attach();
    try {
      std::uint64_t before = runs();
      detail::compare_runs(check, reference, detail::run_once(run, state, options.gradients),
                           state.gradient_names(), options.tolerance);
      check.kernel_ran = runs() > before;
      if (kernel && !check.kernel_ran && can_retry_in_eval) {
        // The kernel replayed: check it where it applies, against the unfused model there.
        const torch::NoGradGuard no_grad;
        module.eval();
        if (!eval_reference) {
          chain->detach();
          eval_reference = detail::run_once(run, state, false);
          chain->attach();
        }
        before = runs();
        ChainCheck fresh;
        fresh.chain = std::move(check.chain);
        check = std::move(fresh);
        detail::compare_runs(check, *eval_reference, detail::run_once(run, state, false), {},
                             options.tolerance);
        check.kernel_ran = check.kernel_in_eval = runs() > before;
        flags.restore();
      }
      if (kernel && !check.kernel_ran && options.require_kernel_run) check.ok = false;
    } catch (const std::exception& error) {
      check.error = error.what();
      check.ok = false;
    }
    flags.restore();
    chain->detach();
    report.chains.push_back(std::move(check));
  }
  return report;
}

/// verify with the default options (the default tolerances).
template <typename Root, typename Run>
VerifyReport verify(Root& root, Run&& run) {
  return verify(root, std::forward<Run>(run), VerifyOptions{});
}

/// verify with an absolute tolerance and the default options otherwise.
template <typename Root, typename Run>
VerifyReport verify(Root& root, Run&& run, double tolerance) {
  VerifyOptions options;
  options.tolerance = tolerance;
  return verify(root, std::forward<Run>(run), options);
}

}  // namespace fusion
