"""The backend registry: selection rules, settings, errors, and the `auto` preferences."""
import json

import pytest
import torch

from longvideo.ops import _registry as R
from longvideo.ops import preferences
from longvideo.ops._constraints import on_device, requires


@pytest.fixture
def toy_op():
    name = "_toy_op_for_tests"
    calls = []
    R.register_backend(name, "reference", lambda x: calls.append("reference") or x + 1, rank=100,
                       constraints=(on_device("cpu", "cuda"),))
    R.register_backend(name, "triton", lambda x: calls.append("triton") or x + 1, available=R.triton_available, rank=10,
                       constraints=(requires("small", lambda a: a["x"].numel() <= 4, "too big"),))
    R.register_backend(name, "cuda", lambda x: calls.append("cuda") or x + 1, available=lambda: (False, "not built"), rank=5)
    yield name, calls
    R._REGISTRY.pop(name)


def test_cpu_auto_uses_reference(toy_op):
    name, calls = toy_op
    assert R.dispatch(name, torch.device("cpu"), torch.zeros(2)).tolist() == [1.0, 1.0]
    assert calls == ["reference"]


def test_use_backend_context_and_restore(toy_op, monkeypatch):
    name, calls = toy_op
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with R.use_backend("triton"):
        assert R.current_setting(name) == "triton"
        R.dispatch(name, torch.device("cpu"), torch.zeros(2))
        with R.use_backend("reference", op=name):
            R.dispatch(name, torch.device("cpu"), torch.zeros(2))
    assert R.current_setting(name) == "auto"
    assert calls == ["triton", "reference"]


def test_explicit_backend_errors_name_the_reason(toy_op, monkeypatch):
    name, _ = toy_op
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with R.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="does not run on cpu"):
            R.dispatch(name, torch.device("cpu"), torch.zeros(2))
    with R.use_backend("triton"):
        with pytest.raises(RuntimeError, match="too big"):
            R.dispatch(name, torch.device("cpu"), torch.zeros(8))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with R.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            R.dispatch(name, torch.device("cpu"), torch.zeros(2))


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="backend must be one of"):
        R.set_backend("fast")
    with pytest.raises(ValueError, match="unknown op"):
        with R.use_backend("triton", op="no_such_op"):
            pass


def test_every_op_registers_three_backends():
    import longvideo  # noqa: F401

    for op in ("lowfreq_mix", "consistent_attention", "tiered_sparse_attention"):
        assert set(R.backends(op)) == {"reference", "triton", "cuda"}, op
        assert hasattr(torch.ops.longvideo, op)
        ok, why = R.get_backend(op, "cuda").is_available()
        if not torch.cuda.is_available():
            assert not ok and why  # unavailable, with a reason, and no exception


def test_preferences_from_records(tmp_path):
    def rec(device, t_triton, t_cuda, date):
        return {"suite": "lowfreq_mix", "quick": False,
                "environment": {"device_type": "cuda", "device": device, "date": date},
                "cases": [{"name": "a", "impl": "longvideo[triton]", "params": {"s": 1}, "median_ms": t_triton},
                          {"name": "a", "impl": "longvideo[cuda]", "params": {"s": 1}, "median_ms": t_cuda},
                          {"name": "a", "impl": "torch_fft", "params": {"s": 1}, "median_ms": 0.001}]}
    (tmp_path / "r1.json").write_text(json.dumps(rec("GPU-X", 1.0, 2.0, "2026-01-01")))
    (tmp_path / "r2.json").write_text(json.dumps(rec("GPU-Y", 3.0, 2.0, "2026-01-01")))
    prefs = preferences.compute_preferences(tmp_path)
    assert prefs["lowfreq_mix"]["by_device"] == {"GPU-X": "triton", "GPU-Y": "cuda"}
    # a newer record of the same case replaces the older one
    (tmp_path / "r3.json").write_text(json.dumps(rec("GPU-X", 5.0, 2.0, "2026-02-01")))
    assert preferences.compute_preferences(tmp_path)["lowfreq_mix"]["by_device"]["GPU-X"] == "cuda"


