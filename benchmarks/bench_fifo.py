"""Benchmark suite ``fifo`` (issue 6): seconds per output frame and peak memory of FIFO-Diffusion.

One FIFO iteration (every window of the queue denoised once, the head popped, a tail pushed)
produces one latent frame = 4 video frames on Wan. Cases, on a Wan2.1-1.3B-shaped transformer
with random weights (bf16) at 832x480 (30x52 tokens per latent frame), f = 21 latent frames per
window, n = 4 partitions, lookahead on, classifier-free guidance batched (text embeddings random,
512 tokens):
  fifo                 the plain iteration
  fifo+coherent_tail   with Ouroboros' coherent tail sampling (lowfreq_mix on the tail)
Seconds per video frame = iteration time / `extra["video_frames_per_iteration"]` (4). The
queue's size does not depend on the video length (only the iteration counter grows), so one
iteration's peak memory is the peak for 128, 256 or 512 frames alike; the issue's three lengths are
not run separately here (to do with a full generate() once a Wan VAE of real size is built).
The VAE decode of the popped frame is not included (no Wan VAE weights shape is built here).
quick=True: the tiny config on CPU.
"""
from __future__ import annotations

import types

import torch

from longvideo.benchmarking import Case

from .bench_freeloc import TINY, WAN_1_3B, _transformer


def _fifo(transformer, f, n, coherent_tail):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from longvideo.methods.fifo import FIFODiffusion

    pipe = types.SimpleNamespace(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return FIFODiffusion(pipe, num_partitions=n, frames_per_window=f, coherent_tail=coherent_tail)


def _iteration_case(device, transformer, config, f, n, h, w, text_len, label, coherent_tail):
    from longvideo.methods.fifo import QueueState

    fifo = _fifo(transformer, f, n, coherent_tail)
    gen = torch.Generator("cpu").manual_seed(0)
    C = config["in_channels"]
    state = QueueState(queue=torch.randn(1, C, fifo.L, h, w, generator=gen).to(device),
                       context=torch.randn(1, C, f // 2, h, w, generator=gen).to(device), prev_latent=None,
                       iteration=0, frames_out=0, rng_state=gen.get_state())
    emb = torch.randn(1, text_len, config["text_dim"], generator=gen).to(device, transformer.dtype)
    neg = torch.randn(1, text_len, config["text_dim"], generator=gen).to(device, transformer.dtype)
    sig = fifo.sigmas(device)

    def run():
        with torch.no_grad():
            new = fifo.step(state, sig, emb, neg, 5.0)
            tail = torch.randn_like(new[:, :, :1])
            if coherent_tail:
                tail = torch.ops.longvideo.lowfreq_mix(new[:, :, -1:].contiguous(), tail, "gaussian", 0.25, 1.0, 4)
            return torch.cat([new[:, :, 1:], tail], dim=2)

    tokens = f * h * w // 4
    return Case(suite="fifo", name=f"iteration_f{f}_n{n}_{h * 8}x{w * 8}", impl=label, fn=run,
                params={"f": f, "n": n, "latent_hw": (h, w), "tokens_per_window": tokens},
                extra={"model_calls": 2 * n, "video_frames_per_iteration": 4, "video_length_independent": True},
                timing={"warmup": 1, "repeats": 3, "min_time_s": 0.0})


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        tr = _transformer(TINY, device, torch.float32)
        return [_iteration_case(device, tr, TINY, 4, 2, 8, 8, 8, impl, ct)
                for impl, ct in (("fifo", False), ("fifo+coherent_tail", True))]
    tr = _transformer(WAN_1_3B, device, torch.bfloat16)
    return [_iteration_case(device, tr, WAN_1_3B, 21, 4, 60, 104, 512, impl, ct)
            for impl, ct in (("fifo", False), ("fifo+coherent_tail", True))]
