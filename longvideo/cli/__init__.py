"""The ``longvideo`` command.

    longvideo info                      versions, devices, which backends are available and why not
    longvideo bench [--suite S] [--quick] [--profile full|budget] [--table]
                                        run benchmark suites, record JSON under benchmarks/results/
    longvideo generate --method M ...   long video: direct | freeloc | fifo | ouroboros
    longvideo probe ...                 FreeLOC layer probing -> layer configuration JSON
    longvideo story PROMPTS.txt ...     StoryDiffusion comic from a story file
    longvideo enhance IN.mp4 --out OUT.mp4
                                        StreamingT2V randomized-blending enhancement
    longvideo plan --method M --model NAME|DIR ... [--fit 24GB]
                                        predicted peak GPU memory by component, settings that fit

Every command runs on a built-in tiny random-weight model unless ``--model PATH`` names a local
diffusers checkpoint. A method's options are prefixed with its name (--fifo-*, --ouroboros-*,
--freeloc-*, --probe-*, --story-*, --blend-*).

A mistake in the command line or its inputs is reported in one line, ``longvideo: error: ...``,
with exit status 2 (--debug adds the traceback). An output that cannot be written (a full disk, no
permission) is reported in one line naming the file and what was kept, exit status 1. Ctrl-C
(SIGINT) and SIGTERM stop a command the same way, saving what can be saved (the frames written so
far, FIFO's queue state): exit status 130 and 143 (docs/outputs.md).
"""
from __future__ import annotations

import argparse
import re
import sys
import traceback

from . import _signals, bench, enhance, generate, info, plan, probe, story
from ._common import HelpFormatter, Parser, UsageError, one_line
from ._common import add_common_generation as _add_common_generation  # noqa: F401  (the name tests used)

# command -> module with HELP, add_arguments(parser) and run(args) -> exit status. A module imports
# only argparse-level code: what a command runs is imported inside its run().
COMMANDS = {"info": info, "bench": bench, "generate": generate, "probe": probe, "story": story,
            "enhance": enhance, "plan": plan}

_DEBUG_HELP = "on an error in the command line or its inputs, also print the traceback"


def build_parser() -> Parser:
    parser = Parser(prog="longvideo", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv=None) -> int:
    """Run the ``longvideo`` command line; returns the exit status (2: a mistake in the command
    line or its inputs, reported in one line on stderr; 1: an output that cannot be written;
    130 / 143: interrupted by SIGINT / SIGTERM)."""
    parser = build_parser()
    args = None
    with _signals.interrupts_raise():
        try:
            args, extra = parser.parse_known_args(argv)
            if extra:  # named by the command's parser, whose --help lists what it takes
                args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
            return args._run(args)
        except UsageError as exc:
            return _report(args, exc, f"longvideo: error: {one_line(exc)}", 2)
        except KeyboardInterrupt as exc:
            return _report(args, exc, f"longvideo: interrupted by {_signals.signal_name(exc)}",
                           _signals.exit_status(exc), traceback_too=False)
        except OSError as exc:
            from .._io import DISK_ERRNOS, OutputError, reason

            if _signals.received() is not None:
                return _report(args, exc, f"longvideo: interrupted by {_signals.signal_name()}",
                               _signals.exit_status(exc), traceback_too=False)
            if isinstance(exc, OutputError):
                return _report(args, exc, f"longvideo: error: {one_line(exc)}", 1)
            if exc.errno in DISK_ERRNOS:
                where = f" {exc.filename}" if exc.filename else ""
                return _report(args, exc, f"longvideo: error: cannot write{where}: {reason(exc)}", 1)
            raise
        except Exception as exc:
            if _signals.received() is not None:
                # the consequence of an interrupt (under torchrun: a collective whose peer is gone)
                return _report(args, exc, f"longvideo: interrupted by {_signals.signal_name()}",
                               _signals.exit_status(exc), traceback_too=False)
            memory = out_of_memory(exc)
            if memory:  # sizes the device cannot hold: the user's to change, not a bug
                return _report(args, exc, f"longvideo: error: out of memory ({memory}); ask for less: "
                                          "--height / --width / --num-frames, or --fit SIZE", 2)
            raise


def out_of_memory(exc: BaseException) -> str:
    """What ran out, in a few words, when `exc` is an allocation failure (MemoryError, CUDA's
    OutOfMemoryError, the CPU allocator's "can't allocate memory"); "" otherwise."""
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError):
        return text[:160] or "the host's memory"
    if not isinstance(exc, RuntimeError):
        return ""
    low = text.lower()
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in low:
        return "the GPU's memory: " + text.split(".")[0][:160]
    if "can't allocate memory" in low or "cannot allocate memory" in low:
        tried = re.search(r"allocate (\d+) bytes", text)
        return (f"the host's memory: {int(tried.group(1)) / 2**30:.1f} GiB asked for at once" if tried
                else "the host's memory")
    return ""


def _report(args, exc, line: str, status: int, traceback_too: bool = True) -> int:
    """Print `line` (and the traceback with --debug) on stderr -- on one rank only under torchrun,
    the others exit quietly with the same status."""
    if not _signals.reporting_rank():
        return status
    if args is not None and getattr(args, "debug", False) and traceback_too:
        traceback.print_exception(exc)
    print(line, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
