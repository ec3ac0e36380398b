"""Render the wall time of each step of the recorded GPU runs (benchmarks/results/gpu_runs/*/steps.tsv)
into README.md between the markers ``<!-- gpu-run-steps:begin -->`` and ``<!-- gpu-run-steps:end -->``,
so the README's step times come from a recorded run (tools/ingest_gpu_run.sh calls this).

    python tools/gpu_run_summary.py [README.md] [benchmarks/results/gpu_runs]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- gpu-run-steps:begin -->", "<!-- gpu-run-steps:end -->"


def render(runs_dir: Path) -> str:
    lines = []
    for run in sorted(p for p in runs_dir.iterdir() if (p / "steps.tsv").is_file()):
        rows = [r.split("\t") for r in (run / "steps.tsv").read_text().splitlines()[1:] if r.strip()]
        device = ""
        gpu = run / "gpu.txt"
        if gpu.is_file():
            m = re.search(r"^(NVIDIA [^,]+),", gpu.read_text(), re.M)
            device = f" on {m.group(1)}" if m else ""
        lines += [f"Run `{run.name}`{device} (logs in `benchmarks/results/gpu_runs/{run.name}/`):", "",
                  "| step | started at (s) | wall (s) | exit |", "|---|---|---|---|"]
        lines += [f"| {name} | {start} | {wall} | {rc} |" for name, start, wall, rc in rows]
        lines.append("")
    return "\n".join(lines) if lines else "No GPU run recorded yet.\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    readme = Path(argv[0]) if argv else ROOT / "README.md"
    runs = Path(argv[1]) if len(argv) > 1 else ROOT / "benchmarks" / "results" / "gpu_runs"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"{readme}: no {BEGIN} ... {END} block; nothing written")
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + render(runs) + END + tail)
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
