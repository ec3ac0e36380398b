"""Triton forward of ``tiered_sparse_attention``: block-sparse flash attention over a block
schedule, FreeLOC's temporal RoPE re-encoding (VRPR) from pre-rotated copies of q and k.

One program per (query block, batch*head). It visits only the key blocks of its schedule row:
first the *full* ones (every element attended: no element mask), then the *partial* ones (a
tier edge, a sink edge or the sequence end falls inside: the element mask is applied). Softmax
is online (flash attention) in float32 with exp2.

Temporal RoPE: channels [0, 2R) of q and k are the unrotated temporal pairs. Since
<rot(q, a), rot(k, b)> depends on a - b only, the band of a (query, key) pair just picks which
position "variant" rotates q and which rotates k (five variants with VRPR, one without). Before
the attention kernel, ``_rotate_variants_kernel`` writes every variant of the temporal tile of q
and of k once (channels [0, RP): the 2R rotated ones, then identity channels up to the power of
two RP), in the dot dtype. The attention kernel then never rotates. Its schedule is built with
one combo per entry (``longvideo.ops.plan.tiered.build_schedule(split_combos=True)``): a block
pair inside one band is a plain dot of q's variant and k's variant for that band; a block pair
that spans a band edge is listed once per band present, as partial entries masked to their band,
and the online softmax folds them like any other visits. The temporal channels [0, RP) and the rest [RP, D) are
separate dots, so the re-encoding costs no more tensor-core work than the dense dot.

Why pre-rotated copies (measured on an H200, 41 latent frames x 1560 tokens, bf16, D 128): the
in-kernel rotation held q's temporal tile and its pair-swapped copy in float32 for the whole row,
rotated k twice per visit and spilled ~2.6 KB per thread; it ran at 47 TFLOP/s on the attended
pairs against 276 for the same tiers without RoPE. The copies cost 2 x variants x B*H*S*RP
elements of extra memory (bf16, 41 frames, 12 heads: 0.98 GB; 81 frames: 1.9 GB) and one
elementwise pass that reads q and k's temporal channels once and writes each variant once.

NaN/inf (the op's rule: a key that query i does not attend never reaches out[i]): masked scores
are replaced by -inf with a where. A partial visit's masked keys have p = 0, and 0 * NaN/inf in
their v rows would reach every query of the block through the dot, so partial visits feed v's
NaN/inf values to the dot as 0; afterwards ``_nonfinite_fixup_kernel`` adds the attended ones to
the output, for the query blocks whose partial entries hit a key block that the prepass
``_nonfinite_key_blocks_kernel`` flagged (both cost one read of v and a scan of the schedule when
v is finite). Full visits attend every key of their block: their plain dot already follows the rule.

No torch.library code here (the op module registers this as a backend).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from longvideo.ops.plan import tiered as plan


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@triton.jit
def _rotate_variants_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, S, F, D, R2, frame_tokens,
                            stride_xb, stride_xh, stride_xn, stride_xd, H, out_var_stride,
                            NV: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr):
    """out[v, b, h, s, c] = x[b, h, s, c] * COS[v, f(s), c] + x[b, h, s, c ^ 1] * SIN[v, f(s), c]
    for c < RP (COS = 1, SIN = 0 past the 2R rotated channels: identity), in out's dtype."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_c = tl.arange(0, RP)
    n_ok = offs_n < S
    x_base = x_ptr + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = tl.load(x_base + offs_n[:, None] * stride_xn + offs_c[None, :] * stride_xd,
                mask=n_ok[:, None] & (offs_c[None, :] < D), other=0.0).to(tl.float32)
    x_sw = tl.load(x_base + offs_n[:, None] * stride_xn + (offs_c ^ 1)[None, :] * stride_xd,
                   mask=n_ok[:, None] & (offs_c[None, :] < R2), other=0.0).to(tl.float32)
    frame = tl.minimum(offs_n // frame_tokens, F - 1)
    out_row = (pid_bh.to(tl.int64) * S + offs_n)[:, None] * RP + offs_c[None, :]
    for v in tl.static_range(NV):
        tab = (v * F + frame)[:, None] * RP + offs_c[None, :]
        rot = x * tl.load(cos_ptr + tab) + x_sw * tl.load(sin_ptr + tab)
        tl.store(out_ptr + v * out_var_stride + out_row, rot.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _pair_keep(offs_m, offs_n, f_q, p_q, c, S, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
               w1, w2, te0, te1, te2, te3, LAYOUT: tl.constexpr, VRPR: tl.constexpr):
    """(len(offs_m), len(offs_n)) bool: query offs_m[a] attends key offs_n[b] in this entry (its
    layout's mask, keys past S excluded; with combos, only the pairs of the entry's combo c)."""
    n_ok = offs_n < S
    f_k = offs_n // frame_tokens
    p_k = offs_n % frame_tokens
    near_p = tl.abs(p_q[:, None] - p_k[None, :]) < stripe_width
    if LAYOUT == 2:
        # token tiers [L, St, K, J] = (te0, te1, te2, te3): FreeLOC's released TSA masks
        t = offs_m[:, None] - offs_n[None, :]
        a = tl.abs(t)
        in_sink = offs_n[None, :] < te2
        far_sink = in_sink & (t > te1)
        late = (offs_n[None, :] > te3) & (-t > te1)
        keep = (a <= te0) | ((a <= te1) & (near_p | in_sink)) | far_sink | late
        keep = keep & n_ok[None, :]
        if VRPR:  # combo 1: far sink, 2: late keys, 0: the rest
            band = tl.where(far_sink, 1, tl.where(late, 2, 0))
            keep = keep & (band == c)
    else:
        dist = tl.abs(f_q[:, None] - f_k[None, :])
        keep = (dist < local_frames) | (f_k[None, :] < sink_frames)
        keep = keep | ((dist < stripe_frames) & near_p)
        keep = keep & n_ok[None, :]
        if LAYOUT == 1:
            # token bands [E, B1, B2] = (te0, te1, te2): no pair with E < |t| < B1 (the gap)
            t = offs_m[:, None] - offs_n[None, :]
            a = tl.abs(t)
            keep = keep & ((a <= te0) | (a >= te1))
            if VRPR:
                band = tl.where(a <= te0, 0, tl.where(a < te2, tl.where(t > 0, 1, 2), tl.where(t > 0, 3, 4)))
                keep = keep & (band == c)
        elif VRPR:  # this entry's band only (a block pair spanning band edges is one entry per band)
            d = f_q[:, None] - f_k[None, :]
            band = tl.where(dist < w1, 0, tl.where(dist < w2, tl.where(d > 0, 1, 2), tl.where(d > 0, 3, 4)))
            keep = keep & (band == c)
    return keep


@triton.jit
def _is_nonfinite(x):
    """x is NaN or +-inf: its exponent bits all ones (a bit test in x's own width, immune to fast-math)."""
    if x.dtype.is_bf16():
        return (x.to(tl.int16, bitcast=True) & 0x7F80) == 0x7F80
    elif x.dtype.is_fp16():
        return (x.to(tl.int16, bitcast=True) & 0x7C00) == 0x7C00
    else:
        return (x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000


@triton.jit
def _add_nonfinite_terms(acc, kb, c, v_base, stride_vn, stride_vd, offs_m, f_q, p_q, S, frame_tokens, local_frames,
                         stripe_frames, stripe_width, sink_frames, w1, w2, te0, te1, te2, te3, DV,
                         BLOCK_N: tl.constexpr, DVP: tl.constexpr, LAYOUT: tl.constexpr, VRPR: tl.constexpr):
    """acc[a, ch] + v[j, ch] for every key j of block kb that query offs_m[a] attends in this entry
    and whose v[j, ch] is NaN or +-inf, one key at a time. The partial visit fed those values to
    the dot as 0; added here, an attended NaN makes acc NaN and an attended inf makes it inf (or
    NaN next to an opposite inf), whatever the finite terms, as IEEE p * v would (p > 0). A masked
    key is never added (where-selection)."""
    offs_v = tl.arange(0, DVP)
    for j in tl.range(0, BLOCK_N, loop_unroll_factor=1):  # rare path: no unrolled copies
        key = kb * BLOCK_N + j
        keep_j = _pair_keep(offs_m, key + tl.zeros([1], dtype=tl.int32), f_q, p_q, c, S, frame_tokens, local_frames,
                            stripe_frames, stripe_width, sink_frames, w1, w2, te0, te1, te2, te3, LAYOUT, VRPR)
        v_j = tl.load(v_base + key * stride_vn + offs_v * stride_vd, mask=offs_v < tl.where(key < S, DV, 0),
                      other=0.0).to(tl.float32)
        v_j = tl.where(_is_nonfinite(v_j), v_j, 0.0)
        acc += tl.where(keep_j, v_j[None, :], 0.0)
    return acc


@triton.jit
def _visit(acc, m_i, l_i, q_r, q_t0, idx_ptr, combo_ptr, e,
           k_base, v_base, qt_ptr, kt_ptr, stride_kn, stride_kd, stride_vn, stride_vd, var_stride,
           offs_m, m_ok, f_q, p_q, S, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
           w1, w2, te0, te1, te2, te3, D, DV, qk_scale,
           BLOCK_N: tl.constexpr, RP: tl.constexpr, SPLIT: tl.constexpr, DR: tl.constexpr, DVP: tl.constexpr,
           HAS_ROPE: tl.constexpr, HAS_REST: tl.constexpr, VRPR: tl.constexpr, PARTIAL: tl.constexpr,
           LAYOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, GUARD_V: tl.constexpr):
    """Fold one key block into the running (acc, m_i, l_i) of a query block."""
    kb = tl.load(idx_ptr + e)
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < S
    c = 0
    s = tl.zeros([q_r.shape[0], BLOCK_N], dtype=tl.float32)
    if HAS_REST:
        offs_r = SPLIT + tl.arange(0, DR)
        k_r = tl.load(k_base + offs_n[:, None] * stride_kn + offs_r[None, :] * stride_kd,
                      mask=n_ok[:, None] & (offs_r[None, :] < D), other=0.0)
        if IEEE:
            s += tl.dot(q_r, tl.trans(k_r), input_precision="ieee")
        else:
            s += tl.dot(q_r, tl.trans(k_r))
    if HAS_ROPE:
        offs_t = tl.arange(0, RP)
        if VRPR:
            # one combo per entry (split schedule): q's variant c against k's variant (0, 2, 1, 4, 3)[c]
            c = tl.load(combo_ptr + e)
            kv = c + (c == 1).to(tl.int32) - (c == 2).to(tl.int32) + (c == 3).to(tl.int32) - (c == 4).to(tl.int32)
            q_v = tl.load(qt_ptr + c.to(tl.int64) * var_stride + offs_m[:, None] * RP + offs_t[None, :],
                          mask=m_ok[:, None], other=0.0)
            k_v = tl.load(kt_ptr + kv.to(tl.int64) * var_stride + offs_n[:, None] * RP + offs_t[None, :],
                          mask=n_ok[:, None], other=0.0)
        else:  # plain temporal RoPE: the one variant, q's tile held for the whole row
            q_v = q_t0
            k_v = tl.load(kt_ptr + offs_n[:, None] * RP + offs_t[None, :], mask=n_ok[:, None], other=0.0)
        if IEEE:
            s += tl.dot(q_v, tl.trans(k_v), input_precision="ieee")
        else:
            s += tl.dot(q_v, tl.trans(k_v))
    s = s * qk_scale
    if PARTIAL:
        # a where-selection, not an added -inf bias: a NaN/inf score of a masked key (NaN in its k
        # row) is replaced, never carried into the row's max or sum
        keep = _pair_keep(offs_m, offs_n, f_q, p_q, c, S, frame_tokens, local_frames, stripe_frames, stripe_width,
                          sink_frames, w1, w2, te0, te1, te2, te3, LAYOUT, VRPR)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    offs_v = tl.arange(0, DVP)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                mask=n_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
    if PARTIAL and GUARD_V:
        # A partial entry's masked keys have p = 0, and 0 * NaN (or inf) in a masked v row would
        # reach every query of the block through the dot: NaN/inf values enter the dot as 0, and
        # _nonfinite_fixup_kernel adds the attended ones to the output afterwards. (A full entry
        # attends every key of its block: its plain product already follows the rule.)
        v = tl.where(_is_nonfinite(v), 0.0, v)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE))
    return acc, m_new, l_i


@triton.jit
def _nonfinite_key_blocks_kernel(v_ptr, flag_ptr, S, DV, stride_vb, stride_vh, stride_vn, stride_vd, H, NKB,
                                 BLOCK_N: tl.constexpr, ROWS: tl.constexpr, DVP: tl.constexpr):
    """flag[b*H + h, kb] = 1 if rows [kb*BLOCK_N, (kb+1)*BLOCK_N) of v[b, h] hold a NaN or inf, else 0.
    The exponent bits of the float32 value decide (all ones: inf or NaN), immune to fast-math."""
    kb = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    offs_v = tl.arange(0, DVP)
    bad = tl.zeros([ROWS, DVP], dtype=tl.int32)
    for r in tl.static_range(0, BLOCK_N, ROWS):
        offs_n = kb * BLOCK_N + r + tl.arange(0, ROWS)
        x = tl.load(base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                    mask=(offs_n[:, None] < S) & (offs_v[None, :] < DV), other=0.0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True) & 0x7F800000
        bad = tl.maximum(bad, (bits == 0x7F800000).to(tl.int32))
    tl.store(flag_ptr + pid_bh.to(tl.int64) * NKB + kb, tl.max(tl.max(bad, 1), 0).to(tl.int8))


@triton.jit
def _tsa_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, qt_ptr, kt_ptr,
                    full_idx, full_cnt, full_combo, part_idx, part_cnt, part_combo, full_w, part_w,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_on, stride_od, var_stride,
                    H, S, D, DV, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
                    w1, w2, te0, te1, te2, te3, qk_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP: tl.constexpr, SPLIT: tl.constexpr,
                    DR: tl.constexpr,
                    DVP: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_REST: tl.constexpr, VRPR: tl.constexpr,
                    LAYOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, GUARD_V: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    # this (b, h)'s rows of the variant copies (V, B*H, S, RP), contiguous
    qt_bh = qt_ptr + pid_bh.to(tl.int64) * S * RP
    kt_bh = kt_ptr + pid_bh.to(tl.int64) * S * RP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    f_q = offs_m // frame_tokens  # rows past S are never stored
    p_q = offs_m % frame_tokens

    # Query tiles stay in registers for the whole row of key blocks (with VRPR the temporal tile
    # of the combo is loaded per visit: up to five variants, read from L2).
    if HAS_REST:
        offs_r = SPLIT + tl.arange(0, DR)
        q_r = tl.load(q_base + offs_m[:, None] * stride_qn + offs_r[None, :] * stride_qd,
                      mask=m_ok[:, None] & (offs_r[None, :] < D), other=0.0).to(DOT_DTYPE)
    else:
        q_r = tl.zeros([BLOCK_M, 16], dtype=DOT_DTYPE)
    if HAS_ROPE and not VRPR:
        offs_t = tl.arange(0, RP)
        q_t0 = tl.load(qt_bh + offs_m[:, None] * RP + offs_t[None, :], mask=m_ok[:, None], other=0.0)
    else:
        q_t0 = tl.zeros([BLOCK_M, 16], dtype=DOT_DTYPE)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DVP], dtype=tl.float32)

    n_full = tl.load(full_cnt + pid_m)
    for e in range(0, n_full):
        acc, m_i, l_i = _visit(acc, m_i, l_i, q_r, q_t0, full_idx + pid_m * full_w, full_combo + pid_m * full_w, e,
                               k_base, v_base, qt_bh, kt_bh, stride_kn, stride_kd, stride_vn, stride_vd, var_stride,
                               offs_m, m_ok, f_q, p_q, S, frame_tokens, local_frames, stripe_frames, stripe_width,
                               sink_frames, w1, w2, te0, te1, te2, te3, D, DV, qk_scale, BLOCK_N, RP, SPLIT, DR,
                               DVP, HAS_ROPE, HAS_REST, VRPR, False, LAYOUT, DOT_DTYPE, IEEE, GUARD_V)
    n_part = tl.load(part_cnt + pid_m)
    for e in range(0, n_part):
        acc, m_i, l_i = _visit(acc, m_i, l_i, q_r, q_t0, part_idx + pid_m * part_w, part_combo + pid_m * part_w, e,
                               k_base, v_base, qt_bh, kt_bh, stride_kn, stride_kd, stride_vn, stride_vd, var_stride,
                               offs_m, m_ok, f_q, p_q, S, frame_tokens, local_frames, stripe_frames, stripe_width,
                               sink_frames, w1, w2, te0, te1, te2, te3, D, DV, qk_scale, BLOCK_N, RP, SPLIT, DR,
                               DVP, HAS_ROPE, HAS_REST, VRPR, True, LAYOUT, DOT_DTYPE, IEEE, GUARD_V)

    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    offs_v = tl.arange(0, DVP)
    tl.store(o_base + offs_m[:, None] * stride_on + offs_v[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_v[None, :] < DV))


