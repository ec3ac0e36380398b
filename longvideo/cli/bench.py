"""``longvideo bench``: run benchmark suites and record JSON, or only regenerate the table.

Where records go without ``--out``: GPU runs into benchmarks/results/ of the checkout (the tracked
records behind the README's tables; else ./benchmark-results); CPU runs (smoke runs, not
performance records) into ./benchmark-results-cpu of the current folder, so they never rewrite
the tracked results -- ``--out benchmarks/results`` asks for that explicitly. ``--table`` and
``--update-preferences`` read benchmarks/results/ by default."""
from __future__ import annotations

import sys
from pathlib import Path

from ._common import UsageError, resolve_device

HELP = "run benchmark suites and record the results"


def add_arguments(p) -> None:
    p.add_argument("--suite", action="append", default=None, help="suite name (repeatable; default: all)")
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    p.add_argument("--profile", default="full", choices=["full", "budget"],
                   help="full: every shape; budget: the representative shapes, one warm-up, few repeats "
                        "(all suites in one short GPU slot)")
    p.add_argument("--warm", action="store_true",
                   help="run each case once, untimed and unrecorded: fills the Triton and torch.compile caches "
                        "(tools/warm_triton.py runs suites so in parallel)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--out", default=None,
                   help="results folder (default: benchmarks/results of the checkout for GPU runs, the table and "
                        "--update-preferences; ./benchmark-results-cpu for runs on CPU, so that CPU records never "
                        "replace the tracked ones)")
    p.add_argument("--table", action="store_true", help="only regenerate the table from recorded results")
    p.add_argument("--update-preferences", action="store_true",
                   help="write the 'auto' backend preferences from the recorded results")
    p.add_argument("--list", action="store_true", help="list suites")


CPU_RESULTS = "benchmark-results-cpu"  # relative to the current folder


def results_dir(arg, device=None) -> Path:
    """--out, else the default for `device` (a CPU run's records stay out of the tracked results)."""
    if arg:
        return Path(arg)
    if device is not None and str(device).split(":")[0] == "cpu":
        return Path(CPU_RESULTS)
    checkout = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    return checkout if checkout.parent.is_dir() else Path("benchmark-results")


def run(args) -> int:
    from .. import benchmarking

    out = results_dir(args.out)
    suites = benchmarking.available_suites()
    if args.list:
        print("\n".join(suites))
        return 0
    if args.update_preferences:
        from ..ops import preferences

        path = preferences.update_from_records(out)
        print(f"wrote {path}")
        return 0
    if not args.table:
        import torch

        chosen = args.suite or suites
        unknown = [s for s in chosen if s not in suites]
        if unknown:
            raise UsageError(f"--suite: unknown suite(s) {', '.join(unknown)}; available: {', '.join(suites)}")
        device = torch.device(resolve_device(args.device))
        out = results_dir(args.out, device)
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
