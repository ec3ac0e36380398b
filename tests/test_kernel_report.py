"""tools/kernel_report.py: the hot Triton variants compiled offline for sm_90 neither spill nor
leave a dot off wgmma (unless allow-listed with a measured reason), with whatever Triton is
installed; the enumeration the GPU warm-up can import; the gate's allow-list logic.

The report runs in a subprocess: this suite's conftest sets TRITON_INTERPRET=1, under which
``triton.jit`` builds interpreted functions that cannot be compiled. One run per session (module
fixture); it takes ~10-30 s on 2 cores (a dozen variants)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "kernel_report.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import kernel_report as kr  # noqa: E402  (imports nothing from triton at module level)


def _clean_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _offline_compile_unavailable() -> str | None:
    """Why this Triton cannot compile for sm_90 here (None when it can)."""
    try:
        import triton
        from triton.backends import backends
    except Exception as exc:  # pragma: no cover - the test extra installs triton
        return f"triton not importable ({exc})"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no nvidia backend"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
        return f"triton {triton.__version__} ships no ptxas ({ptxas})"
    return None


@pytest.fixture(scope="module")
def hot_report(tmp_path_factory):
    why = _offline_compile_unavailable()
    if why:
        pytest.skip(f"Triton cannot compile offline here: {why}")
    out = tmp_path_factory.mktemp("kernel_report") / "hot.json"
    proc = subprocess.run([sys.executable, TOOL, "--hot", "--json", str(out), "--fail-on-spill", "--fail-on-no-wgmma"],
                          cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def test_hot_variants_do_not_spill_and_use_wgmma(hot_report):
    proc, report = hot_report
    assert report is not None, f"no report written (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    fails = report["gate"]["failures"]
    assert proc.returncode == 0 and not fails, (
        "kernel_report gate failed (a hot Triton variant spills, has a non-wgmma dot, or did not capture/compile). "
        "Fix the kernel or add a measured entry to ALLOW in tools/kernel_report.py:\n"
        + "\n".join(" ".join(map(str, f)) for f in fails) + "\n" + proc.stdout[-4000:] + proc.stderr[-2000:])


def test_hot_report_covers_each_op_hot_path(hot_report):
    _, report = hot_report
    assert report is not None
    rows = report["variants"]
    assert not report["capture_errors"]
    assert all(r["hot"] for r in rows)
    for r in rows:  # really compiled for sm_90 and measured
        assert "error" not in r, r
        assert r["regs"] and r["regs"] > 0 and r["spill_stores"] is not None, r

    def has(op, kernel, **cx):
        return any(r["op"] == op and r["kernel"] == kernel and all(str(r["constexprs"].get(k)) == str(v)
                                                                   for k, v in cx.items()) for r in rows)

    assert has("tiered_sparse_attention", "_tsa_fwd_kernel", VRPR=True, DOT_DTYPE="bf16")
    assert has("tiered_sparse_attention", "_tsa_fwd_kernel", VRPR=False, HAS_ROPE=True)
    assert has("tiered_sparse_attention", "_tsa_fwd_kernel", HAS_ROPE=False)
    assert has("consistent_attention", "_fwd_kernel", D=64, BD0=64, HAS_SAMPLES=True)
    assert has("consistent_attention", "_fwd_kernel", D=128, BD0=128, HAS_SAMPLES=True)
    assert has("lowfreq_mix", "_single_pass_kernel", PREC="tf32")
    labels = {lab for r in rows for lab in r["labels"]}
    assert {"480p_F41_tsa_vrpr", "480p_F81_tsa_vrpr", "sdxl_n4096_fwd", "sacfa_16f_fwd",
            "ouroboros_tail_16x60x104_bfloat16"} <= labels
    # every tensor-core dot of these variants is a wgmma in the SASS too
    for r in rows:
        if r["dots_wgmma"]:
            assert r["ptx_wgmma"] > 0 and r["ptx_mma_sync"] == 0, r
            if r.get("sass_hgmma") is not None:
                assert r["sass_hgmma"] > 0 and r["sass_hmma"] == 0, r


def test_enumeration_is_importable_for_the_warm_up(tmp_path):
    """What tools/warm_triton.py would call: enumerate_launches() in a process without TRITON_INTERPRET."""
    why = _offline_compile_unavailable()
    if why:
        pytest.skip(f"Triton cannot compile offline here: {why}")
    code = ("import sys; sys.path.insert(0, 'tools'); import kernel_report as kr\n"
            "ls = kr.enumerate_launches(hot_only=True, ops=('lowfreq_mix',))\n"
            "print(sorted({(la.kernel, la.dtype, la.options.num_warps) for la in ls}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "('_single_pass_kernel', 'bf16', 4)" in out and "('_single_pass_kernel', 'bf16', 8)" in out, out


def _row(**kw):
    base = {"variant": "tiered_sparse_attention/_tsa_fwd_kernel[bf16 VRPR=True w8 s2]#0", "op": "tiered_sparse_attention",
            "kernel": "_tsa_fwd_kernel", "labels": ["480p_F41_tsa_vrpr"], "dtype": "bf16", "regs": 255,
            "spill_stores": 40, "spill_loads": 40, "dots_wgmma": 6, "dots_other": 0, "other_kind": None}
    base.update(kw)
    return base


def test_gate_allow_list_is_bounded():
    allow = {"tiered_sparse_attention/*/_tsa_fwd_kernel": {"reason": "measured", "spill_bytes_max": 100}}
    fails, allowed = kr.gate([_row()], [], True, True, {})
    assert [f[1] for f in fails] == ["spill"] and not allowed
    fails, allowed = kr.gate([_row()], [], True, True, allow)
    assert not fails and [a[1] for a in allowed] == ["spill"]
    fails, _ = kr.gate([_row(spill_stores=400)], [], True, True, allow)  # a regression past the bound fails again
    assert [f[1] for f in fails] == ["spill"]
    fails, _ = kr.gate([_row(dots_wgmma=0, dots_other=6, other_kind="mma.sync", spill_stores=0, spill_loads=0)], [],
                       True, True, allow)
    assert [f[1] for f in fails] == ["no_wgmma"]  # a spill entry does not excuse a non-wgmma dot
    fails, _ = kr.gate([_row(spill_stores=0, spill_loads=0)], [], True, True, {})
    assert not fails
    fails, _ = kr.gate([_row(error="boom")], [], False, False, {})
    assert [f[1] for f in fails] == ["compile"]


def test_ptxas_log_parsing():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "    72 bytes stack frame, 72 bytes spill stores, 76 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 72 bytes cumulative stack size\n")
    assert kr._parse_ptxas(log) == {"regs": 255, "stack": 72, "spill_stores": 72, "spill_loads": 76, "static_smem": 0}
    kinds = kr._dot_kinds("%1 = ttng.warp_group_dot %a\n ttng.warp_group_dot_wait %1\n %2 = tt.dot %x",
                          "wgmma.mma_async.sync mma.sync.aligned")
    assert (kinds["dots_wgmma"], kinds["dots_other"], kinds["other_kind"]) == (1, 1, "mma.sync")
