"""Seam metric for chunked video processing, without model weights.

A seam between two chunks shows as a frame transition that differs from its neighbours: a jump in
appearance and a break in the motion. For a video of frames f_0..f_{F-1} and the transitions
i = 1..F-1 (frame i-1 -> frame i):

* frame difference   d_i = mean |f_i - f_{i-1}|   (over pixels and RGB, 8-bit units 0..255)
* flow roughness     r_i = mean_p || u_i(p) - (u_{i-1}(p) + u_{i+1}(p)) / 2 ||
                     the second temporal difference of the optical flow u_i (frame i-1 -> i), in
                     pixels of the working resolution; one neighbour at the ends. Smooth motion
                     gives small r_i; a seam gives a flow spike that is unlike both neighbours.
* flow std           std over i of the mean flow magnitude (StreamingT2V's "temporal smoothness",
                     reported for the whole video).

Each per-transition quantity is averaged over the boundary transitions (given: where chunks
meet, see ``ChunkLayout.seam_transitions``; ``window`` widens each by +-window) and over the
remaining interior transitions; ``ratio = boundary / interior`` is about 1 for a seamless video
and grows with visible seams.

A mean over a seam region does not see whether a change happens at once or is spread over the
region (a ramp of m steps of J/m sums to the same J), so the frame difference is also reported
as a peak: the largest d_i in each contiguous boundary region, against the largest d_i in every
interior window of the same length (``peak_boundary``, ``peak_interior``, ``peak_ratio``; about
1 without seams, since both sides take a maximum over equally many transitions).

Optical flow: OpenCV's Farneback (``cv2.calcOpticalFlowFarneback``, pyramid 0.5 x 3 levels,
window 15, 3 iterations, poly_n 5, sigma 1.2) when ``cv2`` is importable; otherwise a dense
pyramidal Lucas-Kanade flow in PyTorch (``lucas_kanade_flow``: Gaussian pyramid, 3 iterations of
warp + windowed least squares per level, 7x7 window, Tikhonov-regularised 2x2 solve, so flat
regions get zero flow instead of noise). Both run on grey frames resized so the longer side is
at most ``flow_max_side`` pixels; the two backends give comparable but not identical numbers,
so compare ratios computed with the same backend (the result names it).
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F


def _frames_float(frames) -> np.ndarray:
    """float32 (F, H, W, 3) in [0, 1]."""
    if isinstance(frames, np.ndarray) and frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype != np.uint8:
        return np.clip(frames.astype(np.float32), 0.0, 1.0)
    from ..video import to_uint8_frames

    return to_uint8_frames(frames).astype(np.float32) / 255.0


def _grey(frames: np.ndarray, max_side: int) -> torch.Tensor:
    """(F, 1, h, w) float32 luma in [0, 1], resized (area) so that max(h, w) <= max_side."""
    rgb = torch.from_numpy(frames).permute(0, 3, 1, 2)
    grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).unsqueeze(1)
    h, w = grey.shape[-2:]
    scale = max_side / max(h, w)
    if scale < 1:
        grey = F.interpolate(grey, size=(max(8, round(h * scale)), max(8, round(w * scale))), mode="area")
    return grey.contiguous()


# --------------------------------------------------------------------------------------------
# Optical flow
# --------------------------------------------------------------------------------------------


def _gauss_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    r = max(1, int(round(2 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample img (N, 1, H, W) at p + flow(p) (bilinear, border clamp); flow (N, 2, H, W) in pixels."""
    n, _, h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype), indexing="ij")
    gx = (xs + flow[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0
    gy = (ys + flow[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
    return F.grid_sample(img, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="border",
                         align_corners=True)


def lucas_kanade_flow(prev: torch.Tensor, nxt: torch.Tensor, levels: int = 3, window: int = 7,
                      iterations: int = 3, reg: float = 1e-4) -> torch.Tensor:
    """Dense flow from `prev` to `nxt` ((N, 1, H, W) grey in [0, 1]) -> (N, 2, H, W), pixels (dx, dy).

    Pyramidal Lucas-Kanade: on every level (coarse to fine) iterate
        w = nxt warped by the current flow,  I_x, I_y = gradients of (prev + w) / 2,  I_t = w - prev,
        [sum I_x^2  sum I_xI_y; sum I_xI_y  sum I_y^2] du = -[sum I_xI_t; sum I_yI_t]
    with sums over a window x window box, solved in closed form with `reg` added to the diagonal.
    """
    pyr_p, pyr_n = [prev], [nxt]
    for _ in range(levels - 1):
        if min(pyr_p[-1].shape[-2:]) < 16:
            break
        pyr_p.append(F.avg_pool2d(_gauss_blur(pyr_p[-1]), 2))
        pyr_n.append(F.avg_pool2d(_gauss_blur(pyr_n[-1]), 2))
    flow = None
    pad = window // 2
    for p, q in zip(reversed(pyr_p), reversed(pyr_n)):
        if flow is None:
            flow = p.new_zeros(p.shape[0], 2, *p.shape[-2:])
        else:
            flow = 2.0 * F.interpolate(flow, size=p.shape[-2:], mode="bilinear", align_corners=False)
        for _ in range(iterations):
            warped = _warp(q, flow)
            avg = 0.5 * (p + warped)
            padded = F.pad(avg, (1, 1, 1, 1), mode="replicate")
            ix = 0.5 * (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2])
            iy = 0.5 * (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1])
            it = warped - p

            def box(z):
                return F.avg_pool2d(F.pad(z, (pad, pad, pad, pad), mode="replicate"), window, stride=1)

            a, b, c = box(ix * ix) + reg, box(ix * iy), box(iy * iy) + reg
            bx, by = -box(ix * it), -box(iy * it)
            det = a * c - b * b
            du = (c * bx - b * by) / det
            dv = (a * by - b * bx) / det
            flow = flow + torch.cat([du, dv], dim=1)
    return flow


def _cv2():
    try:
        import cv2  # noqa: F401
    except Exception:
        return None
    return cv2


def optical_flow(grey: torch.Tensor, method: str = "auto") -> tuple[torch.Tensor, str]:
    """Flow between consecutive frames of grey (F, 1, H, W): (F-1, 2, H, W) and the method used."""
    cv2 = _cv2() if method in ("auto", "farneback") else None
    if method == "farneback" and cv2 is None:
        raise RuntimeError("flow method 'farneback' needs OpenCV (pip install opencv-python-headless)")
    if method not in ("auto", "farneback", "lucas_kanade"):
        raise ValueError(f"flow method must be 'auto', 'farneback' or 'lucas_kanade', got {method!r}")
    if cv2 is not None:
        g8 = (grey[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        flows = [cv2.calcOpticalFlowFarneback(g8[i - 1], g8[i], None, 0.5, 3, 15, 3, 5, 1.2, 0)
                 for i in range(1, len(g8))]
        return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).float(), "farneback"
    return lucas_kanade_flow(grey[:-1], grey[1:]), "lucas_kanade"


# --------------------------------------------------------------------------------------------
# The metric
# --------------------------------------------------------------------------------------------


_Triple = tuple[Optional[float], Optional[float], Optional[float]]


def _split(values: np.ndarray, transitions: np.ndarray, boundary: set) -> _Triple:
    mask = np.array([i in boundary for i in transitions])
    b = float(values[mask].mean()) if mask.any() else None
    r = float(values[~mask].mean()) if (~mask).any() else None
    if b is None or r is None:
        ratio = None
    elif r > 0:
        ratio = b / r
    else:
        ratio = 1.0 if b == 0 else None
    return b, r, ratio


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of True in a boolean vector."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _peak_split(values: np.ndarray, mask: np.ndarray) -> _Triple:
    regions = _runs(mask)
    if not regions:
        return None, None, None
    interior_runs = _runs(~mask)
    peaks_b, peaks_i = [], []
    for a, z in regions:
        ell = z - a
        peaks_b.append(float(values[a:z].max()))
        windows = [float(values[s:s + ell].max()) for ra, rz in interior_runs for s in range(ra, rz - ell + 1)]
        if windows:
            peaks_i.append(float(np.mean(windows)))
    b = float(np.mean(peaks_b))
    r = float(np.mean(peaks_i)) if peaks_i else None
    ratio = None if r is None else (b / r if r > 0 else (1.0 if b == 0 else None))
    return b, r, ratio


def seam_metric(frames, boundaries: Iterable[int], window: int = 0, flow: str = "auto",
                flow_max_side: int = 256) -> dict:
    """Seam strength of a video at the given boundary transitions.

    frames: (F, H, W, 3) uint8 or float in [0, 1] (or anything ``longvideo.video.to_uint8_frames``
    takes); boundaries: transition indices i (the step from frame i-1 to frame i), 1 <= i < F;
    window: also count transitions within +-window of a boundary as boundary.

    Returns {"boundary", "interior", "ratio"} for the frame difference (the headline numbers), the
    same for its peak ("peak_boundary", "peak_interior", "peak_ratio") and for the flow roughness
    ("flow_boundary", "flow_interior", "flow_ratio"), and
    "flow_std", "flow_method", "num_boundary", "num_interior", "per_transition" (lists). Values
    are None where undefined (no boundary or no interior transition).
    """
    x = _frames_float(frames)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"frames: need at least 2 frames to measure seams, got {n}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    bset = set()
    for b in boundaries:
        b = int(b)
        if not 1 <= b < n:
            raise ValueError(f"boundaries: transition {b} is outside 1..{n - 1}")
        bset.update(range(max(1, b - window), min(n - 1, b + window) + 1))
    trans = np.arange(1, n)
    d = np.abs(x[1:] - x[:-1]).mean(axis=(1, 2, 3)) * 255.0

    grey = _grey(x, flow_max_side)
    u, method = optical_flow(grey, flow)  # u[k] = flow of transition k + 1
    m = u.shape[0]
    rough = np.zeros(m, dtype=np.float64)
    for k in range(m):
        nbrs = [u[j] for j in (k - 1, k + 1) if 0 <= j < m]
        if not nbrs:
            continue
        ref = sum(nbrs) / len(nbrs)
        rough[k] = float(torch.linalg.vector_norm(u[k] - ref, dim=0).mean())
    mag = torch.linalg.vector_norm(u, dim=1).mean(dim=(1, 2)).numpy()

    b, r, ratio = _split(d, trans, bset)
    pb, pr, pratio = _peak_split(d, np.array([i in bset for i in trans]))
    fb, fr, fratio = _split(rough, trans, bset) if m > 1 else (None, None, None)
    return {
        "boundary": b, "interior": r, "ratio": ratio,
        "peak_boundary": pb, "peak_interior": pr, "peak_ratio": pratio,
        "flow_boundary": fb, "flow_interior": fr, "flow_ratio": fratio,
        "flow_std": float(np.std(mag)), "flow_method": method,
        "num_boundary": int(sum(1 for i in trans if i in bset)),
        "num_interior": int(sum(1 for i in trans if i not in bset)),
        "boundaries": sorted(bset),
        "per_transition": {"frame_diff": [float(v) for v in d], "flow_roughness": [float(v) for v in rough]},
    }
