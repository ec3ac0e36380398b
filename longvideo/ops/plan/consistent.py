"""Plan of ``consistent_attention``: which sampled tokens each row of the batch attends.

sample_idx holds sorted unique flat token indices into [0, B*N), i.e. it is sorted by source
image, so the samples row b may see (the other images of its group, within the window) are two
contiguous runs of sample_idx: the sources before b and those after b. :func:`segment_table`
finds the four run ends per row with one ``torch.searchsorted`` on the device; both the Triton
and the CUDA kernels walk the two runs as one virtual range. The table depends on the values of
sample_idx, so it is built per call (one small kernel), not cached.
"""
from __future__ import annotations

import torch


def has_samples(sample_idx: torch.Tensor, group_size: int, window: int) -> bool:
    """Whether any row attends sampled tokens of other images (else the kernels skip that source)."""
    return sample_idx.numel() > 0 and group_size > 1 and window != 0


def segment_table(sample_idx: torch.Tensor, B: int, N: int, group_size: int, window: int) -> torch.Tensor:
    """int32 (B, 4): [lo1, hi1, lo2, hi2] such that the samples row b sees are
    sample_idx[lo1:hi1] (source images before b) and sample_idx[lo2:hi2] (after b)."""
    dev = sample_idx.device
    b = torch.arange(B, device=dev, dtype=torch.int64)
    g_lo = torch.div(b, group_size, rounding_mode="floor") * group_size
    g_hi = g_lo + group_size - 1
    if window >= 0:
        lo_src = torch.maximum(g_lo, b - window)
        hi_src = torch.minimum(g_hi, b + window)
    else:
        lo_src, hi_src = g_lo, g_hi
    # lo_src <= b <= hi_src always, so both runs are well formed (lo <= hi)
    bounds = torch.stack([lo_src * N, b * N, (b + 1) * N, (hi_src + 1) * N], dim=1)
    if sample_idx.numel() == 0:
        return torch.zeros(B, 4, dtype=torch.int32, device=dev)
    seg = torch.searchsorted(sample_idx, bounds.to(sample_idx.dtype).contiguous())
    return seg.to(torch.int32)
