"""Benchmark suite ``lowfreq_mix`` (issue 2).

Cases (GPU; float32 and bfloat16; FreeInit: butterworth order 4, d_s = d_t = 0.25, diffusers'
defaults; Ouroboros tail: gaussian, d_s 0.25, d_t 1.0, the method's setting):
  ouroboros_tail_4x40x64      (1, 4, 1, 40, 64)      Ouroboros' per-step tail mixing (T = 1)
  ouroboros_tail_16x60x104    (1, 16, 1, 60, 104)    the same at Wan-like latent sizes
  freeinit_4x16x64x64         (1, 4, 16, 64, 64)     FreeInit on AnimateDiff (16 frames, 512x512)
  freeinit_2x16x21x60x104     (2, 16, 21, 60, 104)   FreeInit on a Wan-sized latent, CFG batch 2

Profiles: ``full`` and ``budget`` run the same cases (the harness caps the budget's repeats).

Implementations:
  longvideo[triton], longvideo[cuda]   torch.ops.longvideo.lowfreq_mix on that backend (the public
                                       op: argument checks and dispatch included)
  triton_spectral                      (T > 1 only) the Triton backend forced onto its spectral path
                                       (rfftn + filter kernel + irfftn), the path T > 1 took before the
                                       plane path: the two measured side by side (docs/perf_notes.md)
  torch_fft_reference                  longvideo.reference.lowfreq_mix (fftn, shifts, filter cached)
  diffusers_freeinit                   diffusers' FreeInit path per call, as `_apply_free_init` does
                                       it: `_get_free_init_freq_filter` (Python loop over T*H*W) +
                                       `_apply_freq_filter` on float32 inputs
  device_copy                          roofline: one copy of the same number of bytes
                                       (1.5 x numel elements read and written = x + noise + out)
  torch_add                            x + noise -> out: the op's exact traffic in one torch kernel

On CUDA every case but diffusers' is also timed as 20 calls replayed from a CUDA graph
(``graph_ms``: the device time per call, without the host's launch path, which is what a call
costs inside a pipeline whose GPU is busy). The Ouroboros tail shapes move 0.1-1.2 MB: a kernel
launch takes longer than the bandwidth roofline of such a call, so the table also gives each
implementation's speed relative to ``device_copy`` of the same bytes (``%copy``, ``graph_%copy``).

`bytes` = x + noise read + out written (3 x numel x element size) for every implementation, so GB/s
and the fraction of the copy bandwidth compare directly. The Triton rows also carry the bytes their
path moves by the kernels' model (``extra["path"]``, ``extra["model_bytes"]``,
``triton_kernels/lowfreq_mix.py: predicted_bytes``): frac_peak_bw x model_bytes / bytes is the
fraction of the copy bandwidth the path's real traffic reaches. `extra["speedup_vs_diffusers"]` is not
computed here (the harness times cases independently); the table shows the times side by side.
"""
from __future__ import annotations

import torch

from longvideo.benchmarking import Case
from longvideo.ops import get_backend, use_backend
from longvideo.ops.lowfreq_mix import lowfreq_mix
from longvideo.reference.lowfreq_mix import lowfreq_mix_reference

SUITE = "lowfreq_mix"
GRAPH_CALLS = 20  # device time per call from a CUDA graph of 20 calls (see Case.graph_calls)
# (filter, d_s, d_t, order): FreeInit cases at diffusers' defaults; the Ouroboros tail at the
# method's own setting (docs/methods.md, coherent tail latent sampling: Gaussian, d_s 0.25,
# d_t 1.0; with d_t = d_s and T = 1 the temporal term alone puts every frequency far outside the
# pass band and the mix returns ~noise).
FREEINIT = ("butterworth", 0.25, 0.25, 4.0)
OUROBOROS_TAIL = ("gaussian", 0.25, 1.0, 4.0)


