"""Benchmark harness (docs/architecture.md, "Benchmarks and records").

A suite is a module ``longvideo.benchmarks.bench_<name>`` (folder ``benchmarks/`` of the
checkout) with a function ``cases(device: torch.device, quick: bool, profile: str = "full")``
returning a list of :class:`Case` or a generator of them. The harness times every case (CUDA
events after warm-up on GPUs, perf_counter on CPU; the median of several repeats), records peak
memory, derives TFLOP/s and GB/s from the case's declared work, and writes one JSON record per
run under ``benchmarks/results/``. ``render_table`` turns the records into the markdown table
``benchmarks/results/README.md``.

Profiles (``PROFILES``): ``full`` (every shape, the default timing) and ``budget`` (the
representative shapes each suite names, one warm-up and a few repeats: all seven suites fit one
short GPU slot; see tools/gpu_run.sh). On CUDA each record carries the device's ceilings measured
in the same process (a large device copy and a dense bf16 matmul, ``measure_ceilings``): the
fractions of peak are taken against those, not against a datasheet.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import functools
import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

# Fallback peak figures for "fraction of the device's peak" where the ceilings could not be
# measured in the run: earlier measurements of copy bandwidth and bf16 dense matmul on these
# devices (docs/architecture.md, "Benchmarks and records"). Unknown devices get no fraction.
DEVICE_PEAKS = {
    "H100": {"copy_GBps": 3000.0, "bf16_TFLOPs": 800.0},
    "H200": {"copy_GBps": 4300.0, "bf16_TFLOPs": 790.0},
}


# profile -> the harness's default timing (a case's own `timing` is capped by the budget's)
PROFILES = {
    "full": dict(warmup=3, repeats=10, min_time_s=0.2),
    "budget": dict(warmup=1, repeats=3, min_time_s=0.0, max_time_s=4.0),
}


@dataclass
class Case:
    """One timed call.

    suite/name  identify the case; `impl` names what is timed ("longvideo[triton]",
                "sdpa_flash", "flex_attention", "diffusers_freeinit", ...); `params` the shape.
    fn          zero-argument callable doing the work once (inputs prepared by the case).
    flops       floating-point work actually computed (for TFLOP/s), or None.
    bytes       minimum bytes moved (for GB/s and the roofline fraction), or None.
    setup_ms    one-off cost reported separately (e.g. FlexAttention block-mask build).
    timing      per-case overrides of the timing loop (warmup, repeats, min_time_s).
    extra       anything else worth recording (density, ...).
    report      optional zero-argument callable, called once after the timed calls (also when
                they raised): its dict is merged into the case's record row -- its "extra" into
                the row's extra, any other key replacing the row's own. For cases that measure
                more than one call's time in `fn` (the memory suite's phases and peaks).
    graph_calls on CUDA, also time `graph_calls` back-to-back calls captured in one CUDA graph and
                record the device time per call (``graph_ms``): for kernels that run for a few
                microseconds, the event timing of a single call measures the host's launch path
                (Python dispatch, argument checks) rather than the GPU; in a pipeline that
                path overlaps with the model's kernels. 0 (default): events only.
    """

    suite: str
    name: str
    impl: str
    fn: Callable[[], object]
    params: dict = field(default_factory=dict)
    flops: Optional[float] = None
    bytes: Optional[float] = None
    setup_ms: Optional[float] = None
    extra: dict = field(default_factory=dict)
    timing: Optional[dict] = None  # overrides of time_fn's warmup/repeats/min_time_s (e.g. whole-video runs)
    graph_calls: int = 0
    kernel_profile: bool = False
    report: Optional[Callable[[], dict]] = None


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10,
            min_time_s: float = 0.2, max_time_s: Optional[float] = None) -> dict:
    """Median wall time (ms) of `fn` and the peak memory it allocates beyond what was live.

    `repeats` timed calls (more while under `min_time_s`), but no new call once the timed calls
    add up to `max_time_s` (at least one call: a 10-second case is timed once, not three times)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t_end = time.perf_counter() + min_time_s
        while len(times) < repeats or (time.perf_counter() < t_end and len(times) < 200):
            if max_time_s is not None and times and sum(times) / 1e3 >= max_time_s:
                break
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        t_end = time.perf_counter() + min_time_s
        while len(times) < repeats or (time.perf_counter() < t_end and len(times) < 50):
            if max_time_s is not None and times and sum(times) / 1e3 >= max_time_s:
                break
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = None
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p20_ms": times[int(0.2 * (len(times) - 1))],
        "p80_ms": times[int(0.8 * (len(times) - 1))],
        "repeats": len(times),
        "peak_mem_bytes": peak,
    }


