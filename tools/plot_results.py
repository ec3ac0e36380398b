"""Plots of the recorded GPU benchmarks: one PNG per suite under benchmarks/results/ (linked from
the README), drawn from the newest non-quick CUDA record of each suite.

Per suite: the median time of every implementation, per case (grouped bars, log scale), so ours
and the peers of each shape stand side by side; for the attention suites whose cases differ in
length (tiered_sparse_attention: latent frames; freeloc: video frames) the x axis is that length.

    python tools/plot_results.py [benchmarks/results]
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def newest_records(results: Path) -> dict:
    best = {}
    for path in sorted(results.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except ValueError:
            continue
        env = rec.get("environment", {})
        if "suite" not in rec or rec.get("quick") or env.get("device_type") != "cuda":
            continue
        if rec["suite"] not in best or env["date"] > best[rec["suite"]]["environment"]["date"]:
            best[rec["suite"]] = rec
    return best


def plot_suite(rec: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rec["cases"] if "error" not in r and r.get("median_ms")]
    cases = list(dict.fromkeys(r["name"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ms = defaultdict(dict)
    for r in rows:
        ms[r["impl"]][r["name"]] = r["median_ms"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cases) + 2), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs = [c + i * width for c, name in enumerate(cases) if name in ms[impl]]
        ys = [ms[impl][name] for name in cases if name in ms[impl]]
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log)")
    env = rec["environment"]
    ax.set_title(f"{rec['suite']} on {env['device']} (torch {env['torch']}, {env['date'][:10]})", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results = Path(argv[0] if argv else Path(__file__).resolve().parents[1] / "benchmarks" / "results")
    recs = newest_records(results)
    if not recs:
        print(f"no CUDA records in {results}")
        return 0
    for suite, rec in sorted(recs.items()):
        print(plot_suite(rec, results / f"{suite}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
