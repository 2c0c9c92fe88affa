// mobilenet_fusion: a torchvision MobileNetV2 (seeded random weights and BatchNorm statistics, or
// a torchvision state_dict saved with safetensors), fused with mobilenet::block_plan() (the stem,
// every inverted residual block and the last 1x1 convolution each as one chain, on the block
// kernels the example declares by layout), and checked against the unfused network. The command
// line is examples/common/cnn_demo.hpp's:
//
//   mobilenet_fusion [--weights FILE] [--input FILE] [--save-logits FILE] [--batch N]
//                    [--channels-last | --mkldnn] [--expect-logits FILE] [--auto [--min-speedup X]]
#include "cnn_demo.hpp"
#include "mobilenet.hpp"

int main(int argc, char** argv) {
  return cnn_demo::run<mobilenet::MobileNetV2>(
      argc, argv,
      {"mobilenet_fusion", "MobileNetV2", mobilenet::init_random, mobilenet::block_plan});
}
