"""The ``memory`` benchmark suite (benchmarks/bench_memory.py) on CPU: its quick run on the tiny
models plans each target with the memory planner, runs it with the chosen settings and compares
the planner's prediction with the LiveTensorTracker's measured peak. Checked here: the records'
schema; that the prediction in a record is the planner's for the run made and the measured
peak the tracker's (a prediction scaled by 1.5 is flagged, an out-of-memory case says fits:
false, an interrupted case stops the suite); the GPU tier's targets plan on CUDA without a GPU.
"""
import json

import pytest
import torch

from longvideo import benchmarking
from longvideo.benchmarks import bench_memory as bm
from longvideo.planner import plan, spec_from_pipeline

CPU = torch.device("cpu")
MEMORY_KEYS = {"target", "status", "target_bytes", "settings", "settings_described", "predicted_peak_bytes",
               "predicted_target_peak_bytes", "measured_peak_bytes", "ratio", "within_tolerance", "fits",
               "seconds_per_step", "phases", "measure", "compared_phases"}
# the planner's own tolerance against the tracker on the tiny pipelines (tests/test_planner.py)
METHOD_TOL = 0.25


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    rec = benchmarking.run_suite("memory", CPU, quick=True, progress=None, out_dir=out)
    files = list(out.glob("memory_cpu_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["cases"] == json.loads(json.dumps(rec["cases"],
                                                                                                    default=str))
    return rec


def _only(monkeypatch, key):
    real = bm.targets
    monkeypatch.setattr(bm, "targets", lambda quick: [t for t in real(quick) if t.key == key])


def test_quick_run_records_every_target_with_the_schema(record):
    assert record["complete"] and [c["name"] for c in record["cases"]] == [t.key for t in bm.targets(True)]
    for row in record["cases"]:
        m = row["memory"]
        assert MEMORY_KEYS <= set(m), (row["name"], MEMORY_KEYS - set(m))
        assert m["status"] == "ok", m["status"]
        assert row["peak_mem_bytes"] == m["measured_peak_bytes"] > 0
        assert m["ratio"] == pytest.approx(m["predicted_peak_bytes"] / m["measured_peak_bytes"])
        assert m["within_tolerance"] == (abs(m["ratio"] - 1) <= bm.TOLERANCE)
        assert m["fits"] == (m["measured_peak_bytes"] <= m["target_bytes"])
        assert m["seconds_per_step"] > 0 and row["median_ms"] > 0
        by_name = {p["name"]: p for p in m["phases"]}
        for name in m["compared_phases"]:
            assert by_name[name]["measured_bytes"] > 0 and by_name[name]["calls"] >= 1, (row["name"], name)
        # the overall peak is the largest phase peak (measuring starts right before the first phase)
        assert m["measured_peak_bytes"] == max(p["measured_bytes"] or 0 for p in m["phases"])
        assert row["extra"]["status"] == "ok" and "fit" in row["extra"]


def test_table_renders_the_rows(record, tmp_path):
    benchmarking.write_record(record, tmp_path)
    table = benchmarking.render_table(tmp_path)
    for row in record["cases"]:
        line, = [ln for ln in table.splitlines() if ln.startswith(f"| {row['name']} |")]
        assert "status=ok" in line and "ratio=" in line


def test_quick_settings_carry_the_offload_and_bank_paths(record):
    by = {c["name"]: c["memory"] for c in record["cases"]}
    assert by["fifo_tiny_wan_32"]["settings"]["offload"] == "group"
    assert by["story_tiny_sdxl_32_4ids"]["settings"]["bank_location"] == "cpu"
    assert by["freeloc_tiny_17f"]["settings"]["vae_tiling"] is True


def test_prediction_is_the_planners_for_the_run_made(record):
    """The record's predicted peak recomputed here from the planner (beyond the weights on CPU: the
    tracker does not see the weights built before it), and within the planner's tested tolerance
    of the tracker's measured peak for FreeLOC and FIFO."""
    from longvideo.models import wan

    pipe = wan.tiny_pipeline("t2v")
    spec = spec_from_pipeline(pipe, name="tiny-wan")
    by = {c["name"]: c["memory"] for c in record["cases"]}
    m = by["freeloc_tiny_17f"]
    st = m["settings"]
    p = plan("freeloc", spec, 32, 32, 17, "float32", device="cpu", trained_frames=3, num_inference_steps=1,
             offload=st["offload"], vae_tiling=st["vae_tiling"], vae_slicing=st["vae_slicing"])
    assert m["predicted_peak_bytes"] == max(ph.beyond_weights for ph in p.phases)
    assert {r["name"]: r["predicted_bytes"] for r in m["phases"]} == {ph.name: ph.beyond_weights for ph in p.phases}
    for key in ("freeloc_tiny_17f", "fifo_tiny_wan_32"):
        assert abs(by[key]["ratio"] - 1) < METHOD_TOL, (key, by[key]["ratio"])


