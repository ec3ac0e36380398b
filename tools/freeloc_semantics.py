"""Measure how far FreeLOC's two semantics ("official": the released code's token-granular
layouts; "paper": the frame-granular definition) are apart, for docs/fidelity.md.

For 41 and 81 latent frames of 1560 tokens (832x480, Wan2.1):
- attended pair density of a VRPR layer and of a TSA layer under each semantics (exact pair
  counts of the op's layouts: ``longvideo.ops.plan.tiered.token_pair_count`` / ``schedule_density``);
- relative L2 ||official - paper|| / ||paper|| of the layer's attention output (the op's reference
  backend, float32) on a fixed random input: one head of Wan's D = 128 (44 temporal channels,
  theta 10000), q, k, v standard normal (seed 0), on `--rows` query rows drawn uniformly (seed 1).

    python tools/freeloc_semantics.py [--rows 32] [--json out.json]

Prints a markdown table; ``--json`` writes the numbers with the setup.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from longvideo.methods.freeloc import derive_params  # noqa: E402
from longvideo.ops.plan import tiered as plan  # noqa: E402
from longvideo.reference.tiered_sparse_attention import tiered_sparse_attention_reference  # noqa: E402

T = 1560
D = 128
T_DIM = D - 4 * (D // 6)  # Wan's temporal channels: 44 at D = 128


def density(F: int, mode: str, semantics: str) -> float:
    """Attended pairs / S^2 of a layer in `mode` under `semantics`."""
    kw = derive_params(F, 21, semantics=semantics).settings(mode, T).op_kwargs()
    if kw.get("token_tiers") is not None or kw.get("token_bands") is not None:
        return plan.token_pair_count(F, T, kw["stripe_width"], kw.get("token_bands"),
                                     kw.get("token_tiers")) / float(F * T) ** 2
    # pair_density does not depend on the tile: one block spanning the sequence keeps the block
    # classification (not needed here) trivial
    return plan.schedule_density(F, T, kw["local_frames"], kw["stripe_frames"], kw["stripe_width"],
                                 kw["sink_frames"], block_m=F * T, block_n=F * T)["pair_density"]


def layer_output(F: int, mode: str, semantics: str, rows: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    S = F * T
    q, k, v = (torch.randn(1, 1, S, D, generator=gen) for _ in range(3))
    freqs = 1.0 / 10000.0 ** (torch.arange(0, T_DIM, 2, dtype=torch.float64) / T_DIM)
    kw = derive_params(F, 21, semantics=semantics).settings(mode, T).op_kwargs()
    local = kw.pop("local_frames")
    return tiered_sparse_attention_reference(q, k, v, T, local, scale=None, rope_t_freqs=freqs.float(),
                                             query_rows=rows, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32, help="sampled query rows per layer (default 32)")
    ap.add_argument("--json", help="write the numbers to this file")
    args = ap.parse_args(argv)
    results = []
    t0 = time.time()
    for F in (41, 81):
        rows = torch.randint(0, F * T, (args.rows,), generator=torch.Generator().manual_seed(1))
        for mode in ("vrpr", "tsa"):
            off = layer_output(F, mode, "official", rows)
            pap = layer_output(F, mode, "paper", rows)
            rel = float((off - pap).norm() / pap.norm())
            results.append(dict(latent_frames=F, layer=mode, density_official=density(F, mode, "official"),
                                density_paper=density(F, mode, "paper"), relative_l2=rel))
    print("| latent frames | layer | attended density, official | attended density, paper | relative L2 |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['latent_frames']} | {r['layer']} | {100 * r['density_official']:.2f}% | "
              f"{100 * r['density_paper']:.2f}% | {r['relative_l2']:.3f} |")
    setup = dict(frame_tokens=T, head_dim=D, temporal_channels=T_DIM, heads=1, rows=args.rows, dtype="float32",
                 backend="reference", seeds=dict(inputs=0, rows=1), torch=torch.__version__,
                 machine=platform.machine(), seconds=round(time.time() - t0, 1),
                 date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(setup=setup, results=results), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
