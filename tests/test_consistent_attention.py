"""consistent_attention: reference, Triton (CPU interpreter in CI), CUDA extension (GPU tier).

Oracles: the explicit-concatenation reference (longvideo.reference), and two independent
re-implementations written here of StoryDiffusion's official computation given the same sampled
indices: its index-based "low VRAM" path (per image: own tokens + the sampled tokens of the other
images of the group, concatenated, then F.scaled_dot_product_attention) and its dense-mask path
(one (B*N) x (B*N) boolean mask, SDPA over all tokens at once).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import longvideo  # noqa: F401  (registers the ops)
from longvideo.ops import get_backend, use_backend
from longvideo.ops.consistent_attention import consistent_attention
from longvideo.reference.consistent_attention import consistent_attention_reference

OP = "consistent_attention"
needs_triton = pytest.mark.skipif(not get_backend(OP, "triton").is_available()[0], reason="triton unavailable")


# ----------------------------------------------------------------------------------------------
# independent oracles (StoryDiffusion's two official paths, re-implemented from the paper/code
# description, not from our reference)
def storydiffusion_index_path(q, k, v, sample_idx, group_size, window=-1, bank_k=None, bank_v=None, scale=None):
    """Per image: concat(own tokens, sampled tokens of every other image of the group[/window],
    bank), then SDPA in float32."""
    B, H, N, D = q.shape
    sampled = torch.zeros(B * N, dtype=torch.bool)
    sampled[sample_idx.long()] = True
    sampled = sampled.view(B, N)
    outs = []
    for b in range(B):
        first = (b // group_size) * group_size
        keys, vals = [k[b]], [v[b]]
        for other in range(first, first + group_size):
            if other == b or (window >= 0 and abs(other - b) > window):
                continue
            keys.append(k[other][:, sampled[other]])
            vals.append(v[other][:, sampled[other]])
        if bank_k is not None:
            keys.append(bank_k if bank_k.dim() == 3 else bank_k[b // group_size])
            vals.append(bank_v if bank_v.dim() == 3 else bank_v[b // group_size])
        K, V = torch.cat(keys, 1).float(), torch.cat(vals, 1).float()
        outs.append(F.scaled_dot_product_attention(q[b].float(), K, V, scale=scale))
    return torch.stack(outs)


def storydiffusion_dense_mask_path(q, k, v, sample_idx, group_size, window=-1, scale=None):
    """All B*N tokens at once with a boolean (B*N, B*N) mask: a query token sees every token of
    its own image and the sampled tokens of the other images of its group[/window]."""
    B, H, N, D = q.shape
    img = torch.arange(B * N) // N
    sampled = torch.zeros(B * N, dtype=torch.bool)
    sampled[sample_idx.long()] = True
    same = img[:, None] == img[None, :]
    cross = (img[:, None] // group_size == img[None, :] // group_size) & sampled[None, :] & ~same
    if window >= 0:
        cross &= (img[:, None] - img[None, :]).abs() <= window
    mask = same | cross
    flat = lambda t: t.float().permute(1, 0, 2, 3).reshape(H, B * N, D)  # noqa: E731
    out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask, scale=scale)
    return out.reshape(H, B, N, D).permute(1, 0, 2, 3)


# ----------------------------------------------------------------------------------------------
# helpers
def make_inputs(B, H, N, D, M, group_size, bank=None, E=5, dtype=torch.float32, transposed=False, seed=0,
                idx_dtype=torch.int64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if transposed:  # diffusers' layout: (B, N, H, D) memory seen as (B, H, N, D)
        q, k, v = (rnd(B, N, H, D).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (rnd(B, H, N, D) for _ in range(3))
    sample_idx = torch.randperm(B * N, generator=g)[:M].sort().values.to(idx_dtype)
    bank_k = bank_v = None
    if bank == "shared":
        bank_k, bank_v = rnd(H, E, D), rnd(H, E, D)
    elif bank == "group":
        bank_k, bank_v = rnd(B // group_size, H, E, D), rnd(B // group_size, H, E, D)
    tensors = [q, k, v, bank_k, bank_v]
    if requires_grad:
        tensors = [t.requires_grad_() if t is not None else None for t in tensors]
    q, k, v, bank_k, bank_v = tensors
    return q, k, v, sample_idx, bank_k, bank_v


def assert_close(actual, expected, backend, dtype, what="", factor=1.0):
    atol, rtol = get_backend(OP, backend).tolerance(dtype)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * factor, rtol=rtol * factor,
                               msg=lambda m: f"{what} ({backend}, {dtype}): {m}")


# ----------------------------------------------------------------------------------------------
# the reference against StoryDiffusion's two official computations
@pytest.mark.parametrize("B,group_size,window,bank,M", [
    (4, 4, -1, None, 16),        # one story, sampling rate 0.5
    (4, 2, -1, "group", 10),     # CFG halves as groups, per-group bank (read mode)
    (6, 3, 1, "shared", 25),     # sliding window inside the group, shared bank
    (4, 4, 0, None, 8),          # window 0: own tokens only
    (4, 2, -1, None, 0),         # empty sample_idx
    (4, 4, 2, None, 32),         # M = B*N
])
def test_reference_matches_storydiffusion_paths(B, group_size, window, bank, M):
    H, N, D = 2, 8, 16
    q, k, v, idx, bk, bv = make_inputs(B, H, N, D, M, group_size, bank)
    ref = consistent_attention_reference(q, k, v, idx, group_size, window, bk, bv)
    torch.testing.assert_close(ref, storydiffusion_index_path(q, k, v, idx, group_size, window, bk, bv),
                               atol=1e-5, rtol=1e-5)
    if bank is None:
        torch.testing.assert_close(ref, storydiffusion_dense_mask_path(q, k, v, idx, group_size, window),
                                   atol=1e-5, rtol=1e-5)
    # the public op (reference backend on CPU) with a custom scale
    out = consistent_attention(q, k, v, idx, group_size, window, bk, bv, scale=0.3)
    torch.testing.assert_close(out, storydiffusion_index_path(q, k, v, idx, group_size, window, bk, bv, scale=0.3),
                               atol=1e-5, rtol=1e-5)


def test_samples_only_in_own_image_change_nothing():
    B, H, N, D = 4, 2, 6, 16
    q, k, v, _, _, _ = make_inputs(B, H, N, D, 0, 2)
    idx = torch.arange(N, 2 * N)  # every sample belongs to image 1 only
    out = consistent_attention(q, k, v, idx, 1)   # group_size 1: nobody else may see them
    plain = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)


def test_reference_gradients_closed_form_match_autograd():
    q, k, v, idx, bk, bv = make_inputs(4, 2, 7, 16, 12, 2, "group", requires_grad=True)
    out = consistent_attention(q, k, v, idx, 2, -1, bk, bv)      # closed-form backward (reference backend)
    ref = consistent_attention_reference(q, k, v, idx, 2, -1, bk, bv)
    go = torch.randn_like(out)
    ins = (q, k, v, bk, bv)
    for a, b, name in zip(torch.autograd.grad(out, ins, go), torch.autograd.grad(ref, ins, go), "q k v bank_k bank_v".split()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


# ----------------------------------------------------------------------------------------------
# Triton kernels (CPU interpreter) against the reference: forward and gradients
TRITON_CASES = [
    # B, H, N, D, M, group, window, bank, dtype, transposed
    (4, 2, 20, 40, 30, 2, -1, "group", torch.float32, False),
    (4, 2, 7, 64, 14, 4, 1, "shared", torch.float32, True),
    (2, 1, 20, 64, 40, 2, -1, None, torch.float16, False),      # M = B*N
    (4, 1, 20, 40, 0, 4, -1, "shared", torch.float16, True),    # empty sample_idx, bank only
    (4, 1, 7, 40, 12, 4, 2, None, torch.bfloat16, False),       # bf16 upcast path of the interpreter
    (2, 1, 7, 80, 5, 2, -1, "group", torch.float16, True),      # D = 80 (padded to 128)
    (4, 1, 7, 160, 10, 4, 1, "shared", torch.float32, False),   # D = 160 (padded to 256)
]


@needs_triton
@pytest.mark.parametrize("B,H,N,D,M,G,window,bank,dtype,transposed", TRITON_CASES)
def test_triton_matches_reference_forward_backward(B, H, N, D, M, G, window, bank, dtype, transposed):
    q, k, v, idx, bk, bv = make_inputs(B, H, N, D, M, G, bank, dtype=dtype, transposed=transposed,
                                       idx_dtype=torch.int32 if transposed else torch.int64, requires_grad=True)
    with use_backend("triton", op=OP):
        out = consistent_attention(q, k, v, idx, G, window, bk, bv)
    ref = consistent_attention_reference(q, k, v, idx, G, window, bk, bv)
    assert out.dtype == dtype and out.stride() == q.stride()  # laid out like q (no hidden copies)
    assert_close(out, ref, "triton", dtype, "out")
    go = torch.randn(out.shape).to(dtype)
    ins = [t for t in (q, k, v, bk, bv) if t is not None]
    with use_backend("triton", op=OP):
        grads = torch.autograd.grad(out, ins, go)
    ref_grads = torch.autograd.grad(ref, ins, go)
    for name, a, b in zip("q k v bank_k bank_v".split(), grads, ref_grads):
        # gradients sum over up to N + M + E keys: twice the forward tolerance in half precision
        assert_close(a, b, "triton", dtype, f"d{name}", factor=1.0 if dtype == torch.float32 else 2.0)


@needs_triton
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("D,dtype", [(40, torch.float32), (64, torch.float16), (80, torch.float32)])
def test_triton_backward_fused_and_split_match_reference(D, dtype, fused):
    """The fused backward (dq by atomics from the key-side kernels, the default) and the split one
    (a separate dq kernel) against the reference's autograd, head dims 40/64/80, samples + window +
    per-group bank (every dq source present). Each source's share of dq is larger than the
    tolerance (checked), so a path that dropped one would fail."""
    from longvideo.ops.consistent_attention import _triton_module

    B, H, N, M, G, window = 4, 2, 12, 20, 2, 1
    q, k, v, idx, bk, bv = make_inputs(B, H, N, D, M, G, "group", dtype=dtype, E=5, requires_grad=True)
    ref = consistent_attention_reference(q, k, v, idx, G, window, bk, bv)
    go = torch.randn(ref.shape).to(dtype)
    ins = (q, k, v, bk, bv)
    ref_grads = torch.autograd.grad(ref, ins, go)
    mod = _triton_module()
    scale = 1.0 / math.sqrt(D)
    with torch.no_grad():
        out, lse = mod.consistent_attention_forward(q, k, v, idx, G, window, bk, bv, scale)
        grads = mod.consistent_attention_backward(go, q, k, v, idx, G, window, bk, bv, scale, out, lse, fused=fused)
    factor = 1.0 if dtype == torch.float32 else 2.0
    for name, a, b in zip("q k v bank_k bank_v".split(), grads, ref_grads):
        assert_close(a, b, "triton", dtype, f"d{name} (fused={fused})", factor=factor)
    # dq without the samples' and the bank's share (own keys only) is far from the reference
    own = consistent_attention_reference(q, k, v, idx[:0], G, window, None, None)
    dq_own = torch.autograd.grad(own, q, go)[0]
    with pytest.raises(AssertionError):
        assert_close(dq_own, ref_grads[0], "triton", dtype, "dq own-only", factor=factor)


@needs_triton
def test_triton_matches_storydiffusion_paths():
    B, H, N, D, G = 4, 2, 20, 64, 4
    q, k, v, idx, _, _ = make_inputs(B, H, N, D, 40, G)
    with use_backend("triton", op=OP):
        out = consistent_attention(q, k, v, idx, G, -1)
    assert_close(out, storydiffusion_index_path(q, k, v, idx, G), "triton", torch.float32, "vs index path")
    assert_close(out, storydiffusion_dense_mask_path(q, k, v, idx, G), "triton", torch.float32, "vs dense mask")


@needs_triton
@pytest.mark.parametrize("D", [40, 80, 96, 160])
def test_triton_head_dims_forward(D):
    """The head dims of the contract (D = 96 is not in TRITON_CASES) at a tiny size, fp32, both bank
    forms and a window."""
    for bank, window in ((None, 1), ("group", -1)):
        q, k, v, idx, bk, bv = make_inputs(4, 1, 5, D, 7, 2, bank, E=3)
        with use_backend("triton", op=OP):
            out = consistent_attention(q, k, v, idx, 2, window, bk, bv)
        assert_close(out, consistent_attention_reference(q, k, v, idx, 2, window, bk, bv), "triton", torch.float32,
                     f"D={D}")


def test_cuda_backend_accepts_the_contract_head_dims():
    """The CUDA kernel pads D to 32/48/64/80/96/128/160/256 (csrc/consistent_attention_kernels.cu):
    supports() accepts every contract head dim in fp16/bf16 (the GPU tier runs them)."""
    sup = get_backend(OP, "cuda").supports
    for D in (40, 64, 80, 96, 128, 160):
        for dtype in (torch.float16, torch.bfloat16):
            q = torch.zeros(2, 1, 8, D, dtype=dtype)
            assert sup(q, q, q, torch.arange(3), 2, -1, None, None, None) is None, (D, dtype)


# ----------------------------------------------------------------------------------------------
# op machinery: opcheck, torch.compile, bad inputs
def test_opcheck_reference():
    q, k, v, idx, bk, bv = make_inputs(4, 2, 5, 8, 7, 2, "shared", requires_grad=True)
    torch.library.opcheck(torch.ops.longvideo.consistent_attention.default, (q, k, v, idx, 2, 1, bk, bv))
    torch.library.opcheck(torch.ops.longvideo.consistent_attention.default, (q, k, v, idx[:0], 2),
                          {"scale": 0.5})
    out, lse = torch.ops.longvideo._consistent_attention_forward(q, k, v, idx, 2, -1, bk, bv, 0.3)
    go = torch.randn_like(out)
    torch.library.opcheck(torch.ops.longvideo.consistent_attention_backward.default,
                          (go, q.detach(), k.detach(), v.detach(), idx, 2, -1, bk.detach(), bv.detach(), 0.3,
                           out.detach(), lse.detach()))


@needs_triton
def test_opcheck_triton():
    q, k, v, idx, bk, bv = make_inputs(2, 1, 5, 16, 4, 2, "group", requires_grad=True)
    with use_backend("triton", op=OP):
        torch.library.opcheck(torch.ops.longvideo.consistent_attention.default, (q, k, v, idx, 2, -1, bk, bv),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph_forward_backward():
    q, k, v, idx, bk, bv = make_inputs(4, 2, 6, 16, 9, 2, "group", requires_grad=True)

    def f(q, k, v, idx, bk, bv):
        return torch.ops.longvideo.consistent_attention(q, k, v, idx, 2, -1, bk, bv).sin().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, idx, bk, bv)
    grads = torch.autograd.grad(loss, (q, k, v, bk, bv))
    ref_loss = consistent_attention_reference(q, k, v, idx, 2, -1, bk, bv).sin().sum()
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v, bk, bv))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_naming_the_argument():
    q, k, v, idx, bk, bv = make_inputs(4, 2, 5, 8, 6, 2, "group")
    ca = torch.ops.longvideo.consistent_attention
    with pytest.raises(ValueError, match="sorted"):
        ca(q, k, v, idx.flip(0), 2)
    with pytest.raises(ValueError, match="sorted"):
        ca(q, k, v, torch.tensor([1, 1, 3]), 2)
    with pytest.raises(ValueError, match=r"\[0, B\*N\)"):
        ca(q, k, v, torch.tensor([0, 4 * 5]), 2)
    with pytest.raises(ValueError, match=r"\[0, B\*N\)"):
        ca(q, k, v, torch.tensor([-1, 3]), 2)
    with pytest.raises(ValueError, match="group_size"):
        ca(q, k, v, idx, 3)
    with pytest.raises(ValueError, match="group_size"):
        ca(q, k, v, idx, 0)
    with pytest.raises(ValueError, match="bank_k"):
        ca(q, k, v, idx, 2, -1, bk[:, :1], bv)
    with pytest.raises(ValueError, match="bank_k"):
        ca(q, k, v, idx, 4, -1, bk, bv)  # per-group bank of 2 groups, but group_size 4 makes 1
    with pytest.raises(ValueError, match="bank_v"):
        ca(q, k, v, idx, 2, -1, bk, bv[..., :4])
    with pytest.raises(ValueError, match="together"):
        ca(q, k, v, idx, 2, -1, bk, None)
    with pytest.raises(ValueError, match="sample_idx"):
        ca(q, k, v, idx.float(), 2)
    with pytest.raises(ValueError, match="sample_idx"):
        ca(q, k, v, idx[None], 2)
    with pytest.raises(ValueError, match="window"):
        ca(q, k, v, idx, 2, -2)
    with pytest.raises(ValueError, match="k shape"):
        ca(q, k[:, :1], v, idx, 2)
    with pytest.raises(ValueError, match="v dtype"):
        ca(q, k, v.double(), idx, 2)
    with pytest.raises(ValueError, match="q must be"):
        ca(q[0], k, v, idx, 2)


def test_cpu_auto_uses_reference_and_cuda_backend_reports_why():
    q, k, v, idx, _, _ = make_inputs(2, 1, 4, 8, 3, 2)
    assert longvideo.ops.select(OP, q.device, q, k, v, idx, 2, -1, None, None, 0.3).name == "reference"
    sup = get_backend(OP, "cuda").supports(q, k, v, idx, 2, -1, None, None, 0.3)
    assert sup and "dtype" in sup  # fp32 is not a tensor-core input


# ----------------------------------------------------------------------------------------------
# GPU tier: Triton and CUDA backends at (reduced) benchmark shapes, fp16/bf16
GPU_SHAPES = [
    # B, H, N, D, group, window, bank, sample rate: SDXL-like (CFG: 2 groups of 4), SD1.5 head dim,
    # Ouroboros SACFA (16 frames, 20% subject tokens, sliding window), Wan-ish D=80/96/160 bank cases
    (8, 20, 1024, 64, 4, -1, None, 0.5),
    (8, 8, 1024, 40, 4, -1, "group", 0.5),
    (16, 12, 1560, 128, 16, 3, "shared", 0.2),
    (4, 4, 300, 80, 2, -1, "group", 0.5),
    (4, 4, 300, 96, 4, 1, None, 0.3),
    (4, 4, 300, 160, 4, -1, "shared", 0.5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,N,D,G,window,bank,rate", GPU_SHAPES)
def test_gpu_backends_match_reference(require_backend, backend, dtype, B, H, N, D, G, window, bank, rate):
    require_backend(OP, backend)
    assert get_backend(OP, backend).supports(*_cuda_args(B, H, N, D, dtype)) is None  # D 40/80/96/160 included
    dev = torch.device("cuda")
    q, k, v, idx, bk, bv = make_inputs(B, H, N, D, int(rate * B * N), G, bank, E=77, dtype=dtype,
                                       transposed=True)
    q, k, v, idx = q.to(dev), k.to(dev), v.to(dev), idx.to(dev)
    bk = bk.to(dev) if bk is not None else None
    bv = bv.to(dev) if bv is not None else None
    with use_backend(backend, op=OP):
        out = consistent_attention(q, k, v, idx, G, window, bk, bv)
    ref = consistent_attention_reference(q, k, v, idx, G, window, bk, bv)
    assert_close(out, ref, backend, dtype, "out")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 17, 70, 129, 200])
@pytest.mark.parametrize("D", [32, 64, 96, 128, 160])
def test_gpu_cuda_partial_query_tiles(require_backend, dtype, N, D):
    """The CUDA forward's query tiles (128 rows = 4 warps x 32 rows for padded D <= 128, 64 rows
    above) at N that leave whole warps, one row tile of a warp, or a single row valid: every row
    against the reference, samples and a bank present."""
    require_backend(OP, "cuda")
    dev = torch.device("cuda")
    B, H, G = 4, 2, 2
    q, k, v, idx, bk, bv = make_inputs(B, H, N, D, max(1, B * N // 3), G, "group", E=7, dtype=dtype)
    q, k, v, idx, bk, bv = (t.to(dev) for t in (q, k, v, idx, bk, bv))
    with use_backend("cuda", op=OP):
        out = consistent_attention(q, k, v, idx, G, -1, bk, bv)
    assert_close(out, consistent_attention_reference(q, k, v, idx, G, -1, bk, bv), "cuda", dtype, f"N={N} D={D}")


def _cuda_args(B, H, N, D, dtype):
    """Small CUDA tensors of the given head dim, for a backend's supports()."""
    q = torch.zeros(B, H, N, D, dtype=dtype, device="cuda")
    return q, q, q, torch.arange(2, device="cuda"), B, -1, None, None, None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 40, 80, 96, 160])
