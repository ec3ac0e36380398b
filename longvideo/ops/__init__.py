"""The ``torch.ops.longvideo`` ops and the backend registry.

Importing this module registers the ops. Each op module holds the op's schema, argument
checks, fake kernel, autograd and its backend registrations; the backends themselves live in
``longvideo.reference`` (PyTorch), ``longvideo.triton_kernels`` and ``csrc/`` (CUDA extension),
and what they read besides the data (block schedules, segment and filter tables) is planned by
``longvideo.ops.plan``: op -> plan -> backend kernel.

One registration idiom: the op that runs is a ``torch.library.custom_op`` with ``register_fake``
and ``register_autograd`` (tiered_sparse_attention: a backward that refuses; consistent_attention:
its private ``_consistent_attention_forward`` returning (out, lse), under a composite public
schema, and its backward op). Exception, measured: lowfreq_mix is defined with the low-level
``torch.library`` API (half the host cost per call; see the note beside its registration). Each
backend registration declares what it accepts as named constraints (``_constraints``).
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
