"""FlexAttention as the suites' peer: compiled, never silently eager.

Each tier or band mask is its own ``mask_mod`` closure, and dynamo guards on the closure's
constants, so every distinct mask is one more compile of ``create_block_mask`` and of
``flex_attention``. Past ``recompile_limit`` (8 by default) dynamo falls back to eager code, and
eager FlexAttention and eager ``create_block_mask`` materialise the S x S scores / mask: the first
GPU run asked for 183 GiB (FreeLOC at 41 frames) and 714 GiB (the tiers at 81 frames) there. The
official FreeLOC code compiles per band as well, so a higher limit is the fair setting; where it is
still hit, the suite records an error instead of timing an eager fallback.
"""
from __future__ import annotations

import torch

RECOMPILE_LIMIT = 64


def compiled_flex_attention():
    """``torch.compile(flex_attention)`` with room for one compile per mask of a suite."""
    from torch.nn.attention.flex_attention import flex_attention

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=False)


def block_mask(mask_mod, seq_len: int, device):
    """The block mask of `mask_mod` over a (seq_len x seq_len) problem, built by compiled code (no
    S x S tensor), under the same recompile allowance."""
    from torch.nn.attention.flex_attention import create_block_mask

    compiled_flex_attention()  # sets the limits
    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device, _compile=True)
