"""Triton backend of ``lowfreq_mix`` (FreeInit's low-frequency mixing).

Algebra used by both paths. With D = fftn(x - noise) and the filter moved to unshifted frequency
indices, M'(k) = LPF[(k + n//2) % n] per axis,

    out = Re(ifftn(X M' + N (1 - M'))) = noise + Re(ifftn(M' D))

and, x and noise being real (D Hermitian), Re(ifftn(M' D)) = ifftn(Ms D) with the real, even
symmetrised filter Ms(k) = (M'(k) + M'(-k)) / 2 (for even sizes the shifted grid is symmetric and
Ms = M'; for odd sizes it is not). Ms D is Hermitian, so the half spectrum (rfftn / irfftn)
suffices. The filter is evaluated in-kernel from a tiny per-axis table (T + H + W + 1 float64
values built once per shape and parameters by the plan layer, ``longvideo.ops.plan.lowfreq.axis_table``):
no (T, H, W) filter tensor exists.

Two paths:

* ``single pass`` (T == 1, H and W up to 128 -- the Ouroboros tail, run every denoising step):
  one program per (..., H, W) slice loads x and noise once, computes the 2-D DFT of x - noise as
  real matmuls with DFT cos/sin matrices (``tl.dot``, tf32x3 or for bfloat16 tf32: see
  ``_dot_precision``), multiplies by Ms, inverts, adds noise and stores in x's dtype.
  Work per slice ~ 4 HP WP WHP + 16 HP^2 WHP flops (HP, WP: H, W rounded up to a power of two
  >= 16, WHP: W//2+1 likewise); reads 2 and writes 1 element per element: one launch, no
  intermediate in global memory. The DFT matrices (<= 4 x 64 KiB, ``plan.lowfreq.dft_matrices``)
  are cached per (H, W, device) and read through L2 by every program.
* ``spectral`` (everything else): fp32 difference kernel, torch.fft.rfftn, an in-place kernel
  multiplying the half spectrum by Ms (the filter of a block of frequencies is evaluated once
  and applied to a chunk of the leading (batch x channel) index), torch.fft.irfftn, and a fused
  add-noise-and-cast kernel.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from longvideo.ops.plan.lowfreq import FILTER_CODES, dft_matrices, filter_coef, padded

SINGLE_PASS_MAX_SIDE = 128
SINGLE_PASS_MAX_TILE = 128 * 64  # HP * WP; larger tiles spill registers (8 warps, fp32 tiles)
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
def _lpf_at(tab_ptr, kt, kh, kw, T, H, W, FILTER: tl.constexpr, coef, order):
    """Filter value (fp32) at unshifted frequency (kt, kh, kw), from the per-axis float64 table."""
    a = tl.load(tab_ptr + kt)
    b = tl.load(tab_ptr + T + kh)
    c = tl.load(tab_ptr + T + H + kw)
    if FILTER == 3:  # box: product of the three axis indicators
        val = (a * b * c).to(tl.float32)
    else:
        d2 = (a + b) + c  # float64, same summation order as diffusers' loop
        if FILTER == 2:  # ideal: d^2 <= 2 d_s, the threshold stored (float64) after the W terms
            thr = tl.load(tab_ptr + T + H + W)
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


def lowfreq_mix(x: torch.Tensor, noise: torch.Tensor, table: torch.Tensor, filter: str, d_s: float,
                order: float, force_spectral: bool = False) -> torch.Tensor:
    """out = noise + irfftn(Ms rfftn(x - noise)); `table` from ``plan.lowfreq.axis_table`` on x's device.

    x, noise: same shape (..., T, H, W), dtype float16/bfloat16/float32, same device.
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
    if single_pass_ok(x.shape) and not force_spectral:
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
