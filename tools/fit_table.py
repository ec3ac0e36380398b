"""The README's "fit a 12 / 16 / 24 GB card" table, from the memory planner (`longvideo plan`).

    python tools/fit_table.py            # print the table
    python tools/fit_table.py --readme   # rewrite it in README.md between the fit-table markers

Each row is one `longvideo plan ... --fit SIZE` (the command is in the row); the cell says what
the planner chooses, with the predicted peak, or that nothing fits with the smallest peak it
found (docs/methods.md, "Fitting a GPU"). Where the `memory` benchmark suite has measured that
case at that size on a GPU (benchmarks/results/memory_*.json, the newest CUDA record of the
target; benchmarks/bench_memory.py), the cell adds the measured peak
(``torch.cuda.max_memory_allocated`` of the run made with the chosen settings), the device, and
whether it fit; nothing in the table is typed in.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = ("12GB", "16GB", "24GB")
# (label, planner keyword arguments: the `longvideo plan` options of the same names)
CASES = [
    ("FreeLOC, Wan2.1-1.3B, 480x832, 321 frames",
     dict(method="freeloc", model="wan2.1-t2v-1.3b", height=480, width=832, num_frames=321)),
    ("FreeLOC, Wan2.1-14B, 480x832, 161 frames",
     dict(method="freeloc", model="wan2.1-t2v-14b", height=480, width=832, num_frames=161)),
    ("FIFO, Wan2.1-1.3B, 480x832",
     dict(method="fifo", model="wan2.1-t2v-1.3b", height=480, width=832, num_frames=241)),
    ("FIFO, Wan2.1-14B, 480x832",
     dict(method="fifo", model="wan2.1-t2v-14b", height=480, width=832, num_frames=241)),
    ("StoryDiffusion, SDXL, 1024x1024, 4 id images",
     dict(method="story", model="sdxl", height=1024, width=1024, num_frames=None, dtype="float16")),
    ("enhance (blending), Wan2.1-1.3B, 480x832, 121 frames",
     dict(method="enhance", model="wan2.1-t2v-1.3b", height=480, width=832, num_frames=121)),
    # an I2V pipeline is always planned with its image (CLIP encoder, condition encode, condition)
    ("image to video (direct), Wan2.1-I2V-14B-480P, 480x832, 81 frames",
     dict(method="direct", model="wan2.1-i2v-14b-480p", height=480, width=832, num_frames=81)),
]


_KEYS = ("method", "model", "height", "width", "num_frames")


def measured_targets(results: Optional[Path] = None) -> dict:
    """{(method, model, height, width, num_frames, dtype, fit): (memory record of the newest
    non-quick CUDA run, its file name)} from the memory suite's records in `results` (default: the
    planner's records folder, benchmarks/results or $LONGVIDEO_RESULTS_DIR). Cases that did not
    finish ("interrupted", "error: ...") are left out; "out of memory" is kept (it did not fit)."""
    from longvideo.planner.estimate import _records_dir

    results = Path(results) if results is not None else _records_dir()
    found = {}
    for path in sorted(results.glob("memory_*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        env = rec.get("environment", {})
        if rec.get("quick") or env.get("device_type") != "cuda":
            continue
        for row in rec.get("cases", []):
            m = row.get("memory") or {}
            t = m.get("target_plan")
            if not t or m.get("status") not in ("ok", "out of memory"):
                continue
            key = tuple(t.get(k) for k in _KEYS) + (t.get("dtype", "bfloat16"), t.get("fit"))
            if key not in found or env.get("date", "") >= found[key][0]["environment"].get("date", ""):
                found[key] = (rec, m, path.name)
    return {k: (m, name, rec["environment"].get("device", "?")) for k, (rec, m, name) in found.items()}


def _measured(case: dict, size: str, settings, measured: dict) -> str:
    from longvideo.planner import format_bytes

    key = tuple(case.get(k) for k in _KEYS) + (case.get("dtype", "bfloat16"), size)
    if key not in measured:
        return ""
    m, _, device = measured[key]
    if m["status"] == "out of memory":
        return f"; measured on {device}: out of memory"
    out = f"; measured {format_bytes(m['measured_peak_bytes'])} on {device}"
    if m.get("fits") is not None:
        out += ", fits" if m["fits"] else ", does NOT fit"
    if settings is not None and m.get("settings_described") != settings.describe():
        out += f" (measured with {m.get('settings_described')})"
    return out


def cell(case: dict, size: str, measured: Optional[dict] = None) -> str:
    from longvideo.planner import format_bytes, plan

    kw = dict(case)
    method, model = kw.pop("method"), kw.pop("model")
    dtype = kw.pop("dtype", "bfloat16")
    p = plan(method, model, kw.pop("height"), kw.pop("width"), kw.pop("num_frames"), dtype, gpu_memory=size, **kw)
    if not p.fits:
        return (f"nothing fits (smallest {format_bytes(min(c.peak for c in p.candidates))})"
                + _measured(case, size, None, measured or {}))
    return f"{p.settings.describe()} ({format_bytes(p.peak_bytes)}" + _measured(case, size, p.settings,
                                                                               measured or {}) + ")"


def plan_command(case: dict) -> str:
    """The `longvideo plan` options of a case (its keyword arguments, spelled as options)."""
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in case.items() if value is not None)


def table(results: Optional[Path] = None) -> str:
    measured = measured_targets(results)
    lines = ["| case (`longvideo plan ...`) | " + " | ".join(f"`--fit {s}`" for s in SIZES) + " |",
             "|---|" + "---|" * len(SIZES)]
    for label, case in CASES:
        lines.append(f"| {label} <br>`{plan_command(case)}` | "
                     + " | ".join(cell(case, s, measured) for s in SIZES) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", action="store_true", help="rewrite README.md's table between the markers")
    args = ap.parse_args()
    text = table()
    if not args.readme:
        print(text)
        return 0
    readme = ROOT / "README.md"
    src = readme.read_text()
    pattern = re.compile(r"(<!-- fit-table:begin -->\n).*?(<!-- fit-table:end -->)", re.S)
    if not pattern.search(src):
        print("README.md has no <!-- fit-table:begin --> ... <!-- fit-table:end --> markers", file=sys.stderr)
        return 1
    readme.write_text(pattern.sub(lambda m: m.group(1) + text + "\n" + m.group(2), src))
    print(f"rewrote the fit table in {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
