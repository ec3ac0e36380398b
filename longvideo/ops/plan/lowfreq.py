"""Plan of ``lowfreq_mix``: the filter and transform tables the kernels read, never a (T, H, W)
filter tensor.

* :func:`axis_table`: the filter's per-axis terms at unshifted frequencies (T + H + W + 1 float64
  values, ``longvideo.reference.lowfreq_mix.unshifted_axis_table``) on the input's device,
  cached per (shape, filter, d_s, d_t, device); both the Triton and the CUDA kernels evaluate the
  filter from it, with the filter's code (:data:`FILTER_CODES`) and coefficient
  (:func:`filter_coef`).
* :func:`dft_matrices`: the zero-padded DFT cos/sin matrices of the Triton single pass (T == 1
  slices up to 128 x 128), cached per (H, W, device). Their padding (:func:`padded`: a power of
  two >= 16 per side) is the single pass's tile; the plane path (T > 1) uses the same matrices for
  its per-frame (H, W) planes.
* :func:`dft_t_matrices`: the zero-padded DFT cos/sin matrices along T of the plane path's middle
  pass, cached per (T, device).
"""
from __future__ import annotations

import functools
import math

import torch

from ...reference.lowfreq_mix import unshifted_axis_table

FILTER_CODES = {"gaussian": 0, "butterworth": 1, "ideal": 2, "box": 3}


def filter_coef(filter: str, d_s: float) -> float:
    """The kernels' filter coefficient: 1 / (2 d_s^2) for "gaussian", else 1 / d_s^2."""
    return 1.0 / (2.0 * d_s * d_s) if filter == "gaussian" else 1.0 / (d_s * d_s)


@functools.lru_cache(maxsize=64)
def _axis_table(shape_THW, filter, d_s, d_t, device):
    return unshifted_axis_table(shape_THW, filter, d_s, d_t).to(device)


def axis_table(x: torch.Tensor, filter: str, d_s: float, d_t: float) -> torch.Tensor:
    """The kernels' per-axis filter table for x's (T, H, W) on x's device (T + H + W + 1 float64), cached."""
    return _axis_table(tuple(int(n) for n in x.shape[-3:]), filter, float(d_s), float(d_t), x.device)


def padded(n: int) -> int:
    """A side of the single pass's tile: n rounded up to a power of two, at least 16."""
    return max(16, 1 << (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=32)
def dft_matrices(H: int, W: int, device: torch.device):
    """Zero-padded DFT matrices for the single-pass kernel (fp32, computed in float64)."""
    HP, WP, WH = padded(H), padded(W), W // 2 + 1
    WHP = padded(WH)
    f64 = torch.float64

    def cos_sin(n_rows, n_cols, n, rows_valid, cols_valid):
        r = torch.arange(n_rows, dtype=torch.int64)[:, None]
        c = torch.arange(n_cols, dtype=torch.int64)[None, :]
        ang = 2 * math.pi * ((r * c) % n).to(f64) / n  # exact argument reduction in integers
        valid = (r < rows_valid) & (c < cols_valid)
        return torch.where(valid, torch.cos(ang), 0.0), torch.where(valid, torch.sin(ang), 0.0)

    cw, sw = cos_sin(WP, WHP, W, W, WH)          # (w, kw)
    ch, sh = cos_sin(HP, HP, H, H, H)            # (kh, h), symmetric
    icw, isw = cos_sin(WHP, WP, W, WH, W)        # (kw, w)
    # Hermitian weights: bins 0 and (W even) W/2 once, the others twice; and the 1/(H W).
    alpha = torch.full((WHP, 1), 2.0, dtype=f64)
    alpha[0] = 1.0
    if W % 2 == 0:
        alpha[W // 2] = 1.0
    alpha /= H * W
    mats = (cw, sw, ch, sh, icw * alpha, isw * alpha)
    return tuple(m.to(torch.float32).contiguous().to(device) for m in mats)


@functools.lru_cache(maxsize=32)
def dft_t_matrices(T: int, device: torch.device):
    """(cos, sin) of the length-T DFT, zero-padded to (padded(T), padded(T)), symmetric, fp32
    (computed in float64 with the argument reduced exactly in integers)."""
    TP = padded(T)
    r = torch.arange(TP, dtype=torch.int64)[:, None]
    c = torch.arange(TP, dtype=torch.int64)[None, :]
    ang = 2 * math.pi * ((r * c) % T).to(torch.float64) / T
    valid = (r < T) & (c < T)
    cos = torch.where(valid, torch.cos(ang), 0.0)
    sin = torch.where(valid, torch.sin(ang), 0.0)
    return tuple(m.to(torch.float32).contiguous().to(device) for m in (cos, sin))
