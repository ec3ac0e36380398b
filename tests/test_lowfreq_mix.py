"""lowfreq_mix: reference vs diffusers' FreeInit functions (external oracle), box vs the original
slice expression, the Triton kernels (CPU interpreter) vs the reference, opcheck, torch.compile,
bad inputs; GPU tier: triton and cuda backends at the benchmark shapes.

Tolerances: the reference builds diffusers' float32 filter bit for bit (asserted) and mixes with
the same FFT calls, so its output matches diffusers' to 1e-5 absolute (float32 FFT rounding,
|out| ~ 4). Kernels vs reference: the registry's per-dtype tolerances of each backend.
"""
import math

import pytest
import torch

import longvideo  # noqa: F401  (registers the ops)
from longvideo.ops import get_backend, use_backend
from longvideo.ops.lowfreq_mix import _triton_module
from longvideo.reference.lowfreq_mix import lowfreq_mix_reference, lowpass_filter

OP = torch.ops.longvideo.lowfreq_mix


def _inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    return x.to(device=device, dtype=dtype), noise.to(device=device, dtype=dtype)


def _diffusers():
    from diffusers.pipelines.free_init_utils import FreeInitMixin

    return FreeInitMixin


def _assert_close(got, ref, backend, dtype):
    atol, rtol = get_backend("lowfreq_mix", backend).tolerance(dtype)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)


# Relative distance ||ref - noise|| / ||noise|| below which a case is "trivially the noise": the
# filter's pass band is (almost) empty and a kernel that returned `noise` unchanged would pass it.
# At T = 1 the temporal term of d^2 is (d_s / d_t)^2 (the single frequency sits at 2t/T - 1 = -1):
# with d_s = d_t = 0.25 it is 1 and the gaussian/butterworth/ideal filters are ~0 everywhere, so T = 1
# cases use d_t = 1.0 (the Ouroboros setting). The box filter at T = 1 is EMPTY for every d_t
# (tt = round(T // 2 * d_t) = 0, the slice [0, 0)): its answer is the noise by definition, tested on
# its own (test_box_t1_is_exactly_the_noise), never counted as a kernel check.
MIN_REL_FROM_NOISE = 0.03


def _assert_nontrivial(ref, noise, backend=None, dtype=None):
    """The expected answer differs clearly from `noise`; with a backend, `noise` itself fails that
    backend's comparison, so the case proves it can catch a kernel that returns its second input."""
    rel = ((ref.double() - noise.double()).norm() / noise.double().norm().clamp_min(1e-30)).item()
    assert rel > MIN_REL_FROM_NOISE, (
        f"expected answer is ~noise (||ref - noise|| / ||noise|| = {rel:.2e}): empty pass band, the case cannot fail")
    if backend is not None:
        with pytest.raises(AssertionError):
            _assert_close(noise, ref, backend, dtype)


# ----------------------------------------------------------------------------------------------
# reference vs external oracles
@pytest.mark.parametrize("filter", ["gaussian", "butterworth", "ideal"])
@pytest.mark.parametrize("shape,d_s,d_t,order", [
    ((2, 3, 5, 7, 9), 0.25, 0.25, 4),      # odd T, H, W, two leading dims
    ((4, 8, 6), 0.3, 0.7, 2),              # even sizes, no leading dim
    ((2, 1, 10, 12), 0.5, 1.0, 1),         # T = 1 (d_t = 1: a non-empty pass band)
    ((1, 2, 4, 16, 11), 1.0, 0.4, 3.5),    # non-integer butterworth order, d_s = 1
])
def test_reference_matches_diffusers(filter, shape, d_s, d_t, order):
    fim = _diffusers()
    x, noise = _inputs(shape)
    fshape = shape if len(shape) == 3 else (1, *shape[1:])  # diffusers' (1, C, T, H, W) broadcast over batch
    lpf_diffusers = fim._get_free_init_freq_filter(None, fshape, "cpu", filter, order, d_s, d_t)
    assert torch.equal(lowpass_filter(shape[-3:], filter, d_s, d_t, order).expand(lpf_diffusers.shape), lpf_diffusers)
    expected = fim._apply_freq_filter(None, x, noise, lpf_diffusers)
    got = OP(x, noise, filter, d_s, d_t, order)  # CPU: the reference backend
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    _assert_nontrivial(expected, noise)


