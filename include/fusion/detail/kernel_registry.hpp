// The registry of kernels by name: one implementation per set of device types, all of one name
// taking the same modules and inputs and returning the same result.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <typeindex>
#include <utility>
#include <vector>

#include <c10/core/DeviceType.h>

#include "fusion/detail/abi.hpp"
#include "fusion/detail/boxing.hpp"
#include "fusion/detail/typed_kernel.hpp"
#include "fusion/error.hpp"

namespace fusion::detail {

inline namespace FUSION_ABI_VERSION {

/// Kernels by name; each name has one implementation per set of device types.
class FUSION_API KernelRegistry {
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

  /// Runs `registrations` unless a call for `group` ran it already (or is running it); false
  /// then. A `registrations` that throws leaves the group unmarked.
  bool once(const std::string& group, const std::function<void()>& registrations) {
    // Recursive: registrations may run another group's (register_builtin_kernels inside a
    // user's); not mutex_, which add() takes.
    std::lock_guard<std::recursive_mutex> lock(once_mutex_);
    if (!groups_.insert(group).second) return false;
    try {
      registrations();
    } catch (...) {
      groups_.erase(group);
      throw;
    }
    return true;
  }

  /// Each kernel's member types (the same for all its implementations), by name.
  std::vector<std::pair<std::string, std::vector<std::type_index>>> member_types() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::pair<std::string, std::vector<std::type_index>>> result;
    for (const auto& [name, impls] : kernels_) result.emplace_back(name, impls.front()->modules);
    return result;
  }

  /// Whether fusion::optimize tries kernel `name` only where named: an implementation computes
  /// in another dtype than its inputs (KernelOptions::compute_dtype) or says so
  /// (KernelOptions::optimize_tries).
  bool only_where_named(const std::string& name) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = kernels_.find(name);
    if (found == kernels_.end()) return false;
    for (const auto& impl : found->second) {
      if (impl->options.compute_dtype || !impl->options.optimize_tries) return true;
    }
    return false;
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
  std::recursive_mutex once_mutex_;
  std::set<std::string> groups_;  // the groups register_kernels_once ran
};

}  // namespace FUSION_ABI_VERSION

}  // namespace fusion::detail
