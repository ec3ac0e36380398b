"""Benchmark suite ``tiered_sparse_attention``: FreeLOC's tiered sparse attention (+ VRPR) at
Wan2.1-1.3B shapes (B=1, 12 heads, D=128, bf16; 832x480 -> 1560 tokens per latent frame, 720p ->
3600), against SDPA flash (dense problem), FlexAttention compiled with the same mask (block mask
built once; its build time is ``setup_ms``) and FreeLOC's official scheme for VRPR layers (one
compiled FlexAttention call per band with that band's RoPE copies, merged by log-sum-exp).

SDPA on the dense problem runs on two backends, flash and cuDNN (``SDPBackend.CUDNN_ATTENTION``,
the FA3-class kernel on Hopper): what a user would run without FreeLOC's sparsity.

``cuda_legacy_kernel``: the CUDA backend with ``LONGVIDEO_TSA_CUDA=legacy`` (16 query rows per warp,
tiles staged synchronously) beside ``longvideo[cuda]`` (the default pipelined kernel), for the
side-by-side measurement of docs/perf_notes.md.

``flops`` counts the attended pairs only (4 * D per pair: QK^T and PV), so TFLOP/s compares
useful work; ``extra`` records the token- and block-level density of the tiers.

Profiles: ``full`` (21/41/81 frames at 480p, 21/41 at 720p) and ``budget`` (one GPU slot):
FreeLOC's hot path first -- its default ``semantics="official"`` layers (token-granular TSA and
VRPR layouts, the op's backends only), then the tiers with temporal RoPE + VRPR (the paper's
semantics) at 41 and 81 latent frames -- then the plain tiers at 41 and 81.
"""
from __future__ import annotations

import importlib
import os
import time

import torch

from longvideo.benchmarking import Case

SUITE = "tiered_sparse_attention"
FREELOC_TIERS = dict(local_frames=8, stripe_frames=24, stripe_width=195, sink_frames=1)
VRPR = {41: [12.0, 20.0, 2.0, 8.0, 20.0], 81: [10.0, 14.0, 2.0, 8.0, 20.0]}
# (block_m, block_n, num_warps, num_stages) tried besides the default (128, 64, 8, 2) in the budget
# profile at 41 frames; tiles that spill offline for sm_90 are left out (docs/kernel_report_sm90.md:
# with VRPR, 128 x 128 spills 552 B in Triton 3.6; 128 x 64 with 3 stages spills 0 B in 3.6, 16 B in 3.9)
TILE_SWEEP = {"plain": [(128, 128, 8, 2), (128, 64, 8, 3)], "vrpr": [(128, 64, 8, 3)]}


def wan_temporal_freqs(head_dim: int = 128, theta: float = 10000.0) -> torch.Tensor:
    """Wan's temporal RoPE frequencies: the first d - 4 (d // 6) channels (44 of 128 = 22 pairs)."""
    dt = head_dim - 4 * (head_dim // 6)
    return 1.0 / theta ** (torch.arange(0, dt, 2, dtype=torch.float64) / dt)


def _flex_mask_mod(T, L, SF, SW, SK, band=None):
    def mask_mod(b, h, qi, kj):
        fi, fj = qi // T, kj // T
        dist = (fi - fj).abs()
        keep = (dist < L) | ((dist < SF) & ((qi % T - kj % T).abs() < SW)) | (fj < SK)
        if band is not None:
            keep = keep & (dist >= band[0]) & (dist < band[1])
        return keep
    return mask_mod


def _rotate(x, pos, freqs):
    """Temporal RoPE copy of x with per-token positions (the official scheme's per-band copies)."""
    r = freqs.numel()
    ang = pos.to(torch.float32)[:, None] * freqs.to(x.device, torch.float32)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x0, x1 = x[..., 0:2 * r:2], x[..., 1:2 * r:2]
    rot = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)
    return torch.cat((rot, x[..., 2 * r:]), -1)