def test_constraints_report_the_first_failure_in_declared_order():
    """A registration's constraints are checked in order on the call's arguments, named as the
    backend function's parameters (positional or keyword, None tensors skipped); the first failing
    one's message is the reason, and an explicit choice raises with it."""
    from longvideo.ops._constraints import aligned, dtype_in, head_dim_in, strides_multiple_of, unit_last_stride

    name = "_toy_constrained_op"

    def fn(q, k, bank=None, scale=1.0):
        return q

    be = R.register_backend(name, "triton", fn, available=R.triton_available, constraints=(
        on_device("cuda"),
        dtype_in("q", {torch.float16}, "dtype {dtype} is not half"),
        head_dim_in({64, 128}, "head dims 64/128 (got {D}, {Dv})", ("q", "k"), equal=True),
        unit_last_stride(("q", "k", "bank"), "{name}: last stride"),
        strides_multiple_of(("q", "k", "bank"), 8, "{name}: rows", skip_size_one=True),
        aligned(("q", "k", "bank"), 16, "{name}: aligned"),
    ))
    R.register_backend(name, "reference", fn, constraints=(on_device("cpu", "cuda"),))
    try:
        assert be.devices == ("cuda",) and R.get_backend(name, "reference").devices == ("cpu", "cuda")
        h = torch.zeros(2, 64, dtype=torch.float16)
        assert be.supports(h, h) is None and be.supports(h, k=h, bank=None) is None
        assert be.supports(h.float(), h[:, :32]) == "dtype torch.float32 is not half"  # first of two failures
        assert be.supports(h, h[:, :32]) == "head dims 64/128 (got 64, 32)"
        assert be.supports(h, k=torch.zeros(64, 2, dtype=torch.float16).t()) == "k: last stride"
        assert be.supports(h, h, torch.zeros(2, 72, dtype=torch.float16)[:, :64]) is None  # 72: rows of 8
        assert be.supports(h, h, bank=torch.zeros(2, 68, dtype=torch.float16)[:, :64]) == "bank: rows"
        assert be.supports(h, h, bank=torch.zeros(1, 68, dtype=torch.float16)[:, :64]) is None  # size-1 dim
        assert be.supports(h, h, torch.zeros(129, dtype=torch.float16)[1:].view(2, 64)) == "bank: aligned"
        with pytest.MonkeyPatch.context() as mp, R.use_backend("triton", op=name):
            mp.setenv("TRITON_INTERPRET", "1")
            with pytest.raises(RuntimeError, match="does not support this input: head dims 64/128"):
                R.dispatch(name, torch.device("cpu"), h, h[:, :32])
    finally:
        R._REGISTRY.pop(name)
        R._ORDER_CACHE.clear()


def test_every_kernel_backend_declares_its_constraints():
    """The ops' kernel backends state what they accept as named constraints beside their
    registration (no per-op supports functions): on CUDA only, each with at least one check."""
    import longvideo  # noqa: F401
    from longvideo.ops._constraints import Constraint

    for op in ("lowfreq_mix", "consistent_attention", "tiered_sparse_attention"):
        for name in ("triton", "cuda"):
            be = R.get_backend(op, name)
            assert be.devices == ("cuda",) and be.constraints, (op, name)
            assert all(isinstance(c, Constraint) for c in be.constraints), (op, name)
        assert R.get_backend(op, "reference").devices == ("cpu", "cuda")


def test_op_call_overhead_script_runs():
    """tools/op_call_overhead.py (the measurement behind lowfreq_mix's low-level registration) runs."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "tools" / "op_call_overhead.py"
    res = subprocess.run([sys.executable, str(script), "--reps", "20"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "low-level Library (lowfreq_mix)" in res.stdout and "custom_op + register_fake" in res.stdout