def time_graph(fn: Callable[[], object], device: torch.device, calls: int, repeats: int = 10) -> float:
    """Median device time (ms) per call of `fn`, from replays of a CUDA graph of `calls` calls.

    Warm-up runs on a side stream first (as graph capture requires: caches filled, kernels
    compiled). Raises whatever capture raises (e.g. a host-to-device copy inside `fn`)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / calls)
    del graph
    torch.cuda.empty_cache()
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def measure_ceilings(device: torch.device) -> dict:
    """The device's two ceilings, measured now (METHOD: a large device-to-device copy, counting the
    bytes read and written, and a dense 8192^3 bf16 matmul on random data; median of 10 after 3
    warm-ups). About a second of device time; cached per process. {} off CUDA."""
    if torch.device(device).type != "cuda":
        return {}
    n = 1 << 29  # 1 GiB of bf16 per buffer: many times the L2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device, warmup=3, repeats=10, min_time_s=0.0)["median_ms"]
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm = time_fn(lambda: a @ b, device, warmup=3, repeats=10, min_time_s=0.0)["median_ms"]
    del a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": 2 * n * 2 / (copy / 1e3) / 1e9, "bf16_TFLOPs": 2 * m ** 3 / (mm / 1e3) / 1e12,
            "how": "measured in this run: 1 GiB bf16 device copy (read + write), 8192^3 bf16 matmul"}


def profile_kernels(fn: Callable[[], object], device: torch.device, top: int = 15) -> list:
    """One call of `fn` under torch.profiler: the `top` device kernels by total device time, as
    [{"name", "calls", "total_ms"}] (names cut to 120 characters), plus the sum over all kernels."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.device(device).type == "cuda"
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as prof:
        fn()
        _sync(device)
    rows = []
    total = 0.0
    for ev in prof.key_averages():
        if on_cuda:
            t = getattr(ev, "self_device_time_total", None)
            if t is None:
                t = getattr(ev, "self_cuda_time_total", 0.0)
        else:  # CPU (tests): host operators instead of kernels
            t = ev.self_cpu_time_total
        if t <= 0:
            continue
        total += t
        rows.append({"name": ev.key[:120], "calls": ev.count, "total_ms": t / 1e3})
    rows.sort(key=lambda r: -r["total_ms"])
    return rows[:top] + [{"name": "<all kernels>", "calls": sum(r["calls"] for r in rows), "total_ms": total / 1e3}]


