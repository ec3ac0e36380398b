"""The plan layer (longvideo.ops.plan): backend-neutral host-side preparation of each op's call.

Structure: the plan modules import no backend (no Triton, no kernel module, no op module), and
the CUDA backends build their plans without Triton. Caching: what depends on shapes and
parameters only is built once per key.
"""
import ast
import pathlib
import subprocess
import sys
import textwrap

import torch

import longvideo  # noqa: F401  (registers the ops)
from longvideo.ops.plan import consistent as plan_ca
from longvideo.ops.plan import lowfreq as plan_lf
from longvideo.ops.plan import tiered as plan_tsa

PLAN_DIR = pathlib.Path(plan_tsa.__file__).parent


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")


def test_plan_modules_import_no_backend():
    """Flow op -> plan -> kernel: a plan module imports torch and the reference, never Triton, a
    kernel module, an op module or the registry."""
    for path in sorted(PLAN_DIR.glob("*.py")):
        for name in _imports(path):
            assert "triton" not in name, (path.name, name)
            assert name in ("__future__", "functools", "math", "threading", "dataclasses", "typing", "torch") \
                or name.startswith("...reference."), (path.name, name)


def test_cuda_backends_plan_without_triton():
    """Each CUDA backend builds its plan (schedule, RoPE tables, segment table, filter table) with
    Triton unimportable and reaches its private op (absent here: the extension is not loaded)."""
    script = textwrap.dedent("""
        import sys, types
        sys.modules["triton"] = None  # any import of triton (or of a Triton kernel module) now fails
        import torch
        torch.cuda.current_stream = lambda *a, **k: types.SimpleNamespace(cuda_stream=0)
        import longvideo
        from longvideo.ops import get_backend
        h = torch.float16
        x = torch.randn(1, 2, 3, 8, 8, dtype=h)
        q_ca = torch.randn(2, 2, 16, 64, dtype=h)
        q_tsa = torch.randn(1, 2, 24, 64, dtype=h)
        calls = {
            "lowfreq_mix": (x, x.clone(), "gaussian", 0.25, 0.25, 4),
            "consistent_attention": (q_ca, q_ca, q_ca, torch.tensor([1, 3, 20]), 2, -1, None, None, 0.125),
            "tiered_sparse_attention": (q_tsa, q_tsa, q_tsa, 6, 2, 3, 2, 1, None, torch.rand(4),
                                        [1.0, 2.0, 2.0, 2.0, 3.0]),
        }
        for op, args in calls.items():
            try:
                get_backend(op, "cuda").fn(*args)
            except (AttributeError, NotImplementedError) as exc:
                assert f"_{op}_cuda" in str(exc), (op, exc)
            else:
                raise AssertionError(op + ": the private op ran?")
        kernels = [m for m in sys.modules if "triton_kernels" in m]
        assert not kernels, kernels
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def test_plans_are_cached_per_key():
    a = plan_tsa.build_schedule(60, 5, 2, 4, 2, 1, 16, 16, "cpu", [1, 3, 1, 2, 4], split_combos=True)
    assert plan_tsa.build_schedule(60, 5, 2, 4, 2, 1, 16, 16, "cpu", [1, 3, 1, 2, 4], split_combos=True) is a
    assert plan_tsa.build_schedule(60, 5, 2, 4, 2, 1, 16, 16, "cpu", [1, 3, 1, 2, 4]) is not a  # another layout
    x = torch.zeros(2, 3, 4, 6)
    assert plan_lf.axis_table(x, "gaussian", 0.25, 0.5) is plan_lf.axis_table(x.clone(), "gaussian", 0.25, 0.5)
    assert plan_lf.dft_matrices(10, 14, torch.device("cpu")) is plan_lf.dft_matrices(10, 14, torch.device("cpu"))


def test_segment_table_runs():
    """Row b's samples are sample_idx[lo1:hi1] (sources before b) and [lo2:hi2] (after b), within
    its group and window."""
    B, N, G, window = 4, 5, 4, 1
    idx = torch.tensor([0, 3, 6, 9, 12, 17, 19])
    seg = plan_ca.segment_table(idx, B, N, G, window)
    for b in range(B):
        lo1, hi1, lo2, hi2 = seg[b].tolist()
        want = [i for i in idx.tolist() if i // N != b and abs(i // N - b) <= window]
        assert idx[lo1:hi1].tolist() + idx[lo2:hi2].tolist() == want
    assert plan_ca.has_samples(idx, G, window) and not plan_ca.has_samples(idx, 1, -1)
