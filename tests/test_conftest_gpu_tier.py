"""The GPU-tier gate in tests/conftest.py: without CUDA the gpu-marked tests skip; with CUDA but
without LONGVIDEO_TEST_GPU they skip with a reason that says to set it (the conftest then set
TRITON_INTERPRET=1, so they would run the interpreter at real shapes), and the report header warns;
with both they run. require_backend fails (not skips) in the GPU tier."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def conftest_mod():
    spec = importlib.util.spec_from_file_location("_longvideo_conftest_under_test",
                                                  Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Item:
    def __init__(self, gpu):
        self.keywords = {"gpu": True} if gpu else {}
        self.markers = []

    def add_marker(self, m):
        self.markers.append(m)


def _collect(mod):
    items = [_Item(True), _Item(False)]
    mod.pytest_collection_modifyitems(None, items)
    return [[m.kwargs.get("reason") for m in it.markers if m.name == "skip"] for it in items]


@pytest.mark.parametrize("cuda,env,expect", [
    (False, None, "needs a CUDA device"),
    (False, "1", "needs a CUDA device"),
    (True, None, "set LONGVIDEO_TEST_GPU=1"),
    (True, "0", "set LONGVIDEO_TEST_GPU=1"),
    (True, "1", None),
])
def test_gpu_tier_gate(conftest_mod, monkeypatch, cuda, env, expect):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if env is None:
        monkeypatch.delenv("LONGVIDEO_TEST_GPU", raising=False)
    else:
        monkeypatch.setenv("LONGVIDEO_TEST_GPU", env)
    gpu_reasons, cpu_reasons = _collect(conftest_mod)
    assert cpu_reasons == []  # CPU tests never skipped by the gate
    if expect is None:
        assert gpu_reasons == []
    else:
        assert len(gpu_reasons) == 1 and expect in gpu_reasons[0]
    header = conftest_mod.pytest_report_header(None)
    if cuda and expect is not None:
        assert header and "WARNING" in header[0] and "LONGVIDEO_TEST_GPU=1" in header[0]
        assert "TRITON_INTERPRET=1" in header[0]
        lines = []
        rep = SimpleNamespace(write_sep=lambda *a, **k: lines.append(a), write_line=lambda s: lines.append(s))
        conftest_mod.pytest_terminal_summary(rep, 0, None)
        assert any("LONGVIDEO_TEST_GPU=1" in str(x) for x in lines)
    else:
        assert not header


@pytest.mark.parametrize("env", [None, "1"])
def test_require_backend_fails_in_gpu_tier(conftest_mod, monkeypatch, env):
    if env is None:
        monkeypatch.delenv("LONGVIDEO_TEST_GPU", raising=False)
    else:
        monkeypatch.setenv("LONGVIDEO_TEST_GPU", env)
    check = conftest_mod.require_backend.__wrapped__()  # the fixture's function
    from longvideo.ops import get_backend

    be = get_backend("lowfreq_mix", "cuda")
    monkeypatch.setattr(be, "_avail_cache", (False, "extension did not build (test)"))
    expected = pytest.fail.Exception if env else pytest.skip.Exception
    with pytest.raises(expected, match="did not build"):
        check("lowfreq_mix", "cuda")
    monkeypatch.setattr(be, "_avail_cache", (True, "ok"))
    assert check("lowfreq_mix", "cuda") is be
