"""``longvideo generate --method M``: one long video with a long-video method (direct: the
pipeline alone). FIFO and Ouroboros stream frames into the video as they leave the queue and
save the queue next to it (--resume continues); direct and FreeLOC print the time per step."""

# the options and the run of each method: generate_freeloc (direct, freeloc), generate_fifo
# (fifo, ouroboros)
from __future__ import annotations

import os

from . import _fit, _image, generate_fifo, generate_freeloc
from ._common import UsageError, add_common_generation, apply_backend, positive_int, refuse_inapplicable, resolve_device

HELP = "generate a long video"

METHODS = {"direct": generate_freeloc, "freeloc": generate_freeloc, "fifo": generate_fifo,
           "ouroboros": generate_fifo}


def add_arguments(p) -> None:
    p.add_argument("--method", default="fifo", choices=sorted(METHODS),
                   help="direct: the pipeline as is; freeloc: FreeLOC; fifo: FIFO-Diffusion; ouroboros: "
                        "Ouroboros-Diffusion")
    add_common_generation(p)
    p.add_argument("--context-parallel", type=positive_int, default=None, metavar="N",
                   help="under torchrun: split each video sequence (each FIFO/Ouroboros window) over groups of N "
                        "ranks (Ulysses context parallelism, Wan). Default: all ranks for direct/freeloc; 1 for "
                        "fifo/ouroboros, whose windows are split over the ranks (with N > 1: over world/N groups "
                        "of N ranks)")
    _image.add_argument(p)
    _fit.add_argument(p)
    for module in dict.fromkeys(METHODS.values()):
        module.add_arguments(p)


def applies(method: str, dest: str) -> bool:
    """Whether the option with destination `dest` applies to --method `method` (the common options
    always do; --steps with fifo/ouroboros is a note, not an error: generate_fifo says so)."""
    if dest == "image":
        return method in _image.I2V_METHODS
    if dest == "fifo_coherent_tail":
        return method == "fifo"
    if dest.startswith("fifo_") or dest == "resume":
        return method in ("fifo", "ouroboros")
    if dest.startswith("ouroboros_"):
        return method == "ouroboros"
    if dest == "freeloc_negative_prompt":
        return method in ("freeloc", "direct")
    if dest.startswith("freeloc_"):
        return method == "freeloc"
    return True


def context_parallel_size(args, world: int) -> int:
    """The ranks each video sequence is split over (--context-parallel, checked against the
    torchrun world): all of them for direct / freeloc (one video), a divisor of them for fifo /
    ouroboros (the rest split the windows), 1 by default there. UsageError naming the option."""
    one_video = args.method in ("direct", "freeloc")
    n = args.context_parallel
    if n is None:
        return world if one_video else 1
    if n > 1 and world == 1:
        raise UsageError(f"--context-parallel {n}: needs {n} processes or a multiple, launched by torchrun "
                         f"(torchrun --nproc-per-node {n} -m longvideo generate ...)")
    if one_video and n != world:
        raise UsageError(f"--context-parallel {n}: --method {args.method} splits its one video over all "
                         f"{world} ranks; omit the option or launch {n} processes")
    if world % n:
        raise UsageError(f"--context-parallel {n}: the {world} torchrun ranks are not a multiple of {n} "
                         "(FIFO/Ouroboros run world/N window groups of N ranks)")
    return n


def run(args) -> int:
    refuse_inapplicable(args, add_arguments, lambda dest: applies(args.method, dest), f"--method {args.method}")
    args.context_parallel = context_parallel_size(args, int(os.environ.get("WORLD_SIZE", "1") or 1))
    args.device = resolve_device(args.device)
    apply_backend(args.backend, args.device)
    return METHODS[args.method].run(args)
