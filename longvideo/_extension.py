"""Loading of the CUDA extension ``longvideo._C``.

The extension holds the CUDA-extension backends of the ops. Its kernels register private ops
(``torch.ops.longvideo._<op>_cuda``) into the ``longvideo`` namespace; the public ops dispatch to
them through :mod:`longvideo.ops._registry`. Loading order:

1. ``import longvideo._C`` (built by setup.py when installed with a CUDA build of torch);
2. otherwise, on a machine with a CUDA device and nvcc, a JIT build of ``csrc/`` with
   ``torch.utils.cpp_extension.load`` (ninja), cached under ``$LONGVIDEO_BUILD_DIR`` or
   ``~/.cache/longvideo/<torch version>``;
3. otherwise the extension is unavailable and :func:`extension_status` says why.

Loading never raises: a failure is recorded and the ops fall back to Triton or the reference.
Set ``LONGVIDEO_NO_JIT=1`` to skip step 2.
"""
from __future__ import annotations

import glob
import os
import threading
from pathlib import Path

_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "reason": "not loaded yet", "how": None}


def csrc_dir() -> Path:
    """Directory of the CUDA sources: ``longvideo/csrc`` when installed, ``csrc/`` in a checkout."""
    pkg = Path(__file__).resolve().parent
    for cand in (pkg / "csrc", pkg.parent / "csrc"):
        if cand.is_dir() and any(cand.glob("*.cu")):
            return cand
    try:  # installed as the package ``longvideo.csrc`` (package_dir mapping)
        import importlib.util

        spec = importlib.util.find_spec("longvideo.csrc")
        if spec is not None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
    except Exception:
        pass
    return pkg.parent / "csrc"


def _jit_build():
    import torch
    from torch.utils import cpp_extension

    from ._build_flags import cxx_flags, nvcc_flags

    src = csrc_dir()
    sources = sorted(glob.glob(str(src / "*.cpp")) + glob.glob(str(src / "*.cu")))
    if not sources:
        raise RuntimeError(f"no CUDA sources found in {src}")
    build_dir = os.environ.get("LONGVIDEO_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "longvideo", f"torch{torch.__version__}".replace("+", "_")
    )
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name="longvideo_C",
        sources=sources,
        extra_cflags=cxx_flags(),
        extra_cuda_cflags=nvcc_flags(),
        build_directory=build_dir,
        is_python_module=False,
        verbose=bool(os.environ.get("LONGVIDEO_VERBOSE_BUILD")),
    )


def load_extension() -> bool:
    """Load the extension once; return whether its ops are registered. Never raises."""
    with _lock:
        if _state["tried"]:
            return _state["ok"]
        _state["tried"] = True
        import torch

        try:
            from . import _C  # noqa: F401

            _state.update(ok=True, reason="prebuilt longvideo._C", how="prebuilt")
            return True
        except ImportError as exc:
            prebuilt_err = str(exc)
        if torch.version.cuda is None:
            _state["reason"] = "torch has no CUDA build"
            return False
        if not torch.cuda.is_available():
            _state["reason"] = "no CUDA device visible"
            return False
        if os.environ.get("LONGVIDEO_NO_JIT"):
            _state["reason"] = f"no prebuilt extension ({prebuilt_err}) and LONGVIDEO_NO_JIT is set"
            return False
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            _state["reason"] = "no prebuilt extension and no nvcc (CUDA_HOME not found) for a JIT build"
            return False
        try:
            _jit_build()
            _state.update(ok=True, reason=f"JIT-built from {csrc_dir()}", how="jit")
        except Exception as exc:  # compile errors must not break import or the other backends
            _state["reason"] = f"JIT build failed: {type(exc).__name__}: {str(exc)[-2000:]}"
        return _state["ok"]


def extension_status() -> tuple[bool, str]:
    """(available, reason) without triggering a build if none was attempted yet."""
    return _state["ok"], _state["reason"]
