"""An independent probe of the three ops' inputs (issue 17 item 4, cases beyond
tests/test_op_inputs.py): tensors on different devices or of mixed / integer / bool dtypes, bank
shapes that disagree, head dims a forced backend has no kernel for -- each a ValueError naming the
argument -- and strided inputs (non-contiguous, zero-stride expanded) giving exactly what their
contiguous copies give, on the reference and the Triton kernels (interpreter)."""
import re

import pytest
import torch

import longvideo.ops as ops

tsa = torch.ops.longvideo.tiered_sparse_attention
csa = torch.ops.longvideo.consistent_attention
lfm = torch.ops.longvideo.lowfreq_mix
BACKENDS = ["reference", "triton"]
TSA_KW = dict(stripe_frames=2, stripe_width=2, sink_frames=1)


@pytest.fixture
def backend(request):
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend("auto")


def _r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def _tsa(q, k, v):
    return tsa(q, k, v, 6, 1, **TSA_KW)


def _csa(q, k, v, bank_k=None, bank_v=None, idx=None):
    return csa(q, k, v, torch.tensor([1, 9, 20, 30]) if idx is None else idx, 2, -1, bank_k, bank_v)


def _lfm(x, n):
    return lfm(x, n, "gaussian", 0.25, 0.25, 4.0)


Q, K, V = _r(1, 2, 24, 16), _r(2, 1, 24, 16).transpose(0, 1).contiguous() * 0.5, _r(1, 2, 24, 16)
CQ, CK, CV = _r(4, 2, 8, 16), _r(4, 2, 8, 16) * 0.7, _r(4, 2, 8, 16) * 1.3
X, N = _r(1, 2, 3, 8, 8), _r(2, 1, 3, 8, 8).transpose(0, 1).contiguous()

BAD = {  # name: (call, the argument named in the message)
    "tsa_k_float64": (lambda: _tsa(Q, K.double(), V), "k must be float16/bfloat16/float32"),
    "tsa_int": (lambda: _tsa(Q.int(), K.int(), V.int()), "q must be float16/bfloat16/float32"),
    "tsa_bool": (lambda: _tsa(Q > 0, K > 0, V > 0), "q must be float16/bfloat16/float32"),
    "tsa_v_on_meta": (lambda: _tsa(Q, K, V.to("meta")), "v is on meta, q on cpu"),
    "tsa_rope_on_meta": (lambda: tsa(Q, K, V, 6, 1, rope_t_freqs=torch.ones(4, device="meta"), **TSA_KW),
                         "rope_t_freqs is on meta"),
    "tsa_rope_int": (lambda: tsa(Q, K, V, 6, 1, rope_t_freqs=torch.ones(4, dtype=torch.int64), **TSA_KW),
                     "rope_t_freqs must be floating point"),
    "csa_k_half": (lambda: _csa(CQ, CK.half(), CV), "k dtype torch.float16 must equal q's"),
    "csa_int": (lambda: _csa(CQ.int(), CK.int(), CV.int()), "q dtype must be float16/bfloat16/float32"),
    "csa_float64": (lambda: _csa(CQ.double(), CK.double(), CV.double()), "q dtype must be"),
    "csa_idx_float": (lambda: _csa(CQ, CK, CV, idx=torch.tensor([1.0, 9.0])), "sample_idx dtype must be int32 or int64"),
    "csa_idx_on_meta": (lambda: _csa(CQ, CK, CV, idx=torch.tensor([1, 9], device="meta")), "sample_idx is on meta"),
    "csa_bank_lengths_disagree": (lambda: _csa(CQ, CK, CV, _r(2, 5, 16), _r(2, 6, 16)), "bank_k (2, 5, 16) and bank_v"),
    "csa_bank_3d_vs_4d": (lambda: _csa(CQ, CK, CV, _r(2, 2, 5, 16), _r(2, 5, 16)), "bank_k (2, 2, 5, 16) and bank_v"),
    "csa_bank_wrong_heads": (lambda: _csa(CQ, CK, CV, _r(3, 5, 16), _r(3, 5, 16)), "bank_k must be (H=2, E, D=16)"),
    "csa_bank_wrong_groups": (lambda: _csa(CQ, CK, CV, _r(3, 2, 5, 16), _r(3, 2, 5, 16)), "bank_k must be (H=2"),
    "csa_bank_int": (lambda: _csa(CQ, CK, CV, _r(2, 5, 16).int(), _r(2, 5, 16).int()), "bank_k dtype torch.int32"),
    "csa_bank_on_meta": (lambda: _csa(CQ, CK, CV, _r(2, 5, 16).to("meta"), _r(2, 5, 16).to("meta")), "bank_k is on meta"),
    "csa_bank_k_only": (lambda: _csa(CQ, CK, CV, _r(2, 5, 16), None), "bank_k and bank_v must be given together"),
    "lfm_int": (lambda: _lfm(X.int(), N.int()), "x must have a floating dtype"),
    "lfm_complex": (lambda: _lfm(X.to(torch.complex64), N.to(torch.complex64)), "x must have a floating dtype"),
    "lfm_noise_float64": (lambda: _lfm(X, N.double()), "noise dtype torch.float64 must equal x's"),
    "lfm_noise_on_meta": (lambda: _lfm(X, N.to("meta")), "noise is on meta, x on cpu"),
}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tensor_argument_raises_value_error_naming_it(case, backend):
    call, words = BAD[case]
    with pytest.raises(ValueError) as info:
        call()
    assert words in str(info.value)


