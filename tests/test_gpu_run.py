"""Rehearsal of the one-call GPU job (tools/gpu_run.sh) on CPU: its structure -- deadline
arithmetic, the background build and warm-up, the test step, one process per suite, the files it
leaves in $OUT (at most 8: the device returns no more) -- is exercised here, so a broken script is
caught in CI and not on the GPU machine (GPU_RUN_REHEARSAL=1: quick CPU suites, a CPU test
selection instead of the GPU tier)."""
import inspect
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from longvideo import benchmarking

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_run.sh"
OUT_FILES = {"gpu.txt", "steps.tsv", "build.log", "warm.log", "tests.log", "junit.xml", "bench.log", "results.tar.gz"}


def _rehearse(tmp_path, **env):
    out, res = tmp_path / "out", tmp_path / "res"
    full_env = dict(os.environ, GPU_RUN_REHEARSAL="1", OUT=str(out), RES=str(res), TEST_WORKERS="0",
                    TESTS="tests/test_registry.py", LONGVIDEO_BUILD_DIR=str(tmp_path / "build"), **env)
    full_env.pop("LONGVIDEO_TEST_GPU", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    return out, res, {name: (int(start), int(wall), rc) for name, start, wall, rc in steps}


def test_rehearsal_runs_every_step_and_leaves_at_most_8_files(tmp_path):
    out, res, steps = _rehearse(tmp_path, DEADLINE="200", SUITES="lowfreq_mix tiered_sparse_attention memory",
                                WARM_SUITES="lowfreq_mix")
    files = {p.name for p in out.iterdir()}
    assert files <= OUT_FILES and len(files) <= 8, files
    assert {"gpu.txt", "steps.tsv", "build.log", "warm.log", "tests.log", "junit.xml", "bench.log",
            "results.tar.gz"} == files
    assert not any(p.is_dir() for p in out.iterdir())
    names = list(steps)
    assert any(n.startswith("tests(limit") for n in names), names
    assert steps["warm"][2] == "0" and "extension_build" in names
    assert [n.split("(")[0] for n in names if n.startswith("bench:")] == ["bench:lowfreq_mix",
                                                                          "bench:tiered_sparse_attention",
                                                                          "bench:memory"]
    assert all(steps[n][2] == "0" for n in names if n.startswith("bench:")), \
        [(n, steps[n]) for n in names if n.startswith("bench:")] + [(out / "bench.log").read_text()[-1500:]]
    assert steps["total"][1] < 200
    assert 'failures="0"' in (out / "junit.xml").read_text() and 'errors="0"' in (out / "junit.xml").read_text()
    with tarfile.open(out / "results.tar.gz") as tar:
        records = [n for n in tar.getnames() if n.endswith(".json")]
    assert sorted(re.sub(r"_cpu_.*", "", Path(n).name) for n in records) == ["lowfreq_mix", "memory",
                                                                            "tiered_sparse_attention"]
    # the memory suite's targets ran in the job's structure (planned, run, measured)
    with tarfile.open(out / "results.tar.gz") as tar:
        name, = [n for n in records if Path(n).name.startswith("memory_")]
        memory = json.load(tar.extractfile(name))
    assert [c["memory"]["status"] for c in memory["cases"]] == ["ok"] * 3


def test_deadline_skips_what_does_not_fit_and_ends_in_time(tmp_path):
    # 30 s: after the exit margin and the floors promised to three suites, the tests get no time,
    # and the suites run while time is left; the job itself ends inside its deadline
    out, res, steps = _rehearse(tmp_path, DEADLINE="45", SUITE_FLOOR="20",
                                SUITES="lowfreq_mix consistent_attention tiered_sparse_attention", WARM_SUITES="")
    names = list(steps)
    assert any(n.startswith("tests(skipped") for n in names), names
    assert steps["total"][1] <= 45 + 5
    assert "warm" not in steps
    assert any(n.endswith("(skipped)") for n in names if n.startswith("bench:")) or \
        all(steps[n][2] == "0" for n in names if n.startswith("bench:"))


def _script_default(var):
    m = re.search(rf'^{var}=\$\{{{var}-(.*)\}}$', SCRIPT.read_text(), re.M)
    assert m, var
    return m.group(1).split()


def test_budget_profile_names_every_suite():
    suites = benchmarking.available_suites()
    assert sorted(_script_default("SUITES")) == sorted(suites)
    caps = dict(re.findall(r"\[(\w+)\]=(\d+)", SCRIPT.read_text()))
    assert set(suites) <= set(caps), set(suites) - set(caps)
    assert set(_script_default("WARM_SUITES")) <= set(suites)
    for name in suites:
        params = inspect.signature(benchmarking.load_suite(name).cases).parameters
        assert "profile" in params, f"suite {name} has no budget profile"


def test_budget_timing_caps_the_cases_own():
    assert benchmarking.case_timing("budget", {"warmup": 3, "repeats": 10}) == dict(warmup=1, repeats=3, min_time_s=0.0,
                                                                                 max_time_s=4.0)
    assert benchmarking.case_timing("budget", {"warmup": 0, "repeats": 1})["repeats"] == 1
    assert benchmarking.case_timing("full", {"warmup": 0, "repeats": 2}) == dict(warmup=0, repeats=2, min_time_s=0.2)
    # a long case is timed once under the budget: no new call once the timed ones reach max_time_s
    calls = []
    row = benchmarking.time_fn(lambda: (calls.append(1), __import__("time").sleep(0.05)), torch.device("cpu"),
                               warmup=0, repeats=5, min_time_s=0.0, max_time_s=0.01)
    assert row["repeats"] == 1 and len(calls) == 1
    with pytest.raises(ValueError, match="unknown benchmark profile"):
        benchmarking.suite_cases("lowfreq_mix", "cpu", True, "fast")
