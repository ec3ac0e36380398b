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
diffusers checkpoint. Method modules add their own options (prefixed with the method name).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import import_module
from pathlib import Path

# generate --method NAME -> module providing add_generate_arguments(parser) / run_generate(args)
GENERATE_METHODS = {
    "direct": "longvideo.methods.freeloc",
    "freeloc": "longvideo.methods.freeloc",
    "fifo": "longvideo.methods.fifo",
    "ouroboros": "longvideo.methods.fifo",
}
# command -> (module, hook name)
COMMANDS = {
    "probe": ("longvideo.methods.freeloc", "probe"),
    "story": ("longvideo.methods.storydiffusion", "story"),
    "enhance": ("longvideo.methods.blending", "enhance"),
    "plan": ("longvideo.planner.cli", "plan"),
}


def _import(modname):
    try:
        return import_module(modname), None
    except Exception as exc:  # a broken method must not take the other commands down
        return None, f"{type(exc).__name__}: {exc}"


def _default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_common_generation(p):
    p.add_argument("--model", default=None, help="local diffusers checkpoint (default: built-in tiny model)")
    p.add_argument("--prompt", default="a red panda walking through a bamboo forest, cinematic")
    p.add_argument("--num-frames", type=int, default=None, help="video frames to generate")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", default=None, help="output file or folder")
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cuda", "reference"],
                   help="kernel backend for the longvideo ops")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longvideo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions and backend availability")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--no-build", action="store_true", help="do not try to load/JIT-build the CUDA extension")

    p = sub.add_parser("bench", help="run benchmark suites and record the results")
    p.add_argument("--suite", action="append", default=None, help="suite name (repeatable; default: all)")
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    p.add_argument("--profile", default="full", choices=["full", "budget"],
                   help="full: every shape; budget: the representative shapes, one warm-up, few repeats "
                        "(all suites in one short GPU slot)")
    p.add_argument("--warm", action="store_true",
                   help="run each case once, untimed and unrecorded: fills the Triton and torch.compile caches "
                        "(tools/warm_triton.py runs suites so in parallel)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results of the checkout, else ./benchmark-results)")
    p.add_argument("--table", action="store_true", help="only regenerate the table from recorded results")
    p.add_argument("--update-preferences", action="store_true",
                   help="write the 'auto' backend preferences from the recorded results")
    p.add_argument("--list", action="store_true", help="list suites")

    p = sub.add_parser("generate", help="generate a long video")
    p.add_argument("--method", default="fifo", choices=sorted(GENERATE_METHODS))
    _add_common_generation(p)
    p.set_defaults(_hook_errors={})
    seen = set()
    for name, modname in GENERATE_METHODS.items():
        if modname in seen:
            continue
        seen.add(modname)
        mod, err = _import(modname)
        if mod is None or not hasattr(mod, "add_generate_arguments"):
            p.get_default("_hook_errors")[modname] = err or "no add_generate_arguments"
            continue
        try:
            mod.add_generate_arguments(p)
        except Exception as exc:
            p.get_default("_hook_errors")[modname] = f"{type(exc).__name__}: {exc}"

    for cmd, (modname, hook) in COMMANDS.items():
        p = sub.add_parser(cmd, help=f"see `longvideo {cmd} --help`")
        mod, err = _import(modname)
        if mod is None or not hasattr(mod, f"add_{hook}_arguments"):
            p.set_defaults(_broken=err or f"{modname} has no add_{hook}_arguments")
            continue
        _add_common_generation(p)
        try:
            getattr(mod, f"add_{hook}_arguments")(p)
        except Exception as exc:  # a broken hook must not break the other commands
            p.set_defaults(_broken=f"{type(exc).__name__}: {exc}")
    return parser


def _results_dir(arg):
    if arg:
        return Path(arg)
    checkout = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    return checkout if checkout.parent.is_dir() else Path("benchmark-results")


def cmd_info(args) -> int:
    import platform

    import torch

    from . import _extension, ops

    if not args.no_build:
        _extension.load_extension()  # returns at once, with the reason, where no CUDA device is present
    info = {
        "longvideo": __import__("longvideo").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": None,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "cuda_extension": dict(zip(("available", "reason"), _extension.extension_status())),
        "csrc": str(_extension.csrc_dir()),
        "backend_setting": {op: ops.current_setting(op) for op in ops.report()},
        "backends": ops.report(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not importable: {exc}"
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except Exception as exc:
        info["diffusers"] = f"not importable: {exc}"
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("longvideo", "python", "torch", "torch_cuda", "cuda_device", "triton", "diffusers", "TRITON_INTERPRET"):
        print(f"{key:>16}: {info[key]}")
    ext = info["cuda_extension"]
    print(f"{'cuda extension':>16}: {'loaded' if ext['available'] else 'unavailable'} ({ext['reason']})")
    print("\nbackends (auto picks per device; on CPU the reference):")
    for op, table in info["backends"].items():
        print(f"  {op}  [setting: {info['backend_setting'][op]}]")
        for name, b in table.items():
            mark = "yes" if b["available"] else "no "
            print(f"    {name:<10} {mark}  {b['reason']}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from . import benchmarking

    out = _results_dir(args.out)
    suites = benchmarking.available_suites()
    if args.list:
        print("\n".join(suites))
        return 0
    if args.update_preferences:
        from .ops import preferences

        path = preferences.update_from_records(out)
        print(f"wrote {path}")
        return 0
    if not args.table:
        device = torch.device(args.device or _default_device())
        chosen = args.suite or suites
        unknown = [s for s in chosen if s not in suites]
        if unknown:
            print(f"unknown suite(s) {unknown}; available: {suites}", file=sys.stderr)
            return 2
        if device.type == "cpu" and not args.quick:
            print("note: full-size suites are meant for a GPU; on CPU use --quick", file=sys.stderr)
        if args.warm:
            failed = sum(benchmarking.warm_suite(s, device, quick=args.quick, profile=args.profile) for s in chosen)
            return 1 if failed else 0
        for suite in chosen:
            rec = benchmarking.run_suite(suite, device, quick=args.quick, out_dir=out, profile=args.profile)
            print(f"recorded {benchmarking.write_record(rec, out)}")
    table = out / "README.md"
    out.mkdir(parents=True, exist_ok=True)
    table.write_text(benchmarking.render_table(out))
    print(f"table: {table}")
    return 0


def cmd_generate(args) -> int:
    modname = GENERATE_METHODS[args.method]
    if modname in args._hook_errors:
        print(f"method {args.method!r} is unavailable: {args._hook_errors[modname]}", file=sys.stderr)
        return 2
    if args.device is None:
        args.device = _default_device()
    from .ops import set_backend

    set_backend(args.backend)
    return import_module(modname).run_generate(args)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_broken", None):
        print(f"`longvideo {args.command}` is unavailable: {args._broken}", file=sys.stderr)
        return 2
    if args.command == "info":
        return cmd_info(args)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "generate":
        return cmd_generate(args)
    modname, hook = COMMANDS[args.command]
    if getattr(args, "device", "unset") is None:
        args.device = _default_device()
    if getattr(args, "backend", None):
        from .ops import set_backend

        set_backend(args.backend)
    return getattr(import_module(modname), f"run_{hook}")(args)


if __name__ == "__main__":
    sys.exit(main())
