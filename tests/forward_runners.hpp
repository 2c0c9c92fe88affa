// Threads that run a model's forward over and over while a test changes its fusion: what the
// [threads] tests share.
#pragma once

#include <atomic>
#include <cstddef>
#include <thread>
#include <vector>

#include <torch/torch.h>

namespace fusion_test {

/// `count` threads calling `model` on `inputs` in turn (each thread starting at its own index),
/// under NoGradGuard, until stop(): counting forwards, results not allclose(rtol, atol) to
/// `expected`, and calls that threw. The constructor returns once every thread runs, so that the
/// test's changes race forwards from the start.
template <typename Model>
class ForwardRunners {
 public:
  ForwardRunners(Model& model, const std::vector<torch::Tensor>& inputs,
                 const std::vector<torch::Tensor>& expected, double rtol, double atol,
                 int count = 4) {
    std::atomic<int> started{0};
    // Pointers, not the constructor's references: the threads outlive this call.
    Model* runs = &model;
    const auto* in = &inputs;
    const auto* out = &expected;
    for (int t = 0; t < count; ++t) {
      threads_.emplace_back([this, &started, runs, in, out, t, rtol, atol] {
        torch::NoGradGuard no_grad;
        ++started;
        for (std::size_t k = static_cast<std::size_t>(t); !stop_; k = (k + 1) % in->size()) {
          try {
            if (!torch::allclose((*runs)((*in)[k]), (*out)[k], rtol, atol)) ++wrong;
            ++forwards;
          } catch (...) {
            ++failed;
          }
        }
      });
    }
    while (started < count) std::this_thread::yield();
  }
  ForwardRunners(const ForwardRunners&) = delete;
  ForwardRunners& operator=(const ForwardRunners&) = delete;
  ~ForwardRunners() { stop(); }

  void stop() {
    stop_ = true;
    for (auto& thread : threads_) {
      if (thread.joinable()) thread.join();
    }
  }

  std::atomic<int> forwards{0}, wrong{0}, failed{0};

 private:
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

}  // namespace fusion_test