def _box_original(shape, d_s, d_t):
    """The original FreeInit repository's box_low_pass_filter, as described (slice assignment)."""
    T, H, W = shape[-3], shape[-2], shape[-1]
    mask = torch.zeros(shape)
    threshold_s = round(int(H // 2) * d_s)
    threshold_t = round(T // 2 * d_t)
    cframe, crow, ccol = T // 2, H // 2, W // 2
    mask[..., cframe - threshold_t:cframe + threshold_t, crow - threshold_s:crow + threshold_s,
         ccol - threshold_s:ccol + threshold_s] = 1.0
    return mask


@pytest.mark.parametrize("shape,d_s,d_t", [
    ((2, 5, 7, 9), 0.5, 1.0),
    ((1, 8, 12, 10), 0.25, 0.5),   # round(6 * 0.25) = round(1.5) = 2: Python's round-half-even
    ((2, 4, 16, 6), 1.0, 1.0),     # threshold from H wider than W: the W slice starts below 0
    ((3, 2, 9, 9), 0.7, 1.0),      # T = 2: the smallest T with a non-empty temporal range
    ((3, 1, 9, 9), 0.7, 1.0),      # T = 1: an empty temporal range for every d_t, the result is the noise
])
def test_box_matches_original_slices(shape, d_s, d_t):
    x, noise = _inputs(shape)
    mask = _box_original(shape[-3:], d_s, d_t)
    assert torch.equal(lowpass_filter(shape[-3:], "box", d_s, d_t), mask)
    expected = _diffusers()._apply_freq_filter(None, x, noise, mask)
    torch.testing.assert_close(OP(x, noise, "box", d_s, d_t), expected, atol=1e-5, rtol=0)
    if shape[-3] == 1:
        assert not mask.any()
        torch.testing.assert_close(expected, noise, atol=1e-5, rtol=0)
    else:
        _assert_nontrivial(expected, noise)


@pytest.mark.parametrize("d_t", [0.25, 1.0])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_box_t1_is_exactly_the_noise(backend, d_t):
    """Box at T = 1: the temporal slice [0, 0) is empty whatever d_t, so the answer is the noise
    (within float32 FFT rounding); the kernels must return it, not x or their own mix."""
    x, noise = _inputs((2, 1, 9, 130))
    assert not lowpass_filter((1, 9, 130), "box", 0.5, d_t).any()
    with use_backend(backend, op="lowfreq_mix"):
        got = OP(x, noise, "box", 0.5, d_t)
    _assert_close(got, noise, "triton", torch.float32)


def test_reference_float64_and_dtype_preserved():
    x, noise = _inputs((2, 3, 6, 5), torch.float64)
    out = OP(x, noise, "gaussian", 0.25, 0.25)
    assert out.dtype == torch.float64 and out.is_contiguous()
    fim = _diffusers()
    lpf = lowpass_filter((3, 6, 5), "gaussian", 0.25, 0.25, 4, dtype=torch.float64)
    torch.testing.assert_close(out, fim._apply_freq_filter(None, x, noise, lpf), atol=1e-12, rtol=0)
    xh, nh = _inputs((1, 4, 8, 8), torch.float16)
    assert OP(xh, nh).dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# Triton kernels on CPU (TRITON_INTERPRET=1, set by conftest)
TRITON_CASES = [
    # (shape, filter, d_s, d_t, order): single pass (T = 1) and spectral (T > 1) paths, even/odd.
    # T = 1 uses d_t = 1 (else the pass band is empty and the answer is the noise; box at T = 1 is
    # always empty: test_box_t1_is_exactly_the_noise)
    ((2, 1, 12, 10), "gaussian", 0.25, 1.0, 4),
    ((1, 7, 9), "ideal", 0.3, 1.0, 4),                  # T = 1, odd H/W, no leading dim
    ((2, 2, 1, 16, 33), "butterworth", 0.25, 1.0, 2),   # T = 1, two leading dims
    ((1, 1, 9, 130), "ideal", 0.5, 1.0, 4),             # T = 1 but W > 128: the spectral path
    ((1, 2, 9, 130), "box", 0.5, 1.0, 4),               # box, T = 2 (non-empty), W > 128
    ((2, 5, 6, 8), "butterworth", 0.25, 0.25, 4),
    ((3, 4, 7, 9), "gaussian", 0.4, 0.3, 4),            # odd H/W (asymmetric shifted grid)
    ((5, 8, 6), "box", 0.5, 1.0, 4),
    ((1, 2, 3, 5, 10), "ideal", 0.25, 0.25, 4),
    # T > 1, small planes: the plane path (passes A, B, C); FreeInit's setting and an odd T
    ((1, 2, 16, 20, 24), "butterworth", 0.25, 0.25, 4),
    ((1, 1, 21, 12, 26), "gaussian", 0.25, 0.25, 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,filter,d_s,d_t,order", TRITON_CASES)
def test_triton_matches_reference(shape, filter, d_s, d_t, order, dtype):
    x, noise = _inputs(shape, dtype)
    ref = lowfreq_mix_reference(x, noise, filter, d_s, d_t, order)
    _assert_nontrivial(ref, noise, "triton", dtype)
    with use_backend("triton", op="lowfreq_mix"):
        got = OP(x, noise, filter, d_s, d_t, order)
    _assert_close(got, ref, "triton", dtype)


def test_a_kernel_returning_noise_fails_every_triton_case(monkeypatch):
    """A deliberately wrong triton backend (returns its second input) fails the comparison of every
    TRITON_CASES case: the cases are not trivially the noise."""
    from longvideo.ops import _registry as R

    monkeypatch.setattr(R.get_backend("lowfreq_mix", "triton"), "fn", lambda x, noise, *a, **k: noise.clone())
    for shape, filter, d_s, d_t, order in TRITON_CASES:
        x, noise = _inputs(shape)
        ref = lowfreq_mix_reference(x, noise, filter, d_s, d_t, order)
        with use_backend("triton", op="lowfreq_mix"):
            got = OP(x, noise, filter, d_s, d_t, order)
        with pytest.raises(AssertionError):
            _assert_close(got, ref, "triton", torch.float32)


@pytest.mark.parametrize("filter", ["gaussian", "butterworth", "ideal", "box"])
def test_triton_spectral_path_for_t1(filter):
    """The spectral path on a T = 1 slice (normally served by the single pass): same result."""
    x, noise = _inputs((2, 1, 10, 14))
    mod = _triton_module()
    from longvideo.ops.plan.lowfreq import axis_table

    table = axis_table(x, filter, 0.5, 1.0)
    ref = lowfreq_mix_reference(x, noise, filter, 0.5, 1.0, 3)
    if filter == "box":  # empty at T = 1 (see MIN_REL_FROM_NOISE): both paths must return the noise
        _assert_close(ref, noise, "triton", torch.float32)
    else:
        _assert_nontrivial(ref, noise, "triton", torch.float32)
    for force in (False, True):
        got = mod.lowfreq_mix(x, noise, table, filter, 0.5, 3, force_spectral=force)
        _assert_close(got, ref, "triton", torch.float32)


def test_triton_path_choice():
    """Which path a shape takes: T == 1 small planes -> single pass; T > 1 small planes -> planes;
    planes beyond the single pass's tile -> spectral."""
    mod = _triton_module()
    assert mod.choose_path((2, 4, 1, 40, 64)) == "single"
    assert mod.choose_path((1, 4, 16, 64, 64)) == "planes"
    assert mod.choose_path((2, 16, 21, 60, 104)) == "planes"
    assert mod.choose_path((1, 2, 9, 130)) == "spectral"           # W > 128
    assert mod.choose_path((1, 2, 65, 8, 8)) == "spectral"         # T > PLANES_MAX_T
    x, noise = _inputs((1, 2, 4, 8, 8))
    from longvideo.ops.plan.lowfreq import axis_table

    with pytest.raises(ValueError, match="path 'single' does not fit"):
        mod.lowfreq_mix(x, noise, axis_table(x, "gaussian", 0.25, 0.25), "gaussian", 0.25, 4, path="single")


@pytest.mark.parametrize("shape,filter,d_s,d_t", [
    ((1, 1, 16, 64, 64), "butterworth", 0.25, 0.25),     # one channel of FreeInit on AnimateDiff
    ((1, 1, 21, 60, 104), "gaussian", 0.25, 0.25),       # one channel of FreeInit on a Wan 480p latent
])
def test_triton_planes_freeinit_shapes(shape, filter, d_s, d_t):
    """The plane path at the FreeInit plane sizes (64 x 64 and 60 x 104 tiles, T 16 and 21): the
    same result as the reference and as the spectral path (torch.fft)."""
    x, noise = _inputs(shape)
    mod = _triton_module()
    from longvideo.ops.plan.lowfreq import axis_table

    assert mod.choose_path(shape) == "planes"
    table = axis_table(x, filter, d_s, d_t)
    ref = lowfreq_mix_reference(x, noise, filter, d_s, d_t, 4)
    _assert_nontrivial(ref, noise, "triton", torch.float32)
    got = mod.lowfreq_mix(x, noise, table, filter, d_s, 4)
    _assert_close(got, ref, "triton", torch.float32)


@pytest.mark.parametrize("shape,filter,d_s,d_t", [((2, 5, 6, 8), "butterworth", 0.25, 0.25),
                                                   ((1, 1, 21, 12, 26), "ideal", 0.25, 0.25)])
def test_triton_planes_split_tf32_pass_b(monkeypatch, shape, filter, d_s, d_t):
    """Pass B's float32 form on the GPU (DOT precision tf32x3: the DFT matrices pre-split into tf32
    hi / lo parts in memory, the data split in registers, three products per dot) run under the
    interpreter: the split algebra (signs, which part goes where) gives the reference's answer."""
    mod = _triton_module()
    from longvideo.ops.plan.lowfreq import axis_table

    monkeypatch.setattr(mod, "DOT_PRECISION", "tf32x3")
    x, noise = _inputs(shape)
    ref = lowfreq_mix_reference(x, noise, filter, d_s, d_t, 4)
    _assert_nontrivial(ref, noise, "triton", torch.float32)
    got = mod.lowfreq_mix(x, noise, axis_table(x, filter, d_s, d_t), filter, d_s, 4, path="planes")
    _assert_close(got, ref, "triton", torch.float32)


@pytest.mark.parametrize("shape,filter,d_s,d_t,order", [c for c in TRITON_CASES if c[0][-3] > 1])
def test_triton_planes_with_a_wrong_filter_fail(shape, filter, d_s, d_t, order):
    """The plane path given a deliberately wrong filter table (d_s 20% larger; for the box filter the
    spatial half-width one bin wider) fails the comparison: the cases see the filter's values, and the
    right table passes on the same inputs."""
    x, noise = _inputs(shape)
    mod = _triton_module()
    from longvideo.ops.plan.lowfreq import axis_table

    ref = lowfreq_mix_reference(x, noise, filter, d_s, d_t, order)
    wrong_ds = min(1.0, d_s + 2.0 / min(shape[-2:])) if filter == "box" else d_s * 1.2
    for path in ("planes", "spectral") if mod.planes_ok(shape) else ("spectral",):
        good = mod.lowfreq_mix(x, noise, axis_table(x, filter, d_s, d_t), filter, d_s, order, path=path)
        _assert_close(good, ref, "triton", torch.float32)
        bad = mod.lowfreq_mix(x, noise, axis_table(x, filter, wrong_ds, d_t), filter, d_s, order, path=path)
        with pytest.raises(AssertionError):
            _assert_close(bad, ref, "triton", torch.float32)


def test_predicted_bytes_model():
    """The bytes model beside the kernels (what the bench records as model_bytes): the single pass
    moves the floor 3 e N; at the Wan FreeInit shape the plane path moves 24.3 B per element in
    bfloat16 (4.1x the floor) and the spectral path 56.6 B, the numbers docs/perf_notes.md quotes."""
    mod = _triton_module()
    shape = (2, 16, 21, 60, 104)
    n = math.prod(shape)
    assert mod.predicted_bytes((3, 1, 40, 64), 2, "single") == 3 * 2 * 3 * 40 * 64
    assert round(mod.predicted_bytes(shape, 2, "planes") / n, 1) == 24.3
    assert round(mod.predicted_bytes(shape, 4, "planes") / n, 1) == 32.3
    assert round(mod.predicted_bytes(shape, 2, "spectral") / n, 1) == 56.6
    with pytest.raises(ValueError, match="path"):
        mod.predicted_bytes(shape, 2, "fft")


def test_triton_noncontiguous_and_empty():
    x, noise = _inputs((3, 2, 6, 8))
    xt, nt = x.transpose(0, 1), noise.transpose(0, 1)  # (2, 3, 6, 8), non-contiguous
    with use_backend("triton", op="lowfreq_mix"):
        got = OP(xt, nt, "gaussian")
        empty = OP(x[:0], noise[:0], "gaussian")
    _assert_close(got, lowfreq_mix_reference(xt, nt, "gaussian"), "triton", torch.float32)
    assert empty.shape == (0, 2, 6, 8)


def test_triton_rejects_float64():
    x, noise = _inputs((1, 2, 4, 4), torch.float64)
    with use_backend("triton", op="lowfreq_mix"), pytest.raises(RuntimeError, match="float64"):
        OP(x, noise)


# ----------------------------------------------------------------------------------------------
# torch.library integration
def test_opcheck():
    x, noise = _inputs((2, 3, 6, 5))
    torch.library.opcheck(OP.default, (x, noise), {"filter": "butterworth", "d_s": 0.3, "d_t": 0.5, "order": 2.0})
    x1, n1 = _inputs((1, 1, 8, 12))
    with use_backend("triton", op="lowfreq_mix"):
        torch.library.opcheck(OP.default, (x1, n1, "ideal", 0.25, 0.25, 4.0),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    x, noise = _inputs((2, 4, 6, 8))

    def f(a, b):
        return longvideo.ops.lowfreq_mix(a * 2, b, "gaussian", 0.25, 0.25, 4.0) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, noise), f(x, noise))


# ----------------------------------------------------------------------------------------------
# bad inputs
def _bad_cases():
    x, noise = _inputs((1, 2, 4, 4))
    return [
        ((x, noise[..., :3]), {}, "noise shape"),
        ((x, noise), {"filter": "hann"}, "filter"),
        ((x, noise), {"d_s": 0.0}, "d_s"),
        ((x, noise), {"d_s": -0.1}, "d_s"),
        ((x, noise), {"d_t": 0.0}, "d_t"),
        ((x, noise), {"d_s": float("nan")}, "d_s"),
        ((x.to(torch.int32), noise.to(torch.int32)), {}, "floating"),
        ((x, noise.double()), {}, "noise dtype"),
        ((x, noise.to("meta")), {}, "noise"),
        ((x[0, 0], noise[0, 0]), {}, "ndim"),
        ((x, noise), {"filter": "butterworth", "order": 0.5}, "order"),
        ((x, noise), {"filter": "box", "d_s": 1.5}, "d_s"),
        ((x, noise), {"filter": "box", "d_t": 2.0}, "d_t"),
    ]


@pytest.mark.parametrize("idx", range(len(_bad_cases())))
def test_bad_inputs_raise(idx):
    args, kwargs, match = _bad_cases()[idx]
    with pytest.raises(ValueError, match=match):
        OP(*args, **kwargs)


def test_not_differentiable_raises_clearly():
    """No autograd formula: inputs that require grad are refused (not a silently wrong backward),
    and the same call under no_grad or on detached inputs works and returns a plain tensor."""
    x, noise = _inputs((1, 2, 3, 4, 4))
    xg = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        OP(xg, noise)
    with pytest.raises(RuntimeError, match="not differentiable"):
        OP(x, noise.clone().requires_grad_(True))
    with torch.no_grad():
        out = OP(xg, noise)
    assert not out.requires_grad
    torch.testing.assert_close(out, OP(x, noise), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="not differentiable"):  # the fake kernel agrees
        torch.compile(lambda a, b: OP(a, b), fullgraph=True, backend="aot_eager")(xg, noise)


def test_registered_without_custom_op_wrapper():
    """The op has plain CPU/CUDA kernels and a fake (Meta) kernel (no custom_op autograd layer, whose
    per-call cost would dominate at the Ouroboros tail sizes)."""
    for key in ("CPU", "CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("longvideo::lowfreq_mix", key), key
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("longvideo::lowfreq_mix", "Autograd")


def test_bench_quick_cases_run():
    """The benchmark suite's quick cases build and every implementation computes the same mix."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lowfreq_mix.py"
    spec = importlib.util.spec_from_file_location("bench_lowfreq_mix_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = {}
    for case in bench.cases(torch.device("cpu"), quick=True):
        assert case.bytes and case.bytes > 0
        res = case.fn()
        if case.impl not in ("device_copy", "torch_add"):
            results.setdefault(case.name, []).append(res)
    assert results
    for name, outs in results.items():
        assert len(outs) >= 3, name
        for o in outs[1:]:
            torch.testing.assert_close(o, outs[0], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# GPU tier
BENCH_SHAPES = [(1, 4, 1, 40, 64), (1, 16, 1, 60, 104), (1, 4, 16, 64, 64), (2, 16, 21, 60, 104)]
GPU_SHAPES = BENCH_SHAPES + [(3, 1, 33, 47), (2, 5, 9, 130)]


def _gpu_params(shape, filter):
    """(d_s, d_t) with a non-empty pass band: T = 1 -> d_t = 1.0 (Ouroboros); box: d_s = 0.5."""
    d_s = 0.5 if filter == "box" else 0.25
    d_t = 1.0 if (shape[-3] == 1 or filter == "box") else 0.25
    return d_s, d_t


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,filter", [(s, f) for s in GPU_SHAPES for f in ("gaussian", "butterworth", "ideal", "box")
                                          if not (f == "box" and s[-3] == 1)])  # box at T = 1: below
def test_gpu_backend_matches_reference(require_backend, backend, dtype, shape, filter):
    require_backend("lowfreq_mix", backend)
    x, noise = _inputs(shape, dtype, "cuda")
    d_s, d_t = _gpu_params(shape, filter)
    ref = lowfreq_mix_reference(x, noise, filter, d_s, d_t, 4)
    _assert_nontrivial(ref, noise, backend, dtype)  # a kernel returning `noise` fails this case
    with use_backend(backend, op="lowfreq_mix"):
        got = OP(x, noise, filter, d_s, d_t, 4)
    _assert_close(got, ref, backend, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [s for s in GPU_SHAPES if s[-3] == 1])
def test_gpu_box_t1_is_the_noise(require_backend, backend, dtype, shape):
    """Box at T = 1 has an empty pass band for every d_t (tt = round(0 * d_t) = 0): the answer is the
    noise, and a kernel must return it (this case catches a kernel returning x, not one returning noise)."""
    require_backend("lowfreq_mix", backend)
    x, noise = _inputs(shape, dtype, "cuda")
    with use_backend(backend, op="lowfreq_mix"):
        got = OP(x, noise, "box", 0.5, 1.0, 4)
    _assert_close(got, noise, backend, dtype)
    with pytest.raises(AssertionError):
        _assert_close(x, noise, backend, dtype)


@pytest.mark.gpu
def test_gpu_matches_diffusers_and_auto():
    fim = _diffusers()
    shape = (2, 4, 16, 32, 32)
    x, noise = _inputs(shape, torch.float32, "cuda")
    lpf = fim._get_free_init_freq_filter(None, (1, *shape[1:]), "cuda", "butterworth", 4, 0.25, 0.25)
    expected = fim._apply_freq_filter(None, x, noise, lpf)
    _assert_nontrivial(expected, noise)
    got = OP(x, noise, "butterworth", 0.25, 0.25, 4)  # auto: a kernel backend on CUDA
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert math.isfinite(got.abs().max().item())
