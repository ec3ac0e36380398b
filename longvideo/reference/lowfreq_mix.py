"""Reference of ``lowfreq_mix``: FreeInit's spatio-temporal low-frequency mixing (torch.fft).

FreeInit (Wu et al. 2023, eq. 5-6) re-initialises a video latent by keeping the low frequencies of
the diffused latent x and taking the high frequencies from fresh noise:

    X = fftshift(fftn(x)),  N = fftshift(fftn(noise))          (over the last three dims T, H, W)
    out = Re(ifftn(ifftshift(X * LPF + N * (1 - LPF))))

with the low-pass filter LPF(t, h, w) defined on the fftshift-ed grid through the normalised
squared distance from the centre (diffusers' ``_get_free_init_freq_filter``)

    d^2 = ((d_s / d_t) (2t/T - 1))^2 + (2h/H - 1)^2 + (2w/W - 1)^2

    gaussian     exp(-d^2 / (2 d_s^2))
    butterworth  1 / (1 + (d^2 / d_s^2)^order)
    ideal        1 if d^2 <= 2 d_s else 0          (diffusers' condition, kept as written there)
    box          1 inside [ct-tt, ct+tt) x [ch-ts, ch+ts) x [cw-ts, cw+ts), else 0 (original FreeInit
                 repository): ts = round(int(H // 2) * d_s), tt = round(T // 2 * d_t) (Python
                 round), centre (T//2, H//2, W//2), ts (from H) used for both H and W, slices with
                 Python slice semantics.

The filter is computed analytically: 1-D coordinate terms per axis, broadcast, never a loop over
elements. It is evaluated in float64 and rounded once to the compute dtype (diffusers evaluates in
Python floats and stores float32), and cached per arguments.
"""
from __future__ import annotations

import functools

import torch

FILTERS = ("gaussian", "butterworth", "ideal", "box")