def test_a_wrong_prediction_is_flagged(monkeypatch, record):
    """The comparison is live: the same FIFO case with the planner's phases scaled by 1.5 gives a
    ratio 1.5 times the honest one, outside the tolerance."""
    real_plan = bm._plan

    def inflated(*args, **kwargs):
        p = real_plan(*args, **kwargs)
        if kwargs.get("settings") is None:   # the choice itself is left alone: only the run's prediction
            return p
        for ph in p.phases:
            for part in ph.parts:
                part.nbytes = int(part.nbytes * 1.5)
        return p

    _only(monkeypatch, "fifo_tiny_wan_32")
    monkeypatch.setattr(bm, "_plan", inflated)
    row, = benchmarking.run_suite("memory", CPU, quick=True, progress=None)["cases"]
    honest = {c["name"]: c["memory"] for c in record["cases"]}["fifo_tiny_wan_32"]
    assert row["memory"]["status"] == "ok"
    assert row["memory"]["ratio"] == pytest.approx(1.5 * honest["ratio"], rel=0.02)
    assert row["memory"]["within_tolerance"] is False


def test_out_of_memory_says_it_does_not_fit_and_interrupt_stops_the_suite(monkeypatch):
    def oom(ctx):
        ctx.meter.start()
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    def interrupted(ctx):
        raise KeyboardInterrupt

    real = bm.targets

    def patched(quick):
        ts = real(quick)
        ts[0].run, ts[1].run = oom, interrupted
        return ts

    monkeypatch.setattr(bm, "targets", patched)
    rec = benchmarking.run_suite("memory", CPU, quick=True, progress=None)
    rows = [c["memory"] for c in rec["cases"]]
    assert [r["status"] for r in rows] == ["out of memory", "interrupted"]   # the third never starts
    assert rows[0]["fits"] is False and "out of memory" in rows[0]["error"]
    assert rows[1]["fits"] is None


def test_gpu_targets_plan_on_cuda_without_a_gpu():
    """The full-size targets' planner calls (the GPU run's first step) on device="cuda": each
    chooses settings that fit its card, the FIFO 14B one with offloading."""
    got = {}
    for t in bm.targets(False):
        from longvideo.planner import load_model_spec, parse_bytes

        p = bm._plan(t, load_model_spec(t.plan_kwargs["model"]), "cuda", size=parse_bytes(t.size))
        got[t.key] = p
        assert p.fits and p.peak_bytes <= 0.95 * parse_bytes(t.size), (t.key, p.choice)
    assert [t.key for t in bm.targets(False)][0] == "freeloc_wan1.3b_321f_480p"
    assert got["fifo_wan14b_480p"].settings.offload in ("group", "sequential", "model")


class _FakeAllocator:
    """torch.cuda's allocator statistics for the Meter's CUDA path, without a GPU: alloc / free
    move the current bytes, the peak follows, reset_peak_memory_stats starts it anew; reserved =
    allocated + a fixed cache."""

    def __init__(self, start=100):
        self.current = self.peak = start

    def alloc(self, n):
        self.current += n
        self.peak = max(self.peak, self.current)

    def free(self, n):
        self.current -= n

    def install(self, monkeypatch):
        cuda = torch.cuda
        for name, fn in {"synchronize": lambda *a: None, "empty_cache": lambda: None,
                         "memory_allocated": lambda *a: self.current, "max_memory_allocated": lambda *a: self.peak,
                         "memory_reserved": lambda *a: self.current + 10,
                         "max_memory_reserved": lambda *a: self.peak + 10,
                         "reset_peak_memory_stats": lambda *a: setattr(self, "peak", self.current)}.items():
            monkeypatch.setattr(cuda, name, fn)


def test_cuda_meter_counts_from_the_case_start_and_forgets_the_build_transient(monkeypatch):
    fake = _FakeAllocator(start=100)             # 100 bytes left by an earlier case: not this case's
    fake.install(monkeypatch)
    meter = bm.Meter(torch.device("cuda"))
    fake.alloc(1000)                             # float32 build ...
    fake.free(500)                               # ... cast: 500 bytes of weights stay
    meter.start()
    with meter.phase("text"):
        fake.alloc(50)
        fake.free(50)
    fake.alloc(20)                               # state between the phases (prompt embeddings)
    with meter.phase("denoise"):
        fake.alloc(300)
        fake.free(300)
    with meter.phase("denoise"):                 # a second call: the larger peak is kept
        fake.alloc(200)
        fake.free(200)
    meter.stop()
    assert meter.phases["text"]["measured_bytes"] == 550
    assert meter.phases["denoise"]["measured_bytes"] == 820 and meter.phases["denoise"]["calls"] == 2
    assert meter.phases["denoise"]["measured_reserved_bytes"] == 820
    assert meter.overall == 820                  # not the build's 1000
