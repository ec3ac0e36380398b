#!/usr/bin/env bash
# Compile check of csrc/ (no GPU here: nothing built is run).
#  - *.cu: nvcc -c; these translation units include only CUDA headers.
#  - *.cpp: g++ -fsyntax-only against torch's headers (the CPU wheel lacks c10/cuda's generated
#    macros, so the glue code stays free of c10/cuda and ATen/cuda headers by design).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "compile_csrc: nvcc not found" >&2; exit 1; fi
ARCH=${LONGVIDEO_CHECK_ARCH:-"-gencode=arch=compute_90,code=sm_90"}
tmp=$(mktemp -d)
status=0
shopt -s nullglob
for f in csrc/*.cu; do
  echo "nvcc  $f"
  if ! "$NVCC" -std=c++17 -O2 $ARCH -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ \
       -U__CUDA_NO_BFLOAT16_CONVERSIONS__ -c "$f" -o "$tmp/$(basename "$f").o"; then status=1; fi
done
INC=$(python -c 'import sysconfig, torch.utils.cpp_extension as c; print(" ".join("-I"+p for p in c.include_paths()+[sysconfig.get_paths()["include"]]))')
for f in csrc/*.cpp; do
  echo "g++   $f"
  if ! g++ -std=c++17 -Wno-c++20-extensions -fsyntax-only $INC -DTORCH_EXTENSION_NAME=longvideo_C -DTORCH_API_INCLUDE_EXTENSION_H "$f"; then status=1; fi
done
rm -rf "$tmp"
[ $status -eq 0 ] && echo "compile_csrc: ok" || echo "compile_csrc: FAILED" >&2
exit $status
