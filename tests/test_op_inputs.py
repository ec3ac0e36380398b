"""Input handling shared by the three ops (issue 17 items 4 and 7): bad float arguments (NaN/inf)
raise an error that names the argument, at the op's entry and in the fake kernel; empty inputs give
empty outputs on every backend; bf16 through the Triton backend on CPU (interpreter) is computed,
not garbage; NaN propagation follows one stated rule, identically in the reference and the Triton
kernels (interpreter):

* tiered_sparse_attention / consistent_attention: a key/value row that a query does not attend
  never reaches that query's output, whatever its values; attended ones enter by IEEE arithmetic:
  NaN in q[i] or in an attended k[j] -> the whole row out[i] NaN; NaN in channel c of an attended
  v[j] -> out[i, c] NaN.
* lowfreq_mix: a NaN/inf in x or noise makes its whole (T, H, W) output slice NaN, no other slice.

The expected NaN masks are built here from the tier mask / the explicit key lists, independently
of the implementations.
"""
import importlib
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import longvideo.ops as ops
from longvideo.reference.consistent_attention import consistent_attention_reference
from longvideo.reference.lowfreq_mix import lowfreq_mix_reference
from longvideo.reference.tiered_sparse_attention import tier_mask, tiered_sparse_attention_reference

tsa = torch.ops.longvideo.tiered_sparse_attention
csa = torch.ops.longvideo.consistent_attention
lfm = torch.ops.longvideo.lowfreq_mix
tsa_mod = importlib.import_module("longvideo.ops.tiered_sparse_attention")

NAN, INF = float("nan"), float("inf")
BACKENDS = ["reference", "triton"]


def _freqs(R):
    return 1.0 / (10000.0 ** (torch.arange(R, dtype=torch.float64) / R)).float()


# ----------------------------------------------------------------------------------------------
# 1. bad float arguments: ValueError naming the argument
def _tsa_args(**kw):
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    args = dict(q=q, k=k, v=v, frame_tokens=6, local_frames=1, stripe_frames=2, stripe_width=2, sink_frames=1,
                scale=None, rope_t_freqs=None, vrpr=None)
    args.update(kw)
    return args


def _vrpr_with(pos, val):
    vr = [1.0, 2.0, 1.0, 1.0, 3.0]
    vr[pos] = val
    return vr


TSA_BAD = [
    *[(dict(scale=val), "scale") for val in (NAN, INF, -INF)],
    *[(dict(rope_t_freqs=_freqs(4), vrpr=_vrpr_with(pos, val)), "vrpr")
      for pos in range(5) for val in (NAN, INF, -INF)],
]
# rope_t_freqs values are data: checked at the op's real entry (not by the fake kernel)
TSA_BAD_FREQS = [torch.tensor([NAN, 1.0, 0.5, 0.25]), torch.tensor([1.0, INF, 0.5, 0.25]),
                 torch.tensor([1.0, 0.5, 0.25, -INF])]


def _ids(cases):
    return [f"{name}-{i}" for i, (_, name) in enumerate(cases)]


def _call_tsa(args):
    a = dict(args)
    return tsa(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("frame_tokens"), a.pop("local_frames"), **a)


@pytest.mark.parametrize("kw,name", TSA_BAD, ids=_ids(TSA_BAD))
def test_tiered_bad_float_raises_naming_it(kw, name):
    with pytest.raises(ValueError, match=rf"tiered_sparse_attention: {name}\b"):
        _call_tsa(_tsa_args(**kw))


@pytest.mark.parametrize("kw,name", TSA_BAD, ids=_ids(TSA_BAD))
def test_tiered_bad_float_raises_in_fake_kernel(kw, name):
    args = _tsa_args(**kw)
    with FakeTensorMode() as mode:
        fargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(ValueError, match=rf"tiered_sparse_attention: {name}\b"):
            _call_tsa(fargs)


