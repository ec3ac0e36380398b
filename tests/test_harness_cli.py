"""Benchmark harness, result records and tables, and the `longvideo` command."""
import json
import subprocess
import sys

import pytest
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


def test_table_relates_rows_to_the_same_size_copy_and_graph_time(tmp_path):
    """Rows of a case with a roofline copy get %copy (copy time / row time, events and graph)."""
    x = torch.randn(8)
    cpu = torch.device("cpu")
    copy = benchmarking.run_case(benchmarking.Case("toy", "mix", "device_copy", lambda: x.clone(), bytes=96,
                                                   extra={"roofline": True}, graph_calls=5), cpu, repeats=3)
    op = benchmarking.run_case(benchmarking.Case("toy", "mix", "op", lambda: x * 2, bytes=96, graph_calls=5), cpu,
                               repeats=3)
    assert "graph_ms" not in op and "graph_error" not in op  # CUDA only; a CPU run has no graph timing
    copy.update(median_ms=2.0, graph_ms=1.0)
    op.update(median_ms=8.0, graph_ms=1.25, graph_frac_peak_bw=0.5)
    failed = dict(op, impl="host_built", graph_error="RuntimeError: capture failed")
    del failed["graph_ms"], failed["graph_frac_peak_bw"]
    rec = {"suite": "toy", "quick": False, "environment": benchmarking.environment(cpu), "cases": [copy, op, failed]}
    benchmarking.write_record(rec, tmp_path)
    table = benchmarking.render_table(tmp_path)
    op_line = next(line for line in table.splitlines() if line.startswith("| mix | op |"))
    assert "graph_ms=1.25" in op_line and "graph_%peak=50" in op_line
    assert "%copy=25" in op_line and "graph_%copy=80" in op_line
    failed_line = next(line for line in table.splitlines() if line.startswith("| mix | host_built |"))
    assert "graph: RuntimeError: capture failed" in failed_line and "graph_%copy" not in failed_line
    copy_line = next(line for line in table.splitlines() if line.startswith("| mix | device_copy |"))
    assert "%copy" not in copy_line


@pytest.mark.gpu
def test_graph_timing_on_gpu():
    """time_graph captures the ops' launch paths (Triton, CUDA extension, cuFFT) and gives a per-call
    device time of the same order as the event time of one call, and leaves the results unchanged."""
    from longvideo.ops import use_backend
    from longvideo.ops.lowfreq_mix import lowfreq_mix

    dev = torch.device("cuda")
    x, noise = torch.randn(2, 1, 3, 40, 64, device=dev), torch.randn(2, 1, 3, 40, 64, device=dev)
    for be in ("triton", "cuda"):
        for shape_x, shape_n in ((x[:, :, :1], noise[:, :, :1]), (x, noise)):  # single pass, spectral path
            with use_backend(be, op="lowfreq_mix"):
                expected = lowfreq_mix(shape_x, shape_n)
                case = benchmarking.Case("toy", "mix", be, lambda a=shape_x, b=shape_n: lowfreq_mix(a, b),
                                         bytes=1, graph_calls=4)
                row = benchmarking.run_case(case, dev, repeats=3, min_time_s=0.0)
            assert "graph_error" not in row, row.get("graph_error")
            assert 0 < row["graph_ms"] < row["median_ms"] * 4
            with use_backend(be, op="lowfreq_mix"):
                torch.testing.assert_close(lowfreq_mix(shape_x, shape_n), expected, atol=0, rtol=0)


def test_kernel_profile_lists_the_costliest_work_first():
    from longvideo.benchmarking import profile_kernels

    a, b = torch.randn(300, 300), torch.randn(300, 300)
    rows = profile_kernels(lambda: (a @ b, a + b), torch.device("cpu"))
    assert rows[-1]["name"] == "<all kernels>"
    times = [r["total_ms"] for r in rows[:-1]]
    assert times == sorted(times, reverse=True) and rows[-1]["total_ms"] >= sum(times) - 1e-9
    assert any("mm" in r["name"] for r in rows[:3])
