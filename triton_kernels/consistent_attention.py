"""Triton kernels of consistent self-attention (StoryDiffusion; Ouroboros' SACFA).

Row ``b`` (an image / frame) attends with ONE online softmax (flash-attention style, float32
statistics) over three key sources, never concatenated in memory:

1. its own N keys ``k[b]``;
2. the sampled tokens of the other images of its group (and window), read IN PLACE from k/v
   through ``sample_idx``. sample_idx is sorted by flat index, i.e. by source image, so the samples
   row b may see are two contiguous runs of sample_idx: the sources before b and those after b,
   clipped to the group and the window. The plan layer's ``segment_table``
   (``longvideo.ops.plan.consistent``) finds the four run ends per row with one
   ``torch.searchsorted`` on the device; the kernel walks both runs as one virtual range and
   gathers whole D-element rows;
3. the bank rows (shared, or one bank per group: a group stride of 0 makes both one code path).

Backward (FA2 formulation, with the forward's float32 lse): ``delta = rowsum(dO * O)``; then
key-side kernels, each walking the queries that see its key tile: dk/dv of the own tokens by key
blocks of each image; the contributions of the queries of OTHER images to the sampled tokens by
tiles of sample_idx (each sample belongs to exactly one tile, so no atomics for dk/dv: a compact
float32 (M, H, D) buffer, added into the own-key blocks through an inverse map token -> sample);
the bank gradient by bank tiles, one float32 partial per group, summed for a shared bank.

dq, fused (the default): each key-side kernel also forms dq's share dS K from the probabilities it
has just recomputed and adds it with float32 atomics into a (B, H, N, D) buffer, scaled and cast
once at the end -- per (query tile, key tile) pair 5 dots (S, dP, dV, dK, dQ) instead of 7 (the
split path's separate dq kernel recomputes S and dP), the exp of the tile once instead of twice.
Cost of the atomics: BLOCK_M x D float32 adds per tile pair against 2 x 5 x BLOCK_M x BLOCK_N x D
flops of dots, i.e. one 4-byte atomic per 10 BLOCK_N = 320-640 flops, the ratio FlashAttention-2's
CUDA backward runs at; the atomics land in L2 and the dq buffer (B H N D x 4 bytes) stays
resident there for the shapes of the benchmark. The order of the float32 adds varies from run to
run: dq is not bitwise deterministic on GPU (within the tolerances). LONGVIDEO_CA_BWD=split (or
``fused=False``) keeps the two-kernel path, for comparison.

Any strides (diffusers hands (B, S, H, D) transposed views); head dims 1..256: the forward takes
the head dim as a compile-time constant split into two powers of two (40 = 32 + 16, 80 = 64 + 16,
96 = 64 + 32, 160 = 128 + 32: two dots instead of one padded to 64 / 128 / 256), the backward pads
to a power of two with masks; fp16/bf16 use tensor cores with fp32 accumulation, fp32 inputs use
``input_precision="ieee"`` dots. Under TRITON_INTERPRET=1 (CPU) bf16 tiles are upcast to fp32
first (the interpreter has no bf16 dot).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from longvideo.ops.plan import consistent as plan

_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# forward
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SIDX, SEG, BK, BV,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                sbkg, sbkh, sbke, sbkd, sbvg, sbvh, sbve, sbvd,
                H, N, E, group_size, qk_scale,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BD0: tl.constexpr,
                BD1: tl.constexpr, HAS_SAMPLES: tl.constexpr, HAS_BANK: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BD0)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < N
    q_rows = Q + b * sqb + h * sqh + offs_m[:, None] * sqn
    q0 = tl.load(q_rows + offs_d0[None, :] * sqd, mask=m_ok[:, None] & (offs_d0[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, BD0], tl.float32)
    if BD1 > 0:
        offs_d1 = BD0 + tl.arange(0, BD1)
        q1 = tl.load(q_rows + offs_d1[None, :] * sqd, mask=m_ok[:, None] & (offs_d1[None, :] < D), other=0.0)
        acc1 = tl.zeros([BLOCK_M, BD1], tl.float32)
    else:
        q1 = q0
        acc1 = acc0

    # 1. own keys (always >= 1 valid column first, so m_i is finite afterwards)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + offs_n
        ok = cols < N
        acc0, acc1, m_i, l_i = _fwd_tile(acc0, acc1, m_i, l_i, q0, q1, K + b * skb + h * skh, V + b * svb + h * svh,
                                         cols.to(tl.int64) * skn, cols.to(tl.int64) * svn, ok, skd, svd, qk_scale,
                                         D, BD0, BD1, DOT_F32)

    # 2. sampled tokens of the other images: two runs of sample_idx walked as one range
    if HAS_SAMPLES:
        lo1 = tl.load(SEG + b * 4)
        hi1 = tl.load(SEG + b * 4 + 1)
        lo2 = tl.load(SEG + b * 4 + 2)
        hi2 = tl.load(SEG + b * 4 + 3)
        len1 = hi1 - lo1
        total = len1 + (hi2 - lo2)
        for t0 in range(0, total, BLOCK_N):
            t = t0 + offs_n
            ok = t < total
            j = tl.where(t < len1, lo1 + t, lo2 + (t - len1))
            idx = tl.load(SIDX + j, mask=ok, other=0).to(tl.int64)
            src = idx // N
            pos = idx - src * N
            # the rows' offsets differ per key (source image and position); the K and V bases are
            # their tensors' (b = 0, h) rows, and the two tensors have their own strides
            acc0, acc1, m_i, l_i = _fwd_tile(acc0, acc1, m_i, l_i, q0, q1, K + h * skh, V + h * svh,
                                             src * skb + pos * skn, src * svb + pos * svn, ok, skd, svd,
                                             qk_scale, D, BD0, BD1, DOT_F32)

    # 3. bank rows (group stride 0 for a shared bank)
    if HAS_BANK:
        g = b // group_size
        for e0 in range(0, E, BLOCK_N):
            cols = e0 + offs_n
            ok = cols < E
            acc0, acc1, m_i, l_i = _fwd_tile(acc0, acc1, m_i, l_i, q0, q1, BK + g * sbkg + h * sbkh,
                                             BV + g * sbvg + h * sbvh, cols.to(tl.int64) * sbke,
                                             cols.to(tl.int64) * sbve, ok, sbkd, sbvd, qk_scale, D, BD0, BD1,
                                             DOT_F32)

    o_rows = O + b * sob + h * soh + offs_m[:, None] * son
    tl.store(o_rows + offs_d0[None, :] * sod, (acc0 / l_i[:, None]).to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d0[None, :] < D))
    if BD1 > 0:
        tl.store(o_rows + offs_d1[None, :] * sod, (acc1 / l_i[:, None]).to(O.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_d1[None, :] < D))
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)


@triton.jit
def _fwd_tile(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, k_off, v_off, col_ok, skd, svd, qk_scale,
              D: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, DOT_F32: tl.constexpr):
    """One online-softmax update of (acc, m_i, l_i) with a (BLOCK_N) tile of keys/values.

    The tile's key rows start at k_base + k_off and its value rows at v_base + v_off (own keys,
    sampled tokens gathered in place, or bank rows). The head dim is split into [0, BD0) and
    [BD0, BD0 + BD1) (BD1 = 0: one part), powers of two covering D with little padding: 40 = 32 +
    16 (8 masked), 80 = 64 + 16, 96 = 64 + 32, 160 = 128 + 32 (a power of two pads 40 to 64 and 160
    to 256: 60% more dot work)."""
    offs_d0 = tl.arange(0, BD0)
    kt0 = tl.load(k_base + k_off[None, :] + offs_d0[:, None] * skd,
                  mask=(offs_d0[:, None] < D) & col_ok[None, :], other=0.0)
    if DOT_F32:
        s = tl.dot(q0.to(tl.float32), kt0.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q0, kt0)
    if BD1 > 0:
        offs_d1 = BD0 + tl.arange(0, BD1)
        kt1 = tl.load(k_base + k_off[None, :] + offs_d1[:, None] * skd,
                      mask=(offs_d1[:, None] < D) & col_ok[None, :], other=0.0)
        if DOT_F32:
            s += tl.dot(q1.to(tl.float32), kt1.to(tl.float32), input_precision="ieee")
        else:
            s += tl.dot(q1, kt1)
    s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v0 = tl.load(v_base + v_off[:, None] + offs_d0[None, :] * svd,
                 mask=col_ok[:, None] & (offs_d0[None, :] < D), other=0.0)
    if DOT_F32:
        acc0 = acc0 * alpha[:, None] + tl.dot(p, v0.to(tl.float32), input_precision="ieee")
    else:
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0)
    if BD1 > 0:
        v1 = tl.load(v_base + v_off[:, None] + offs_d1[None, :] * svd,
                     mask=col_ok[:, None] & (offs_d1[None, :] < D), other=0.0)
        if DOT_F32:
            acc1 = acc1 * alpha[:, None] + tl.dot(p, v1.to(tl.float32), input_precision="ieee")
        else:
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1)
    return acc0, acc1, m_new, l_i


# ----------------------------------------------------------------------------------------------
# backward
@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, son, sod, sgb, sgh, sgn, sgd, H, N, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O (float32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :] * sgd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, col_ok, d_ok, qk_scale, DOT_F32: tl.constexpr):
    """dq += dS K for one tile of keys, dS = P * (dO V^T - delta) (unscaled)."""
    kk = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    vv = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        kk = kk.to(tl.float32)
        vv = vv.to(tl.float32)
        s = tl.dot(q, tl.trans(kk), input_precision="ieee")
        dp = tl.dot(do, tl.trans(vv), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(kk))
        dp = tl.dot(do, tl.trans(vv))
    p = tl.where(col_ok[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
    ds = p * (dp - delta[:, None])
    if DOT_F32:
        dq += tl.dot(ds, kk, input_precision="ieee")
    else:
        dq += tl.dot(ds.to(kk.dtype), kk)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, SIDX, SEG, BK, BV,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
                   sdb, sdh, sdn, sdd,
                   sbkg, sbkh, sbke, sbkd, sbvg, sbvh, sbve, sbvd,
                   H, N, D, E, group_size, scale, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_SAMPLES: tl.constexpr, HAS_BANK: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < N
    d_ok = offs_d < D
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :] * sgd, mask=qd_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for n0 in range(0, N, BLOCK_N):
        cols = n0 + offs_n
        ok = cols < N
        k_ptrs = K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :] * skd
        v_ptrs = V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :] * svd
        dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, ok, d_ok, qk_scale, DOT_F32)
    if HAS_SAMPLES:
        lo1 = tl.load(SEG + b * 4)
        hi1 = tl.load(SEG + b * 4 + 1)
        lo2 = tl.load(SEG + b * 4 + 2)
        hi2 = tl.load(SEG + b * 4 + 3)
        len1 = hi1 - lo1
        total = len1 + (hi2 - lo2)
        for t0 in range(0, total, BLOCK_N):
            t = t0 + offs_n
            ok = t < total
            j = tl.where(t < len1, lo1 + t, lo2 + (t - len1))
            idx = tl.load(SIDX + j, mask=ok, other=0).to(tl.int64)
            src = idx // N
            pos = idx - src * N
            k_ptrs = K + src[:, None] * skb + h * skh + pos[:, None] * skn + offs_d[None, :] * skd
            v_ptrs = V + src[:, None] * svb + h * svh + pos[:, None] * svn + offs_d[None, :] * svd
            dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, ok, d_ok, qk_scale, DOT_F32)
    if HAS_BANK:
        g = b // group_size
        for e0 in range(0, E, BLOCK_N):
            cols = e0 + offs_n
            ok = cols < E
            k_ptrs = BK + g * sbkg + h * sbkh + cols[:, None] * sbke + offs_d[None, :] * sbkd
            v_ptrs = BV + g * sbvg + h * sbvh + cols[:, None] * sbve + offs_d[None, :] * sbvd
            dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, ok, d_ok, qk_scale, DOT_F32)
    tl.store(DQ + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _dkdv_queries(dk, dv, kk, vv, key_vis, Q, DO, LSE, DELTA, DQA, bq, h,
                  sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd, H, N, D, qk_scale,
                  offs_d, d_ok, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    """Accumulate into (dk, dv) of a (BLOCK_N) key tile the contributions of all N queries of image
    bq; key_vis (BLOCK_N) masks the keys those queries do not see. dk is left unscaled.

    DQ_ATOMIC: also add dS K of every query block (unscaled, float32) into DQA (B, H, N, D)
    contiguous with atomics -- the fused backward's dq from the same probabilities (5 dots per tile
    pair instead of 7). Row r = (bq * H + h) * N + i of DQA starts at r * D."""
    offs_mb = tl.arange(0, BLOCK_M)
    row = (bq * H + h) * N
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + offs_mb
        m_ok = offs_m < N
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + bq * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
        do = tl.load(DO + bq * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :] * sgd, mask=qd_mask,
                     other=0.0)
        lse2 = tl.load(LSE + row + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row + offs_m, mask=m_ok, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
            st = tl.dot(kk, tl.trans(q), input_precision="ieee")                # (BLOCK_N, BLOCK_M)
        else:
            st = tl.dot(kk, tl.trans(q))
        pt = tl.where(key_vis[:, None] & m_ok[None, :], tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
        if DOT_F32:
            dv += tl.dot(pt, do, input_precision="ieee")
            dpt = tl.dot(vv, tl.trans(do), input_precision="ieee")
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst, q, input_precision="ieee")
            if DQ_ATOMIC:
                dq = tl.dot(tl.trans(dst), kk, input_precision="ieee")
        else:
            dv += tl.dot(pt.to(do.dtype), do)
            dpt = tl.dot(vv, tl.trans(do))
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q)
            if DQ_ATOMIC:
                dq = tl.dot(tl.trans(dst.to(kk.dtype)), kk)
        if DQ_ATOMIC:
            tl.atomic_add(DQA + (row + offs_m[:, None]).to(tl.int64) * D + offs_d[None, :], dq,
                          mask=qd_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_own_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, INV, DKS, DVS, DQA,
                         sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
                         sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                         H, N, D, scale, qk_scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_SAMPLES: tl.constexpr, DOT_F32: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    """dk/dv of the own tokens of image b from its own queries, plus (through the inverse map)
    the precomputed float32 contributions of the other images' queries to sampled tokens."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    d_ok = offs_d < D
    nd_mask = n_ok[:, None] & d_ok[None, :]
    kk = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd_mask, other=0.0)
    vv = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
    if DOT_F32:
        kk = kk.to(tl.float32)
        vv = vv.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk, dv = _dkdv_queries(dk, dv, kk, vv, n_ok, Q, DO, LSE, DELTA, DQA, b, h,
                           sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd, H, N, D, qk_scale,
                           offs_d, d_ok, BLOCK_M, DOT_F32, DQ_ATOMIC)
    dk = dk * scale
    if HAS_SAMPLES:
        j = tl.load(INV + b * N + offs_n, mask=n_ok, other=-1).to(tl.int64)
        has = j >= 0
        s_off = (j[:, None] * H + h) * D + offs_d[None, :]
        dk += tl.load(DKS + s_off, mask=has[:, None] & d_ok[None, :], other=0.0)
        dv += tl.load(DVS + s_off, mask=has[:, None] & d_ok[None, :], other=0.0)
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _bwd_dkdv_samples_kernel(Q, K, V, DO, LSE, DELTA, SIDX, DKS, DVS, DQA,
                             sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
                             H, N, D, M, n_groups, group_size, window, scale, qk_scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             DOT_F32: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    """For a tile of sample_idx: the gradient its sampled tokens receive from the queries of the
    OTHER images that see them (same group, within the window), into compact (M, H, D) fp32."""
    pid_j = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    j_ok = offs_j < M
    d_ok = offs_d < D
    idx = tl.load(SIDX + offs_j, mask=j_ok, other=0).to(tl.int64)
    src = idx // N
    pos = idx - src * N
    jd_mask = j_ok[:, None] & d_ok[None, :]
    kk = tl.load(K + src[:, None] * skb + h * skh + pos[:, None] * skn + offs_d[None, :] * skd, mask=jd_mask,
                 other=0.0)
    vv = tl.load(V + src[:, None] * svb + h * svh + pos[:, None] * svn + offs_d[None, :] * svd, mask=jd_mask,
                 other=0.0)
    if DOT_F32:
        kk = kk.to(tl.float32)
        vv = vv.to(tl.float32)
    # images whose queries may see some sample of this tile (sources are sorted)
    j_last = tl.minimum(pid_j * BLOCK_N + BLOCK_N, M) - 1
    src_first = tl.load(SIDX + pid_j * BLOCK_N).to(tl.int64) // N
    src_last = tl.load(SIDX + j_last).to(tl.int64) // N
    b_lo = (src_first // group_size) * group_size
    b_hi = (src_last // group_size) * group_size + group_size - 1
    if window >= 0:
        b_lo = tl.maximum(b_lo, src_first - window)
        b_hi = tl.minimum(b_hi, src_last + window)
    g_src = src // group_size
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for bq in range(b_lo, b_hi + 1):
        vis = j_ok & (src != bq) & (g_src == bq // group_size)
        if window >= 0:
            vis = vis & (tl.abs(src - bq) <= window)
        if tl.max(vis.to(tl.int32), 0) > 0:
            dk, dv = _dkdv_queries(dk, dv, kk, vv, vis, Q, DO, LSE, DELTA, DQA, bq, h,
                                   sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd, H, N, D, qk_scale,
                                   offs_d, d_ok, BLOCK_M, DOT_F32, DQ_ATOMIC)
    s_off = (offs_j[:, None].to(tl.int64) * H + h) * D + offs_d[None, :]
    tl.store(DKS + s_off, dk * scale, mask=jd_mask)
    tl.store(DVS + s_off, dv, mask=jd_mask)


@triton.jit
def _bwd_bank_kernel(Q, BK, BV, DO, LSE, DELTA, DBK, DBV, DQA,
                     sqb, sqh, sqn, sqd, sbkg, sbkh, sbke, sbkd, sbvg, sbvh, sbve, sbvd, sgb, sgh, sgn, sgd,
                     H, N, D, E, group_size, scale, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_F32: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    """Gradient of a tile of bank rows from the queries of one group: float32 (G, H, E, D) partials
    (program axis 2 = group; a shared bank has group stride 0 and its partials are summed)."""
    pid_e = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    g = tl.program_id(2).to(tl.int64)
    offs_e = pid_e * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    e_ok = offs_e < E
    d_ok = offs_d < D
    ed_mask = e_ok[:, None] & d_ok[None, :]
    kk = tl.load(BK + g * sbkg + h * sbkh + offs_e[:, None] * sbke + offs_d[None, :] * sbkd, mask=ed_mask, other=0.0)
    vv = tl.load(BV + g * sbvg + h * sbvh + offs_e[:, None] * sbve + offs_d[None, :] * sbvd, mask=ed_mask, other=0.0)
    if DOT_F32:
        kk = kk.to(tl.float32)
        vv = vv.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i in range(0, group_size):
        bq = g * group_size + i
        dk, dv = _dkdv_queries(dk, dv, kk, vv, e_ok, Q, DO, LSE, DELTA, DQA, bq, h,
                               sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd, H, N, D, qk_scale,
                               offs_d, d_ok, BLOCK_M, DOT_F32, DQ_ATOMIC)
    p_off = ((g * H + h) * E + offs_e[:, None]) * D + offs_d[None, :]
    tl.store(DBK + p_off, dk * scale, mask=ed_mask)
    tl.store(DBV + p_off, dv, mask=ed_mask)


# ----------------------------------------------------------------------------------------------
# launch helpers
def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _split_d(D: int) -> tuple[int, int]:
    """(BD0, BD1): the forward's head-dim split, BD0 the largest power of two <= D (at least 16),
    BD1 the power of two (at least 16) covering the rest, 0 when BD0 covers D."""
    bd0 = max(16, 1 << (max(D, 1).bit_length() - 1))
    rest = D - bd0
    return bd0, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def _dot_f32(dtype: torch.dtype) -> bool:
    # fp32 inputs: exact "ieee" dots; bf16 under the CPU interpreter: it has no bf16 dot
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _fwd_config(BD: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward, chosen by the padded head dim
    (BD0 + BD1 of the split)."""
    if _interpreting():
        return 16, 16, 1, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if BD == 48:  # 40 = 32 + 16: two accumulators; 4 warps spill (offline sm_90), 8 do not
        return 128, 64, 8, 2
    if BD <= 64:
        return 128, 64, 4, 3
    if BD <= 128:
        return 128, 64, 8, 2
    return 64, 64, 4, 2


def _bwd_config(BD: int, dtype: torch.dtype, fused: bool = True):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the backward kernels (BLOCK_M: query rows,
    BLOCK_N: key rows of the key-side kernels). Chosen offline (Triton 3.6, sm_90, the report's
    shapes) for no spills in the fused kernels: BD <= 64 64 x 64 with 8 warps (4 warps spill
    8-240 B); BD = 128 32 query rows x 64 keys with 8 warps (64 x 64 spills 64-268 B; the dq dot
    then has M = 32, mma.sync, the other four are wgmma); BD = 256 32 x 32 with 8 warps (mma.sync:
    below wgmma's 64 rows). The split path keeps its earlier tiles."""
    if _interpreting():
        return 16, 16, 1, 1
    if dtype == torch.float32:
        return 32, 32, 4, 1
    if BD <= 64:
        return (64, 64, 8, 2) if fused else (64, 64, 4, 2)
    if BD <= 128:
        return (32, 64, 8, 2) if fused else (64, 64, 8, 2)
    return (32, 32, 8, 1) if fused else (32, 32, 4, 1)  # BD 256 (D 160): 4 warps spill 24 B fused


def _bank_args(bank: torch.Tensor | None, fallback: torch.Tensor):
    """(tensor, [group stride, h stride, e stride, d stride], E) with group stride 0 when shared."""
    if bank is None:
        return fallback, [0, 0, 0, 0], 0
    if bank.dim() == 3:
        return bank, [0, *bank.stride()], bank.shape[1]
    return bank, list(bank.stride()), bank.shape[2]


def consistent_attention_forward(q, k, v, sample_idx, group_size: int, window: int, bank_k, bank_v, scale: float):
    """(out, lse): out laid out like q, lse float32 (B, H, N) natural-log normaliser."""
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    has_samples = plan.has_samples(sample_idx, group_size, window)
    seg = plan.segment_table(sample_idx, B, N, group_size, window) if has_samples else lse
    sidx = sample_idx if has_samples else lse
    bk, sbk, E = _bank_args(bank_k, q)
    bv, sbv, _ = _bank_args(bank_v, q)
    BD0, BD1 = _split_d(D)
    BM, BN, warps, stages = _fwd_config(BD0 + BD1, q.dtype)
    grid = (triton.cdiv(N, BM), B * H)
    _fwd_kernel[grid](q, k, v, out, lse, sidx, seg, bk, bv,
                      *q.stride(), *k.stride(), *v.stride(), *out.stride(), *sbk, *sbv,
                      H, N, E, group_size, scale * _LOG2E,
                      D=D, BLOCK_M=BM, BLOCK_N=BN, BD0=BD0, BD1=BD1, HAS_SAMPLES=has_samples, HAS_BANK=E > 0,
                      DOT_F32=_dot_f32(q.dtype), num_warps=warps, num_stages=stages)
    return out, lse


def _bwd_fused_default() -> bool:
    mode = os.environ.get("LONGVIDEO_CA_BWD", "fused")
    if mode not in BWD_MODES:
        raise ValueError(f"LONGVIDEO_CA_BWD must be one of {BWD_MODES}, got {mode!r}")
    return mode == "fused"


BWD_MODES = ("fused", "split")


def consistent_attention_backward(grad_out, q, k, v, sample_idx, group_size: int, window: int, bank_k, bank_v,
                                  scale: float, out, lse, fused: bool | None = None):
    """(dq, dk, dv, dbank_k, dbank_v) with the forward's out and lse; dbank_* None without a bank.

    fused (default: True unless LONGVIDEO_CA_BWD=split): dq from the key-side kernels' probabilities
    with float32 atomics (5 dots per tile pair); False: the separate dq kernel recomputes them (7)."""
    B, H, N, D = q.shape
    dev = q.device
    BD = _block_d(D)
    if fused is None:
        fused = _bwd_fused_default()
    BM, BN, warps, stages = _bwd_config(BD, q.dtype, fused)
    dot_f32 = _dot_f32(q.dtype)
    qk_scale = scale * _LOG2E
    delta = torch.empty(B, H, N, dtype=torch.float32, device=dev)
    _bwd_delta_kernel[(triton.cdiv(N, 64), B * H)](out, grad_out, delta, *out.stride(), *grad_out.stride(),
                                                    H, N, D, BLOCK_M=64, BLOCK_D=BD)
    has_samples = plan.has_samples(sample_idx, group_size, window)
    bk, sbk, E = _bank_args(bank_k, q)
    bv, sbv, _ = _bank_args(bank_v, q)
    seg = plan.segment_table(sample_idx, B, N, group_size, window) if has_samples else delta
    sidx = sample_idx if has_samples else delta

    dq = torch.empty_like(q)
    # the fused backward's dq accumulator, (B, H, N, D) float32 contiguous; a placeholder otherwise
    dqa = torch.zeros(B, H, N, D, dtype=torch.float32, device=dev) if fused else delta
    if not fused:
        _bwd_dq_kernel[(triton.cdiv(N, BM), B * H)](
            q, k, v, grad_out, dq, lse, delta, sidx, seg, bk, bv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *sbk, *sbv,
            H, N, D, E, group_size, scale, qk_scale,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, HAS_SAMPLES=has_samples, HAS_BANK=E > 0, DOT_F32=dot_f32,
            num_warps=warps, num_stages=stages)

    if has_samples:
        M = sample_idx.numel()
        dks = torch.empty(M, H, D, dtype=torch.float32, device=dev)
        dvs = torch.empty_like(dks)
        _bwd_dkdv_samples_kernel[(triton.cdiv(M, BN), H)](
            q, k, v, grad_out, lse, delta, sample_idx, dks, dvs, dqa,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
            H, N, D, M, B // group_size, group_size, window, scale, qk_scale,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, DOT_F32=dot_f32, DQ_ATOMIC=fused, num_warps=warps,
            num_stages=stages)
        inv = torch.full((B * N,), -1, dtype=torch.int32, device=dev)
        inv[sample_idx.long()] = torch.arange(M, dtype=torch.int32, device=dev)
    else:
        dks = dvs = inv = delta
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _bwd_dkdv_own_kernel[(triton.cdiv(N, BN), B * H)](
        q, k, v, grad_out, dk, dv, lse, delta, inv, dks, dvs, dqa,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        H, N, D, scale, qk_scale,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, HAS_SAMPLES=has_samples, DOT_F32=dot_f32, DQ_ATOMIC=fused,
        num_warps=warps, num_stages=stages)

    dbk = dbv = None
    if bank_k is not None:
        n_groups = B // group_size
        if E > 0:
            pk = torch.empty(n_groups, H, E, D, dtype=torch.float32, device=dev)
            pv = torch.empty_like(pk)
            _bwd_bank_kernel[(triton.cdiv(E, BN), H, n_groups)](
                q, bk, bv, grad_out, lse, delta, pk, pv, dqa,
                *q.stride(), *sbk, *sbv, *grad_out.stride(),
                H, N, D, E, group_size, scale, qk_scale,
                BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, DOT_F32=dot_f32, DQ_ATOMIC=fused, num_warps=warps,
                num_stages=stages)
            if bank_k.dim() == 3:
                pk, pv = pk.sum(0), pv.sum(0)
        else:
            pk = torch.zeros(bank_k.shape, dtype=torch.float32, device=dev)
            pv = torch.zeros_like(pk)
        dbk = torch.empty_like(bank_k)
        dbk.copy_(pk)
        dbv = torch.empty_like(bank_v)
        dbv.copy_(pv)
    if fused:  # after the bank kernel: its queries' dq arrive through the same atomics
        dq.copy_(dqa.mul_(scale))
    return dq, dk, dv, dbk, dbv
