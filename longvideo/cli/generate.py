"""``longvideo generate --method M``: one long video with a long-video method (direct: the
pipeline alone). FIFO and Ouroboros stream frames into the video as they leave the queue and
save the queue next to it (--resume continues); direct and FreeLOC print the time per step."""

# the options and the run of each method: generate_freeloc (direct, freeloc), generate_fifo
# (fifo, ouroboros)
from __future__ import annotations

from . import _fit, generate_fifo, generate_freeloc
from ._common import add_common_generation, apply_backend, refuse_inapplicable, resolve_device

HELP = "generate a long video"

METHODS = {"direct": generate_freeloc, "freeloc": generate_freeloc, "fifo": generate_fifo,
           "ouroboros": generate_fifo}


def add_arguments(p) -> None:
    p.add_argument("--method", default="fifo", choices=sorted(METHODS),
                   help="direct: the pipeline as is; freeloc: FreeLOC; fifo: FIFO-Diffusion; ouroboros: "
                        "Ouroboros-Diffusion")
    add_common_generation(p)
    _fit.add_argument(p)
    for module in dict.fromkeys(METHODS.values()):
        module.add_arguments(p)


def applies(method: str, dest: str) -> bool:
    """Whether the option with destination `dest` applies to --method `method` (the common options
    always do; --steps with fifo/ouroboros is a note, not an error: generate_fifo says so)."""
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


def run(args) -> int:
    refuse_inapplicable(args, add_arguments, lambda dest: applies(args.method, dest), f"--method {args.method}")
    args.device = resolve_device(args.device)
    apply_backend(args.backend, args.device)
    return METHODS[args.method].run(args)
