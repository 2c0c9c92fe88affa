#!/usr/bin/env bash
# CTest resnet.torchvision_parity: the C++ ResNet-18 against torchvision (Debian sid's
# python3-torchvision, in the chroot scripts/chroot makes and caches). make_model.py saves a seeded
# random resnet18 and torchvision's logits; resnet_fusion must match them unfused, and with the
# folding kernels. Exit 77 (skipped) where no chroot can be made.
#
#   parity.sh path/to/resnet_fusion
set -euo pipefail
binary=$(realpath "$1")
repo=$(cd "$(dirname "$0")/../../.." && pwd)
root=$("$repo/scripts/chroot-or-skip" sid python3-torchvision python3-torch python3-safetensors) || exit $?
out=/tmp/fusion-torchvision-parity.$$
rm -rf "${root:?}$out"
"$repo/scripts/in-chroot" "$root" python3 /src/examples/resnet/torchvision/make_model.py "$out"
status=0
"$binary" --weights "$root$out/model.safetensors" --input "$root$out/input.npy" \
  --expect-logits "$root$out/logits.npy" || status=$?
rm -rf "${root:?}$out"
exit $status