def _op_cases(label, params, impls, device, args, kwargs, flops, extra):
    """One Case per backend of the op (among `impls`) that is available and accepts this call;
    the first call (timed as setup) builds and caches the block schedule and compiles the kernel."""
    from longvideo import ops

    op = torch.ops.longvideo.tiered_sparse_attention
    for backend in ("triton", "cuda", "reference"):
        if backend not in impls:
            continue
        be = ops.get_backend("tiered_sparse_attention", backend)
        if device.type == "cuda" and not be.is_available()[0]:
            continue
        if be.supports is not None and be.supports(*args, **kwargs):
            continue

        def fn(backend=backend):
            with ops.use_backend(backend, op="tiered_sparse_attention"):
                return op(*args, **kwargs)

        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield Case(SUITE, label, f"longvideo[{backend}]", fn, params, flops=flops,
                   setup_ms=(time.perf_counter() - t0) * 1e3, extra=dict(extra))
        if backend == "cuda" and device.type == "cuda":
            # the legacy CUDA kernel (LONGVIDEO_TSA_CUDA=legacy) beside the default pipelined one;
            # not named longvideo[...]: the auto preferences compare backends, not kernels
            def legacy(fn=fn):
                old = os.environ.get("LONGVIDEO_TSA_CUDA")
                os.environ["LONGVIDEO_TSA_CUDA"] = "legacy"
                try:
                    return fn()
                finally:
                    if old is None:
                        os.environ.pop("LONGVIDEO_TSA_CUDA", None)
                    else:
                        os.environ["LONGVIDEO_TSA_CUDA"] = old

            t0 = time.perf_counter()
            legacy()
            torch.cuda.synchronize(device)
            yield Case(SUITE, label, "cuda_legacy_kernel", legacy, params, flops=flops,
                       setup_ms=(time.perf_counter() - t0) * 1e3, extra=dict(extra, kernel="legacy"))


