"""Wan 2.2 two-expert FIFO: the work of the two expert routings (docs/methods.md, "Wan 2.2: two
experts in one window"), counted on the tiny two-expert model on the CPU.

Runs FIFO with ``expert_routing="split"`` and ``"select"`` on ``longvideo.models.wan22``'s tiny
pipeline and counts, with forward pre-hooks on both experts, the expert calls, the latent frames
they process (the transformer's token-linear work scales with these) and the sum of squared
frame counts per call (self-attention's work scales with these). The counts depend on the queue
geometry (n, f, L, the boundary's level), not on the weights; wall time on the tiny model is
dominated by per-call overhead and is printed for information only.

    python tools/wan22_routing_cost.py [--partitions 4] [--window 6] [--frames 24]
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--window", type=int, default=6)
    p.add_argument("--frames", type=int, default=24, help="video frames to generate")
    args = p.parse_args()
    from longvideo.methods.fifo import FIFODiffusion
    from longvideo.models import wan22

    pipe = wan22.tiny_pipeline()
    rows = {}
    for routing in ("split", "select"):
        fifo = FIFODiffusion(pipe, num_partitions=args.partitions, frames_per_window=args.window)
        fifo.family.expert_routing = routing
        count = {"calls": 0, "frames": 0, "frames_sq": 0}

        def hook(module, a, kwargs, count=count):
            f = kwargs["hidden_states"].shape[2]
            count["calls"] += 1
            count["frames"] += f
            count["frames_sq"] += f * f

        handles = [tr.register_forward_pre_hook(hook, with_kwargs=True) for tr in fifo.family.experts]
        t0 = time.perf_counter()
        with torch.no_grad():
            fifo("a cat", args.frames, height=32, width=32, init_steps=2)
        count["wall_s"] = round(time.perf_counter() - t0, 1)
        for h in handles:
            h.remove()
        lv = fifo.family.levels(fifo.L, torch.device("cpu"))
        above = int((lv.t_model >= fifo.family.boundary_timestep).sum())
        rows[routing] = count
        print(f"{routing}: n={fifo.n} f={fifo.f} L={fifo.L} levels at/above the boundary={above} {count}")
    for key in ("frames", "frames_sq"):
        print(f"select / split {key}: {rows['select'][key] / rows['split'][key]:.2f}")


if __name__ == "__main__":
    main()