def _device_peaks(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    try:
        measured = measure_ceilings(device)
    except Exception:  # noqa: BLE001 - an allocation failure must not lose the run: datasheet figures
        measured = {}
    if measured:
        return measured
    name = torch.cuda.get_device_name(device)
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return peaks
    return {}


def case_timing(profile: str, case_timing_: Optional[dict] = None, **overrides) -> dict:
    """The timing loop's arguments for a case: the profile's defaults, then the harness caller's
    overrides, then the case's own; under ``budget`` no case runs more warm-ups or repeats than
    the profile's (a whole-video case asks for fewer, and gets fewer)."""
    base = {**PROFILES[profile], **overrides}
    own = dict(case_timing_ or {})
    if profile == "budget":
        for key in ("warmup", "repeats", "min_time_s"):
            if key in own:
                own[key] = min(own[key], base[key])
    return {**base, **own}


def run_case(case: Case, device: torch.device, profile: str = "full", **timing) -> dict:
    row = {k: v for k, v in dataclasses.asdict(case).items()
           if k not in ("fn", "timing", "graph_calls", "kernel_profile", "report")}
    try:
        row.update(time_fn(case.fn, device, **case_timing(profile, case.timing, **timing)))
    except Exception as exc:  # recorded, not fatal: one failing peer must not lose the run
        row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _merge_report(row, case)
        return row
    _merge_report(row, case)
    sec = row["median_ms"] / 1e3
    peaks = _device_peaks(device)
    if case.flops:
        row["tflops"] = case.flops / sec / 1e12
        if "bf16_TFLOPs" in peaks:
            row["frac_peak_flops"] = row["tflops"] / peaks["bf16_TFLOPs"]
    if case.bytes:
        row["GBps"] = case.bytes / sec / 1e9
        if "copy_GBps" in peaks:
            row["frac_peak_bw"] = row["GBps"] / peaks["copy_GBps"]
    if case.kernel_profile and device.type == "cuda":
        try:
            row["kernel_profile"] = profile_kernels(case.fn, device)
        except Exception as exc:  # noqa: BLE001 - recorded; the timing stands
            row["kernel_profile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if case.graph_calls and device.type == "cuda":
        try:
            row["graph_ms"] = time_graph(case.fn, device, case.graph_calls)
        except Exception as exc:  # e.g. not capturable (host work inside): recorded, events still stand
            row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        else:
            if case.bytes:
                row["graph_GBps"] = case.bytes / (row["graph_ms"] / 1e3) / 1e9
                if "copy_GBps" in peaks:
                    row["graph_frac_peak_bw"] = row["graph_GBps"] / peaks["copy_GBps"]
    return row


def _merge_report(row: dict, case: Case) -> None:
    if case.report is None:
        return
    try:
        extra = case.report()
    except Exception as exc:  # noqa: BLE001 - recorded; the timing stands
        row["report_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return
    for key, value in (extra or {}).items():
        if key == "extra":
            row.setdefault("extra", {}).update(value)
        else:
            row[key] = value


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if device.type == "cuda":
        try:
            env["ceilings"] = measure_ceilings(device)
        except Exception as exc:  # noqa: BLE001 - recorded; fractions then use DEVICE_PEAKS
            env["ceilings"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        env["git_commit"] = os.environ.get("LONGVIDEO_GIT_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except Exception:
        env["git_commit"] = None
    from .ops import _registry

    env["backends"] = {op: {b: v["available"] for b, v in t.items()} for op, t in _registry.report().items()}
    return env


def load_suite(name: str):
    return importlib.import_module(f"longvideo.benchmarks.bench_{name}")


def available_suites() -> list[str]:
    try:
        import longvideo.benchmarks as pkg
    except ImportError:
        return []
    return sorted(p.stem[len("bench_"):] for p in Path(list(pkg.__path__)[0]).glob("bench_*.py"))


def suite_cases(name: str, device: torch.device, quick: bool = False, profile: str = "full"):
    """The suite's cases (a list or a generator) for a profile."""
    if profile not in PROFILES:
        raise ValueError(f"unknown benchmark profile {profile!r}; known: {sorted(PROFILES)}")
    fn = load_suite(name).cases
    if "profile" in inspect.signature(fn).parameters:
        return fn(device, quick, profile=profile)
    if profile != "full":
        raise ValueError(f"suite {name!r} has no {profile!r} profile (its cases() takes no profile argument)")
    return fn(device, quick)


# implementations whose first call compiles something (our kernels, FlexAttention); the others
# (SDPA, copies, the official eager paths, diffusers) have nothing to warm
WARM_IMPLS = ("longvideo", "freeloc[", "flex", "official_3call", "triton_tile")


def warm_suite(name: str, device: torch.device, quick: bool = False, profile: str = "full",
               warm_impls: tuple = WARM_IMPLS, progress: Callable[[str], None] = print) -> int:
    """Run the suite's real setup and every case once, untimed and unrecorded: fills the Triton
    cache (the kernels' specializations at the suite's exact shapes and dtypes) and torch.compile's
    caches (FlexAttention) on disk, so that a later timed run in another process skips the
    compiles. Several suites warmed in parallel processes share those caches (tools/warm_triton.py).
    Only cases whose impl starts with one of `warm_impls` run (the rest compile nothing). Returns
    the number of cases that raised (reported, not raised)."""
    failed = 0
    pending = iter(suite_cases(name, device, quick, profile))
    while True:
        t0 = time.perf_counter()
        try:
            case = next(pending)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 - a failing setup ends the warm-up of this suite
            progress(f"[warm {name}] setup failed: {type(exc).__name__}: {str(exc)[:300]}")
            return failed + 1
        if not case.impl.startswith(warm_impls):
            continue
        try:
            case.fn()
            _sync(device)
            msg = f"{time.perf_counter() - t0:.1f} s"
        except Exception as exc:  # noqa: BLE001
            failed += 1
            msg = f"{type(exc).__name__}: {str(exc)[:200]}"
        progress(f"[warm {name}] {case.name} {case.impl}: {msg}")
        del case
    return failed


def run_suite(name: str, device: torch.device, quick: bool = False, progress: Callable[[str], None] = print,
              out_dir: Optional[Path] = None, profile: str = "full", **timing) -> dict:
    """Run every case of a suite. With `out_dir`, the record is (re)written after each case with
    ``"complete": False`` until the last one, so a run stopped by a time limit keeps what it measured."""
    produced = suite_cases(name, device, quick, profile)
    # A suite returns a list, or a generator that sets up each group of cases when it is reached
    # (so a long setup cannot keep the run from recording the groups before it).
    if isinstance(produced, (list, tuple)):
        total, queue = len(produced), collections.deque(produced)
        if isinstance(produced, list):
            produced.clear()  # the deque holds the only reference: each case is freed after its run
        pending = (queue.popleft() for _ in range(total))
    else:
        total, pending = "?", iter(produced)
    record = {"suite": name, "quick": quick, "profile": profile, "environment": environment(device), "cases": [],
              "complete": False}
    i, setup_failed = 0, False
    while True:
        try:
            case = next(pending)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 - a failing setup ends the suite, recorded
            record["cases"].append({"suite": name, "name": "<setup>", "impl": "",
                                    "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
            setup_failed = True
            break
        row = run_case(case, device, profile, **timing)
        record["cases"].append(row)
        i += 1
        if progress:
            msg = row.get("error") or f"{row['median_ms']:.3f} ms"
            progress(f"[{name} {i}/{total}] {case.name} {case.impl}: {msg}")
        del case
        if out_dir is not None:
            write_record(record, out_dir)
    record["complete"] = not setup_failed
    if out_dir is not None:
        write_record(record, out_dir)
    return record


def write_record(record: dict, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = record["environment"]
    dev = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    path = out_dir / f"{record['suite']}_{dev}_{stamp}.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    return path


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _ceiling_lines(env: dict) -> list:
    c = env.get("ceilings") or {}
    if "copy_GBps" not in c:
        return []
    return [f"Ceilings measured in this run: copy {c['copy_GBps']:.0f} GB/s, dense bf16 matmul "
            f"{c['bf16_TFLOPs']:.0f} TFLOP/s; '% peak' is against these.", ""]


def render_table(results_dir: Path) -> str:
    """Markdown table of every committed record (newest first per suite)."""
    results_dir = Path(results_dir)
    lines = ["# Recorded benchmark results", "",
             "Generated by `longvideo bench --table` from the JSON records in this folder; do not edit.", ""]
    records = []
    for p in sorted(results_dir.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except ValueError:
            continue
        if "suite" in rec and "cases" in rec:
            records.append((p.name, rec))
    for fname, rec in sorted(records, key=lambda r: (r[1]["suite"], r[1]["environment"]["date"]), reverse=False):
        env = rec["environment"]
        lines += [f"## {rec['suite']} — {env['device']} ({fname})", "",
                  f"torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}, commit "
                  f"{(env.get('git_commit') or '?')[:10]}, {env['date']}" + (" (quick)" if rec.get("quick") else "")
                  + (f" (profile {rec['profile']})" if rec.get("profile", "full") != "full" else "")
                  + (" (incomplete: the run stopped before its last case)" if rec.get("complete") is False else ""), "",
                  *_ceiling_lines(env),
                  "| case | impl | params | median ms | peak MiB | TFLOP/s | GB/s | % peak | extra |",
                  "|---|---|---|---|---|---|---|---|---|"]
        # rows flagged extra.roofline (a device copy of the case's bytes): every other row of the
        # same case also gets its speed relative to that copy, which is the attainable roofline
        # where a call is too short for the device's full bandwidth.
        copies = {r["name"]: r for r in rec["cases"] if r.get("extra", {}).get("roofline") and "error" not in r}
        for r in rec["cases"]:
            params = ", ".join(f"{k}={v}" for k, v in r.get("params", {}).items())
            if "error" in r:
                lines.append(f"| {r['name']} | {r['impl']} | {params} | error: {r['error'][:80]} | | | | | |")
                continue
            frac = r.get("frac_peak_bw", r.get("frac_peak_flops"))
            mem = r.get("peak_mem_bytes")
            extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.get("extra", {}).items())
            if r.get("setup_ms") is not None:
                extra = (extra + ", " if extra else "") + f"setup_ms={r['setup_ms']:.2f}"
            notes = []
            if r.get("graph_ms") is not None:
                notes.append(f"graph_ms={r['graph_ms']:.4g}")
                if r.get("graph_frac_peak_bw") is not None:
                    notes.append(f"graph_%peak={100 * r['graph_frac_peak_bw']:.0f}")
            elif r.get("graph_error"):
                notes.append(f"graph: {r['graph_error'][:60]}")
            copy = copies.get(r["name"])
            if copy is not None and copy is not r:
                notes.append(f"%copy={100 * copy['median_ms'] / r['median_ms']:.0f}")
                if r.get("graph_ms") and copy.get("graph_ms"):
                    notes.append(f"graph_%copy={100 * copy['graph_ms'] / r['graph_ms']:.0f}")
            if notes:
                extra = (extra + ", " if extra else "") + ", ".join(notes)
            lines.append(f"| {r['name']} | {r['impl']} | {params} | {r['median_ms']:.4g} | "
                         f"{_fmt(mem / 2**20 if mem is not None else None, '.1f')} | {_fmt(r.get('tflops'), '.1f')} | "
                         f"{_fmt(r.get('GBps'), '.0f')} | {_fmt(frac * 100 if frac is not None else None, '.0f')} | {extra} |")
        lines.append("")
    if not records:
        lines.append("No records yet: run `longvideo bench` on a GPU.")
    return "\n".join(lines) + "\n"
