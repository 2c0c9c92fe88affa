// The options of fusion's calls: FuseOptions (fuse_modules), KernelOptions (register_kernel) and
// KernelPolicy (what a chain with a kernel does on each call).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

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
  /// Takes float32 CPU inputs in oneDNN's blocked layout (`Tensor::is_mkldnn()`), computes them
  /// without reordering, and may keep its result blocked when asked (BlockedHandOff::take_grant):
  /// fusion::Sequential then hands results on blocked between consecutive one-member chains with
  /// such kernels (detail/blocked_layout.hpp), reordering once on the way in and once out.
  bool blocked_layout = false;
  /// The dtype the kernel computes in where that is not its inputs' (a reduced-precision kernel:
  /// bfloat16 weights and activations, float32 accumulation, float32 results); unset: the inputs'.
  /// Its results are then compared within that dtype's tolerance (verify, KernelPolicy::checked),
  /// report shows it, and fusion::optimize tries the kernel only when OptimizeOptions::kernels
  /// names it: a loss of precision is the user's choice, never found by itself.
  std::optional<c10::ScalarType> compute_dtype = std::nullopt;
  /// Whether fusion::optimize tries the kernel on the chains it finds of its member types; false:
  /// only where OptimizeOptions::kernels names it (a kernel that fits every module of a common
  /// type, such as fusion.linear, and is worth timing only where the user asks).
  bool optimize_tries = true;
};

/// What a chain with a kernel does on each call.
enum class KernelPolicy {
  /// When the kernel does not apply to a call (another device, training mode, gradients needed,
  /// its applies() says no), replay the members and count why.
  fallback,
  /// Throw a FusionError saying why the kernel does not apply, instead of replaying.
  strict,
  /// As fallback, and on every call the kernel runs, also replay the members and compare: a
  /// result whose structure, shape, dtype or device differs, or whose values differ by more than
  /// the default tolerance of their dtype (see VerifyOptions), throws a FusionError naming the
  /// kernel and the chain. Twice the work: for tests and for trying a new kernel. Except calls
  /// with a free input of a user type (not a tensor, number, string, list or None: a KV cache
  /// pointer), whose replay would change that value a second time; `report` counts the checks.
  checked,
};

/// How fuse_modules builds chains (and a plan's rules).
struct FuseOptions {
  /// Skip bindings that some pattern lacks (a layer without the module) instead of failing.
  bool skip_incomplete_chains = false;
  /// A registered kernel (see register_kernel) to run in place of the replay; empty: replay.
  /// With a kernel, a chain may have a single member: "replace this module's forward".
  std::string kernel = {};
  KernelPolicy policy = KernelPolicy::fallback;
};

}  // namespace fusion