def test_gpu_backward_matches_reference(require_backend, backend, dtype, D):
    require_backend(OP, backend)
    dev = torch.device("cuda")
    B, H, N, G = 8, 4, 520 if D == 64 else 260, 4
    q, k, v, idx, bk, bv = make_inputs(B, H, N, D, B * N // 2, G, "group", E=100, dtype=dtype, transposed=True)
    q, k, v, idx, bk, bv = (t.to(dev) for t in (q, k, v, idx, bk, bv))
    for t in (q, k, v, bk, bv):
        t.requires_grad_()
    with use_backend(backend, op=OP):
        out = consistent_attention(q, k, v, idx, G, 2, bk, bv)
    ref = consistent_attention_reference(q, k, v, idx, G, 2, bk, bv)
    go = torch.randn_like(out)
    ins = (q, k, v, bk, bv)
    with use_backend(backend, op=OP):
        grads = torch.autograd.grad(out, ins, go)
    for name, a, b in zip("q k v bank_k bank_v".split(), grads, torch.autograd.grad(ref, ins, go)):
        scale = b.float().abs().max().clamp_min(1.0)  # summed gradients: tolerance relative to their size
        assert_close(a / scale, b / scale, backend, dtype, f"d{name}", factor=2.0)


def test_benchmark_quick_cases_run():
    from pathlib import Path
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_consistent_attention.py"
    spec = importlib.util.spec_from_file_location("bench_consistent_attention_for_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cases = mod.cases(torch.device("cpu"), quick=True)
    assert cases and all(math.isfinite(c.flops or 0.0) for c in cases)
    for c in cases[:4]:
        c.fn()


def test_benchmark_cases_of_several_shapes_keep_their_own_sizes(monkeypatch):
    """Each case computes on its own shape's tensors and group size, whatever shape came last (the
    first GPU run found the closures of a loop all bound to the last shape's)."""
    from longvideo.benchmarking import load_suite

    mod = load_suite("consistent_attention")
    shapes = [dict(name="a", B=4, G=2, N=16, H=2, D=16, rate=0.5, window=-1),
              dict(name="b", B=3, G=3, N=8, H=1, D=8, rate=0.5, window=-1)]
    monkeypatch.setattr(mod, "_shapes", lambda quick, profile="full": shapes)
    cases = mod.cases(torch.device("cpu"), quick=True)
    assert {c.name.split("_")[0] for c in cases} == {"a", "b"}
    for c in cases:
        if c.name.endswith("_fwd"):
            p = c.params
            out = c.fn()
            assert out.shape[:3] == (p["B"], p["H"], p["N"]), (c.name, c.impl, out.shape)
