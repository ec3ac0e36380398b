"""The backend registry: selection rules, settings, errors, and the `auto` preferences."""
import json

import pytest
import torch

from longvideo.ops import _registry as R
from longvideo.ops import preferences


@pytest.fixture
def toy_op():
    name = "_toy_op_for_tests"
    calls = []
    R.register_backend(name, "reference", lambda x: calls.append("reference") or x + 1, rank=100, devices=("cpu", "cuda"))
    R.register_backend(name, "triton", lambda x: calls.append("triton") or x + 1, available=R.triton_available, rank=10,
                       supports=lambda x: "too big" if x.numel() > 4 else None)
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