@triton.jit
def _nonfinite_fixup_kernel(o_ptr, v_ptr, vbad_ptr, part_idx, part_cnt, part_combo, part_w,
                            stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
                            H, S, DV, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
                            w1, w2, te0, te1, te2, te3,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, DVP: tl.constexpr,
                            SCAN: tl.constexpr, LAYOUT: tl.constexpr, VRPR: tl.constexpr):
    """After _tsa_fwd_kernel: out[i, ch] += v[j, ch] for each key j of a partial entry that query i
    attends and whose v[j, ch] is NaN/inf. The attention kernel fed those values to the dot as 0
    (a masked key's p = 0 times NaN would have reached every query of the block); added here, an
    attended NaN makes out[i, ch] NaN and an attended inf makes it inf (NaN next to an opposite
    inf), as IEEE p * v with p > 0 does. One program per ROWS query rows of a query block; it scans
    the prepass flags of its partial entries (SCAN at a time) and returns unless one is set."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_m = pid // (BLOCK_M // ROWS)
    vbad_bh = vbad_ptr + pid_bh.to(tl.int64) * tl.cdiv(S, BLOCK_N)
    row_idx = part_idx + pid_m * part_w
    n_part = tl.load(part_cnt + pid_m)
    seen = tl.full([], 0, dtype=tl.int32)
    for e0 in range(0, n_part, SCAN):
        offs_e = e0 + tl.arange(0, SCAN)
        kbs = tl.load(row_idx + offs_e, mask=offs_e < n_part, other=0)
        flags = tl.load(vbad_bh + kbs, mask=offs_e < n_part, other=0)
        seen = tl.maximum(seen, tl.max(flags.to(tl.int32), 0))
    if seen != 0:
        b = pid_bh // H
        h = pid_bh % H
        v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        offs_m = pid * ROWS + tl.arange(0, ROWS)
        f_q = offs_m // frame_tokens
        p_q = offs_m % frame_tokens
        nonfinite = tl.zeros([ROWS, DVP], dtype=tl.float32)
        for e in range(0, n_part):
            kb = tl.load(row_idx + e)
            if tl.load(vbad_bh + kb) != 0:
                c = 0
                if VRPR:
                    c = tl.load(part_combo + pid_m * part_w + e)
                nonfinite = _add_nonfinite_terms(nonfinite, kb, c, v_base, stride_vn, stride_vd, offs_m, f_q, p_q, S,
                                                 frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
                                                 w1, w2, te0, te1, te2, te3, DV, BLOCK_N, DVP, LAYOUT, VRPR)
        offs_v = tl.arange(0, DVP)
        o_ptrs = o_base + offs_m[:, None] * stride_on + offs_v[None, :] * stride_od
        o_mask = (offs_m[:, None] < S) & (offs_v[None, :] < DV)
        out = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, (out + nonfinite).to(o_ptr.dtype.element_ty), mask=o_mask)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def default_blocks(q: torch.Tensor) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) for this input."""
    if q.device.type != "cuda":
        return 16, 16, 4, 1  # interpreter: small blocks exercise many full/partial/edge cases
    D = q.shape[-1]
    if q.dtype == torch.float32:
        return 64, 32, 4, 2
    if D <= 64:
        return 128, 64, 4, 3
    if D <= 128:
        return 128, 64, 8, 2
    return 64, 32, 4, 2


