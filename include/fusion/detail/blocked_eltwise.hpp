// In-place activations on tensors in oneDNN's blocked layout. LibTorch has relu_ for them but no
// hardtanh_, clamp_ or hardswish_ (each fails: "Could not run 'aten::hardtanh_' with arguments
// from the 'MkldnnCPU' backend"), so a ReLU6 after a blocked convolution would go dense and back,
// two passes over the activations. TorchScript's optimize_for_inference has the same gap and fills
// it with JIT operators of its own (prim::MKLDNNClamp_, prim::MKLDNNHardSwish_, registered by
// LibTorch's frozen_ops_to_mkldnn.cpp) that run the ATen op on the tensor's whole buffer, padding
// included; both map 0 to 0, so padded channels stay zero. But LibTorch 1.13's version runs the op
// on as many elements as the tensor has logically: where oneDNN pads the channels (24 channels in
// blocks of 16) it computes the wrong ones (measured; 2.14's is right). So
// they are used only where the channels are a multiple of 16, which no blocked layout pads. They
// are reached here as TorchScript's graph reaches them: an Operation made from a node that carries
// their attributes (a LibTorch internal, docs/compatibility.md). Where a LibTorch lacks them, or
// the channels do not fit, the callers go dense and back.
#pragma once

#include <optional>

#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/runtime/operator.h>
#include <torch/types.h>

namespace fusion::detail {

class BlockedEltwise {
 public:
  /// clamp(x, 0, 6) in place on a blocked tensor (float32 or bfloat16); false (`x` untouched)
  /// where LibTorch lacks the operator or the channels are not a multiple of 16.
  static bool relu6_(const torch::Tensor& x) {
    static std::optional<torch::jit::Operation> op = make("prim::MKLDNNClamp_", true);
    return run(op, x);
  }
  /// hardswish(x) in place on a blocked tensor; false as relu6_.
  static bool hardswish_(const torch::Tensor& x) {
    static std::optional<torch::jit::Operation> op = make("prim::MKLDNNHardSwish_", false);
    return run(op, x);
  }

 private:
  static std::optional<torch::jit::Operation> make(const char* name, bool relu6_bounds) {
    const auto op = torch::jit::findOperatorFor(c10::OperatorName(name, ""));
    if (!op) return std::nullopt;
    // The Operation reads its attributes from the node when it is made, and keeps no reference
    // to it: the graph may go.
    torch::jit::Graph graph;
    torch::jit::Node* node = graph.create(c10::Symbol::fromQualString(name), 1);
    node->addInput(graph.addInput());
    if (relu6_bounds) {
      node->f_(torch::jit::attr::min_val, 0.0);
      node->f_(torch::jit::attr::max_val, 6.0);
    }
    return op->getOperation(node);
  }
  static bool run(std::optional<torch::jit::Operation>& op, const torch::Tensor& x) {
    if (!op || x.dim() < 2 || x.size(1) % 16 != 0) return false;
    torch::jit::Stack stack{x};
    (*op)(stack);  // non-const on 1.13 (a struct around a std::function), safe from any thread
    return true;
  }
};

}  // namespace fusion::detail
