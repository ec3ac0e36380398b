#!/usr/bin/env bash
# Build check of csrc/ without a GPU (nothing built here runs a kernel):
#  1. *.cu: nvcc -c; these translation units include only CUDA headers.
#  2. *.cpp: g++ -c against torch's headers (the CPU wheel lacks c10/cuda's generated macros, so
#     the glue code stays free of c10/cuda and ATen/cuda headers by design).
#  3. link everything into one shared library against libtorch (CPU) and libcudart, load it with
#     torch.ops.load_library, and check that every CUDA backend's Python call binds to the schema
#     its private op registers (.ci/check_extension_bindings.py).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "compile_csrc: nvcc not found" >&2; exit 1; fi
CUDA_ROOT=""
for cand in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
  if [ -n "$cand" ] && ls "$cand"/lib64/libcudart.so* >/dev/null 2>&1; then CUDA_ROOT=$cand; break; fi
done
if [ -z "$CUDA_ROOT" ]; then echo "compile_csrc: libcudart not found (set CUDA_HOME)" >&2; exit 1; fi
ARCH=${LONGVIDEO_CHECK_ARCH:-"-gencode=arch=compute_90,code=sm_90"}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
shopt -s nullglob
for f in csrc/*.cu; do
  echo "nvcc  $f"
  "$NVCC" -std=c++17 -O2 $ARCH -Xcompiler -fPIC -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ \
      -U__CUDA_NO_BFLOAT16_CONVERSIONS__ -c "$f" -o "$tmp/$(basename "$f").o"
done
INC=$(python -c 'import sysconfig, torch.utils.cpp_extension as c; print(" ".join("-I"+p for p in c.include_paths()+[sysconfig.get_paths()["include"]]))')
TORCH_LIB=$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
for f in csrc/*.cpp; do
  echo "g++   $f"
  g++ -std=c++17 -Wno-c++20-extensions -O1 -fPIC $INC -DTORCH_EXTENSION_NAME=longvideo_C \
      -DTORCH_API_INCLUDE_EXTENSION_H -c "$f" -o "$tmp/$(basename "$f").o"
done
echo "link  longvideo_C.so"
g++ -shared -o "$tmp/longvideo_C.so" "$tmp"/*.o -L"$TORCH_LIB" -lc10 -ltorch_cpu -ltorch -ltorch_python \
    -L"$CUDA_ROOT/lib64" -lcudart -Wl,-rpath,"$CUDA_ROOT/lib64"
python .ci/check_extension_bindings.py "$tmp/longvideo_C.so"
echo "compile_csrc: ok"