def rotate_variants(x: torch.Tensor, frame_tokens: int, cos_t: torch.Tensor, sin_t: torch.Tensor, r2: int,
                    num_variants: int, dtype: torch.dtype) -> torch.Tensor:
    """(V, B*H, S, RP) copies of x's temporal channels [0, RP), rotated by each position variant
    (tables from ``plan.rope_tables`` with width RP), in `dtype`: one pass over x."""
    B, H, S, D = x.shape
    rp = cos_t.shape[-1]
    out = torch.empty(num_variants, B * H, S, rp, device=x.device, dtype=dtype)
    block = 64
    grid = (triton.cdiv(S, block), B * H)
    _rotate_variants_kernel[grid](x, out, cos_t, sin_t, S, S // frame_tokens, D, r2, frame_tokens, *x.stride(), H,
                                  out.stride(0), NV=num_variants, RP=rp, BLOCK=block, num_warps=4)
    return out


def nonfinite_key_blocks(v: torch.Tensor, block_n: int) -> torch.Tensor:
    """int8 (B*H, cdiv(S, block_n)): 1 where the key block [kb*block_n, (kb+1)*block_n) of v[b, h]
    holds a NaN or inf, else 0. One read of v (any strides); the output is a few KB."""
    B, H, S, DV = v.shape
    nkb = triton.cdiv(S, block_n)
    flags = torch.empty(B * H, nkb, device=v.device, dtype=torch.int8)
    dvp = max(16, _next_pow2(DV))
    rows = max(1, min(block_n, 4096 // dvp))  # a (rows, DVP) tile per step: 32 elements a thread
    _nonfinite_key_blocks_kernel[(nkb, B * H)](v, flags, S, DV, *v.stride(), H, nkb, BLOCK_N=block_n, ROWS=rows,
                                               DVP=dvp, num_warps=4)
    return flags


def tiered_sparse_attention_fwd(q, k, v, frame_tokens, local_frames, stripe_frames=0, stripe_width=0,
                                sink_frames=1, scale=None, rope_t_freqs=None, vrpr=None, *,
                                token_bands=None, token_tiers=None, sink_rope=None,
                                block_m: Optional[int] = None, block_n: Optional[int] = None,
                                num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                                guard_masked_v: bool = True):
    """Launch the kernel over its plan (``longvideo.ops.plan.tiered``): the cached block schedule of
    this tile with one combo per entry, and the RoPE tables. The tile (block_m, block_n, num_warps,
    num_stages) defaults to :func:`default_blocks` (the benchmark's tile sweep passes others).

    guard_masked_v: keep NaN/inf of masked v rows out of the output (the op's NaN rule): partial
    visits feed v's NaN/inf values to p @ v as 0, a prepass (:func:`nonfinite_key_blocks`) flags
    the key blocks of v holding one, and ``_nonfinite_fixup_kernel`` adds the attended ones to the
    output. False only for tests: the kernel without the guard, where a masked NaN/inf row of a
    partial block reaches the block's queries as 0 * NaN."""
    B, H, S, D = q.shape
    DV = v.shape[3]
    F = S // frame_tokens
    bm, bn, nw, ns = default_blocks(q)
    block_m, block_n = block_m or bm, block_n or bn
    num_warps, num_stages = num_warps or nw, num_stages or ns
    has_rope = rope_t_freqs is not None and rope_t_freqs.numel() > 0
    has_vrpr = vrpr is not None and has_rope
    # per-entry combos (pre-rotated position variants): VRPR's five, or the token tiers' re-encoded sink
    has_combos = has_vrpr or (sink_rope is not None and has_rope)
    layout = plan.layout_code(token_bands, token_tiers)
    sched = plan.build_schedule(S, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
                                block_m, block_n, q.device, vrpr if has_vrpr else None, split_combos=True,
                                token_bands=token_bands, token_tiers=token_tiers, plain_positions=not has_combos)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dot_dtype = q.dtype
    if has_rope:
        r2 = 2 * rope_t_freqs.numel()
        rp = max(16, _next_pow2(r2))
        # token tiers use variants 0..2 only (combos 0..2)
        nv = plan.NUM_VARIANTS if has_vrpr else (3 if has_combos else 1)
        cos_t, sin_t = plan.rope_tables(F, rope_t_freqs, vrpr if has_vrpr else None, q.device, width=rp,
                                        sink_rope=sink_rope if has_combos and not has_vrpr else None)
        cos_t, sin_t = cos_t[:nv].contiguous(), sin_t[:nv].contiguous()
        q_var = rotate_variants(q, frame_tokens, cos_t, sin_t, r2, nv, dot_dtype)
        k_var = rotate_variants(k, frame_tokens, cos_t, sin_t, r2, nv, dot_dtype)
    else:
        rp = 0
        q_var = k_var = torch.zeros(1, device=q.device, dtype=dot_dtype)
    has_rest = D > rp
    dr = max(16, _next_pow2(D - rp)) if has_rest else 16
    dvp = max(16, _next_pow2(DV))
    w1, w2 = plan.band_edges(vrpr if has_vrpr else None)
    te = plan.token_edges(token_bands, token_tiers)
    out = torch.empty(B, H, S, DV, device=q.device, dtype=q.dtype)
    guard = bool(guard_masked_v) and sched.num_partial > 0  # only partial visits can meet a masked value
    grid = (sched.num_q_blocks, B * H)
    _tsa_fwd_kernel[grid](
        q, k, v, out, q_var, k_var,
        sched.full_idx, sched.full_cnt, sched.full_combo, sched.part_idx, sched.part_cnt, sched.part_combo,
        sched.full_idx.shape[1], sched.part_idx.shape[1],
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), q_var.stride(0) if has_rope else 0,
        H, S, D, DV, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
        w1, w2, *te, scale * 1.4426950408889634,
        BLOCK_M=block_m, BLOCK_N=block_n, RP=max(rp, 16), SPLIT=rp, DR=dr, DVP=dvp, HAS_ROPE=has_rope,
        HAS_REST=has_rest, VRPR=has_combos, LAYOUT=layout, DOT_DTYPE=_TL_DTYPE[q.dtype],
        IEEE=(q.dtype == torch.float32), GUARD_V=guard, num_warps=num_warps, num_stages=num_stages,
    )
    if guard:
        v_bad = nonfinite_key_blocks(v, block_n)
        rows = min(block_m, 8)  # an (8, DVP) float32 tile per program
        _nonfinite_fixup_kernel[(sched.num_q_blocks * (block_m // rows), B * H)](
            out, v, v_bad, sched.part_idx, sched.part_cnt, sched.part_combo, sched.part_idx.shape[1],
            *v.stride(), *out.stride(), H, S, DV, frame_tokens, local_frames, stripe_frames, stripe_width,
            sink_frames, w1, w2, *te,
            BLOCK_M=block_m, BLOCK_N=block_n, ROWS=rows, DVP=dvp, SCAN=64, LAYOUT=layout, VRPR=has_combos,
            num_warps=4, num_stages=1, maxnreg=128,  # ptxas' own choice (64) spilled a few bytes
        )
    return out