# head dims a kernel backend has no kernel for: asked for explicitly, a ValueError (also a RuntimeError,
# as before) naming the head dim; auto falls back to the reference and computes it
@pytest.mark.parametrize("op", ["tsa", "csa"])
def test_forced_backend_refuses_an_unsupported_head_dim(op):
    D = 300
    call = (lambda: _tsa(_r(1, 2, 24, D), _r(1, 2, 24, D), _r(1, 2, 24, D))) if op == "tsa" else \
        (lambda: _csa(_r(4, 2, 8, D), _r(4, 2, 8, D), _r(4, 2, 8, D)))
    ops.set_backend("triton")
    try:
        with pytest.raises(ValueError, match=r"does not support this input: head dim") as info:
            call()
        assert isinstance(info.value, RuntimeError)
    finally:
        ops.set_backend("auto")
    assert call().shape[-1] == D


def _views():
    """(name, op, strided args, contiguous copies): transposed, sliced and zero-stride inputs."""
    qt = _r(1, 24, 2, 16).transpose(1, 2)                          # (B, H, S, D) with S, H swapped in memory
    qs = _r(1, 2, 24, 32)[..., ::2]                                # D stride 2
    qe = _r(1, 1, 24, 16).expand(1, 2, 24, 16)                     # zero stride over heads
    ke, ve = K[:, :1].expand(1, 2, 24, 16), V[:, :1].expand(1, 2, 24, 16)
    cqe = _r(1, 2, 8, 16).expand(4, 2, 8, 16)                      # zero stride over the batch
    bke, bv = _r(2, 1, 16).expand(2, 5, 16), _r(2, 5, 16)          # a bank with one distinct row
    xe = _r(1, 1, 3, 8, 8).expand(1, 2, 3, 8, 8)
    xt = _r(1, 2, 8, 8, 3).permute(0, 1, 4, 2, 3)
    return [
        ("tsa_transposed_q", _tsa, (qt, K, V)),
        ("tsa_strided_d", _tsa, (qs, K, V)),
        ("tsa_expanded_qkv", _tsa, (qe, ke, ve)),
        ("csa_expanded_q", _csa, (cqe, CK, CV)),
        ("csa_expanded_bank", _csa, (CQ, CK, CV, bke, bv)),
        ("lfm_expanded_x", _lfm, (xe, N)),
        ("lfm_permuted_x", _lfm, (xt, N)),
    ]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("index", range(len(_views())), ids=[v[0] for v in _views()])
