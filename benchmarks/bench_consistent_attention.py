"""Benchmark suite ``consistent_attention`` (issue 3).

Cases (GPU, fp16): StoryDiffusion on SDXL with classifier-free guidance, B = 2 x 4 images,
group_size 4, sampling rate 0.5 (M = 0.5 * B * N): (N=1024, H=20, D=64) and (N=4096, H=10, D=64);
SD1.5-style (N=4096, H=8, D=40); Ouroboros SACFA (16 frames of a window, N=1560, H=12, D=128,
20% subject tokens, whole window).

Implementations per case, forward ("fwd") and forward+backward ("fwd+bwd"):
  longvideo[triton], longvideo[cuda]     the fused op (one online softmax, samples read in place)
  storydiffusion_concat_sdpa             the official "low VRAM" path: per image, concatenate own
                                         tokens + the sampled tokens of the other images, SDPA
                                         (flash backend)
  storydiffusion_dense_mask_sdpa         the official dense path: a (B*N)^2 boolean mask, SDPA
  sdpa_self_floor                        plain self-attention over the own N tokens (the floor)
  sdpa_dense_equivalent                  SDPA flash on a dense problem with the same total key
                                         count per row: the TFLOP/s reference of the 60% target
  sdpa_cudnn_self_floor,                 the same two on torch's cuDNN attention backend
  sdpa_cudnn_dense_equivalent            (SDPBackend.CUDNN_ATTENTION: the FA3-class kernel on
                                         Hopper); a backend refusing the shape is recorded as an error

Profiles: ``full`` every shape; ``budget`` (one GPU slot) the three representative ones:
sdxl_n4096, sd15_n4096 (D = 40) and sacfa_16f (D = 128).

`flops` counts the query-key pairs actually computed (4*D flops per pair forward, 2.5x that
backward); the consistent impls compute exactly the useful pairs, the dense-mask path all
(B*N)^2 pairs. `extra` records the pair counts and the sample count.

`bytes` is the minimum traffic of the op (the same for every impl, so the fraction of the copy
bandwidth compares directly): forward q, k, v read and out written once, plus the float32 lse;
forward + backward adds q, k, v, out and grad_out read, dq, dk, dv written, and lse / delta
(2 float32 per row). Every record then carries both roofline fractions (frac_peak_flops against
the run's measured bf16 matmul rate, frac_peak_bw against its measured copy bandwidth): the
attention cases are compute-bound, so frac_peak_flops is the one to read.

``triton_split_bwd`` (CUDA, fwd+bwd): the Triton backend with LONGVIDEO_CA_BWD=split, the
two-kernel backward (separate dq kernel) the fused one replaced, timed beside it (not a
``longvideo[...]`` row: the backend preferences ignore it).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from longvideo.benchmarking import Case
from longvideo.ops import get_backend, use_backend
from longvideo.ops.consistent_attention import consistent_attention

SUITE = "consistent_attention"


BUDGET_SHAPES = ("sdxl_n4096", "sd15_n4096", "sacfa_16f")


def _shapes(quick: bool, profile: str = "full"):
    if quick:
        return [dict(name="tiny", B=4, G=2, N=16, H=2, D=16, rate=0.5, window=-1)]
    if profile == "budget":
        return [s for s in _shapes(False) if s["name"] in BUDGET_SHAPES]
    return [
        dict(name="sdxl_n1024", B=8, G=4, N=1024, H=20, D=64, rate=0.5, window=-1),
        dict(name="sdxl_n4096", B=8, G=4, N=4096, H=10, D=64, rate=0.5, window=-1),
        dict(name="sd15_n4096", B=8, G=4, N=4096, H=8, D=40, rate=0.5, window=-1),
        dict(name="sacfa_16f", B=16, G=16, N=1560, H=12, D=128, rate=0.2, window=-1),
    ]


def _keys_per_row(sample_idx: torch.Tensor, B: int, N: int, G: int, window: int) -> list[int]:
    src = (sample_idx // N).cpu()
    counts = torch.bincount(src, minlength=B)
    out = []
    for b in range(B):
        first = (b // G) * G
        lo, hi = (first, first + G - 1) if window < 0 else (max(first, b - window), min(first + G - 1, b + window))
        out.append(N + int(counts[lo:hi + 1].sum()) - int(counts[b]))
    return out


def _concat_path(q, k, v, sampled, G, window):
    """StoryDiffusion's per-image path: concatenate, then SDPA per image."""
    B = q.shape[0]
    outs = []
    for b in range(B):
        first = (b // G) * G
        keys, vals = [k[b]], [v[b]]
        for o in range(first, first + G):
            if o != b and (window < 0 or abs(o - b) <= window):
                keys.append(k[o][:, sampled[o]])
                vals.append(v[o][:, sampled[o]])
        K = torch.cat(keys, 1).unsqueeze(0)
        V = torch.cat(vals, 1).unsqueeze(0)
        outs.append(F.scaled_dot_product_attention(q[b:b + 1], K, V))
    return torch.cat(outs)


def _dense_mask_path(q, k, v, mask):
    B, H, N, D = q.shape
    flat = lambda t: t.transpose(0, 1).reshape(1, H, B * N, D)  # noqa: E731
    out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask)
    return out.reshape(H, B, N, D).transpose(0, 1)


