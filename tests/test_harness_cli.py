"""Benchmark harness, result records and tables, and the `longvideo` command."""
import json
import subprocess
import sys

import torch

from longvideo import benchmarking
from longvideo.cli import main


def test_time_fn_and_record_roundtrip(tmp_path):
    x = torch.randn(64, 64)
    case = benchmarking.Case(suite="toy", name="matmul", impl="torch", fn=lambda: x @ x,
                             params={"n": 64}, flops=2 * 64 ** 3, bytes=3 * 64 * 64 * 4, extra={"density": 0.5})
    row = benchmarking.run_case(case, torch.device("cpu"), warmup=1, repeats=3, min_time_s=0.0)
    assert row["median_ms"] > 0 and row["repeats"] >= 3
    assert abs(row["tflops"] - case.flops / (row["median_ms"] / 1e3) / 1e12) < 1e-12
    rec = {"suite": "toy", "quick": True, "environment": benchmarking.environment(torch.device("cpu")), "cases": [row]}
    path = benchmarking.write_record(rec, tmp_path)
    loaded = json.loads(path.read_text())
    assert loaded["cases"][0]["name"] == "matmul" and loaded["environment"]["torch"] == torch.__version__
    table = benchmarking.render_table(tmp_path)
    assert "| matmul | torch | n=64 |" in table and "density=0.5" in table


def test_failing_case_is_recorded_not_raised():
    def boom():
        raise RuntimeError("out of memory")
    row = benchmarking.run_case(benchmarking.Case("toy", "x", "impl", boom), torch.device("cpu"))
    assert "out of memory" in row["error"]


def test_info_lists_every_op(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["backends"]) >= {"lowfreq_mix", "consistent_attention", "tiered_sparse_attention"}
    assert info["cuda_extension"]["reason"]


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "longvideo", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "reference" in out.stdout


def test_bench_table_only(tmp_path):
    assert main(["bench", "--table", "--out", str(tmp_path)]) == 0
    assert "No records yet" in (tmp_path / "README.md").read_text()


def test_suite_record_is_written_after_every_case(tmp_path, monkeypatch):
    """A suite stopped by a time limit keeps the cases it measured (record marked incomplete)."""
    import types

    seen = []

    def stop_after_two():
        if len(seen) == 2:
            raise KeyboardInterrupt  # what `timeout` does to a long suite, as far as the record goes
        seen.append(1)

    suite = types.SimpleNamespace(cases=lambda device, quick: [
        benchmarking.Case("toy", f"c{i}", "impl", stop_after_two, timing={"warmup": 0, "repeats": 1, "min_time_s": 0.0})
        for i in range(3)])
    monkeypatch.setattr(benchmarking, "load_suite", lambda name: suite)
    try:
        benchmarking.run_suite("toy", torch.device("cpu"), progress=None, out_dir=tmp_path)
    except KeyboardInterrupt:
        pass
    (path,) = tmp_path.glob("toy_*.json")
    rec = json.loads(path.read_text())
    assert [c["name"] for c in rec["cases"]] == ["c0", "c1"] and rec["complete"] is False
    assert "incomplete" in benchmarking.render_table(tmp_path)

    seen.clear()
    suite.cases = lambda device, quick: [benchmarking.Case("toy", "only", "impl", lambda: None)]
    rec = benchmarking.run_suite("toy", torch.device("cpu"), progress=None, out_dir=tmp_path / "done")
    assert rec["complete"] is True
    assert json.loads(next((tmp_path / "done").glob("toy_*.json")).read_text())["complete"] is True


def test_lazy_suite_records_cases_before_a_failing_setup(tmp_path, monkeypatch):
    """A suite may yield its cases (setting each group up when reached): a setup that fails ends
    the suite with an error row, after the cases before it were recorded."""
    import types

    def lazy(device, quick):
        yield benchmarking.Case("toy", "first", "impl", lambda: None, timing={"warmup": 0, "repeats": 1})
        raise RuntimeError("CUDA out of memory in setup")

    monkeypatch.setattr(benchmarking, "load_suite", lambda name: types.SimpleNamespace(cases=lazy))
    rec = benchmarking.run_suite("toy", torch.device("cpu"), progress=None, out_dir=tmp_path)
    assert [c["name"] for c in rec["cases"]] == ["first", "<setup>"] and "out of memory" in rec["cases"][1]["error"]
    assert rec["complete"] is False and "median_ms" in rec["cases"][0]
