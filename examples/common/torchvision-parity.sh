#!/usr/bin/env bash
# CTest <example>.torchvision_parity: a C++ port against torchvision (Debian sid's
# python3-torchvision, in the chroot scripts/chroot makes and caches). torchvision-model.py saves a
# seeded random model and torchvision's logits; the example's demo must match them unfused, and
# with its kernels. Exit 77 (skipped) where no chroot can be made.
#
#   torchvision-parity.sh resnet18|mobilenet_v2 path/to/demo [demo options]
set -euo pipefail
arch=$1
binary=$(realpath "$2")
shift 2
repo=$(cd "$(dirname "$0")/../.." && pwd)
root=$("$repo/scripts/chroot-or-skip" sid python3-torchvision python3-torch python3-safetensors) || exit $?
out=/tmp/fusion-torchvision-parity.$arch.$$
rm -rf "${root:?}$out"
"$repo/scripts/in-chroot" "$root" python3 /src/examples/common/torchvision-model.py "$arch" "$out"
status=0
"$binary" --weights "$root$out/model.safetensors" --input "$root$out/input.npy" \
  --expect-logits "$root$out/logits.npy" "$@" || status=$?
rm -rf "${root:?}$out"
exit $status