def _sdpa_ctx(device, backend: str = "FLASH_ATTENTION"):
    """A context factory forcing one SDPA backend on CUDA (no silent fallback: a backend that
    cannot run the shape raises, and the harness records the error)."""
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return lambda: sdpa_kernel([getattr(SDPBackend, backend)])
    import contextlib

    return contextlib.nullcontext


def cases(device: torch.device, quick: bool, profile: str = "full") -> list[Case]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out: list[Case] = []
    for shp in _shapes(quick, profile):
        out += _shape_cases(shp, device, dtype)
    return out


def _shape_cases(shp: dict, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """The cases of one shape. A function per shape, not a loop body: every closure below binds
    this shape's tensors and sizes (in a loop they all saw the last shape's -- the first GPU run
    measured the sdxl cases with the sacfa group size)."""
    flash = _sdpa_ctx(device)
    cudnn = _sdpa_ctx(device, "CUDNN_ATTENTION") if device.type == "cuda" else None
    out: list[Case] = []
    B, G, N, H, D, window = shp["B"], shp["G"], shp["N"], shp["H"], shp["D"], shp["window"]
    M = int(shp["rate"] * B * N)
    gen = torch.Generator(device="cpu").manual_seed(0)
    # diffusers' layout: (B, N, H, D) memory viewed as (B, H, N, D)
    q, k, v = (torch.randn(B, N, H, D, generator=gen).to(device, dtype).transpose(1, 2) for _ in range(3))
    sample_idx = torch.randperm(B * N, generator=gen)[:M].sort().values.to(device)
    sampled = torch.zeros(B * N, dtype=torch.bool, device=device)
    sampled[sample_idx] = True
    sampled = sampled.view(B, N)
    L = _keys_per_row(sample_idx, B, N, G, window)
    pairs = H * N * sum(L)
    fwd_flops = 4.0 * D * pairs
    params = dict(B=B, group_size=G, N=N, H=H, D=D, M=M, window=window, dtype=str(dtype).replace("torch.", ""))
    extra = dict(pairs=pairs, keys_per_row_mean=sum(L) / B)

    elem = torch.empty((), dtype=dtype).element_size()
    min_bytes = {"fwd": 4 * B * H * N * D * elem + 4 * B * H * N,
                 "fwd+bwd": 12 * B * H * N * D * elem + 3 * 4 * B * H * N}

    def add(impl, fn, flops, mode, ex=None, setup_ms=None):
        out.append(Case(suite=SUITE, name=f"{shp['name']}_{mode}", impl=impl, fn=fn, params=params,
                        flops=flops, bytes=min_bytes[mode], setup_ms=setup_ms, extra={**extra, **(ex or {})}))

    def fwd_bwd(fn, leaves):
        go = torch.randn(B, H, N, D, generator=gen).to(device, dtype)

        def run():
            for t in leaves:
                t.grad = None
            fn().backward(go)
        return run

    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    # the fused op on each backend available here
    backends = ["triton", "cuda"] if device.type == "cuda" else ["reference"]
    for be in backends:
        ok, why = get_backend("consistent_attention", be).is_available()
        if not ok:
            continue

        def ours(be=be, q=q, k=k, v=v):
            with use_backend(be, op="consistent_attention"):
                return consistent_attention(q, k, v, sample_idx, G, window)

        def ours_grad(be=be):
            with use_backend(be, op="consistent_attention"):
                return consistent_attention(qg, kg, vg, sample_idx, G, window)

        add(f"longvideo[{be}]", ours, fwd_flops, "fwd")
        bwd_be = "triton" if be == "cuda" else be  # the cuda backend's backward is the Triton one
        add(f"longvideo[{be}]", fwd_bwd(ours_grad, (qg, kg, vg)), 3.5 * fwd_flops, "fwd+bwd",
            {"backward_backend": bwd_be})
        if be == "triton" and device.type == "cuda":
            split = fwd_bwd(ours_grad, (qg, kg, vg))

            def split_bwd(split=split):
                old = os.environ.get("LONGVIDEO_CA_BWD")
                os.environ["LONGVIDEO_CA_BWD"] = "split"
                try:
                    return split()
                finally:
                    if old is None:
                        os.environ.pop("LONGVIDEO_CA_BWD", None)
                    else:
                        os.environ["LONGVIDEO_CA_BWD"] = old

            add("triton_split_bwd", split_bwd, 3.5 * fwd_flops, "fwd+bwd", {"backward_backend": "triton split"})

    def concat(q=q, k=k, v=v):
        with flash():
            return _concat_path(q, k, v, sampled, G, window)

    def concat_grad():
        with flash():
            return _concat_path(qg, kg, vg, sampled, G, window)

    add("storydiffusion_concat_sdpa", concat, fwd_flops, "fwd")
    add("storydiffusion_concat_sdpa", fwd_bwd(concat_grad, (qg, kg, vg)), 3.5 * fwd_flops, "fwd+bwd")

    # dense (B*N)^2 mask, built per call as the official code does
    img = torch.arange(B * N, device=device) // N
    flat_sampled = sampled.view(-1)
    dense_pairs = H * (B * N) ** 2

    def build_mask():
        same = img[:, None] == img[None, :]
        cross = (img[:, None] // G == img[None, :] // G) & flat_sampled[None, :] & ~same
        if window >= 0:
            cross &= (img[:, None] - img[None, :]).abs() <= window
        return same | cross

    def dense(q=q, k=k, v=v):
        return _dense_mask_path(q, k, v, build_mask())

    def dense_grad():
        return _dense_mask_path(qg, kg, vg, build_mask())

    add("storydiffusion_dense_mask_sdpa", dense, 4.0 * D * dense_pairs, "fwd", {"computed_pairs": dense_pairs})
    add("storydiffusion_dense_mask_sdpa", fwd_bwd(dense_grad, (qg, kg, vg)), 3.5 * 4.0 * D * dense_pairs,
        "fwd+bwd", {"computed_pairs": dense_pairs})

    # floor: plain self-attention over own tokens
    self_flops = 4.0 * D * H * B * N * N

    def self_attn(q=q, k=k, v=v):
        with flash():
            return F.scaled_dot_product_attention(q, k, v)

    def self_grad():
        with flash():
            return F.scaled_dot_product_attention(qg, kg, vg)

    add("sdpa_self_floor", self_attn, self_flops, "fwd")
    add("sdpa_self_floor", fwd_bwd(self_grad, (qg, kg, vg)), 3.5 * self_flops, "fwd+bwd")
    if cudnn is not None:
        def self_cudnn(q=q, k=k, v=v):
            with cudnn():
                return F.scaled_dot_product_attention(q, k, v)

        add("sdpa_cudnn_self_floor", self_cudnn, self_flops, "fwd")

    # dense problem with the same total key count per row (mean): the 60% TFLOP/s target
    L_mean = int(round(sum(L) / B))
    kd = torch.randn(B, L_mean, H, D, generator=gen).to(device, dtype).transpose(1, 2)
    vd = torch.randn(B, L_mean, H, D, generator=gen).to(device, dtype).transpose(1, 2)

    def dense_equiv(q=q, kd=kd, vd=vd):
        with flash():
            return F.scaled_dot_product_attention(q, kd, vd)

    add("sdpa_dense_equivalent", dense_equiv, 4.0 * D * H * B * N * L_mean, "fwd", {"keys_per_row": L_mean})
    if cudnn is not None:
        def dense_equiv_cudnn(q=q, kd=kd, vd=vd):
            with cudnn():
                return F.scaled_dot_product_attention(q, kd, vd)

        add("sdpa_cudnn_dense_equivalent", dense_equiv_cudnn, 4.0 * D * H * B * N * L_mean, "fwd",
            {"keys_per_row": L_mean})
    return out