def test_strided_inputs_equal_their_contiguous_copies(index, backend):
    """Views are read through their strides (a kernel assuming contiguity would read the wrong
    elements: a zero stride would repeat one row, a transposed q would mix heads and tokens)."""
    name, fn, args = _views()[index]
    assert any(not a.is_contiguous() for a in args)
    got = fn(*args)
    want = fn(*(a.contiguous() for a in args))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the comparison can fail: the same values laid out contiguously in another order differ
    wrong = fn(*(a.contiguous().flip(-2) if i == 0 else a for i, a in enumerate(args)))
    assert not torch.allclose(wrong, want, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Python types of the non-tensor arguments at the public functions (longvideo.ops.*): a float
# where an int is expected used to reach torch's schema parser (a RuntimeError of six lines:
# position, value, declaration, a pybind11 note), and a bool was converted to 0 / 1 before any
# check ran (lowfreq_mix(d_s=True) computed with d_s = 1.0; group_size=True was group size 1).
# Now: one ValueError line naming the argument, the type it must have and the type it got.
np = pytest.importorskip("numpy")
FREQS = torch.tensor([1.0, 0.5])
VRPR = [1.0, 2.0, 1.0, 1.0, 3.0]


def _tsa_kw(**kw):
    args = dict(frame_tokens=6, local_frames=1, **TSA_KW)
    args.update(kw)
    return lambda: ops.tiered_sparse_attention(Q, K, V, **args)


def _csa_kw(**kw):
    args = dict(sample_idx=torch.tensor([1, 9, 20, 30]), group_size=2, window=-1)
    args.update(kw)
    return lambda: ops.consistent_attention(CQ, CK, CV, **args)


def _lfm_kw(**kw):
    return lambda: ops.lowfreq_mix(X, N, **kw)


INT, NUM = "an int", r"a number \(int or float\)"
BAD_TYPES = {  # name: (call, argument, what it must be, what it got)
    "tsa_frame_tokens_float": (_tsa_kw(frame_tokens=6.0), "frame_tokens", INT, "float 6.0"),
    "tsa_frame_tokens_bool": (_tsa_kw(frame_tokens=True), "frame_tokens", INT, "bool True"),
    "tsa_frame_tokens_tensor": (_tsa_kw(frame_tokens=torch.tensor(6)), "frame_tokens", INT, r"Tensor tensor\(6\)"),
    "tsa_local_frames_bool": (_tsa_kw(local_frames=True), "local_frames", INT, "bool True"),
    "tsa_local_frames_numpy_float": (_tsa_kw(local_frames=np.float64(2)), "local_frames", INT, "float64"),
    "tsa_stripe_frames_float": (_tsa_kw(stripe_frames=2.0), "stripe_frames", INT, "float 2.0"),
    "tsa_stripe_width_str": (_tsa_kw(stripe_width="2"), "stripe_width", INT, "str '2'"),
    "tsa_sink_frames_half": (_tsa_kw(sink_frames=1.5), "sink_frames", INT, "float 1.5"),
    "tsa_scale_bool": (_tsa_kw(scale=True), "scale", NUM, "bool True"),
    "tsa_scale_str": (_tsa_kw(scale="0.25"), "scale", NUM, "str '0.25'"),
    "tsa_scale_tensor": (_tsa_kw(scale=torch.tensor(0.25)), "scale", NUM, "Tensor"),
    "tsa_vrpr_bool_entry": (_tsa_kw(rope_t_freqs=FREQS, vrpr=[True, 2.0, 1.0, 1.0, 3.0]), "vrpr",
                            "a list of numbers", r"\[True, 2.0, 1.0, 1.0, 3.0\] \(True is a bool\)"),
    "tsa_vrpr_str": (_tsa_kw(rope_t_freqs=FREQS, vrpr="12113"), "vrpr", "a list of numbers", "str '12113'"),
    "tsa_token_tiers_float_entry": (_tsa_kw(local_frames=1, stripe_frames=0, sink_frames=0, token_tiers=[1.0, 2, 3, 4]),
                                    "token_tiers", "a list of ints", r"\[1.0, 2, 3, 4\] \(1.0 is a float\)"),
    "tsa_token_bands_bool_entry": (_tsa_kw(rope_t_freqs=FREQS, vrpr=VRPR, token_bands=[0, True, 3]), "token_bands",
                                   "a list of ints", r"\[0, True, 3\] \(True is a bool\)"),
    "tsa_sink_rope_int": (_tsa_kw(local_frames=1, stripe_frames=0, sink_frames=0, token_tiers=[1, 2, 3, 4],
                                  rope_t_freqs=FREQS, sink_rope=2), "sink_rope", "a list of ints", "int 2"),
    "tsa_rope_t_freqs_list": (_tsa_kw(rope_t_freqs=[1.0, 0.5]), "rope_t_freqs", "a tensor", r"list \[1.0, 0.5\]"),
    "csa_group_size_float": (_csa_kw(group_size=2.0), "group_size", INT, "float 2.0"),
    "csa_group_size_bool": (_csa_kw(group_size=True), "group_size", INT, "bool True"),
    "csa_window_float": (_csa_kw(window=1.0), "window", INT, "float 1.0"),
    "csa_window_bool": (_csa_kw(window=False), "window", INT, "bool False"),
    "csa_scale_bool": (_csa_kw(scale=True), "scale", NUM, "bool True"),
    "csa_sample_idx_list": (_csa_kw(sample_idx=[1, 9]), "sample_idx", "a tensor", r"list \[1, 9\]"),
    "lfm_d_s_bool": (_lfm_kw(d_s=True), "d_s", NUM, "bool True"),
    "lfm_d_t_bool": (_lfm_kw(d_t=False), "d_t", NUM, "bool False"),
    "lfm_order_bool": (_lfm_kw(filter="butterworth", order=True), "order", NUM, "bool True"),
    "lfm_d_s_numpy_bool": (_lfm_kw(d_s=np.bool_(True)), "d_s", NUM, "bool"),
    "lfm_d_s_str": (_lfm_kw(d_s="0.25"), "d_s", NUM, "str '0.25'"),
    "lfm_d_s_tensor": (_lfm_kw(d_s=torch.tensor(0.25)), "d_s", NUM, "Tensor"),
    "lfm_filter_int": (_lfm_kw(filter=3), "filter", "a string", "int 3"),
    "lfm_filter_none": (_lfm_kw(filter=None), "filter", "a string", "None"),
}


@pytest.mark.parametrize("case", sorted(BAD_TYPES))
def test_wrong_argument_type_is_one_line_naming_it(case):
    call, name, must, got = BAD_TYPES[case]
    op = {"tsa": "tiered_sparse_attention", "csa": "consistent_attention", "lfm": "lowfreq_mix"}[case[:3]]
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 160, message
    assert re.match(rf"{op}: {name} must be {must}, got {got}", message), message


# What the checks accept is what the functions always accepted: an int where a float is expected,
# NumPy scalars, tuples for lists; each gives what the plain Python values give.
GOOD_TYPES = {  # name: (call with other accepted types, the same call with plain Python values)
    "tsa_numpy_ints_tuple_vrpr_int_scale": (
        lambda: ops.tiered_sparse_attention(Q, K, V, np.int64(6), np.int32(2), np.int16(2), 2, 1, 1,
                                            rope_t_freqs=FREQS, vrpr=(1, 2, 1, np.int64(1), 3.0)),
        lambda: ops.tiered_sparse_attention(Q, K, V, 6, 2, 2, 2, 1, 1.0, rope_t_freqs=FREQS, vrpr=VRPR)),
    "tsa_token_tiers_tuple": (
        lambda: ops.tiered_sparse_attention(Q, K, V, 6, 1, 0, 2, 0, token_tiers=(3, 8, 2, 20)),
        lambda: ops.tiered_sparse_attention(Q, K, V, 6, 1, 0, 2, 0, token_tiers=[3, 8, 2, 20])),
    "csa_numpy_group_window_scale": (
        lambda: ops.consistent_attention(CQ, CK, CV, torch.tensor([1, 9]), np.int64(2), np.int64(1),
                                         scale=np.float32(0.25)),
        lambda: ops.consistent_attention(CQ, CK, CV, torch.tensor([1, 9]), 2, 1, scale=0.25)),
    "lfm_int_and_numpy_numbers": (
        lambda: ops.lowfreq_mix(X, N, "butterworth", np.float64(0.5), 1, np.int64(2)),
        lambda: ops.lowfreq_mix(X, N, "butterworth", 0.5, 1.0, 2.0)),
}


@pytest.mark.parametrize("case", sorted(GOOD_TYPES))
def test_accepted_argument_types_equal_plain_python_values(case):
    other, plain = GOOD_TYPES[case]
    torch.testing.assert_close(other(), plain(), rtol=0, atol=0)


def test_bool_is_no_longer_taken_as_one():
    """The silently wrong case: d_s=True was d_s=1.0, a result different from the default's."""
    noise = torch.randn(X.shape, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"lowfreq_mix: d_s must be a number"):
        ops.lowfreq_mix(X, noise, d_s=True)
    assert not torch.allclose(ops.lowfreq_mix(X, noise, d_s=1.0), ops.lowfreq_mix(X, noise, d_s=0.25), atol=1e-2)
