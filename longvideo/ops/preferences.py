"""Derive the ``auto`` backend choice from the recorded GPU benchmarks.

For each op suite (benchmark suite named after the op) and each device in the records, the
backend whose ``longvideo[<backend>]`` cases are faster in most of the shared cases wins; ties go
to the lower registry rank. The result is written to ``backend_preferences.json`` beside the
registry, which ``_registry.select`` reads.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from . import _registry

OP_SUITES = ("lowfreq_mix", "consistent_attention", "tiered_sparse_attention")


def compute_preferences(results_dir: Path) -> dict:
    # times[op][device][case_key][backend] = median_ms (newest record wins)
    times: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    records = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except ValueError:
            continue
        if rec.get("suite") in OP_SUITES and rec.get("environment", {}).get("device_type") == "cuda" and not rec.get("quick"):
            records.append(rec)
    for rec in sorted(records, key=lambda r: r["environment"]["date"]):
        dev = rec["environment"]["device"]
        for row in rec["cases"]:
            impl = row.get("impl", "")
            if not impl.startswith("longvideo[") or "error" in row:
                continue
            backend = impl[len("longvideo["):].split("]")[0]
            key = (row["name"], json.dumps(row.get("params", {}), sort_keys=True))
            times[rec["suite"]][dev][key][backend] = row["median_ms"]
    prefs = {}
    for op, by_dev in times.items():
        prefs[op] = {"by_device": {}}
        for dev, cases in by_dev.items():
            wins = defaultdict(int)
            for per_backend in cases.values():
                if len(per_backend) >= 2:
                    wins[min(per_backend, key=per_backend.get)] += 1
            if wins:
                ranks = {n: b.rank for n, b in _registry.backends(op).items()} if op in _registry._REGISTRY else {}
                prefs[op]["by_device"][dev] = max(wins, key=lambda b: (wins[b], -ranks.get(b, 100)))
    return prefs


def update_from_records(results_dir: Path) -> Path:
    prefs = compute_preferences(results_dir)
    path = _registry._PREF_FILE
    path.write_text(json.dumps(prefs, indent=1, sort_keys=True) + "\n")
    _registry.reload_preferences()
    return path
