"""The ``torch.ops.longvideo`` ops and the backend registry.

Importing this module registers the ops. Each op module holds the op's schema, argument
checks, fake kernel, autograd and its backend registrations; the backends themselves live in
``longvideo.reference`` (PyTorch), ``longvideo.triton_kernels`` and ``csrc/`` (CUDA extension).
"""
from ._registry import (  # noqa: F401
    BACKEND_NAMES,
    backends,
    current_setting,
    get_backend,
    report,
    select,
    set_backend,
    use_backend,
)
from .lowfreq_mix import lowfreq_mix  # noqa: F401
from .consistent_attention import consistent_attention  # noqa: F401
from .tiered_sparse_attention import tiered_sparse_attention  # noqa: F401
from .plan.tiered import schedule_density  # noqa: F401
