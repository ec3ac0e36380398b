"""Triton backend of ``lowfreq_mix`` (FreeInit's low-frequency mixing).

Algebra used by every path. With D = fftn(x - noise) and the filter moved to unshifted frequency
indices, M'(k) = LPF[(k + n//2) % n] per axis,

    out = Re(ifftn(X M' + N (1 - M'))) = noise + Re(ifftn(M' D))

and, x and noise being real (D Hermitian), Re(ifftn(M' D)) = ifftn(Ms D) with the real, even
symmetrised filter Ms(k) = (M'(k) + M'(-k)) / 2 (for even sizes the shifted grid is symmetric and
Ms = M'; for odd sizes it is not). Ms D is Hermitian, so the half spectrum (rfftn / irfftn)
suffices. The filter is evaluated in-kernel from a tiny per-axis table (T + H + W + 1 float64
values built once per shape and parameters by the plan layer, ``longvideo.ops.plan.lowfreq.axis_table``):
no (T, H, W) filter tensor exists.

Three paths (``choose_path``):

* ``single pass`` (T == 1, H and W up to 128 -- the Ouroboros tail, run every denoising step):
  one program per (..., H, W) slice loads x and noise once, computes the 2-D DFT of x - noise as
  real matmuls with DFT cos/sin matrices (``tl.dot``, tf32x3 or for bfloat16 tf32: see
  ``_dot_precision``), multiplies by Ms, inverts, adds noise and stores in x's dtype.
  Work per slice ~ 4 HP WP WHP + 16 HP^2 WHP flops (HP, WP: H, W rounded up to a power of two
  >= 16, WHP: W//2+1 likewise); reads 2 and writes 1 element per element: one launch, no
  intermediate in global memory. The DFT matrices (<= 4 x 64 KiB, ``plan.lowfreq.dft_matrices``)
  are cached per (H, W, device) and read through L2 by every program.
* ``planes`` (1 < T <= 64, each (H, W) plane within the single pass's tile -- FreeInit's latents):
  three Triton launches through one fp32 intermediate, the half spectrum Z, planar (2, L, WH, T, H)
  (L the leading slices, WH = W//2 + 1; the layout puts each (T, H) block of one kw contiguous):
    A. one program per (slice, frame) plane: d = x - noise and its real DFT along W (2 dots, K in
       chunks of 64 columns), stored transposed into Z;
    B. one program per (slice, kw): the (H, T) block as an (HP, TP) tile, H on the rows so every
       dot has M = HP (wgmma): DFT along H (left product), DFT along T (right product), times
       Ms(kt, kh, kw) / T evaluated in-kernel from the axis table, the inverse along T, the
       inverse along H, stored back in place (16 dots);
    C. one program per plane: the inverse real DFT along W (Hermitian weights and 1/(H W) in the
       matrices), plus noise, stored in x's dtype (2 dots).
  Bytes moved, predicted (N = numel, e = element size, r = WH / W, Z = 8 r N bytes):
    A reads 2 e N, writes Z; B reads and writes Z; C reads Z and e N (noise), writes e N:
    total 4 e N + 32 r N = (4 e + 16.3) N at W = 104 (r = 0.51), (4 e + 16.5) N at W = 64.
  The floor is 3 e N (x and noise read, out written once): bfloat16 24.3 N = 4.1x the floor,
  float32 32.3 N = 2.7x. The spectral path below moves, counting cuFFT's 3-D R2C / C2R as two
  passes each over the complex half spectrum (what its multi-kernel plans do at these sizes):
  diff (2 e + 4) N + rfftn ~(4 + 8 r + 2 x 8 r) N + filter 16 r N + irfftn ~(2 x 8 r + 8 r + 4) N
  + add (4 + 2 e) N ~ (4 e + 16 + 64 r) N = 56.6 N at bfloat16, W 104 (9.4x the floor), 64.6 N at
  float32 (5.4x): the plane path cuts the bytes by 2.3x (bfloat16) and 2.0x (float32), and the
  launches from 5-9 to 3.
  Work (real flops, padded tiles): A and C 4 HP WP WHP per plane each, B 2 x (8 HP^2 TP + 8 HP TP^2)
  per (slice, kw): at the Wan FreeInit shape (2, 16, 21, 60, 104) 1.4 + 5.3 + 1.4 = 8.1 GFLOP, x3
  with tf32x3. DFT-by-matmul costs O(n) per element and axis where an FFT costs O(log n): the
  bfloat16 plane path (one tf32 product) stays near its bytes' time, float32 (tf32x3, ~24 GFLOP)
  is compute-bound (docs/perf_notes.md gives the predicted times).
* ``spectral`` (everything else): fp32 difference kernel, torch.fft.rfftn, an in-place kernel
  multiplying the half spectrum by Ms (the filter of a block of frequencies is evaluated once
  and applied to a chunk of the leading (batch x channel) index), torch.fft.irfftn, and a fused
  add-noise-and-cast kernel.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from longvideo.ops.plan.lowfreq import FILTER_CODES, dft_matrices, dft_t_matrices, filter_coef, padded

SINGLE_PASS_MAX_SIDE = 128
SINGLE_PASS_MAX_TILE = 128 * 64  # HP * WP; larger tiles spill registers (8 warps, fp32 tiles)
PLANES_MAX_T = 64  # the plane path's middle pass holds (padded(H), padded(T)) fp32 blocks
# Precision of the single pass's DFT matmuls (``_dot_precision``). On GPUs "tf32x3" (three tf32
# tensor-core products, ~fp32 accuracy) for float32/float16 inputs: with "ieee" the 16 dots unroll
# into ~25k scalar FMAs per program, which takes minutes to compile per variant and spills a 25 KB
# stack (measured with Triton 3.6 for sm_90). For bfloat16 inputs a single "tf32" product (a third
# of the tensor-core work): emulating tf32's operand truncation through the four DFT stages
# (tools/lowfreq_dft_precision.py; filters gaussian/butterworth/ideal, d_s 0.25-0.5, d_t 1, the
# tail shapes) keeps every bf16 output within its tolerance (worst |err| - (atol + rtol |ref|) =
# -8e-3), while float16 would exceed its 2e-3 tolerance and float32 needs tf32x3 (emulated max
# error 5.5e-6, tolerance 1e-4).
# Under the CPU interpreter (no tensor cores to emulate) "ieee".
# LONGVIDEO_LOWFREQ_DOT_PRECISION overrides the choice for every dtype.
DOT_PRECISION = os.environ.get("LONGVIDEO_LOWFREQ_DOT_PRECISION") or None


def _dot_precision(dtype: torch.dtype) -> str:
    if DOT_PRECISION:
        return DOT_PRECISION
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "ieee"
    return "tf32" if dtype == torch.bfloat16 else "tf32x3"

@triton.jit
def _lpf_from_terms(a, b, c, thr, FILTER: tl.constexpr, coef, order):
    """Filter value (fp32) from the three float64 axis terms (broadcastable blocks) and the ideal
    filter's float64 threshold."""
    if FILTER == 3:  # box: product of the three axis indicators
        val = (a * b * c).to(tl.float32)
    else:
        d2 = (a + b) + c  # float64, same summation order as diffusers' loop
        if FILTER == 2:  # ideal: d^2 <= 2 d_s, the threshold stored (float64) after the W terms
            val = tl.where(d2 <= thr, 1.0, 0.0)
        elif FILTER == 0:  # gaussian: exp(-d^2 / (2 d_s^2)), coef = 1 / (2 d_s^2)
            val = tl.exp(-coef * d2.to(tl.float32))
        else:  # butterworth: 1 / (1 + (d^2 / d_s^2)^order), coef = 1 / d_s^2
            # q = 0 (the centre) is clamped to 1e-30 instead of taking log2(0): q^order underflows
            # to 0 all the same (order >= 1) and no -inf is formed.
            q = tl.maximum(d2.to(tl.float32) * coef, 1e-30)
            val = 1.0 / (1.0 + tl.exp2(order * tl.log2(q)))
    return val


