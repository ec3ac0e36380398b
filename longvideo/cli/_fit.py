"""``--fit SIZE`` on ``longvideo generate / story / enhance``: ask the memory planner which settings
fit a GPU of SIZE bytes (offload mode, VAE tiling / slicing, id bank location, FIFO window, chunks
per call), apply them to the loaded pipeline and the command's options, and say so in one line;
refuse in one line (exit status 2) when nothing the planner tries fits.

The plan is made for the pipeline actually loaded (its components' configs, its dtype), at the
command's sizes; the pipeline is loaded on the host first (so that a model larger than the card
can still be offloaded) and then placed by the chosen offload mode. See docs/methods.md
("Fitting a GPU").
"""
from __future__ import annotations

import contextlib

from ._common import UsageError, is_cuda, memory_size, one_line


def add_argument(p) -> None:
    p.add_argument("--fit", type=memory_size, default=None, metavar="SIZE",
                   help="GPU memory to fit, e.g. 24GB (1e9 bytes) or 24GiB: the memory planner chooses offloading, "
                        "VAE tiling, the id bank's location, FIFO's window or chunks per call, and the run uses them "
                        "(see `longvideo plan`)")


@contextlib.contextmanager
def host_loading(args, cuda_dtype=None):
    """With --fit, load on the host: args.device is "cpu" inside the block (and args.dtype, when
    not given, the dtype the command uses on CUDA, `cuda_dtype`, if the run is on CUDA); both are
    restored after."""
    device, dtype = args.device, args.dtype
    if getattr(args, "fit", None):
        if args.dtype is None and cuda_dtype is not None and is_cuda(device):
            args.dtype = cuda_dtype
        args.device = "cpu"
    try:
        yield
    finally:
        args.device, args.dtype = device, dtype


def parse_size(text) -> int:
    """--fit's value in bytes ("24GB" = 24e9, "24GiB" = 24 * 2**30); a UsageError when malformed."""
    from ..planner import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise UsageError(f"--fit {text}: {one_line(exc)}") from None


def apply_settings(pipe, settings, device) -> None:
    """Apply the pipeline-level part of the planner's `settings` (a ``planner.Settings``) to `pipe`:
    the offload mode (computing on `device`), VAE tiling and slicing. The method-level settings
    (bank location, FIFO window, chunks per call) are the caller's."""
    from ..offload import enable_offload

    enable_offload(pipe, settings.offload, device)
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    if settings.vae_slicing:
        pipe.vae.enable_slicing()


def choose(args, pipe, method: str, **plan_kwargs):
    """The planner's choice for `pipe` under --fit, applied (offload, VAE tiling / slicing); returns
    the chosen ``Settings`` (None without --fit). Raises UsageError when nothing fits or the
    request cannot be planned. The caller applies the method-level settings (bank location, FIFO
    window, chunk batch) it receives."""
    if not getattr(args, "fit", None):
        return None
    from ..planner import format_bytes, plan, spec_from_pipeline

    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    dtype = str(denoiser.dtype).replace("torch.", "") if denoiser is not None else "float32"
    try:
        p = plan(method, spec_from_pipeline(pipe, name=args.model or "tiny model"), gpu_memory=args.fit,
                 dtype=dtype, device="cuda" if is_cuda(args.device) else "cpu", **plan_kwargs)
    except ValueError as exc:
        raise UsageError(f"--fit {args.fit}: {one_line(exc)}") from exc
    if not p.fits:
        raise UsageError(f"--fit {args.fit}: {p.choice}; see `longvideo plan --method {method} --fit {args.fit}`")
    st = p.settings
    apply_settings(pipe, st, args.device)
    ranks = p.sizes.get("context_parallel")  # under torchrun: the plan is one rank's share
    per_rank = f" per rank, one of {ranks} context-parallel ranks," if ranks else ""
    print(f"fit {args.fit}: {st.describe()} (predicted peak{per_rank} {format_bytes(p.peak_bytes)} of "
          f"{format_bytes(p.usable)} usable)")
    return st


def lean_wan_forward(pipe) -> None:
    """longvideo's Wan forward (processors/wan_modulation.py: diffusers' output without the
    per-token modulation copies and float32 temporaries) on the pipeline's Wan transformers, for
    the whole process; called right after loading, before --fit's offloading wraps their
    forwards (below which the patch must sit). What the planner assumes (plan's wan_forward)."""
    from ..processors.wan_modulation import apply_lean_wan_forward, wan_transformers

    if wan_transformers(pipe):
        apply_lean_wan_forward(pipe)
