"""Saves a seeded random torchvision resnet18 as torchvision exports it (its state_dict as it is,
num_batches_tracked included, in safetensors), an input and torchvision's logits for it, for the
C++ port to match (examples/resnet/torchvision/parity.sh runs it in a Debian sid chroot).

    python3 make_model.py OUT_DIR
"""
import json
import os
import sys

import torch
import torchvision
from safetensors.torch import save_file


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    print(f"torchvision {torchvision.__version__}, torch {torch.__version__}")
    torch.manual_seed(18)
    model = torchvision.models.resnet18(weights=None)
    # Running statistics from a few training-mode passes, so that batch norm is not the identity.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64) * 2 + 0.5)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out, "model.safetensors"))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(images)
    images.numpy().astype("<f4").tofile(os.path.join(out, "input.f32"))
    logits.numpy().astype("<f4").tofile(os.path.join(out, "expected_logits.f32"))
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"input": {"file": "input.f32", "shape": list(images.shape)},
                   "logits": {"file": "expected_logits.f32", "shape": list(logits.shape)}}, f)
    print(f"saved {len(model.state_dict())} tensors, logits {list(logits.shape)}, "
          f"largest {logits.abs().max().item():.3f}")


if __name__ == "__main__":
    main()
