#!/usr/bin/env bash
# CTest qwen3.transformers_parity and gpt2.transformers_parity: an example's C++ port against
# Hugging Face transformers 5 (Debian sid's python3-transformers, in the chroot scripts/chroot makes
# and caches). The example's make_models.py saves seeded random models there and records
# transformers' logits and greedy ids; the demo must match them unfused, fused and with kernels.
# Exit 77 (skipped) where no chroot can be made.
#
#   transformers-parity.sh path/to/demo_binary examples/NAME/transformers/make_models.py
set -euo pipefail
binary=$(realpath "$1")
script=$2  # relative to the repository root
repo=$(cd "$(dirname "$0")/../.." && pwd)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
root=$("$repo/scripts/chroot-or-skip" sid python3-transformers python3-torch python3-safetensors) || exit $?
# Written inside the chroot, read from outside: no shared mount needed.
out=/tmp/fusion-transformers-parity.$$
rm -rf "${root:?}$out"
"$repo/scripts/in-chroot" "$root" python3 "/src/$script" "$out" 2>&1 |
  grep -v -e "Writing model shards" -e "Loading weights" -e "^\[transformers\]"
status=0
for dir in "$root$out"/*/; do
  echo "== $(basename "$dir")"
  "$binary" --model-dir "$dir" --expect "$dir/expected.json" >"$log" 2>&1 || status=1
  grep -E "^(Model|Note|Refused|Loaded|Max diff|Generat|OK|FAILED)|_fusion:" "$log"
done
rm -rf "${root:?}$out"
exit $status
