"""Build script.

The CUDA extension ``longvideo._C`` is built here only when the build environment has a CUDA
build of torch and nvcc (e.g. ``pip install --no-build-isolation -e .`` on a GPU machine).
Everywhere else this installs pure Python and never fails: the extension is then compiled on
first use by ``longvideo._extension`` (torch.utils.cpp_extension + ninja), and if that is not
possible the ops fall back to their Triton or reference backends.
"""
import glob
import os

from setuptools import setup


def _cuda_extension():
    if os.environ.get("LONGVIDEO_NO_CUDA_BUILD"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:  # torch absent from an isolated build env: JIT build later
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join(here, "csrc", "*.cpp")) + glob.glob(os.path.join(here, "csrc", "*.cu")))
    import runpy

    flags = runpy.run_path(os.path.join(here, "longvideo", "_build_flags.py"))  # shared with the JIT build
    cxx_flags, nvcc_flags = flags["cxx_flags"], flags["nvcc_flags"]

    ext = CUDAExtension(
        name="longvideo._C",
        sources=[os.path.relpath(s, here) for s in sources],
        extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
