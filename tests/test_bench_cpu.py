"""pytest-benchmark over the lowfreq_mix benchmark suite's cases on CPU (issue 2).

The suite's full shapes (Ouroboros tails, FreeInit volumes) run on CPU for the implementations
that exist there: the torch.fft reference, diffusers' FreeInit path, and the copy/add rooflines.
CI runs each case once (benchmarking disabled in pytest's addopts); timings:
`python -m pytest tests/test_bench_cpu.py --benchmark-enable`.
"""
import pytest
import torch

from longvideo.benchmarking import load_suite

_CASES = load_suite("lowfreq_mix").cases(torch.device("cpu"), quick=False)


@pytest.mark.parametrize("case", _CASES, ids=[f"{c.name}-{c.impl}" for c in _CASES])
def test_lowfreq_mix_case(benchmark, case):
    out = benchmark(case.fn)
    if case.impl in ("torch_fft_reference", "diffusers_freeinit"):
        assert out.shape == case.fn().shape and torch.isfinite(out).all()


def test_reference_agrees_with_diffusers_at_benchmark_shapes():
    by_name = {}
    for case in _CASES:
        if case.impl in ("torch_fft_reference", "diffusers_freeinit"):
            by_name.setdefault(case.name, {})[case.impl] = case.fn()
    assert len(by_name) == 4
    for name, outs in by_name.items():
        torch.testing.assert_close(outs["torch_fft_reference"], outs["diffusers_freeinit"], atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")
