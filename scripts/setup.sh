#!/usr/bin/env bash
# Installs what building and testing need, from Debian's packages. Idempotent: when everything is
# present it only checks. Run as root (or with sudo available).
set -euo pipefail

packages=(
  cmake g++ make ccache
  libtorch-dev          # LibTorch 1.13 (CPU)
  libopenblas0-openmp   # Debian's LibTorch links libblas.so.3: reference BLAS is ~50x slower
  libblis4-openmp       # one of the GEMM paths project() measures (include/fusion/detail/blis.hpp)
  libxsmm-dev           # another (include/fusion/detail/libxsmm.hpp): a static library
  libdnnl-dev libideep-dev  # oneDNN's own convolutions (include/fusion/detail/onednn_conv.hpp)
  libfmt-dev catch2 libbenchmark-dev nlohmann-json3-dev
  clang-format          # scripts/check-format, in the `here` stage
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$package")
done

if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || true)
case "$blas" in
  *openblas*) echo "setup: ok (libblas.so.3 -> $blas)" ;;
  *) echo "setup: warning: libblas.so.3 resolves to '$blas', not OpenBLAS: linear layers will be slow" >&2 ;;
esac