@pytest.mark.parametrize("freqs", TSA_BAD_FREQS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("vrpr", [None, [1.0, 2.0, 1.0, 1.0, 3.0]], ids=["rope", "vrpr"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiered_nonfinite_rope_t_freqs_raises(freqs, vrpr, backend):
    with ops.use_backend(backend), pytest.raises(ValueError, match=r"tiered_sparse_attention: rope_t_freqs\b"):
        _call_tsa(_tsa_args(rope_t_freqs=freqs, vrpr=vrpr))


def test_tiered_rope_value_check_sees_in_place_changes():
    """The finite check is cached per tensor and version: a NaN written in place afterwards is caught."""
    freqs = _freqs(4)
    _call_tsa(_tsa_args(rope_t_freqs=freqs))
    freqs[1] = NAN
    with pytest.raises(ValueError, match="rope_t_freqs"):
        _call_tsa(_tsa_args(rope_t_freqs=freqs))


def _csa_args():
    q, k, v = (torch.randn(4, 2, 8, 16) for _ in range(3))
    return q, k, v, torch.tensor([1, 9, 20, 30]), 2


@pytest.mark.parametrize("scale", [NAN, INF, -INF])
def test_consistent_bad_scale_raises_naming_it(scale):
    q, k, v, idx, g = _csa_args()
    with pytest.raises(ValueError, match=r"consistent_attention: scale\b"):
        csa(q, k, v, idx, g, -1, None, None, scale)
    with FakeTensorMode() as mode:
        fq, fk, fv, fi = (mode.from_tensor(t) for t in (q, k, v, idx))
        with pytest.raises(ValueError, match=r"consistent_attention: scale\b"):
            csa(fq, fk, fv, fi, g, -1, None, None, scale)


LFM_BAD = [
    *[(dict(d_s=val), "d_s") for val in (NAN, INF, -INF)],
    *[(dict(d_t=val), "d_t") for val in (NAN, INF, -INF)],
    *[(dict(filter=f, order=val), "order") for f in ("gaussian", "butterworth") for val in (NAN, INF, -INF)],
]


@pytest.mark.parametrize("kw,name", LFM_BAD, ids=_ids(LFM_BAD))
@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_lowfreq_bad_float_raises_naming_it(kw, name, fake):
    x, noise = torch.randn(1, 2, 3, 8, 8), torch.randn(1, 2, 3, 8, 8)
    args = dict(filter="gaussian", d_s=0.25, d_t=0.25, order=4.0)
    args.update(kw)
    if fake:
        with FakeTensorMode() as mode:
            fx, fn = mode.from_tensor(x), mode.from_tensor(noise)
            with pytest.raises(ValueError, match=rf"lowfreq_mix: {name}\b"):
                lfm(fx, fn, **args)
    else:
        with pytest.raises(ValueError, match=rf"lowfreq_mix: {name}\b"):
            lfm(x, noise, **args)


# ----------------------------------------------------------------------------------------------
# 2. empty inputs -> empty outputs, on every backend and in the fake kernel
def _fake_out(fn, *tensors, **kw):
    with FakeTensorMode() as mode:
        out = fn(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in tensors), **kw)
        return tuple(out.shape), out.dtype


# (B, H, F, T, D, Dv): empty batch, heads, frames (S = 0), value dim
TSA_EMPTY = [(0, 2, 4, 6, 16, 16), (1, 0, 4, 6, 16, 16), (1, 2, 0, 6, 16, 16), (1, 2, 4, 6, 16, 0)]


@pytest.mark.parametrize("shape", TSA_EMPTY, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rope", [None, "rope", "vrpr"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiered_empty_input(shape, rope, backend):
    B, H, F, T, D, Dv = shape
    q, k = torch.randn(B, H, F * T, D), torch.randn(B, H, F * T, D)
    v = torch.randn(B, H, F * T, Dv)
    freqs = None if rope is None else _freqs(4)
    vrpr = [1.0, 2.0, 1.0, 1.0, 3.0] if rope == "vrpr" else None
    with ops.use_backend(backend):
        out = tsa(q, k, v, T, 1, 2, 2, 1, None, freqs, vrpr)
    assert out.shape == (B, H, F * T, Dv) and out.dtype == q.dtype
    assert _fake_out(tsa, q, k, v, T, 1, 2, 2, 1, None, freqs, vrpr) == ((B, H, F * T, Dv), q.dtype)
    ref = tiered_sparse_attention_reference(q, k, v, T, 1, 2, 2, 1, None, freqs, vrpr)
    assert ref.shape == (B, H, F * T, Dv)


def test_tiered_zero_head_dim_with_values_raises():
    """D = 0 with a non-empty output is not attention (every logit 0): refused, naming q."""
    q, k, v = torch.randn(1, 2, 12, 0), torch.randn(1, 2, 12, 0), torch.randn(1, 2, 12, 8)
    with pytest.raises(ValueError, match=r"tiered_sparse_attention: q and k need a head dim"):
        tsa(q, k, v, 6, 1)


# (B, H, N, D, group_size, bank E or None)
CSA_EMPTY = [(0, 2, 8, 16, 1, None), (4, 0, 8, 16, 2, None), (4, 2, 0, 16, 2, None), (4, 2, 8, 0, 2, None),
             (2, 2, 0, 16, 2, 3)]


@pytest.mark.parametrize("shape", CSA_EMPTY, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_consistent_empty_input(shape, backend):
    B, H, N, D, g, E = shape
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    idx = torch.tensor([0, 3, 9], dtype=torch.int64) if B * N > 9 else torch.zeros(0, dtype=torch.int64)
    bk = bv = None
    if E is not None:
        bk, bv = torch.randn(H, E, D), torch.randn(H, E, D)
    with ops.use_backend(backend):
        out = csa(q, k, v, idx, g, -1, bk, bv, None)
        out.sum().backward()
    assert out.shape == (B, H, N, D) and q.grad.shape == q.shape
    assert _fake_out(csa, q.detach(), k.detach(), v.detach(), idx, g, -1, bk, bv, None) == ((B, H, N, D), q.dtype)
    assert consistent_attention_reference(q.detach(), k.detach(), v.detach(), idx, g, -1, bk, bv).shape == q.shape


LFM_EMPTY = [(0, 2, 3, 8, 8), (2, 0, 3, 8, 8), (1, 2, 0, 8, 8), (1, 2, 3, 0, 8), (1, 2, 3, 8, 0), (0, 1, 8, 8)]


@pytest.mark.parametrize("shape", LFM_EMPTY, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("filter", ["gaussian", "box"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lowfreq_empty_input(shape, filter, backend):
    x, noise = torch.randn(shape), torch.randn(shape)
    with ops.use_backend(backend):
        out = lfm(x, noise, filter, 0.25, 0.5)
    assert out.shape == shape and out.dtype == x.dtype
    assert _fake_out(lfm, x, noise, filter, 0.25, 0.5) == (shape, x.dtype)
    assert lowfreq_mix_reference(x, noise, filter, 0.25, 0.5).shape == shape


def test_empty_input_returns_before_any_backend(monkeypatch):
    """The early return is in the op, before dispatch: no backend (the CUDA extension's included,
    which cannot run here) ever sees an empty input."""
    from longvideo.ops import _registry

    def boom(*args, **kwargs):
        raise AssertionError("a backend was selected for an empty input")

    monkeypatch.setattr(_registry, "dispatch", boom)
    monkeypatch.setattr(_registry, "select", boom)
    assert tsa(torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 8), 6, 1).shape == (1, 2, 0, 8)
    assert tsa(torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 0), 6, 1).shape == (1, 2, 12, 0)
    assert lfm(torch.randn(0, 3, 8, 8), torch.randn(0, 3, 8, 8)).shape == (0, 3, 8, 8)
    q = torch.randn(2, 2, 0, 16, requires_grad=True)
    out = csa(q, q, q, torch.zeros(0, dtype=torch.int64), 2, -1, None, None, None)
    out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape


# ----------------------------------------------------------------------------------------------
# 3. bf16 through the Triton backend on CPU (the interpreter has no bf16 arithmetic)
TSA_BF16 = [
    # T, F, D, L, SF, SW, SK, R, vrpr
    (6, 4, 32, 1, 3, 2, 1, 0, None),
    (5, 6, 40, 2, 4, 2, 1, 6, None),
    (4, 9, 32, 1, 6, 2, 1, 4, [1, 3, 1, 2, 4]),
]


@pytest.mark.parametrize("case", TSA_BF16, ids=["plain", "rope", "vrpr"])
def test_tiered_bf16_triton_on_cpu_matches_reference(case):
    T, F, D, L, SF, SW, SK, R, vrpr = case
    q, k, v = (torch.randn(1, 2, F * T, D).bfloat16() for _ in range(3))
    freqs = _freqs(R) if R else None
    with ops.use_backend("triton"):
        out = tsa(q, k, v, T, L, SF, SW, SK, None, freqs, vrpr)
    ref = tiered_sparse_attention_reference(q, k, v, T, L, SF, SW, SK, None, freqs, vrpr)
    assert out.dtype == torch.bfloat16
    atol, rtol = ops.get_backend("tiered_sparse_attention", "triton").tolerance(torch.bfloat16)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------
# 4. NaN propagation: one rule, same NaN positions in the reference and the Triton kernels
def _tsa_expected_nan(q, k, v, T, L, SF, SW, SK):
    """The rule, from the tier mask: out[i] all NaN if q[i] or an attended k[j] has a NaN;
    out[i, c] NaN if an attended v[j, c] is NaN."""
    S = q.shape[2]
    att = tier_mask(S, T, L, SF, SW, SK).double()                          # (S, S)
    qn, kn = q.isnan().any(-1), k.isnan().any(-1)                           # (B, H, S)
    row = qn | ((att @ kn.double()[..., None])[..., 0] > 0)
    return row[..., None] | ((att @ v.isnan().double()) > 0)


# (T, F, L, SF, SW, SK, R, vrpr, where the NaN goes: list of (tensor, b, h, token, channel or None))
TSA_NAN = [
    ("q-row", (6, 4, 1, 3, 2, 1, 0, None), [("q", 0, 1, 9, None)]),
    ("k-row", (6, 5, 1, 3, 2, 0, 0, None), [("k", 0, 0, 9, None)]),
    ("k-rope-vrpr", (4, 9, 1, 6, 2, 1, 4, [1, 3, 1, 2, 4]), [("k", 0, 1, 17, 1)]),
    ("k-sink", (6, 4, 1, 0, 0, 1, 0, None), [("k", 0, 0, 2, 3)]),
    ("v-elem", (6, 5, 1, 3, 2, 0, 0, None), [("v", 0, 0, 9, 5)]),
    ("v-rows-vrpr", (4, 9, 2, 5, 1, 1, 4, [1, 3, 1, 2, 4]), [("v", 0, 0, 13, None), ("v", 0, 1, 30, 2)]),
    ("v-stripe", (5, 6, 1, 4, 2, 0, 0, None), [("v", 0, 1, 11, None)]),
]
# Block-aligned layout (frame_tokens = the interpreter's block size 16, one frame per key block, no
# stripe): every visited key block is fully attended, so no masked key shares a visited block.
TSA_NAN_ALIGNED = [
    ("v-aligned", (16, 4, 1, 0, 0, 0, 0, None), [("v", 0, 0, 20, None), ("v", 0, 1, 50, 3)]),
    ("v-aligned-sink", (16, 4, 2, 0, 0, 1, 0, None), [("v", 0, 0, 5, None), ("v", 0, 1, 40, None)]),
]


def _tsa_nan_inputs(case, value=NAN):
    (T, F, L, SF, SW, SK, R, vrpr), where = case
    q, k, v = (torch.randn(1, 2, F * T, 16) for _ in range(3))
    t = dict(q=q, k=k, v=v)
    for name, b, h, s, c in where:
        t[name][b, h, s, slice(None) if c is None else c] = value
    return q, k, v, (T, L, SF, SW, SK), (_freqs(R) if R else None), vrpr


@pytest.mark.parametrize("name,params,where", TSA_NAN + TSA_NAN_ALIGNED, ids=[c[0] for c in TSA_NAN + TSA_NAN_ALIGNED])
def test_tiered_reference_nan_rule(name, params, where):
    q, k, v, tiers, freqs, vrpr = _tsa_nan_inputs((params, where))
    ref = tiered_sparse_attention_reference(q, k, v, *tiers, None, freqs, vrpr)
    exp = _tsa_expected_nan(q, k, v, *tiers)
    assert exp.any() and not exp.all(), "the case must put NaN in some outputs and not in others"
    _assert_same_nan(ref, exp)


def test_tiered_reference_inf_in_masked_v_row_does_not_reach():
    """An inf in a v row: the queries that do not attend it stay finite (0 * inf would be NaN)."""
    T, F = 6, 5
    q, k, v = (torch.randn(1, 1, F * T, 16) for _ in range(3))
    v[0, 0, 9] = INF
    ref = tiered_sparse_attention_reference(q, k, v, T, 1, 0, 0, 0)
    att = tier_mask(F * T, T, 1, 0, 0, 0)[:, 9]
    assert torch.isfinite(ref[0, 0, ~att]).all()
    assert not torch.isfinite(ref[0, 0, att]).any()


def _assert_same_nan(out, ref):
    """out has NaN exactly where `ref` has (ref: a tensor, or the boolean mask of expected NaN)."""
    got, exp = out.isnan(), (ref if ref.dtype == torch.bool else ref.isnan())
    assert torch.equal(got, exp), (f"NaN at {int((got & ~exp).sum())} outputs where the rule says finite, finite at "
                                   f"{int((exp & ~got).sum())} where it says NaN (of {int(exp.sum())} NaN expected)")


def _tsa_triton_nan_check(params, where):
    q, k, v, tiers, freqs, vrpr = _tsa_nan_inputs((params, where))
    with ops.use_backend("triton"):
        out = tsa(q, k, v, *tiers, None, freqs, vrpr)
    ref = tiered_sparse_attention_reference(q, k, v, *tiers, None, freqs, vrpr)
    _assert_same_nan(out, ref)
    fin = ~ref.isnan()
    torch.testing.assert_close(out[fin], ref[fin], atol=2e-4, rtol=2e-4)


_TRITON_OK = [c for c in TSA_NAN if c[0].startswith(("q-", "k-"))] + TSA_NAN_ALIGNED
_TRITON_V_MASKED = [c for c in TSA_NAN if c[0].startswith("v-")]


@pytest.mark.parametrize("name,params,where", _TRITON_OK, ids=[c[0] for c in _TRITON_OK])
def test_tiered_triton_nan_rows_match_reference(name, params, where):
    _tsa_triton_nan_check(params, where)


@pytest.mark.parametrize("name,params,where", _TRITON_V_MASKED, ids=[c[0] for c in _TRITON_V_MASKED])
def test_tiered_triton_nan_in_masked_v_row_does_not_reach(name, params, where):
    """A NaN in a v row that some queries of a visited partial key block do not attend: those
    queries stay finite (the kernel no longer forms p = 0 times NaN), the others get NaN."""
    _tsa_triton_nan_check(params, where)


# Every layout with partial key blocks (interpreter blocks 16 x 16): frame tiers with a stripe and a
# sink, VRPR with the mid band's shift M, token bands (their gap inside blocks; alone and on frame
# tiers), token tiers with and without sink_rope. The NaN/inf goes to keys that some queries of a
# visited block attend and others do not (_exposed_keys): the keys of partial blocks.
# (name, frame_tokens, frames, R (RoPE pairs, 0: none), op keyword arguments)
TSA_PARTIAL_LAYOUTS = [
    ("frame-stripe-sink", 6, 5, 0, dict(local_frames=1, stripe_frames=3, stripe_width=2, sink_frames=1)),
    ("vrpr-mid-shift", 4, 9, 4, dict(local_frames=1, stripe_frames=6, stripe_width=2, sink_frames=1,
                                     vrpr=[1, 3, 1, 2, 4, 2])),
    ("token-bands", 10, 7, 5, dict(local_frames=7, vrpr=[3, 5, 2, 3, 4, 1], token_bands=[17, 25, 44])),
    ("token-bands-tiers", 10, 7, 5, dict(local_frames=2, stripe_frames=4, stripe_width=3, sink_frames=1,
                                         vrpr=[2, 4, 2, 2, 3], token_bands=[9, 13, 31])),
    ("token-tiers-sink-rope", 10, 7, 5, dict(local_frames=1, stripe_frames=0, stripe_width=2, sink_frames=0,
                                             token_tiers=[13, 31, 12, 47], sink_rope=[2, 3])),
    ("token-tiers-plain", 12, 6, 0, dict(local_frames=1, stripe_frames=0, stripe_width=3, sink_frames=0,
                                         token_tiers=[19, 40, 14, 50])),
]
_LAYOUT_IDS = [c[0] for c in TSA_PARTIAL_LAYOUTS]


def _exposed_keys(attended, block=16):
    """Keys j that share a 16 x 16 block pair with an attended pair while a query of that query
    block does not attend j: the block pair is visited (and partial), j is masked for that query."""
    S = attended.shape[0]
    nb = -(-S // block)
    out = []
    for j in range(S):
        for qb in range(nb):
            rows = attended[qb * block:(qb + 1) * block]
            kb = slice((j // block) * block, (j // block + 1) * block)
            if rows[:, kb].any() and not rows[:, j].all():
                out.append(j)
                break
    return out


def _tsa_partial_inputs(layout, tensor, value):
    """q, k, v (1, 2, S, 16) with `value` in `tensor` at two exposed keys (head 0: the whole row,
    head 1: channel 3 only), the op's arguments, and the attended mask (S, S) of the layout."""
    from longvideo.reference.tiered_sparse_attention import pair_classes

    _, T, F, R, kw = layout
    kw = dict(kw)
    args = (T, kw.pop("local_frames"), kw.pop("stripe_frames", 0), kw.pop("stripe_width", 0), kw.pop("sink_frames", 0))
    idx = torch.arange(F * T)
    attended = pair_classes(idx, idx, T, args[1], args[2], args[3], args[4], kw.get("vrpr"), kw.get("token_bands"),
                            kw.get("token_tiers"))[0]
    keys = _exposed_keys(attended)
    assert len(keys) >= 2, "the layout must have partial blocks at the interpreter's block size"
    torch.manual_seed(11)
    q, k, v = (torch.randn(1, 2, F * T, 16) for _ in range(3))
    t = dict(q=q, k=k, v=v)[tensor]
    t[0, 0, keys[len(keys) // 3]] = value
    t[0, 1, keys[2 * len(keys) // 3], 3] = value
    return q, k, v, args, (_freqs(R) if R else None), kw, attended


def _tsa_partial_run(q, k, v, args, freqs, kw, **launch):
    if launch:  # the Triton launcher itself (test-only switches)
        return tsa_mod.triton_module().tiered_sparse_attention_fwd(q, k, v, *args, None, freqs, **kw, **launch)
    with ops.use_backend("triton"):
        return tsa(q, k, v, *args, None, freqs, **kw)


def _tsa_rule_nonfinite(q, k, v, attended):
    """Outputs the rule makes non-finite: out[i] if q[i] or an attended k[j] is NaN; out[i, c] if an
    attended v[j, c] is NaN or inf. (An inf in k is not covered: its sign decides.)"""
    att = attended.double()
    row = q.isnan().any(-1) | ((att @ k.isnan().any(-1).double()[..., None])[..., 0] > 0)
    return row[..., None] | ((att @ (~torch.isfinite(v)).double()) > 0)


_PARTIAL_CASES = [(layout, t, val) for layout in TSA_PARTIAL_LAYOUTS for t, val in (("v", NAN), ("v", INF), ("k", NAN))]
_PARTIAL_CASES += [(TSA_PARTIAL_LAYOUTS[i], t, val) for i in (0, 3) for t, val in (("v", -INF), ("k", INF))]


@pytest.mark.parametrize("layout,tensor,value", _PARTIAL_CASES,
                         ids=[f"{c[0][0]}-{c[1]}-{c[2]}" for c in _PARTIAL_CASES])
def test_tiered_triton_nonfinite_follows_rule_in_partial_blocks(layout, tensor, value):
    """NaN/inf in v or k rows inside partial key blocks, every layout: a query that does not attend
    the row stays finite and equal to the reference; a query that does gets what the reference
    gets (NaN where it has NaN; an attended inf in v stays inf or NaN as IEEE p * inf gives)."""
    q, k, v, args, freqs, kw, attended = _tsa_partial_inputs(layout, tensor, value)
    out = _tsa_partial_run(q, k, v, args, freqs, kw)
    ref = tiered_sparse_attention_reference(q, k, v, *args, None, freqs, **kw)
    bad_rows = (~torch.isfinite(dict(k=k, v=v)[tensor])).any(-1)           # (B, H, S) keys holding NaN/inf
    reaches = (attended.double() @ bad_rows.double()[..., None])[..., 0] > 0  # (B, H, S): query attends one
    assert reaches.any() and not reaches.all(), "the case must have queries on both sides"
    assert torch.isfinite(out[~reaches]).all(), "a NaN/inf row reached a query that does not attend it"
    _assert_same_nan(out, ref)
    if tensor == "v" or value != value:
        assert torch.equal(~torch.isfinite(out), _tsa_rule_nonfinite(q, k, v, attended))
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin)
    torch.testing.assert_close(out[fin], ref[fin], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out[~fin & ~ref.isnan()], ref[~fin & ~ref.isnan()])  # the same signed infs


@pytest.mark.parametrize("layout,value", [(c, NAN) for c in TSA_PARTIAL_LAYOUTS] + [(TSA_PARTIAL_LAYOUTS[2], INF)],
                         ids=[f"{c[0]}-nan" for c in TSA_PARTIAL_LAYOUTS] + [f"{TSA_PARTIAL_LAYOUTS[2][0]}-inf"])
def test_tiered_triton_without_the_guard_leaks_masked_v(layout, value):
    """The cases above can fail: the kernel without the masked-value guard (the old p @ v over whole
    partial blocks) puts NaN where the rule says finite, in every layout."""
    q, k, v, args, freqs, kw, attended = _tsa_partial_inputs(layout, "v", value)
    out = _tsa_partial_run(q, k, v, args, freqs, kw, guard_masked_v=False)
    leaked = out.isnan() & ~_tsa_rule_nonfinite(q, k, v, attended)
    assert leaked.any(), "the unguarded kernel should leak a masked NaN/inf through 0 * NaN here"
    guarded = _tsa_partial_run(q, k, v, args, freqs, kw, guard_masked_v=True)
    assert torch.equal(~torch.isfinite(guarded), _tsa_rule_nonfinite(q, k, v, attended))


def test_tiered_triton_nonfinite_v_across_all_blocks():
    """NaN and +-inf scattered over a tenth of v's elements (full and partial blocks, every tier):
    the output is non-finite exactly where the rule says, NaN exactly where the reference has NaN,
    and equal to it elsewhere."""
    layout = TSA_PARTIAL_LAYOUTS[3]
    q, k, v, args, freqs, kw, attended = _tsa_partial_inputs(layout, "v", 0.0)
    g = torch.Generator().manual_seed(5)
    pick = torch.rand(v.shape, generator=g)
    v = torch.where(pick < 0.03, NAN, torch.where(pick < 0.06, INF, torch.where(pick < 0.09, -INF, v)))
    out = _tsa_partial_run(q, k, v, args, freqs, kw)
    ref = tiered_sparse_attention_reference(q, k, v, *args, None, freqs, **kw)
    rule = _tsa_rule_nonfinite(q, k, v, attended)
    assert rule.any() and not rule.all()
    assert torch.equal(~torch.isfinite(out), rule)
    _assert_same_nan(out, ref)
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], atol=2e-4, rtol=2e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", TSA_PARTIAL_LAYOUTS, ids=_LAYOUT_IDS)
def test_gpu_tiered_triton_nonfinite_v_follows_rule(layout, dtype):
    """The compiled kernel (its default 128 x 64 tiles: every block of these short sequences is
    partial) with NaN and inf in v: non-finite exactly where the rule says, NaN where the reference has it."""
    q, k, v, args, freqs, kw, attended = _tsa_partial_inputs(layout, "v", NAN)
    v[0, 0, _exposed_keys(attended)[-1]] = INF
    dev = torch.device("cuda")
    q, k, v = (x.to(dev, dtype) for x in (q, k, v))
    freqs = freqs.to(dev) if freqs is not None else None
    out = _tsa_partial_run(q, k, v, args, freqs, kw).float().cpu()
    ref = tiered_sparse_attention_reference(q.float(), k.float(), v.float(), *args, None, freqs, **kw).cpu()
    assert torch.equal(~torch.isfinite(out), _tsa_rule_nonfinite(q.cpu(), k.cpu(), v.cpu(), attended))
    _assert_same_nan(out, ref)
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], atol=2e-2, rtol=2e-2)


def _csa_expected_nan(q, k, v, idx, g, window, bk, bv):
    """Row b sees its own tokens, the sampled tokens of the other images of its group (and window),
    and the bank: NaN in q[b, h, i] or in one of those keys -> out[b, h, i] NaN; NaN in channel c
    of one of those values -> out[b, h, :, c] NaN."""
    B, H, N, D = q.shape
    exp = torch.zeros(B, H, N, D, dtype=torch.bool)
    for b in range(B):
        toks = [(b, n) for n in range(N)]
        for t in idx.tolist():
            src = t // N
            if src != b and src // g == b // g and (window < 0 or abs(src - b) <= window):
                toks.append((src, t % N))
        for h in range(H):
            keys = torch.stack([k[s, h, n] for s, n in toks])
            vals = torch.stack([v[s, h, n] for s, n in toks])
            if bk is not None:
                bank_k = bk[h] if bk.dim() == 3 else bk[b // g, h]
                bank_v = bv[h] if bv.dim() == 3 else bv[b // g, h]
                keys, vals = torch.cat([keys, bank_k]), torch.cat([vals, bank_v])
            row = q[b, h].isnan().any(-1) | keys.isnan().any()
            exp[b, h] = row[:, None] | vals.isnan().any(0)[None, :]
    return exp


CSA_NAN = [
    # name, window, bank, NaN placements (tensor, index)
    ("v-sampled", -1, None, [("v", (1, 0, 1, 4))]),          # token 9 = image 1, pos 1: sampled
    ("v-unsampled", -1, None, [("v", (2, 1, 5, None))]),     # image 2 pos 5: only image 2 sees it
    ("k-sampled-window", 1, None, [("k", (0, 0, 1, 2))]),    # token 1 (image 0) sampled: image 1 sees it, 2 and 3 not
    ("q-row", -1, None, [("q", (3, 1, 6, None))]),
    ("bank-v", -1, "group", [("bank_v", (1, 0, 2, 7))]),     # bank of group 1 only
    ("bank-k-shared", -1, "shared", [("bank_k", (1, 0, 3))]),
]


@pytest.mark.parametrize("name,window,bank,where", CSA_NAN, ids=[c[0] for c in CSA_NAN])
def test_consistent_nan_rows_match_rule(name, window, bank, where):
    B, H, N, D, g = 4, 2, 8, 16, 4
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    idx = torch.tensor([1, 9, 12, 20, 27, 30])
    bk = bv = None
    if bank == "shared":
        bk, bv = torch.randn(H, 3, D), torch.randn(H, 3, D)
    elif bank == "group":
        g = 2
        bk, bv = torch.randn(B // g, H, 3, D), torch.randn(B // g, H, 3, D)
    t = dict(q=q, k=k, v=v, bank_k=bk, bank_v=bv)
    for tname, index in where:
        t[tname][tuple(slice(None) if i is None else i for i in index)] = NAN
    exp = _csa_expected_nan(q, k, v, idx, g, window, bk, bv)
    assert exp.any() and not exp.all()
    ref = consistent_attention_reference(q, k, v, idx, g, window, bk, bv)
    _assert_same_nan(ref, exp)
    with ops.use_backend("triton"):
        out = csa(q, k, v, idx, g, window, bk, bv, None)
    _assert_same_nan(out, exp)
    fin = ~exp
    torch.testing.assert_close(out[fin], ref[fin], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("shape", [(2, 3, 1, 16, 16), (2, 3, 4, 8, 6)], ids=["T1-single-pass", "T4-spectral"])
@pytest.mark.parametrize("which", ["x", "noise"])
@pytest.mark.parametrize("filter", ["gaussian", "ideal", "box"])
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_lowfreq_nan_fills_its_slice_only(shape, which, filter, value):
    """One NaN/inf element -> its whole (T, H, W) output slice NaN (FFT), in both backends."""
    x, noise = torch.randn(shape), torch.randn(shape)
    (x if which == "x" else noise)[1, 2, 0, 3, 4] = value
    d_t = 1.0 if shape[2] == 1 else 0.5
    exp = torch.zeros(shape, dtype=torch.bool)
    exp[1, 2] = True
    ref = lfm(x, noise, filter, 0.5, d_t)
    with ops.use_backend("triton"):
        out = lfm(x, noise, filter, 0.5, d_t)
    _assert_same_nan(ref, exp)
    _assert_same_nan(out, exp)
