"""tiered_sparse_attention: reference vs external oracles, Triton (interpreter on CPU) and CUDA
vs reference, schedule density vs brute force, op registration (opcheck, torch.compile), errors.

Oracles nobody here wrote: FlexAttention with an equivalent mask_mod (no RoPE), SDPA (dense).
VRPR is checked against an explicit per-band computation written here: one dense masked
attention per (band, sign) with that band's RoPE copies (complex multiplication, independent of
the reference's rotation code), merged exactly by log-sum-exp: the official scheme, no gap.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as Fn

import longvideo.ops as ops
from longvideo.reference.tiered_sparse_attention import (
    tier_mask,
    tiered_sparse_attention_reference as reference,
)

OP = "tiered_sparse_attention"
# the op module (longvideo.ops re-exports the op under the same name)
tsa_mod = importlib.import_module("longvideo.ops.tiered_sparse_attention")
plan = importlib.import_module("longvideo.ops.plan.tiered")
tsa = torch.ops.longvideo.tiered_sparse_attention


def _tol(backend, dtype):
    return ops.get_backend(OP, backend).tolerance(dtype)


def _qkv(B, H, F, T, D, dtype=torch.float32, device="cpu"):
    return [torch.randn(B, H, F * T, D, dtype=dtype, device=device) for _ in range(3)]


def _freqs(R, device="cpu"):
    # Wan-like temporal frequencies: theta^(-2i/d) over the temporal sub-dimension
    return 1.0 / (10000.0 ** (torch.arange(R, dtype=torch.float64, device=device) * 2 / (2 * R))).float()


# --------------------------------------------------------------------------------------------
# external oracles
def _flex(q, k, v, T, L, SF, SW, SK):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, qi, kj):
        fi, fj = qi // T, kj // T
        dist = (fi - fj).abs()
        return (dist < L) | ((dist < SF) & ((qi % T - kj % T).abs() < SW)) | (fj < SK)

    S = q.shape[2]
    bm = create_block_mask(mask_mod, None, None, S, S, device=q.device.type, BLOCK_SIZE=16)
    return flex_attention(q, k, v, block_mask=bm)


def _rope_complex(x, pos, freqs):
    """Rotate pairs (2i, 2i+1) of x[..., :2R] as complex numbers by pos * freqs (test's own RoPE)."""
    r = freqs.numel()
    xc = torch.view_as_complex(x[..., :2 * r].double().reshape(*x.shape[:-1], r, 2).contiguous())
    rot = xc * torch.polar(torch.ones_like(freqs, dtype=torch.float64), pos.double()[..., None] * freqs.double())
    return torch.cat((torch.view_as_real(rot).flatten(-2), x[..., 2 * r:].double()), dim=-1)


def _band_lse_oracle(q, k, v, T, L, SF, SW, SK, freqs, vrpr, scale):
    """FreeLOC's official scheme without its gap: per (band, sign) a dense masked attention with
    that band's RoPE copies of q and k, merged by log-sum-exp."""
    w1, w2, g1, g2, clip = (int(x) for x in vrpr)
    S = q.shape[2]
    f = torch.arange(S) // T
    d = f[:, None] - f[None, :]
    ad = d.abs()
    tiers = tier_mask(S, T, L, SF, SW, SK)
    c1, c2 = w1 - w1 // g1, w2 - w2 // g2 - (w2 - w1) // g1
    bands = [  # (pair selector, q positions, k positions)
        (ad < w1, f, f),
        ((ad >= w1) & (ad < w2) & (d > 0), f // g1 + c1, f // g1),
        ((ad >= w1) & (ad < w2) & (d < 0), f // g1, f // g1 + c1),
        ((ad >= w2) & (d > 0), torch.clamp(f // g2 + c2, max=clip), f // g2),
        ((ad >= w2) & (d < 0), f // g2, torch.clamp(f // g2 + c2, max=clip)),
    ]
    outs, lses = [], []
    for sel, pq, pk in bands:
        m = sel & tiers
        logits = scale * _rope_complex(q, pq, freqs) @ _rope_complex(k, pk, freqs).transpose(-1, -2)
        logits = logits.masked_fill(~m, float("-inf"))
        lse = torch.logsumexp(logits, -1, keepdim=True)
        p = torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
        outs.append(p @ v.double())
        lses.append(lse)
    lse_all = torch.logsumexp(torch.cat(lses, -1), -1, keepdim=True)
    return sum(o * torch.exp(l - lse_all) for o, l in zip(outs, lses))


# --------------------------------------------------------------------------------------------
# reference vs oracles
@pytest.mark.parametrize("T,F,L,SF,SW,SK", [(6, 4, 1, 3, 2, 1), (13, 9, 2, 5, 4, 2), (13, 9, 3, 0, 0, 0)])
def test_reference_matches_flex_attention(T, F, L, SF, SW, SK):
    q, k, v = _qkv(1, 2, F, T, 32)
    out = tsa(q, k, v, T, L, SF, SW, SK)
    ref = _flex(q, k, v, T, L, SF, SW, SK)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_reference_dense_matches_sdpa():
    q, k, v = _qkv(2, 2, 5, 7, 16)
    out = tsa(q, k, v, 7, 5, 0, 0, 0, 0.3)
    torch.testing.assert_close(out, Fn.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)


def test_reference_rope_without_vrpr_matches_rotated_sdpa():
    T, F, D, R = 5, 6, 32, 6
    q, k, v = _qkv(1, 2, F, T, D)
    freqs = _freqs(R)
    f = torch.arange(F * T) // T
    out = tsa(q, k, v, T, F, rope_t_freqs=freqs)  # dense, positions = frame indices
    qr, kr = _rope_complex(q, f, freqs).float(), _rope_complex(k, f, freqs).float()
    torch.testing.assert_close(out, Fn.scaled_dot_product_attention(qr, kr, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,F,L,SF,SW,SK,vrpr", [
    (4, 12, 2, 8, 2, 1, [3, 6, 2, 3, 5]),     # all three bands, clip active
    (6, 9, 9, 0, 0, 1, [2, 4, 2, 2, 8]),      # dense tiers, VRPR only
    (5, 10, 1, 6, 3, 2, [1, 1, 1, 4, 2]),     # W1 == W2: no mid band
])
def test_reference_vrpr_matches_band_lse(T, F, L, SF, SW, SK, vrpr):
    q, k, v = _qkv(1, 2, F, T, 32)
    freqs = _freqs(6)
    out = tsa(q, k, v, T, L, SF, SW, SK, None, freqs, vrpr)
    ref = _band_lse_oracle(q, k, v, T, L, SF, SW, SK, freqs, vrpr, 1 / math.sqrt(32))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------
# Triton (CPU interpreter) vs reference
TRITON_CASES = [
    # T, F, D, L, SF, SW, SK, R, vrpr, dtype, (block_m, block_n)
    (6, 4, 32, 1, 3, 2, 1, 0, None, torch.float32, None),
    (13, 9, 64, 2, 5, 4, 2, 0, None, torch.float32, None),
    (13, 4, 32, 4, 0, 0, 0, 0, None, torch.float16, None),            # dense, no sink
    (6, 9, 32, 2, 6, 3, 3, 8, None, torch.float32, (32, 16)),         # rope, several sink frames
    (13, 9, 64, 2, 9, 4, 1, 11, [2, 4, 2, 3, 3], torch.float32, None),  # VRPR, R not a power of 2
    (6, 9, 32, 3, 6, 3, 0, 4, [1, 3, 1, 2, 4], torch.float16, (16, 32)),
    (6, 4, 32, 1, 3, 2, 1, 16, [1, 2, 1, 2, 2], torch.float32, None),  # 2R == D: no rest tile
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"T{c[0]}F{c[1]}D{c[2]}R{c[7]}{'v' if c[8] else ''}-{str(c[9])[-7:]}")
def test_triton_matches_reference(case):
    T, F, D, L, SF, SW, SK, R, vrpr, dtype, blocks = case
    q, k, v = _qkv(1, 2, F, T, D, dtype)
    freqs = _freqs(R) if R else None
    bm, bn = blocks or (None, None)
    out = tsa_mod.triton_module().tiered_sparse_attention_fwd(
        q, k, v, T, L, SF, SW, SK, None, freqs, vrpr, block_m=bm, block_n=bn)
    ref = reference(q, k, v, T, L, SF, SW, SK, None, freqs, vrpr)
    atol, rtol = _tol("triton", dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


# The head dims the contract names beyond 32/64 (SD1.5 40/80/160, 96): rope + VRPR, fp32, tiny
@pytest.mark.parametrize("D", [40, 80, 96, 160])
def test_triton_head_dims(D):
    T, F, R = 5, 6, min(22, D // 4)
    q, k, v = _qkv(1, 1, F, T, D)
    freqs = _freqs(R)
    vrpr = [1, 3, 1, 2, 4]
    out = tsa_mod.triton_module().tiered_sparse_attention_fwd(
        q, k, v, T, 2, 4, 2, 1, None, freqs, vrpr)
    ref = reference(q, k, v, T, 2, 4, 2, 1, None, freqs, vrpr)
    atol, rtol = _tol("triton", torch.float32)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_cuda_backend_declares_head_dims_it_lacks():
    """The CUDA kernel is instantiated for D = 64 and 128 only (csrc/tiered_sparse_attention_kernels.cu):
    its supports() says so for 40/80/96/160, so an explicit choice raises naming the head dim and
    `auto` skips it (checked on CUDA in test_gpu_head_dims)."""
    sup = ops.get_backend(OP, "cuda").supports
    for D in (40, 80, 96, 160):
        q, k, v = _qkv(1, 1, 2, 4, D, torch.float16)
        assert "head dims 64 and 128" in sup(q, k, v, 4, 1)
    q, k, v = _qkv(1, 1, 2, 4, 64, torch.float16)
    assert sup(q, k, v, 4, 1) is None


def test_triton_strided_and_dispatch():
    """Non-contiguous q/k/v (a (B, S, H, D) buffer viewed as (B, H, S, D), v with a padded head dim)
    through the public op with the triton backend selected; also vs FlexAttention."""
    T, F, H, D = 6, 5, 2, 32
    S = F * T
    buf = torch.randn(3, 1, S, H, D)
    q, k = buf[0].transpose(1, 2), buf[1].transpose(1, 2)
    v = torch.randn(1, H, S, D + 8)[..., 4:4 + D]
    assert not q.is_contiguous() and not v.is_contiguous()
    with ops.use_backend("triton"):
        out = tsa(q, k, v, T, 2, 4, 2, 1, 0.2)
    ref = reference(q, k, v, T, 2, 4, 2, 1, 0.2)
    atol, rtol = _tol("triton", torch.float32)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    flex = _flex(q.contiguous() * (0.2 * math.sqrt(D)), k.contiguous(), v.contiguous(), T, 2, 4, 2, 1)
    torch.testing.assert_close(out, flex, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------
# schedule
def _brute_blocks(S, T, L, SF, SW, SK, bm, bn):
    mask = tier_mask(S, T, L, SF, SW, SK)
    nq, nk = -(-S // bm), -(-S // bn)
    padded = torch.zeros(nq * bm, nk * bn, dtype=torch.bool)
    valid = torch.zeros_like(padded)
    padded[:S, :S] = mask
    valid[:S, :S] = True
    blocks = padded.reshape(nq, bm, nk, bn).permute(0, 2, 1, 3).flatten(2)
    vblocks = valid.reshape(nq, bm, nk, bn).permute(0, 2, 1, 3).flatten(2)
    nonempty = blocks.any(-1)
    # "full" needs every valid element attended and (kernel rule) the key block inside S
    full = (blocks | ~vblocks).all(-1) & nonempty
    full &= ((torch.arange(nk) + 1) * bn <= S)[None, :]
    return mask, nonempty, full


@pytest.mark.parametrize("F,T,L,SF,SW,SK,bm,bn", [
    (9, 13, 2, 5, 4, 2, 16, 16), (6, 30, 1, 4, 7, 1, 16, 32), (11, 5, 3, 7, 2, 0, 32, 16), (4, 40, 4, 0, 0, 1, 16, 16),
    (9, 45, 2, 5, 20, 1, 128, 64), (41, 10, 2, 4, 3, 1, 64, 64),  # the CUDA kernels' blocks (pipelined, legacy)
])
def test_schedule_and_density_vs_brute_force(F, T, L, SF, SW, SK, bm, bn):
    S = F * T
    mask, nonempty, full = _brute_blocks(S, T, L, SF, SW, SK, bm, bn)
    dens = ops.schedule_density(F, T, L, SF, SW, SK, block_m=bm, block_n=bn)
    assert dens["pair_density"] == pytest.approx(mask.sum().item() / S ** 2)
    assert dens["block_density"] == pytest.approx(nonempty.float().mean().item())
    assert dens["full_blocks"] == int(full.sum()) and dens["partial_blocks"] == int((nonempty & ~full).sum())
    sched = plan.build_schedule(S, T, L, SF, SW, SK, bm, bn, "cpu")
    for qb in range(nonempty.shape[0]):
        got_full = set(sched.full_idx[qb, :sched.full_cnt[qb]].tolist())
        got_part = set(sched.part_idx[qb, :sched.part_cnt[qb]].tolist())
        assert got_full == set(torch.nonzero(full[qb]).flatten().tolist())
        assert got_part == set(torch.nonzero(nonempty[qb] & ~full[qb]).flatten().tolist())


@pytest.mark.parametrize("F,T,bm,bn", [(12, 5, 16, 16), (12, 25, 128, 64)])
def test_schedule_vrpr_combos_cover_every_pair(F, T, bm, bn):
    vrpr = [3, 6, 2, 3, 5]
    S = F * T
    sched = plan.build_schedule(S, T, 12, 0, 0, 0, bm, bn, "cpu", vrpr)
    f = torch.arange(S) // T
    d = f[:, None] - f[None, :]
    ad = d.abs()
    cid = torch.where(ad < 3, 0, torch.where(ad < 6, torch.where(d > 0, 1, 2), torch.where(d > 0, 3, 4)))
    for qb in range(sched.num_q_blocks):
        for idx, cnt, combo in ((sched.full_idx, sched.full_cnt, sched.full_combo),
                                (sched.part_idx, sched.part_cnt, sched.part_combo)):
            for e in range(int(cnt[qb])):
                kb, bits = int(idx[qb, e]), int(combo[qb, e])
                present = cid[qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn].unique().tolist()
                assert all((bits >> c) & 1 for c in present)


# --------------------------------------------------------------------------------------------
# token-granular layouts (FreeLOC's released code; tests/test_freeloc_official.py checks them
# against an emulator of that code at the real geometry)
def _token_oracle(q, k, v, T, freqs, token_bands=None, token_tiers=None, stripe_width=0, vrpr=None,
                  sink_rope=None, scale=None):
    """The token layouts written out per call, as the released code computes them: one dense masked
    attention per position pair (test's own complex RoPE), merged by log-sum-exp."""
    S, D = q.shape[2], q.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    f = torch.arange(S) // T
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    t = i - j
    if token_tiers is not None:
        lt, st, k_end, j_start = token_tiers
        near = ((i % T) - (j % T)).abs() < stripe_width
        g, m = sink_rope if sink_rope is not None else (1, 0)
        shifted = f // g + m if sink_rope is not None else f
        grouped = f // g if sink_rope is not None else f
        calls = [((t.abs() <= lt) | ((t.abs() <= st) & (near | (j < k_end))), f, f),
                 ((j < k_end) & (t > st), shifted, grouped),
                 ((j > j_start) & (-t > st), grouped, shifted)]
    else:
        e, b1, b2 = token_bands
        w1, w2, g1, g2, clip, m = vrpr
        far = torch.clamp(f // g2 + w2 - w2 // g2 - (w2 - w1) // g1, max=clip)
        calls = [(t.abs() <= e, f, f), ((t >= b1) & (t < b2), f // g1 + m, f // g1),
                 ((-t >= b1) & (-t < b2), f // g1, f // g1 + m), (t >= b2, far, f // g2), (-t >= b2, f // g2, far)]
    outs, lses = [], []
    for sel, pq, pk in calls:
        logits = scale * _rope_complex(q, pq, freqs) @ _rope_complex(k, pk, freqs).transpose(-1, -2)
        logits = logits.masked_fill(~sel, float("-inf"))
        lse = torch.logsumexp(logits, -1, keepdim=True)
        outs.append(torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))) @ v.double())
        lses.append(lse)
    lse_all = torch.logsumexp(torch.cat(lses, -1), -1, keepdim=True)
    return sum(o * torch.exp(l - lse_all) for o, l in zip(outs, lses))


# (T, F, token_bands, token_tiers, stripe_width, vrpr, sink_rope, blocks)
TOKEN_CASES = [
    (10, 7, [17, 25, 44], None, 0, [3, 5, 2, 3, 4, 1], None, None),
    (10, 7, [9, 13, 31], None, 0, [2, 4, 2, 2, 3, 0], None, (16, 32)),
    (10, 7, None, [13, 31, 12, 47], 2, None, [2, 3], None),
    (9, 8, None, [0, 5, 3, -1], 4, None, [3, 1], (32, 16)),
    (12, 6, None, [19, 40, 14, 50], 3, None, None, None),           # plain positions on every tier
]


@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda c: f"T{c[0]}F{c[1]}{'bands' if c[2] else 'tiers'}")
def test_token_layouts_reference_and_triton_match_oracle(case):
    T, F, bands, tiers, width, vrpr, sink_rope, blocks = case
    torch.manual_seed(3)
    q, k, v = _qkv(1, 2, F, T, 24)
    freqs = _freqs(5)
    local = F if bands is not None else 1
    kw = dict(token_bands=bands, token_tiers=tiers, sink_rope=sink_rope)
    want = _token_oracle(q, k, v, T, freqs, bands, tiers, width, vrpr, sink_rope)
    ref = reference(q, k, v, T, local, 0, width, 0, None, freqs, vrpr, **kw)
    torch.testing.assert_close(ref.double(), want, atol=2e-5, rtol=2e-5)
    bm, bn = blocks or (None, None)
    out = tsa_mod.triton_module().tiered_sparse_attention_fwd(q, k, v, T, local, 0, width, 0, None, freqs, vrpr,
                                                              block_m=bm, block_n=bn, **kw)
    atol, rtol = _tol("triton", torch.float32)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_token_bands_with_frame_tiers_triton_matches_reference():
    """Token bands (and their gap) on top of frame tiers: the two masks combine."""
    torch.manual_seed(4)
    T, F = 10, 7
    q, k, v = _qkv(1, 2, F, T, 24, torch.float16)
    freqs = _freqs(5)
    args = (T, 2, 4, 3, 1, None, freqs, [2, 4, 2, 2, 3])
    ref = reference(q, k, v, *args, token_bands=[9, 13, 31])
    out = tsa_mod.triton_module().tiered_sparse_attention_fwd(q, k, v, *args, token_bands=[9, 13, 31])
    atol, rtol = _tol("triton", torch.float16)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    # the gap is there: the same call without it differs
    assert (reference(q, k, v, *args).float() - ref.float()).abs().max() > 1e-2


def test_wrong_token_edges_fail_the_oracle():
    """The oracle tells token edges from frame edges: frame-granular tiers differ from token tiers."""
    torch.manual_seed(5)
    T, F = 10, 7
    q, k, v = _qkv(1, 2, F, T, 24)
    freqs = _freqs(5)
    want = _token_oracle(q, k, v, T, freqs, token_tiers=[13, 31, 12, 47], stripe_width=2, sink_rope=[2, 3])
    frame_granular = reference(q, k, v, T, 1, 0, 2, 0, None, freqs, token_tiers=[19, 39, 10, 49], sink_rope=[2, 3])
    assert (frame_granular.double() - want).abs().max() > 1e-2


@pytest.mark.parametrize("layout", [
    dict(token_tiers=[13, 31, 12, 47], stripe_width=2, local=1),
    dict(token_tiers=[0, 5, 3, -1], stripe_width=4, local=1),
    dict(token_bands=[17, 25, 44], stripe_width=0, local=7),
    dict(token_bands=[9, 13, 31], stripe_width=3, local=2, stripe=4, sink=1),
])
@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 16), (16, 64), (128, 64)])
def test_token_schedule_and_pair_count_vs_brute_force(layout, bm, bn):
    """Block schedule of the token layouts: every attended pair is in a visited block with its combo
    listed, 'full' blocks are wholly attended; the pair count equals the mask's."""
    from longvideo.reference.tiered_sparse_attention import pair_classes

    T, F = 10, 7
    S = F * T
    tiers, bands = layout.get("token_tiers"), layout.get("token_bands")
    vrpr = [2, 4, 2, 2, 3] if bands else None
    frame = (layout["local"], layout.get("stripe", 0), layout["stripe_width"], layout.get("sink", 0))
    mask, combo = pair_classes(torch.arange(S), torch.arange(S), T, *frame, vrpr=vrpr, token_bands=bands,
                               token_tiers=tiers)
    if frame[0] >= F or tiers is not None:
        assert plan.token_pair_count(F, T, frame[2], bands, tiers) == int(mask.sum())
    sched = plan.build_schedule(S, T, *frame, bm, bn, "cpu", vrpr, token_bands=bands, token_tiers=tiers)
    for qb in range(sched.num_q_blocks):
        fulls = set(sched.full_idx[qb, :sched.full_cnt[qb]].tolist())
        visited = {}
        for idx, cnt, cmb in ((sched.full_idx, sched.full_cnt, sched.full_combo),
                              (sched.part_idx, sched.part_cnt, sched.part_combo)):
            for e in range(int(cnt[qb])):
                visited[int(idx[qb, e])] = int(cmb[qb, e])
        for kb in range((S + bn - 1) // bn):
            sub = mask[qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn]
            if kb in fulls:
                assert sub.all()
            if sub.any():
                assert kb in visited
                present = combo[qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn][sub].unique().tolist()
                assert all((visited[kb] >> c) & 1 for c in present)


# --------------------------------------------------------------------------------------------
# registration, compile, errors
def test_opcheck():
    q, k, v = _qkv(1, 2, 4, 6, 16)
    torch.library.opcheck(tsa.default, (q, k, v, 6, 1, 3, 2, 1), {})
    torch.library.opcheck(tsa.default, (q, k, v, 6, 2, 4, 3, 1),
                          {"scale": 0.2, "rope_t_freqs": _freqs(4), "vrpr": [1.0, 3.0, 1.0, 2.0, 3.0]})
    torch.library.opcheck(tsa.default, (q, k, v, 6, 1, 0, 2, 0),
                          {"rope_t_freqs": _freqs(4), "token_tiers": [7, 13, 6, 17], "sink_rope": [2, 1]})
    torch.library.opcheck(tsa.default, (q, k, v, 6, 4, 0, 0, 0),
                          {"rope_t_freqs": _freqs(4), "vrpr": [1.0, 3.0, 1.0, 2.0, 3.0, 1.0],
                           "token_bands": [5, 8, 15]})


def test_not_differentiable_backward_raises_clearly():
    """No backward kernel: a forward under grad mode works (and returns a tensor in the graph); a
    backward through it raises saying the op is not differentiable."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 2, 4, 6, 16))
    out = tsa(q, k, v, 6, 1)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="tiered_sparse_attention is not differentiable"):
        out.sum().backward()


def test_torch_compile_fullgraph():
    q, k, v = _qkv(1, 2, 4, 6, 16)
    freqs = _freqs(4)

    def f(q, k, v):
        return tsa(q * 2, k, v, 6, 2, 4, 3, 1, None, freqs, [1.0, 3.0, 1.0, 2.0, 3.0]) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


@pytest.mark.parametrize("kwargs,match", [
    (dict(frame_tokens=7), "frame_tokens"),
    (dict(local_frames=0), "local_frames"),
    (dict(stripe_frames=-1), "stripe_frames"),
    (dict(sink_frames=-2), "sink_frames"),
    (dict(rope_t_freqs=torch.ones(9), vrpr=[2.0, 1.0, 1.0, 1.0, 4.0]), "rope_t_freqs"),
    (dict(rope_t_freqs=torch.ones(4), vrpr=[3.0, 2.0, 1.0, 1.0, 4.0]), "W1"),
    (dict(rope_t_freqs=torch.ones(4), vrpr=[1.0, 2.0, 0.0, 1.0, 4.0]), "G1"),
    (dict(rope_t_freqs=torch.ones(4), vrpr=[1.0, 2.5, 1.0, 1.0, 4.0]), "integers"),
    (dict(vrpr=[1.0, 2.0, 1.0, 1.0, 4.0]), "requires rope_t_freqs"),
    (dict(rope_t_freqs=torch.ones(4), vrpr=[1.0, 2.0, 1.0, 1.0, 4.0, 1.0, 2.0]), "vrpr must be"),
    (dict(token_bands=[1, 2, 3]), "require vrpr"),
    (dict(rope_t_freqs=torch.ones(4), vrpr=[1.0, 2.0, 1.0, 1.0, 4.0], token_bands=[3, 2, 5]), "0 <= E < B1"),
    (dict(rope_t_freqs=torch.ones(4), vrpr=[1.0, 2.0, 1.0, 1.0, 4.0], token_bands=[1, 2]), "token_bands must be"),
    (dict(token_tiers=[3, 2, 1, 5], sink_frames=0), "0 <= L <= St"),
    (dict(token_tiers=[3, 6, 1, 5], sink_frames=1), "replace the frame tiers"),
    (dict(token_tiers=[3, 6, 1, 5], sink_frames=0, rope_t_freqs=torch.ones(4), vrpr=[1.0, 2.0, 1.0, 1.0, 4.0]),
     "do not combine"),
    (dict(token_tiers=[3, 6, 1.5, 5], sink_frames=0), "token_tiers"),  # the schema names it
    (dict(sink_rope=[2, 3]), "requires token_tiers"),
    (dict(token_tiers=[3, 6, 1, 5], sink_frames=0, rope_t_freqs=torch.ones(4), sink_rope=[0, 3]), "group G"),
])
def test_bad_inputs_raise(kwargs, match):
    q, k, v = _qkv(1, 2, 4, 6, 16)
    args = dict(frame_tokens=6, local_frames=1)
    args.update(kwargs)
    with pytest.raises((ValueError, RuntimeError), match=match):
        tsa(q, k, v, **args)


def test_bad_tensors_raise():
    q, k, v = _qkv(1, 2, 4, 6, 16)
    with pytest.raises(ValueError, match="k dtype"):
        tsa(q, k.half(), v, 6, 1)
    with pytest.raises(ValueError, match="k shape"):
        tsa(q, k[:, :1], v, 6, 1)
    with pytest.raises(ValueError, match="q must be a 4-D"):
        tsa(q[0], k, v, 6, 1)


# --------------------------------------------------------------------------------------------
# GPU tier: real shapes (LONGVIDEO_TEST_GPU=1 on a CUDA machine)
GPU_CASES = [
    # F, L, SF, SW, SK, vrpr, dtype
    (21, 21, 0, 0, 1, None, torch.bfloat16),                 # dense: the trained length
    (41, 8, 24, 195, 1, None, torch.bfloat16),
    (41, 8, 24, 195, 1, "rope", torch.float16),
    (9, 3, 6, 195, 2, [2, 4, 2, 2, 5], torch.bfloat16),      # VRPR, every band present
    (21, 8, 24, 195, 1, [12, 20, 2, 8, 20], torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"F{c[0]}-{c[5] if isinstance(c[5], str) else ('vrpr' if c[5] else 'plain')}-{str(c[6])[-4:]}")
def test_gpu_backends_match_reference(require_backend, backend, case):
    F, L, SF, SW, SK, vrpr, dtype = case
    T, D, dev = 1560, 128, torch.device("cuda")
    require_backend(OP, backend)
    q, k, v = _qkv(1, 2, F, T, D, dtype, dev)
    freqs = _freqs(22, dev) if vrpr is not None else None
    vr = vrpr if isinstance(vrpr, list) else None
    with ops.use_backend(backend, op=OP):
        out = tsa(q, k, v, T, L, SF, SW, SK, None, freqs, vr)
    ref = reference(q, k, v, T, L, SF, SW, SK, None, freqs, vr)
    atol, rtol = _tol(backend, dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_strided_d64(require_backend, backend):
    require_backend(OP, backend)
    T, F, H, D = 1560, 12, 3, 64
    buf = torch.randn(3, 1, F * T, H, D, device="cuda", dtype=torch.float16)
    q, k, v = (buf[i].transpose(1, 2) for i in range(3))
    freqs = _freqs(10, "cuda")
    with ops.use_backend(backend, op=OP):
        out = tsa(q, k, v, T, 3, 8, 195, 1, None, freqs, [4.0, 6.0, 2.0, 4.0, 7.0])
    ref = reference(q, k, v, T, 3, 8, 195, 1, None, freqs, [4.0, 6.0, 2.0, 4.0, 7.0])
    atol, rtol = _tol(backend, torch.float16)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [40, 80, 96, 160])
def test_gpu_head_dims(require_backend, backend, dtype, D):
    """Head dims 40/80/96/160 (SD1.5, Wan-like) with tiers, temporal RoPE and VRPR, a frame size that is
    no multiple of the block. The CUDA kernel declares these head dims unsupported (supports(): D in
    {64, 128} only): then the explicit choice must raise a RuntimeError naming the head dim, and `auto`
    must fall back to a backend that supports it and match the reference."""
    require_backend(OP, backend)
    T, F, H, dev = 195, 9, 2, torch.device("cuda")
    q, k, v = _qkv(1, H, F, T, D, dtype, dev)
    freqs = _freqs(min(22, D // 4), dev)
    args = (T, 3, 6, 24, 1, None, freqs, [2.0, 4.0, 2.0, 2.0, 5.0])
    ref = reference(q, k, v, *args)
    be = ops.get_backend(OP, backend)
    declared = be.supports(q, k, v, *args)
    if declared is not None:
        assert backend == "cuda" and "head dim" in declared, declared
        with ops.use_backend(backend, op=OP), pytest.raises(RuntimeError, match="head dim"):
            tsa(q, k, v, *args)
        with ops.use_backend("auto", op=OP):
            chosen = ops.select(OP, q.device, q, k, v, *args)
            out = tsa(q, k, v, *args)
        assert chosen.name != "cuda" and chosen.name != "reference", chosen.name  # falls back to triton
        atol, rtol = _tol(chosen.name, dtype)
    else:
        with ops.use_backend(backend, op=OP):
            out = tsa(q, k, v, *args)
        atol, rtol = _tol(backend, dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_vrpr_41_frames_bf16(require_backend, backend):
    """bf16 VRPR at 41 latent frames with the benchmark's FreeLOC tiers and VRPR[41] =
    [12, 20, 2, 8, 20] (every band present, clip active) and Wan's temporal RoPE frequencies
    (22 pairs of a 128 head dim), at a small frame (48 tokens) so the dense reference is cheap."""
    require_backend(OP, backend)
    T, F, H, D, dev, dtype = 48, 41, 2, 128, torch.device("cuda"), torch.bfloat16
    q, k, v = _qkv(1, H, F, T, D, dtype, dev)
    freqs = _freqs(22, dev)
    args = (T, 8, 24, 6, 1, None, freqs, [12.0, 20.0, 2.0, 8.0, 20.0])
    with ops.use_backend(backend, op=OP):
        out = tsa(q, k, v, *args)
    ref = reference(q, k, v, *args)
    atol, rtol = _tol(backend, dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    # the case can fail: the same tiers with plain frame-index RoPE (no VRPR) fail the same check
    # (on the H200: max |plain - ref| 0.17 against atol 0.02)
    plain = reference(q, k, v, *args[:-1], None)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(plain.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mode", ["vrpr", "tsa"])
@pytest.mark.parametrize("F", [41, 81])
def test_gpu_token_layouts_match_reference(require_backend, backend, mode, F):
    """FreeLOC's official layouts (what semantics="official" passes at 48 tokens per frame: token
    edges rounded to 128, a band gap, the re-encoded far sink, late keys at 81 frames), bf16, D 128
    with Wan's 22 temporal pairs, against the reference."""
    from longvideo.methods.freeloc import derive_params

    require_backend(OP, backend)
    T, H, D, dev, dtype = 48, 2, 128, torch.device("cuda"), torch.bfloat16
    q, k, v = _qkv(1, H, F, T, D, dtype, dev)
    freqs = _freqs(22, dev)
    kw = derive_params(F, 21).settings(mode, T).op_kwargs()
    args = (T, kw.pop("local_frames"), kw.pop("stripe_frames"), kw.pop("stripe_width"), kw.pop("sink_frames"), None,
            freqs)
    with ops.use_backend(backend, op=OP):
        out = tsa(q, k, v, *args, **kw)
    ref = reference(q, k, v, *args, **kw)
    atol, rtol = _tol(backend, dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("vrpr", [[3, 6, 2, 3, 5], [1, 1, 1, 4, 2], None])
def test_split_schedule_lists_each_band_of_each_block_pair_once(vrpr):
    """The Triton kernel's schedule (one combo per entry): for every block pair, its entries carry
    exactly the combos of the bitmask schedule, each once; an entry stays full only when its pair
    is full and lies in one band."""
    args = (12 * 7, 7, 2, 8, 3, 1, 16, 16, "cpu", vrpr)
    plain = plan.build_schedule(*args)
    split = plan.build_schedule(*args, split_combos=True)

    def entries(idx, cnt, combo, is_split):
        out = {}
        for qb in range(idx.shape[0]):
            for e in range(int(cnt[qb])):
                key = (qb, int(idx[qb, e]))
                c = int(combo[qb, e])
                out.setdefault(key, []).append(1 << c if is_split else c)
        return out

    full_p = entries(plain.full_idx, plain.full_cnt, plain.full_combo, False)
    part_p = entries(plain.part_idx, plain.part_cnt, plain.part_combo, False)
    full_s = entries(split.full_idx, split.full_cnt, split.full_combo, True)
    part_s = entries(split.part_idx, split.part_cnt, split.part_combo, True)
    bitmask = {k: v[0] for k, v in {**full_p, **part_p}.items()}
    seen = {}
    for k, bits in list(full_s.items()) + list(part_s.items()):
        seen.setdefault(k, []).extend(bits)
    assert set(seen) == set(bitmask)
    for k, bits in seen.items():
        assert len(bits) == len(set(bits)) and sum(bits) == bitmask[k], (k, bits, bitmask[k])
    for k, bits in full_s.items():
        assert k in full_p and bin(bitmask[k]).count("1") == 1


# --------------------------------------------------------------------------------------------
# the CUDA kernels (pipelined default and legacy, LONGVIDEO_TSA_CUDA), GPU tier: partial query
# tiles, every layout, D 64 / 128, fp16 / bf16, and the NaN rule for masked v rows
CUDA_LAYOUTS = ["plain", "rope", "vrpr", "official_vrpr", "official_tsa"]


def _cuda_layout_args(layout, T, F, D, device):
    """(positional args after q, k, v; keyword args) of one layout: the frame tiers (plain, with
    temporal RoPE, with VRPR) or FreeLOC's official token layouts (derive_params at F frames)."""
    freqs = _freqs(min(22, D // 4), device)  # Wan's 22 temporal pairs at D 128
    if layout == "plain":
        return (T, 2, 4, 3, 1, None, None, None), {}
    if layout == "rope":
        return (T, 2, 4, 3, 1, None, freqs, None), {}
    if layout == "vrpr":
        return (T, 2, 4, 3, 1, None, freqs, [2.0, 4.0, 2.0, 2.0, 5.0]), {}
    from longvideo.methods.freeloc import derive_params

    kw = derive_params(F, 21).settings(layout.split("_")[1], T).op_kwargs()
    return (T, kw.pop("local_frames"), kw.pop("stripe_frames"), kw.pop("stripe_width"), kw.pop("sink_frames"), None,
            freqs), kw


def test_cuda_kernel_choice_from_environment(monkeypatch):
    monkeypatch.delenv("LONGVIDEO_TSA_CUDA", raising=False)
    assert tsa_mod.cuda_kernel_choice() == "pipelined"
    assert tsa_mod.CUDA_KERNELS["pipelined"] == (1, 128) and tsa_mod.CUDA_KERNELS["legacy"] == (0, 64)
    monkeypatch.setenv("LONGVIDEO_TSA_CUDA", "legacy")
    assert tsa_mod.cuda_kernel_choice() == "legacy"
    monkeypatch.setenv("LONGVIDEO_TSA_CUDA", "fast")
    with pytest.raises(ValueError, match="LONGVIDEO_TSA_CUDA"):
        tsa_mod.cuda_kernel_choice()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["pipelined", "legacy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("layout", CUDA_LAYOUTS)
def test_gpu_cuda_kernels_partial_query_tiles(require_backend, monkeypatch, kernel, dtype, D, layout):
    """Both CUDA kernels against the reference where the last query tile is partial: S = 410 (26
    rows of the last 128-row tile: warp 0 only, half of its second row tile empty) and S = 63 (one
    tile, warps 2 and 3 idle), B = 2 (batch offsets). A wrong fragment layout fails the same check:
    the output with rows g and g + 8 of every 16-row tile swapped."""
    require_backend(OP, "cuda")
    monkeypatch.setenv("LONGVIDEO_TSA_CUDA", kernel)
    dev = torch.device("cuda")
    for T, F in [(10, 41)] + ([] if layout.startswith("official") else [(7, 9)]):
        args, kw = _cuda_layout_args(layout, T, F, D, dev)
        q, k, v = _qkv(2, 2, F, T, D, dtype, dev)
        with ops.use_backend("cuda", op=OP):
            out = tsa(q, k, v, *args, **kw)
        ref = reference(q, k, v, *args, **kw)
        atol, rtol = _tol("cuda", dtype)
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
        rows = torch.arange(F * T, device=dev)
        swapped = torch.where((rows ^ 8) < F * T, rows ^ 8, rows)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(out[:, :, swapped].float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["pipelined", "legacy"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("layout", ["plain", "vrpr", "official_vrpr", "official_tsa"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_gpu_cuda_nan_rule_masked_v_rows(require_backend, monkeypatch, kernel, D, layout, value):
    """The op's NaN rule (docs/ops.md) on the CUDA backend: a NaN/inf in v[j] (whole rows and single
    channels) makes out[i, c] non-finite exactly where query i attends key j, as in the reference.
    The pipelined kernel must match the reference's non-finite positions; the legacy kernel is the
    deliberately wrong variant (0 * NaN inside partial blocks): its non-finite set contains the
    reference's and, on the frame tiers (masked keys of visited partial blocks are certain there:
    the stripe tier), is strictly larger."""
    require_backend(OP, "cuda")
    monkeypatch.setenv("LONGVIDEO_TSA_CUDA", kernel)
    dev = torch.device("cuda")
    T, F = 10, 41
    args, kw = _cuda_layout_args(layout, T, F, D, dev)
    q, k, v = _qkv(1, 2, F, T, D, torch.bfloat16, dev)
    for h, tok, ch in [(0, 133, None), (0, 257, 3), (1, 390, None), (1, 14, D - 1)]:
        v[0, h, tok, slice(None) if ch is None else ch] = value
    with ops.use_backend("cuda", op=OP):
        out = tsa(q, k, v, *args, **kw)
    ref = reference(q, k, v, *args, **kw)
    got, exp = ~torch.isfinite(out), ~torch.isfinite(ref)
    assert exp.any() and not exp.all()
    if kernel == "pipelined":
        assert torch.equal(got, exp), (int((got & ~exp).sum()), int((exp & ~got).sum()))
        atol, rtol = _tol("cuda", torch.bfloat16)
        torch.testing.assert_close(out[~exp].float(), ref[~exp].float(), atol=atol, rtol=rtol)
    else:
        assert bool((got | ~exp).all()), "legacy: every non-finite output of the reference is non-finite"
        if not layout.startswith("official"):
            assert int((got & ~exp).sum()) > 0, "legacy: the known gap should show on the frame tiers"
