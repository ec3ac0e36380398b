"""Plots of the recorded GPU benchmarks: one PNG per suite under benchmarks/results/ (linked from
the README), drawn from the newest non-quick CUDA record of each suite.

Per suite: the median time of every implementation, per case (grouped bars, log scale), so ours
and the peers of each shape stand side by side; for the attention suites whose cases differ in
length (tiered_sparse_attention: latent frames; freeloc: video frames) the x axis is that length.
The memory suite: per target, the predicted and the measured peak beside the card size.

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


def plot_memory(rec: dict, path: Path) -> Path:
    """The memory suite (benchmarks/bench_memory.py): per target, the planner's predicted peak and
    the measured peak (GiB) beside the card size it must fit, with the chosen settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r["memory"] for r in rec["cases"] if r.get("memory", {}).get("target_bytes")]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.4 * len(rows) + 2), 4.5))
    gib = 2.0 ** 30
    for i, m in enumerate(rows):
        pred, meas = m.get("predicted_peak_bytes"), m.get("measured_peak_bytes")
        ax.bar(i - 0.2, (pred or 0) / gib, 0.4, color="tab:blue", label="predicted (planner)" if i == 0 else None)
        ax.bar(i + 0.2, (meas or 0) / gib, 0.4, color="tab:orange", label="measured" if i == 0 else None)
        ax.hlines(m["target_bytes"] / gib, i - 0.45, i + 0.45, colors="k", linestyles="dashed",
                  label="card size (target)" if i == 0 else None)
        if m.get("status") != "ok":
            ax.text(i, 0.5, m.get("status", "")[:30], ha="center", rotation=90, fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{m['target']}\n{m.get('settings_described', '')}" for m in rows], fontsize=7)
    ax.set_ylabel("peak GPU memory (GiB)")
    env = rec["environment"]
    ax.set_title(f"memory targets on {env['device']} (torch {env['torch']}, {env['date'][:10]})", fontsize=10)
    ax.legend(fontsize=7)
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
        plot = plot_memory if suite == "memory" else plot_suite
        print(plot(rec, results / f"{suite}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
