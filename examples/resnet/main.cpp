// resnet_fusion: a torchvision ResNet-18 (seeded random weights and BatchNorm statistics, or a
// torchvision state_dict saved with safetensors), fused with resnet::block_plan() (the stem's
// conv+bn+relu+maxpool, and each BasicBlock with the library's residual block kernel), and checked
// against the unfused network. The command line is examples/common/cnn_demo.hpp's:
//
//   resnet_fusion [--weights FILE] [--input FILE] [--save-logits FILE] [--batch N]
//                 [--channels-last | --mkldnn] [--expect-logits FILE] [--auto [--min-speedup X]]
#include "cnn_demo.hpp"
#include "resnet.hpp"

int main(int argc, char** argv) {
  return cnn_demo::run<resnet::ResNet18>(
      argc, argv, {"resnet_fusion", "ResNet-18", resnet::init_random, resnet::block_plan});
}
