"""longvideo: fused kernels and diffusers integration for training-free long-video diffusion.

Ops (``torch.ops.longvideo.*`` and ``longvideo.ops.*``): ``lowfreq_mix``,
``consistent_attention``, ``tiered_sparse_attention``. Methods (imported lazily):
``FreeLOC``, ``FIFODiffusion``, ``OuroborosDiffusion``, ``StoryDiffusion``,
``RandomizedBlending``.
"""
import os as _os
from importlib import import_module

# In a source checkout that was not pip-installed, let `longvideo.triton_kernels`,
# `longvideo.benchmarks` and `longvideo.csrc` (package_dir mappings of pyproject.toml) resolve to
# the top-level folders: a subpackage is searched for in every entry of the package's __path__.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "triton_kernels", "__init__.py")) and _checkout not in __path__:
    __path__.append(_checkout)

from . import ops  # noqa: F401  (registers the torch.ops.longvideo namespace)
from .ops import set_backend, use_backend  # noqa: F401

__version__ = "0.1.0"

# method name -> module that defines it; imported on first access so that `import longvideo`
# stays light (no diffusers import for kernel users).
_LAZY = {
    "FreeLOC": "longvideo.methods.freeloc",
    "apply_freeloc": "longvideo.methods.freeloc",
    "FreeLOCConfig": "longvideo.methods.freeloc",
    "probe_layers": "longvideo.methods.probe",
    "FIFODiffusion": "longvideo.methods.fifo",
    "OuroborosDiffusion": "longvideo.methods.fifo",
    "OuroborosConfig": "longvideo.methods.fifo_ouroboros",
    "StoryDiffusion": "longvideo.methods.storydiffusion",
    "StoryDiffusionConfig": "longvideo.methods.storydiffusion",
    "apply_storydiffusion": "longvideo.methods.storydiffusion",
    "VideoSubjectConsistency": "longvideo.methods.storydiffusion",
    "RandomizedBlending": "longvideo.methods.blending",
    "enable_fast_free_init": "longvideo.methods.free_init",
    "disable_fast_free_init": "longvideo.methods.free_init",
    "apply_free_init": "longvideo.methods.free_init",
    "FreeInitConfig": "longvideo.methods.free_init",
    "apply_lean_wan_forward": "longvideo.processors.wan_modulation",
    "PatchHandle": "longvideo.hooks",
    "VideoOutput": "longvideo.methods.outputs",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'longvideo' has no attribute {name!r}")