@triton.jit
def _lpf_at(tab_ptr, kt, kh, kw, T, H, W, FILTER: tl.constexpr, coef, order):
    """Filter value (fp32) at unshifted frequency (kt, kh, kw), from the per-axis float64 table."""
    a = tl.load(tab_ptr + kt)
    b = tl.load(tab_ptr + T + kh)
    c = tl.load(tab_ptr + T + H + kw)
    thr = tl.load(tab_ptr + T + H + W)
    return _lpf_from_terms(a, b, c, thr, FILTER, coef, order)


@triton.jit
def _lpf_sym(tab_ptr, kt, kh, kw, T, H, W, FILTER: tl.constexpr, coef, order):
    """Symmetrised filter (M'(k) + M'(-k)) / 2 on unshifted indices."""
    rt = (T - kt) % T
    rh = (H - kh) % H
    rw = (W - kw) % W
    return 0.5 * (_lpf_at(tab_ptr, kt, kh, kw, T, H, W, FILTER, coef, order)
                  + _lpf_at(tab_ptr, rt, rh, rw, T, H, W, FILTER, coef, order))


@triton.jit
def _half_spectrum_filter_kernel(tab_ptr, lpf_ptr, H, W, WHP: tl.constexpr, coef, order, FILTER: tl.constexpr):
    # One program = one row kh of the symmetrised T = 1 filter on the half spectrum, (HP, WHP) fp32,
    # zero where kh >= H or kw > W // 2 (the padded DFT rows/columns).
    kh = tl.program_id(0)
    rk = tl.arange(0, WHP)
    valid = (kh < H) & (rk < W // 2 + 1)
    khc = tl.where(kh < H, kh, 0)
    kw = tl.where(rk < W // 2 + 1, rk, 0)
    val = _lpf_sym(tab_ptr, kw * 0, kw * 0 + khc, kw, 1, H, W, FILTER, coef, order)
    tl.store(lpf_ptr + kh * WHP + rk, tl.where(valid, val, 0.0))


@triton.jit
def _single_pass_kernel(x_ptr, n_ptr, out_ptr, lpf_ptr, cw_ptr, sw_ptr, ch_ptr, sh_ptr, icw_ptr, isw_ptr,
                        H, W, HP: tl.constexpr, WP: tl.constexpr, WHP: tl.constexpr, PREC: tl.constexpr):
    # One program = one (H, W) slice (T == 1). Shapes: d (HP, WP); spectra (HP, WHP).
    pid = tl.program_id(0).to(tl.int64)
    base = pid * H * W
    rh = tl.arange(0, HP)
    rw = tl.arange(0, WP)
    rk = tl.arange(0, WHP)
    m = (rh[:, None] < H) & (rw[None, :] < W)
    offs = base + rh[:, None] * W + rw[None, :]
    xv = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    nv = tl.load(n_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = xv - nv
    # Forward DFT along W (half spectrum): A = d (cos - i sin).
    cw = tl.load(cw_ptr + rw[:, None] * WHP + rk[None, :])
    sw = tl.load(sw_ptr + rw[:, None] * WHP + rk[None, :])
    ar = tl.dot(d, cw, input_precision=PREC)
    ai = -tl.dot(d, sw, input_precision=PREC)
    # Forward DFT along H: B = (Ch - i Sh) A.
    rkh = tl.arange(0, HP)
    ch = tl.load(ch_ptr + rkh[:, None] * HP + rh[None, :])
    sh = tl.load(sh_ptr + rkh[:, None] * HP + rh[None, :])
    br = tl.dot(ch, ar, input_precision=PREC) + tl.dot(sh, ai, input_precision=PREC)
    bi = tl.dot(ch, ai, input_precision=PREC) - tl.dot(sh, ar, input_precision=PREC)
    # Symmetrised filter at (kt = 0, kh, kw), precomputed per (shape, filter) by
    # _half_spectrum_filter_kernel: the filter is not a constexpr here, so one compiled variant
    # serves all four filters.
    lpf = tl.load(lpf_ptr + rkh[:, None] * WHP + rk[None, :])
    br = br * lpf
    bi = bi * lpf
    # Inverse DFT along H: E = (Ch + i Sh) B (the 1/(H W) is folded into the W inverse matrices).
    er = tl.dot(ch, br, input_precision=PREC) - tl.dot(sh, bi, input_precision=PREC)
    ei = tl.dot(ch, bi, input_precision=PREC) + tl.dot(sh, br, input_precision=PREC)
    # Inverse real DFT along W (Hermitian half spectrum, weights 1/2/1 folded into icw/isw).
    icw = tl.load(icw_ptr + rk[:, None] * WP + rw[None, :])
    isw = tl.load(isw_ptr + rk[:, None] * WP + rw[None, :])
    y = tl.dot(er, icw, input_precision=PREC) - tl.dot(ei, isw, input_precision=PREC)
    tl.store(out_ptr + offs, (nv + y).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _planes_fwd_w_kernel(x_ptr, n_ptr, zr_ptr, zi_ptr, cw_ptr, sw_ptr, T, H, W, WH,
                         HP: tl.constexpr, WP: tl.constexpr, WHP: tl.constexpr, KW: tl.constexpr,
                         PREC: tl.constexpr):
    # Pass A of the plane path. One program = one (H, W) plane p = l * T + t: A = rDFT_W(x - noise)
    # (half spectrum), stored transposed into Z (L, WH, T, H) planar fp32, so that pass B reads each
    # (T, H) block of one frequency kw contiguously.
    pid = tl.program_id(0).to(tl.int64)
    l = pid // T
    t = pid % T
    rh = tl.arange(0, HP)
    rk = tl.arange(0, WHP)
    ar = tl.zeros((HP, WHP), dtype=tl.float32)
    ai = tl.zeros((HP, WHP), dtype=tl.float32)
    # K in chunks of at most 64 columns of the plane: a 64 x 128 fp32 plane split into tf32 hi/lo parts
    # whole would not fit the registers beside the accumulators.
    for w0 in tl.static_range(0, WP, KW):
        rw = w0 + tl.arange(0, KW)
        m = (rh[:, None] < H) & (rw[None, :] < W)
        offs = pid * H * W + rh[:, None] * W + rw[None, :]
        d = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) - tl.load(n_ptr + offs, mask=m, other=0.0).to(tl.float32)
        cw = tl.load(cw_ptr + rw[:, None] * WHP + rk[None, :])
        sw = tl.load(sw_ptr + rw[:, None] * WHP + rk[None, :])
        ar = tl.dot(d, cw, ar, input_precision=PREC)
        ai = tl.dot(d, sw, ai, input_precision=PREC)
    ai = -ai
    mz = (rh[:, None] < H) & (rk[None, :] < WH)
    zoffs = ((l * WH + rk[None, :]) * T + t) * H + rh[:, None]
    tl.store(zr_ptr + zoffs, ar, mask=mz)
    tl.store(zi_ptr + zoffs, ai, mask=mz)


@triton.jit
def _split_tf32(x, SPLIT: tl.constexpr):
    """(hi, lo) with hi = x truncated to tf32 (exactly representable: a tf32 dot reads it unchanged,
    whether the hardware path truncates or rounds) and lo = x - hi (exact); (x, x) without SPLIT."""
    if SPLIT:
        hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        return hi, x - hi
    else:
        return x, x


@triton.jit
def _mm(a_hi, a_lo, b_hi, b_lo, acc, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """acc + a b. SPLIT: three tf32 products of the pre-split operands, small terms first
    (a_lo b_hi + a_hi b_lo + a_hi b_hi: ~fp32 accuracy, as Triton's tf32x3, but the split of the
    constant DFT matrices comes from memory instead of registers); else one dot at PREC."""
    if SPLIT:
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(a_hi, b_hi, acc, input_precision=PREC)
    return acc


@triton.jit
def _planes_filter_ht_kernel(zr_ptr, zi_ptr, ch_ptr, sh_ptr, ct_ptr, st_ptr, chl_ptr, shl_ptr, ctl_ptr, stl_ptr,
                             ch2_ptr, sh2_ptr, chl2_ptr, shl2_ptr, tab_ptr, T, H, W, WH, coef, order, inv_t, FILTER: tl.constexpr, HP: tl.constexpr,
                             TP: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # Pass B of the plane path. Program (l, kw): the (H, T) block of Z at frequency kw of slice l, held as
    # (HP, TP) with H along the rows (so every dot has M = HP, Hopper wgmma at HP >= 64): DFT along H
    # (left product with the symmetric Ch, Sh), DFT along T (right product with the symmetric Ct, St),
    # times Ms(kt, kh, kw) / T, the two inverse DFTs, stored back in place.
    # SPLIT (float32 / float16 inputs, the tf32x3 precision): the DFT matrices come pre-split into tf32
    # hi (ch_ptr ...) and lo (chl_ptr ...) parts, the data is split in registers (see _mm); Triton's own
    # tf32x3 split both operands in registers and spilled here (Triton 3.6, sm_90: 255 regs, 12 / 428 B
    # at TP 16 / 32; with the pre-split and the reload below: 140 regs and no spill / 255 regs and
    # 224 B). Without SPLIT the lo pointers are not read.
    l = tl.program_id(0).to(tl.int64)
    kw = tl.program_id(1)
    rh = tl.arange(0, HP)
    rt = tl.arange(0, TP)
    m = (rh[:, None] < H) & (rt[None, :] < T)
    offs = (l * WH + kw) * T * H + rt[None, :] * H + rh[:, None]
    zr_h, zr_l = _split_tf32(tl.load(zr_ptr + offs, mask=m, other=0.0), SPLIT)
    zi_h, zi_l = _split_tf32(tl.load(zi_ptr + offs, mask=m, other=0.0), SPLIT)
    hh = rh[:, None] * HP + rh[None, :]
    tt = rt[:, None] * TP + rt[None, :]
    ch_h = tl.load(ch_ptr + hh)
    sh_h = tl.load(sh_ptr + hh)
    ct_h = tl.load(ct_ptr + tt)
    st_h = tl.load(st_ptr + tt)
    if SPLIT:
        ch_l = tl.load(chl_ptr + hh)
        sh_l = tl.load(shl_ptr + hh)
        ct_l = tl.load(ctl_ptr + tt)
        st_l = tl.load(stl_ptr + tt)
    else:
        ch_l = ch_h
        sh_l = sh_h
        ct_l = ct_h
        st_l = st_h
    zero = tl.zeros((HP, TP), dtype=tl.float32)
    # forward along H: B = (Ch - i Sh) Z
    br = _mm(sh_h, sh_l, zi_h, zi_l, _mm(ch_h, ch_l, zr_h, zr_l, zero, SPLIT, PREC), SPLIT, PREC)
    bi = _mm(sh_h, sh_l, -zr_h, -zr_l, _mm(ch_h, ch_l, zi_h, zi_l, zero, SPLIT, PREC), SPLIT, PREC)
    # forward along T: Y = B (Ct - i St)
    br_h, br_l = _split_tf32(br, SPLIT)
    bi_h, bi_l = _split_tf32(bi, SPLIT)
    yr = _mm(bi_h, bi_l, st_h, st_l, _mm(br_h, br_l, ct_h, ct_l, zero, SPLIT, PREC), SPLIT, PREC)
    yi = _mm(-br_h, -br_l, st_h, st_l, _mm(bi_h, bi_l, ct_h, ct_l, zero, SPLIT, PREC), SPLIT, PREC)
    # The symmetrised filter at (kt, kh, kw) and at the negated frequency, from the axis terms (a row of
    # T terms, a column of H terms, one W term): the float64 sums are formed per element in the
    # reference's order. Padded rows / columns read index 0: their Y is zero.
    kt = tl.where(rt < T, rt, 0)
    kh = tl.where(rh < H, rh, 0)
    thr = tl.load(tab_ptr + T + H + W)
    a1 = tl.load(tab_ptr + kt)[None, :]
    a2 = tl.load(tab_ptr + (T - kt) % T)[None, :]
    b1 = tl.load(tab_ptr + T + kh)[:, None]
    b2 = tl.load(tab_ptr + T + (H - kh) % H)[:, None]
    c1 = tl.load(tab_ptr + T + H + kw)
    c2 = tl.load(tab_ptr + T + H + (W - kw) % W)
    lpf = (0.5 * inv_t) * (_lpf_from_terms(a1, b1, c1, thr, FILTER, coef, order)
                           + _lpf_from_terms(a2, b2, c2, thr, FILTER, coef, order))
    yr_h, yr_l = _split_tf32(yr * lpf, SPLIT)
    yi_h, yi_l = _split_tf32(yi * lpf, SPLIT)
    # inverse along T: E = Y (Ct + i St) (the 1/T is in lpf)
    er = _mm(-yi_h, -yi_l, st_h, st_l, _mm(yr_h, yr_l, ct_h, ct_l, zero, SPLIT, PREC), SPLIT, PREC)
    ei = _mm(yr_h, yr_l, st_h, st_l, _mm(yi_h, yi_l, ct_h, ct_l, zero, SPLIT, PREC), SPLIT, PREC)
    # inverse along H: G = (Ch + i Sh) E (the 1/H is in pass C's matrices). The matrices are loaded
    # again through their second pointers (the same tensors; L2 hits): with SPLIT, four 64 x 64 fp32
    # A operands kept live across the T stages spilled at TP = 32.
    er_h, er_l = _split_tf32(er, SPLIT)
    ei_h, ei_l = _split_tf32(ei, SPLIT)
    if SPLIT:
        ch_h = tl.load(ch2_ptr + hh)
        sh_h = tl.load(sh2_ptr + hh)
        ch_l = tl.load(chl2_ptr + hh)
        sh_l = tl.load(shl2_ptr + hh)
    gr = _mm(sh_h, sh_l, -ei_h, -ei_l, _mm(ch_h, ch_l, er_h, er_l, zero, SPLIT, PREC), SPLIT, PREC)
    gi = _mm(sh_h, sh_l, er_h, er_l, _mm(ch_h, ch_l, ei_h, ei_l, zero, SPLIT, PREC), SPLIT, PREC)
    tl.store(zr_ptr + offs, gr, mask=m)
    tl.store(zi_ptr + offs, gi, mask=m)


@triton.jit
def _planes_inv_w_kernel(zr_ptr, zi_ptr, n_ptr, out_ptr, icw_ptr, isw_ptr, T, H, W, WH,
                         HP: tl.constexpr, WP: tl.constexpr, WHP: tl.constexpr, PREC: tl.constexpr):
    # Pass C of the plane path. One program = one plane p = l * T + t: out = noise + irDFT_W(G) (the
    # Hermitian weights and 1/(H W) are folded into icw/isw), rounded once to the output dtype.
    pid = tl.program_id(0).to(tl.int64)
    l = pid // T
    t = pid % T
    rh = tl.arange(0, HP)
    rw = tl.arange(0, WP)
    rk = tl.arange(0, WHP)
    mz = (rh[:, None] < H) & (rk[None, :] < WH)
    zoffs = ((l * WH + rk[None, :]) * T + t) * H + rh[:, None]
    gr = tl.load(zr_ptr + zoffs, mask=mz, other=0.0)
    gi = tl.load(zi_ptr + zoffs, mask=mz, other=0.0)
    icw = tl.load(icw_ptr + rk[:, None] * WP + rw[None, :])
    isw = tl.load(isw_ptr + rk[:, None] * WP + rw[None, :])
    y = tl.dot(gr, icw, input_precision=PREC) - tl.dot(gi, isw, input_precision=PREC)
    m = (rh[:, None] < H) & (rw[None, :] < W)
    offs = pid * H * W + rh[:, None] * W + rw[None, :]
    nv = tl.load(n_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (nv + y).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _diff_kernel(x_ptr, n_ptr, d_ptr, numel, BLOCK: tl.constexpr):
    # d = float32(x) - float32(noise): the input of the spectral path's rfftn.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    xv = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    nv = tl.load(n_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(d_ptr + offs, xv - nv, mask=m)


@triton.jit
def _add_cast_kernel(n_ptr, y_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    # out = noise + y, rounded once to the output dtype.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    nv = tl.load(n_ptr + offs, mask=m, other=0.0).to(tl.float32)
    yv = tl.load(y_ptr + offs, mask=m, other=0.0)
    tl.store(out_ptr + offs, (nv + yv).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _spectrum_filter_kernel(spec_ptr, tab_ptr, L, T, H, W, WH, coef, order, FILTER: tl.constexpr,
                            BLOCK: tl.constexpr, L_CHUNK: tl.constexpr):
    # spec: float32 view (L, T, H, WH, 2) of the complex half spectrum, multiplied in place by Ms.
    # Program (i, j): BLOCK consecutive floats of one (T, H, WH, 2) volume (both halves of a
    # complex number share the filter value), applied to leading indices j*L_CHUNK .. +L_CHUNK.
    per_l = T * H * WH * 2
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < per_l
    f = offs // 2
    kw = f % WH
    kh = (f // WH) % H
    kt = f // (WH * H)
    kw = tl.where(m, kw, 0)
    kh = tl.where(m, kh, 0)
    kt = tl.where(m, kt, 0)
    lpf = _lpf_sym(tab_ptr, kt, kh, kw, T, H, W, FILTER, coef, order)
    l0 = tl.program_id(1) * L_CHUNK
    for i in range(L_CHUNK):
        l = l0 + i
        ptrs = spec_ptr + l.to(tl.int64) * per_l + offs
        ml = m & ((tl.zeros_like(offs) + l) < L)  # a block mask (a scalar & block mask trips the interpreter)
        v = tl.load(ptrs, mask=ml, other=0.0)
        tl.store(ptrs, v * lpf, mask=ml)


_FILTER_CACHE: dict = {}


def _half_spectrum_filter(table: torch.Tensor, H: int, W: int, code: int, coef: float, order: float) -> torch.Tensor:
    """(HP, WHP) fp32 filter of the single pass, cached. The key holds the table tensor itself
    (tables are cached by the op per shape and parameters), so an address cannot be reused by
    another table while its entry lives."""
    key = (table.data_ptr(), table.device, H, W, code, coef, order)
    hit = _FILTER_CACHE.get(key)
    if hit is not None and hit[0] is table:
        return hit[1]
    HP, WHP = padded(H), padded(W // 2 + 1)
    lpf = torch.empty(HP, WHP, dtype=torch.float32, device=table.device)
    _half_spectrum_filter_kernel[(HP,)](table, lpf, H, W, WHP=WHP, coef=coef, order=order, FILTER=code)
    if len(_FILTER_CACHE) >= 64:
        _FILTER_CACHE.clear()
    _FILTER_CACHE[key] = (table, lpf)
    return lpf


def single_pass_ok(shape) -> bool:
    T, H, W = shape[-3:]
    return (T == 1 and H <= SINGLE_PASS_MAX_SIDE and W <= SINGLE_PASS_MAX_SIDE
            and padded(H) * padded(W) <= SINGLE_PASS_MAX_TILE)


def planes_ok(shape) -> bool:
    T, H, W = shape[-3:]
    return (1 < T <= PLANES_MAX_T and H <= SINGLE_PASS_MAX_SIDE and W <= SINGLE_PASS_MAX_SIDE
            and padded(H) * padded(W) <= SINGLE_PASS_MAX_TILE)


PATHS = ("single", "planes", "spectral")


def predicted_bytes(shape, element_size: int, path: str) -> float:
    """Bytes one call moves through DRAM on `path` by the model in this module's docstring (N =
    numel, e = element size, r = (W//2 + 1) / W): single 3 e N; planes (4 e + 32 r) N; spectral
    (4 e + 16 + 64 r) N (cuFFT's 3-D R2C / C2R counted as two passes each over the half spectrum).
    The DFT matrices and the filter table (read through L2 by every program) are not counted."""
    n = 1
    for d in shape:
        n *= int(d)
    W = int(shape[-1])
    r = (W // 2 + 1) / W
    e = int(element_size)
    per = {"single": 3 * e, "planes": 4 * e + 32 * r, "spectral": 4 * e + 16 + 64 * r}
    if path not in per:
        raise ValueError(f"lowfreq_mix: path must be one of {PATHS}, got {path!r}")
    return per[path] * n


def choose_path(shape) -> str:
    """The path a call of this shape takes: "single" (T == 1, small planes), "planes" (T > 1, small
    planes), else "spectral"."""
    if single_pass_ok(shape):
        return "single"
    return "planes" if planes_ok(shape) else "spectral"


def lowfreq_mix(x: torch.Tensor, noise: torch.Tensor, table: torch.Tensor, filter: str, d_s: float,
                order: float, force_spectral: bool = False, path: str | None = None) -> torch.Tensor:
    """out = noise + irfftn(Ms rfftn(x - noise)); `table` from ``plan.lowfreq.axis_table`` on x's device.

    x, noise: same shape (..., T, H, W), dtype float16/bfloat16/float32, same device.
    path: None chooses (:func:`choose_path`); "single", "planes" or "spectral" forces one (a
    forced path must fit the shape: ValueError otherwise); force_spectral=True is path="spectral".
    """
    T, H, W = x.shape[-3:]
    x = x.contiguous()
    noise = noise.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    code = FILTER_CODES[filter]
    coef = filter_coef(filter, d_s)
    order = float(order)
    if force_spectral:
        path = "spectral"
    if path is None:
        path = choose_path(x.shape)
    elif path not in PATHS:
        raise ValueError(f"lowfreq_mix: path must be one of {PATHS}, got {path!r}")
    elif (path == "single" and not single_pass_ok(x.shape)) or (path == "planes" and not planes_ok(x.shape)):
        raise ValueError(f"lowfreq_mix: path {path!r} does not fit shape {tuple(x.shape)}")
    if path == "planes":
        return _planes(x, noise, out, table, code, coef, order)
    if path == "single":
        HP, WP, WHP = padded(H), padded(W), padded(W // 2 + 1)
        mats = dft_matrices(H, W, x.device)
        n_slices = x.numel() // (H * W)
        # 4 warps hold a 64x64 fp32 tile in 32 registers per thread; bigger tiles get 8 warps.
        warps = 4 if HP * WP <= 4096 else 8
        lpf = _half_spectrum_filter(table, H, W, code, coef, order)
        _single_pass_kernel[(n_slices,)](x, noise, out, lpf, *mats, H, W,
                                         HP=HP, WP=WP, WHP=WHP, PREC=_dot_precision(x.dtype), num_warps=warps)
        return out
    numel = x.numel()
    BLOCK = 1024  # elementwise: 1024 elements = 8 per thread with 4 warps (two 16-byte fp32 vectors)
    grid = (triton.cdiv(numel, BLOCK),)
    d = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _diff_kernel[grid](x, noise, d, numel, BLOCK=BLOCK)
    spec = torch.fft.rfftn(d, dim=(-3, -2, -1))
    WH = W // 2 + 1
    L = numel // (T * H * W)
    spec_f = torch.view_as_real(spec)
    # One filter evaluation per frequency is applied to L_CHUNK leading slices; the grid's second
    # axis keeps enough programs in flight when T*H*WH is small.
    L_CHUNK = 4
    per_l = T * H * WH * 2
    fgrid = (triton.cdiv(per_l, BLOCK), triton.cdiv(L, L_CHUNK))
    _spectrum_filter_kernel[fgrid](spec_f, table, L, T, H, W, WH, coef, order, FILTER=code,
                                   BLOCK=BLOCK, L_CHUNK=L_CHUNK)
    y = torch.fft.irfftn(spec, s=(T, H, W), dim=(-3, -2, -1))
    _add_cast_kernel[grid](noise, y, out, numel, BLOCK=BLOCK)
    return out


@functools.lru_cache(maxsize=32)
def _tf32_split_matrices(H: int, W: int, T: int, device: torch.device):
    """((ch, sh, ct, st) truncated to tf32, their float32 remainders): pass B's pre-split operands."""
    _, _, ch, sh, _, _ = dft_matrices(H, W, device)
    ct, st = dft_t_matrices(T, device)
    his, los = [], []
    for mat in (ch, sh, ct, st):
        hi = (mat.view(torch.int32) & -8192).view(torch.float32)
        his.append(hi.contiguous())
        los.append((mat - hi).contiguous())
    return tuple(his), tuple(los)


def _planes(x, noise, out, table, code, coef, order):
    """The plane path (T > 1): passes A, B, C (module docstring)."""
    T, H, W = x.shape[-3:]
    HP, WP, WHP, TP = padded(H), padded(W), padded(W // 2 + 1), padded(T)
    WH = W // 2 + 1
    L = x.numel() // (T * H * W)
    cw, sw, ch, sh, icw, isw = dft_matrices(H, W, x.device)
    ct, st = dft_t_matrices(T, x.device)
    prec = _dot_precision(x.dtype)
    z = torch.empty((2, L, WH, T, H), dtype=torch.float32, device=x.device)
    zr, zi = z[0], z[1]
    warps = 4 if HP * WP <= 4096 else 8
    _planes_fwd_w_kernel[(L * T,)](x, noise, zr, zi, cw, sw, T, H, W, WH,
                                   HP=HP, WP=WP, WHP=WHP, KW=min(WP, 64), PREC=prec, num_warps=warps)
    split = prec == "tf32x3"
    if split:
        (ch_b, sh_b, ct_b, st_b), lo = _tf32_split_matrices(H, W, T, x.device)
    else:
        ch_b, sh_b, ct_b, st_b = ch, sh, ct, st
        lo = (ch, sh, ct, st)  # not read
    _planes_filter_ht_kernel[(L, WH)](zr, zi, ch_b, sh_b, ct_b, st_b, *lo, ch_b, sh_b, lo[0], lo[1], table, T, H, W, WH, coef, order, 1.0 / T,
                                      FILTER=code, HP=HP, TP=TP, SPLIT=split, PREC=prec, num_warps=4)
    _planes_inv_w_kernel[(L * T,)](zr, zi, noise, out, icw, isw, T, H, W, WH,
                                   HP=HP, WP=WP, WHP=WHP, PREC=prec, num_warps=warps)
    return out
