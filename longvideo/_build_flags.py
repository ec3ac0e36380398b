"""Compiler flags for the CUDA extension, shared by setup.py and the first-use JIT build.

Kept free of imports except ``os`` so setup.py can load it without importing the package.
``LONGVIDEO_CUDA_ARCHS`` (e.g. ``90`` or ``80;90``) chooses the machine-code targets; the GPU job
builds for its own device only (half the device code, half the ptxas time).
"""
import os

DEFAULT_ARCHS = "80;90"


def cxx_flags():
    return ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch


def nvcc_flags():
    # sm_80 (A100) and sm_90 (H100/H200) cover the devices the benchmarks target; mma.sync
    # tensor-core instructions used by the attention kernels need sm_80+.
    return [
        "-O3",
        "-lineinfo",
        *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in _archs()),
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]


def _archs():
    raw = os.environ.get("LONGVIDEO_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    bad = [a for a in archs if not a.isdigit() or int(a) < 80]
    if bad or not archs:
        raise ValueError(f"LONGVIDEO_CUDA_ARCHS={raw!r}: expected compute capabilities >= 8.0 such as '90' or '80;90' "
                         "(the attention kernels use sm_80 tensor-core instructions)")
    return archs
