#!/usr/bin/env bash
# CTest qwen3.transformers_parity: the C++ port against Hugging Face transformers 5 (Debian sid's
# python3-transformers, in the chroot scripts/chroot makes and caches). make_models.py saves seeded
# random models there and records transformers' logits and greedy ids; qwen3_fusion must match
# them unfused, fused and with kernels. Exit 77 (skipped) where no chroot can be made.
#
#   parity.sh path/to/qwen3_fusion
set -euo pipefail
binary=$(realpath "$1")
repo=$(cd "$(dirname "$0")/../../.." && pwd)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
root=$("$repo/scripts/chroot-or-skip" sid python3-transformers python3-torch python3-safetensors) || exit $?
# Written inside the chroot, read from outside: no shared mount needed.
out=/tmp/fusion-transformers-parity.$$
rm -rf "${root:?}$out"
"$repo/scripts/in-chroot" "$root" python3 /src/examples/qwen3/transformers/make_models.py "$out" 2>&1 |
  grep -v -e "Writing model shards" -e "Loading weights" -e "^\[transformers\]"
status=0
for dir in "$root$out"/*/; do
  echo "== $(basename "$dir")"
  "$binary" --model-dir "$dir" --expect "$dir/expected.json" >"$log" 2>&1 || status=1
  grep -E "^(Model|Note|Refused|Loaded|Max diff|Generat|OK|FAILED)|qwen3_fusion:" "$log"
done
rm -rf "${root:?}$out"
exit $status