def box_intervals(shape_THW, d_s: float, d_t: float):
    """[(lo, hi)] per axis T, H, W of the box filter, exactly as the original slice expression."""
    T, H, W = (int(n) for n in shape_THW)
    ts = round(int(H // 2) * d_s)
    tt = round(T // 2 * d_t)
    ct, ch, cw = T // 2, H // 2, W // 2
    out = []
    for centre, half, n in ((ct, tt, T), (ch, ts, H), (cw, ts, W)):
        lo, hi, _ = slice(centre - half, centre + half).indices(n)  # Python slice semantics
        out.append((lo, max(lo, hi)))
    return out


def axis_terms(shape_THW, filter: str, d_s: float, d_t: float):
    """Per-axis float64 terms on the fftshift-ed grid, index = shifted position.

    For gaussian/butterworth/ideal: the squared normalised coordinate of each axis (the summands of
    d^2, T scaled by d_s/d_t), evaluated with the same operations as diffusers' loop. For box: the
    0/1 indicator of the axis interval.
    """
    T, H, W = (int(n) for n in shape_THW)
    if filter == "box":
        terms = []
        for (lo, hi), n in zip(box_intervals(shape_THW, d_s, d_t), (T, H, W)):
            idx = torch.arange(n, dtype=torch.float64)
            terms.append(((idx >= lo) & (idx < hi)).to(torch.float64))
        return terms
    scale_t = d_s / d_t
    # 2 * i / n - 1 with true division: the same rounding as Python's 2 * t / time - 1.
    ct = (2 * torch.arange(T, dtype=torch.float64) / T - 1) * scale_t
    ch = 2 * torch.arange(H, dtype=torch.float64) / H - 1
    cw = 2 * torch.arange(W, dtype=torch.float64) / W - 1
    return [ct * ct, ch * ch, cw * cw]


@functools.lru_cache(maxsize=64)
def _lowpass_filter_cached(shape_THW, filter, d_s, d_t, order, device, dtype):
    T, H, W = shape_THW
    tT, tH, tW = axis_terms(shape_THW, filter, d_s, d_t)
    if filter == "box":
        lpf = tT.view(T, 1, 1) * tH.view(1, H, 1) * tW.view(1, 1, W)
    else:
        d2 = tT.view(T, 1, 1) + tH.view(1, H, 1) + tW.view(1, 1, W)  # (t + h) + w, diffusers' order
        if filter == "gaussian":
            lpf = torch.exp((-1 / (2 * d_s ** 2)) * d2)
        elif filter == "butterworth":
            lpf = 1 / (1 + (d2 / d_s ** 2) ** order)
        else:  # ideal
            lpf = (d2 <= d_s * 2).to(torch.float64)
    return lpf.to(dtype=dtype, device=device)


def lowpass_filter(shape_THW, filter: str = "gaussian", d_s: float = 0.25, d_t: float = 0.25, order: float = 4,
                   device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (T, H, W) low-pass filter on the fftshift-ed grid (cached; do not modify the result)."""
    if filter not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
    shape = tuple(int(n) for n in shape_THW)
    if len(shape) != 3:
        raise ValueError(f"shape_THW must have 3 entries, got {shape_THW!r}")
    device = torch.device(device if device is not None else "cpu")
    return _lowpass_filter_cached(shape, filter, float(d_s), float(d_t), float(order), device, dtype)


def lowfreq_mix_reference(x: torch.Tensor, noise: torch.Tensor, filter: str = "gaussian", d_s: float = 0.25,
                          d_t: float = 0.25, order: float = 4) -> torch.Tensor:
    """FreeInit's freq_mix_3d, literally: fftn, fftshift, X*LPF + N*(1-LPF), ifftshift, ifftn, real.

    Computed in float32 (float64 for float64 input); returned in x's dtype. Empty input gives an
    empty result (torch.fft refuses zero-size transforms). A NaN/inf anywhere in a (T, H, W) slice
    of x or noise makes that whole output slice NaN (the transforms mix every element of a slice;
    a zero filter weight times a NaN spectrum is NaN) and no other slice.
    """
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    dims = (-3, -2, -1)
    lpf = lowpass_filter(x.shape[-3:], filter, d_s, d_t, order, device=x.device, dtype=compute)
    x_freq = torch.fft.fftshift(torch.fft.fftn(x.to(compute), dim=dims), dim=dims)
    noise_freq = torch.fft.fftshift(torch.fft.fftn(noise.to(compute), dim=dims), dim=dims)
    mixed = x_freq * lpf + noise_freq * (1 - lpf)
    out = torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real
    return out.to(x.dtype)


def unshifted_axis_table(shape_THW, filter: str, d_s: float, d_t: float) -> torch.Tensor:
    """The filter's per-axis terms indexed by UNSHIFTED frequency, for kernels (float64, CPU).

    Layout: [T terms | H terms | W terms | 2 d_s]. Entry k of an axis of size n holds the axis term
    (see :func:`axis_terms`) at the fftshift-ed position (k + n//2) % n, the place of frequency k
    after fftshift; ifftshift(X_shifted * LPF) = X * LPF[(k + n//2) % n]. A kernel forms, per
    frequency (kt, kh, kw), d^2 = (tT + tH) + tW (float64 adds in diffusers' order, so "ideal"
    decides its d^2 <= 2 d_s boundary exactly as diffusers), or the product of the three box
    indicators, and evaluates the filter. Real inputs see only the symmetrised filter
    (LPF(k) + LPF(-k)) / 2: kernels evaluate it at k and at (n - k) % n per axis.
    """
    parts = []
    for term, n in zip(axis_terms(shape_THW, filter, d_s, d_t), shape_THW):
        k = torch.arange(int(n))
        parts.append(term[(k + int(n) // 2) % int(n)])
    parts.append(torch.tensor([d_s * 2], dtype=torch.float64))
    return torch.cat(parts)