def _shapes(quick: bool):
    if quick:
        return [("ouroboros_tail_tiny", (1, 2, 1, 12, 20), OUROBOROS_TAIL), ("freeinit_tiny", (1, 2, 4, 8, 12), FREEINIT)]
    return [("ouroboros_tail_4x40x64", (1, 4, 1, 40, 64), OUROBOROS_TAIL),
            ("ouroboros_tail_16x60x104", (1, 16, 1, 60, 104), OUROBOROS_TAIL),
            ("freeinit_4x16x64x64", (1, 4, 16, 64, 64), FREEINIT),
            ("freeinit_2x16x21x60x104", (2, 16, 21, 60, 104), FREEINIT)]


def _diffusers_path(x, noise, filt, d_s, d_t, order):
    from diffusers.pipelines.free_init_utils import FreeInitMixin

    def fn():
        lpf = FreeInitMixin._get_free_init_freq_filter(None, (1, *x.shape[1:]), x.device, filt, order, d_s, d_t)
        return FreeInitMixin._apply_freq_filter(None, x.float(), noise.float(), lpf).to(x.dtype)

    return fn


def cases(device: torch.device, quick: bool, profile: str = "full") -> list[Case]:
    """Every shape in both profiles (the whole suite takes seconds; under ``budget`` the harness
    caps the repeats, diffusers' path runs once)."""
    device = torch.device(device)
    dtypes = [torch.float32] if quick or device.type != "cuda" else [torch.float32, torch.bfloat16]
    out = []
    for label, shape, (filt, d_s, d_t, order) in _shapes(quick):
        for dtype in dtypes:
            gen = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            noise = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            numel = x.numel()
            nbytes = 3 * numel * x.element_size()
            params = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "filter": filt,
                      "d_s": d_s, "d_t": d_t}
            name = f"{label}_{params['dtype']}"

            def add(impl, fn, timing=None, graph_calls=GRAPH_CALLS, **extra):
                out.append(Case(suite=SUITE, name=name, impl=impl, fn=fn, params=params, bytes=nbytes, extra=extra,
                                timing=timing, graph_calls=graph_calls))

            for be in ("triton", "cuda"):
                backend = get_backend("lowfreq_mix", be)
                ok, _ = backend.is_available()
                runs_here = device.type in backend.devices or (be == "triton" and device.type == "cpu")
                if not (ok and runs_here):
                    continue

                def fn(be=be, x=x, noise=noise, f=(filt, d_s, d_t, order)):
                    with use_backend(be, op="lowfreq_mix"):
                        return lowfreq_mix(x, noise, *f)

                tm = None
                if be == "triton":
                    from longvideo.ops.lowfreq_mix import _triton_module

                    tm = _triton_module()
                    path = tm.choose_path(shape)
                    add(f"longvideo[{be}]", fn, path=path, model_bytes=tm.predicted_bytes(shape, x.element_size(), path))
                else:
                    add(f"longvideo[{be}]", fn)
                if be == "triton" and shape[-3] > 1:
                    from longvideo.ops.plan.lowfreq import axis_table

                    from longvideo.ops.lowfreq_mix import _triton_module

                    def fn_spectral(x=x, noise=noise, f=(filt, d_s, d_t, order), tm=_triton_module()):
                        return tm.lowfreq_mix(x, noise, axis_table(x, f[0], f[1], f[2]), f[0], f[1], f[3],
                                              path="spectral")

                    add("triton_spectral", fn_spectral, path="spectral",
                        model_bytes=tm.predicted_bytes(shape, x.element_size(), "spectral"))
            add("torch_fft_reference",
                lambda x=x, noise=noise, f=(filt, d_s, d_t, order): lowfreq_mix_reference(x, noise, *f))
            if dtype == torch.float32 or not quick:
                # its Python loop takes ~1-2 s per call at the FreeInit sizes: a few calls suffice
                add("diffusers_freeinit", _diffusers_path(x, noise, filt, d_s, d_t, order), timing={"warmup": 0, "repeats": 3, "min_time_s": 0.0},
                    graph_calls=0)  # builds its filter on the host: not capturable
            src = torch.empty((3 * numel + 1) // 2, dtype=dtype, device=device)
            dst = torch.empty_like(src)
            add("device_copy", lambda src=src, dst=dst: dst.copy_(src), roofline=True)
            res = torch.empty_like(x)
            add("torch_add", lambda x=x, noise=noise, res=res: torch.add(x, noise, out=res))
    return out