def _cases_for(device, dtype, B, H, D, T, F, tiers, vrpr, impls, label):
    """Each implementation's case, yielded as soon as it is set up (a slow setup -- a FlexAttention
    compile -- cannot cost the cases before it when the run is stopped at its time limit)."""
    ops_mod = importlib.import_module("longvideo.ops.tiered_sparse_attention")

    S = F * T
    L, SF, SW, SK = tiers["local_frames"], tiers["stripe_frames"], tiers["stripe_width"], tiers["sink_frames"]
    dens = ops_mod.schedule_density(F, T, L, SF, SW, SK)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
    freqs = wan_temporal_freqs(D).to(device=device, dtype=torch.float32) if vrpr is not None else None
    params = dict(B=B, H=H, S=S, D=D, frame_tokens=T, F=F, dtype=str(dtype).replace("torch.", ""), vrpr=vrpr, **tiers)
    pair_flops = 4.0 * D * dens["pair_density"] * S * S * B * H
    extra = {k_: dens[k_] for k_ in ("pair_density", "computed_pair_density", "block_density")}
    yield from _op_cases(label, params, impls, device, (q, k, v, T, L, SF, SW, SK, None, freqs, vrpr), {},
                         pair_flops, extra)

    if "tiles" in impls and device.type == "cuda":
        # the Triton kernel at other tiles than default_blocks (offline sm_90: no spills at these;
        # which is fastest is what this measures). Named triton_tile[...], not longvideo[...]: the
        # auto preferences compare backends, not tiles.
        tri = importlib.import_module("longvideo.triton_kernels.tiered_sparse_attention")
        for bm, bn, nw, ns in TILE_SWEEP["vrpr" if vrpr is not None else "plain"]:
            def tile_fn(bm=bm, bn=bn, nw=nw, ns=ns):
                return tri.tiered_sparse_attention_fwd(q, k, v, T, L, SF, SW, SK, None, freqs, vrpr, block_m=bm,
                                                       block_n=bn, num_warps=nw, num_stages=ns)

            t0 = time.perf_counter()
            try:
                tile_fn()
                torch.cuda.synchronize(device)
            except Exception:  # noqa: BLE001 - the timed call records the error
                pass
            yield (Case(SUITE, label, f"triton_tile[{bm}x{bn}w{nw}s{ns}]", tile_fn, params, flops=pair_flops,
                        setup_ms=(time.perf_counter() - t0) * 1e3, extra=dict(extra)))

    if "sdpa" in impls:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_backends = {"sdpa_flash(dense)": SDPBackend.FLASH_ATTENTION}
        if device.type == "cuda":
            sdpa_backends["sdpa_cudnn(dense)"] = SDPBackend.CUDNN_ATTENTION
        else:
            sdpa_backends = {"sdpa_flash(dense)": SDPBackend.MATH}
        for impl, sdpa_backend in sdpa_backends.items():
            def sdpa(sdpa_backend=sdpa_backend):
                with sdpa_kernel([sdpa_backend]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)

            yield (Case(SUITE, label, impl, sdpa, params, flops=4.0 * D * S * S * B * H,
                              extra={"pair_density": 1.0, "note": "dense problem, no tiers"}))

    if "flex" in impls and device.type == "cuda":
        from longvideo.benchmarks._flex import block_mask, compiled_flex_attention

        flex = compiled_flex_attention()
        t0 = time.perf_counter()
        bm = block_mask(_flex_mask_mod(T, L, SF, SW, SK), S, device)
        torch.cuda.synchronize(device)
        setup = (time.perf_counter() - t0) * 1e3
        if vrpr is None:
            yield (Case(SUITE, label, "flex_attention", lambda: flex(q, k, v, block_mask=bm), params,
                              flops=pair_flops, setup_ms=setup, extra=dict(extra)))
        else:
            # FreeLOC's official VRPR layer: per band a RoPE copy of q and k and one FlexAttention
            # call restricted to the band, merged by LSE (cost model: the later side's shifted
            # positions are used for both signs, as one copy per band allows).
            w1, w2, g1, g2, clip = (int(x) for x in vrpr)
            f = torch.arange(S, device=device) // T
            c1, c2 = w1 - w1 // g1, w2 - w2 // g2 - (w2 - w1) // g1
            bands = [((0, w1), f, f), ((w1, w2), f // g1 + c1, f // g1),
                     ((w2, 1 << 30), torch.clamp(f // g2 + c2, max=clip), f // g2)]
            t0 = time.perf_counter()
            masks = [block_mask(_flex_mask_mod(T, L, SF, SW, SK, band), S, device) for band, _, _ in bands]
            torch.cuda.synchronize(device)
            setup3 = (time.perf_counter() - t0) * 1e3

            def three_call():
                outs, lses = [], []
                for (band, pq, pk), m in zip(bands, masks):
                    o, lse = flex(_rotate(q, pq, freqs), _rotate(k, pk, freqs), v, block_mask=m, return_lse=True)
                    outs.append(o)
                    lses.append(lse)
                lse = torch.stack(lses)
                w = torch.softmax(lse, dim=0)
                return sum(o * w_[..., None].to(o.dtype) for o, w_ in zip(outs, w))

            yield (Case(SUITE, label, "official_3call_flex_lse", three_call, params, flops=pair_flops,
                              setup_ms=setup3, extra=dict(extra)))


def _official_cases(device, dtype, B, H, D, T, F, mode, impls, label):
    """FreeLOC's default (semantics="official") layer `mode` ("vrpr" | "tsa"): the op with the
    token-granular arguments FreeLOC hands it (docs/fidelity.md), on each available backend."""
    from longvideo.methods.freeloc import derive_params
    from longvideo.ops.plan.tiered import token_pair_count

    S = F * T
    kw = derive_params(F, 21, semantics="official").settings(mode, T).op_kwargs()
    local, stripe, width, sink = (kw.pop(n) for n in ("local_frames", "stripe_frames", "stripe_width", "sink_frames"))
    density = token_pair_count(F, T, width, kw.get("token_bands"), kw.get("token_tiers")) / float(S) ** 2
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
    freqs = wan_temporal_freqs(D).to(device=device, dtype=torch.float32)
    params = dict(B=B, H=H, S=S, D=D, frame_tokens=T, F=F, dtype=str(dtype).replace("torch.", ""),
                  local_frames=local, stripe_frames=stripe, stripe_width=width, sink_frames=sink,
                  semantics="official", layer=mode, **kw)
    yield from _op_cases(label, params, impls, device, (q, k, v, T, local, stripe, width, sink, None, freqs), kw,
                         4.0 * D * density * S * S * B * H, {"pair_density": density})


def cases(device: torch.device, quick: bool, profile: str = "full"):
    """A list (quick) or a generator of cases (full sizes; see _full_cases / _budget_cases)."""
    if quick:  # tiny CPU sizes: the reference and, under TRITON_INTERPRET=1, the Triton kernel
        from longvideo.ops import _registry

        impls = {"reference", "sdpa"} | ({"triton"} if _registry.triton_interpreting() else set())
        tiers = dict(local_frames=2, stripe_frames=4, stripe_width=3, sink_frames=1)
        out = list(_cases_for(device, torch.float32, 1, 2, 32, 13, 6, tiers, None, impls, "quick_F6_T13"))
        out += list(_cases_for(device, torch.float32, 1, 2, 32, 13, 6, tiers, [1.0, 3.0, 1.0, 2.0, 3.0], impls - {"sdpa"},
                          "quick_F6_T13_vrpr"))
        for mode in ("vrpr", "tsa"):  # FreeLOC's official layouts at 23 latent frames of 4 tokens
            out += list(_official_cases(device, torch.float32, 1, 2, 32, 4, 23, mode, impls - {"sdpa"},
                                        f"quick_F23_T4_official_{mode}"))
        return out
    return _budget_cases(device) if profile == "budget" else _full_cases(device)


def _budget_cases(device):
    """FreeLOC's real hot path first: the tiers with RoPE + VRPR at 41 and 81 latent frames (the
    official 3-call FlexAttention scheme as the peer), then the plain tiers (FlexAttention with the
    same block mask, SDPA flash and cuDNN on the dense problem)."""
    impls = {"triton", "cuda", "sdpa", "flex"}
    dt, B, H, D = torch.bfloat16, 1, 12, 128
    for F in (41, 81):  # FreeLOC's default semantics ("official"): its two layer kinds
        for mode in ("tsa", "vrpr"):
            yield from _official_cases(device, dt, B, H, D, 1560, F, mode, impls, f"480p_F{F}_official_{mode}")
    for F in (41, 81):
        yield from _cases_for(device, dt, B, H, D, 1560, F, FREELOC_TIERS, VRPR[F],
                              (impls - {"sdpa"}) | ({"tiles"} if F == 41 else set()), f"480p_F{F}_tsa_vrpr")
    for F in (41, 81):
        yield from _cases_for(device, dt, B, H, D, 1560, F, FREELOC_TIERS, None,
                              impls | ({"tiles"} if F == 41 else set()), f"480p_F{F}_tsa")


def _full_cases(device):
    """Lazily, one configuration at a time (its setup -- first kernel calls, block masks, the
    compiled FlexAttention -- happens when the harness reaches it; a run stopped by a time limit
    keeps the configurations before)."""
    impls = {"triton", "cuda", "sdpa", "flex"}
    dt, B, H, D = torch.bfloat16, 1, 12, 128
    yield from _cases_for(device, dt, B, H, D, 1560, 21, dict(FREELOC_TIERS, local_frames=21), None, impls,
                          "480p_F21_dense")
    for F in (41, 81):
        yield from _cases_for(device, dt, B, H, D, 1560, F, FREELOC_TIERS, None, impls, f"480p_F{F}_tsa")
        yield from _cases_for(device, dt, B, H, D, 1560, F, FREELOC_TIERS, VRPR[F], impls - {"sdpa"},
                              f"480p_F{F}_tsa_vrpr")
        for mode in ("tsa", "vrpr"):
            yield from _official_cases(device, dt, B, H, D, 1560, F, mode, impls, f"480p_F{F}_official_{mode}")
    yield from _cases_for(device, dt, B, H, D, 3600, 21, dict(FREELOC_TIERS, local_frames=21), None, impls,
                          "720p_F21_dense")
    yield from _cases_for(device, dt, B, H, D, 3600, 41, FREELOC_TIERS, None, impls, "720p_F41_tsa")
