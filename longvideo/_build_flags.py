"""Compiler flags for the CUDA extension, shared by setup.py and the first-use JIT build.

Kept free of imports so setup.py can load it without importing the package.
"""


def cxx_flags():
    return ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch


def nvcc_flags():
    # sm_80 (A100) and sm_90 (H100/H200) cover the devices the benchmarks target; mma.sync
    # tensor-core instructions used by the attention kernels need sm_80+.
    return [
        "-O3",
        "-lineinfo",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
