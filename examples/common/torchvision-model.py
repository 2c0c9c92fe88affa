"""Saves a seeded random torchvision model (resnet18 or mobilenet_v2) as torchvision exports it
(its state_dict as it is, num_batches_tracked included, in safetensors), an input [2, 3, 224, 224]
and torchvision's logits for it (.npy), for the C++ ports to match
(examples/common/torchvision-parity.sh runs it in a Debian sid chroot). With --torchscript, also
the model traced with TorchScript (model.pt), the anchor bench/cnn-bench.cpp times the fused
networks against after torch::jit::freeze and optimize_for_inference.

    python3 torchvision-model.py resnet18|mobilenet_v2 OUT_DIR [--torchscript]
"""
import os
import sys

import numpy

import torch
import torchvision
from safetensors.torch import save_file


def main():
    arch, out = sys.argv[1], sys.argv[2]
    if arch not in ("resnet18", "mobilenet_v2"):
        sys.exit(f"torchvision-model.py: unknown model '{arch}' (resnet18, mobilenet_v2)")
    os.makedirs(out, exist_ok=True)
    print(f"torchvision {torchvision.__version__}, torch {torch.__version__}")
    torch.manual_seed(18)
    model = getattr(torchvision.models, arch)(weights=None)
    # Running statistics from a few training-mode passes, so that batch norm is not the identity.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64) * 2 + 0.5)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out, "model.safetensors"))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = model(images)
    numpy.save(os.path.join(out, "input.npy"), images.numpy().astype("<f4"))
    numpy.save(os.path.join(out, "logits.npy"), logits.numpy().astype("<f4"))
    print(f"saved {arch}: {len(model.state_dict())} tensors, logits {list(logits.shape)}, "
          f"largest {logits.abs().max().item():.3f}")
    if "--torchscript" in sys.argv[3:]:
        with torch.no_grad():
            traced = torch.jit.trace(model, images[:1])
        traced.save(os.path.join(out, "model.pt"))
        print("saved the traced model, model.pt")


if __name__ == "__main__":
    main()
