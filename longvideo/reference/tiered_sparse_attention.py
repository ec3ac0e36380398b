"""Reference for ``tiered_sparse_attention``: FreeLOC's tiered sparse attention (TSA) with its
video relative position re-encoding (VRPR), as dense attention with an explicit mask and explicit
per-pair rotary rotations (the contract is the op's docstring and docs/ops.md).

Token s of a (B, H, S, D) sequence lies in frame f(s) = s // frame_tokens at spatial index
p(s) = s % frame_tokens. Every (query i, key j) pair gets an attended flag and a *combo*
c in 0..4 that says which temporal position rotates q_i and which rotates k_j (:func:`pair_classes`):

- frame tiers (default): with d = f(i) - f(j), i attends j iff
  |d| < local_frames  or  (|d| < stripe_frames and |p(i) - p(j)| < stripe_width)  or  f(j) < sink_frames;
- token tiers (``token_tiers = [L, St, K, J]``, FreeLOC's released code): with t = i - j,
  i attends j iff |t| <= L  or  (|t| <= St and |p(i) - p(j)| < stripe_width)  or  j < K  or
  (j > J and -t > St);
- VRPR bands by frame distance |d| (``vrpr``) or by token distance |t| (``token_bands = [E, B1,
  B2]``: |t| <= E exact, E < |t| < B1 the band gap (not attended), B1 <= |t| < B2 mid, |t| >= B2
  far).

With ``rope_t_freqs`` (R,), channels [0, 2R) of q and k are Wan's temporal RoPE pairs (2i, 2i+1),
not yet rotated: pair i of a token at position P is rotated by the angle P * rope_t_freqs[i],
    (x0, x1) -> (x0 cos a - x1 sin a, x0 sin a + x1 cos a).
Positions (:func:`position_variants`): combo c rotates q with variant (0, 1, 2, 3, 4)[c] of its
frame and k with variant (0, 2, 1, 4, 3)[c] of its frame.

Slow and readable: logits in float32, softmax in float32, chunked over queries so S ~ 2000
fits in CPU memory.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def frame_and_spatial_index(n: int, frame_tokens: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(s), p(s)) for s in [0, n): frame index and spatial index in Wan's frame-major order."""
    s = torch.arange(n, device=device)
    return s // frame_tokens, s % frame_tokens


def tier_mask(seq_len: int, frame_tokens: int, local_frames: int, stripe_frames: int = 0,
              stripe_width: int = 0, sink_frames: int = 1, query_index: Optional[torch.Tensor] = None,
              key_index: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Boolean mask (Sq, Sk), True where query i attends key j (the TSA tiers).

    ``query_index`` / ``key_index`` select token indices (default: all of [0, seq_len)), so a
    caller can build the mask one query chunk at a time.
    """
    if query_index is None:
        query_index = torch.arange(seq_len, device=device)
    if key_index is None:
        key_index = torch.arange(seq_len, device=query_index.device)
    fi, pi = (query_index // frame_tokens)[:, None], (query_index % frame_tokens)[:, None]
    fj, pj = (key_index // frame_tokens)[None, :], (key_index % frame_tokens)[None, :]
    dist = (fi - fj).abs()
    local = dist < local_frames
    stripe = (dist < stripe_frames) & ((pi - pj).abs() < stripe_width)
    sink = fj < sink_frames
    return local | stripe | sink


def vrpr_positions(frame_q: torch.Tensor, frame_k: torch.Tensor,
                   vrpr: Optional[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeLOC's re-encoded temporal positions (pos_q, pos_k) per (query, key) pair.

    ``frame_q`` and ``frame_k`` are integer frame indices that broadcast against each other
    (e.g. (Sq, 1) and (1, Sk)). With d = f_q - f_k and vrpr = [W1, W2, G1, G2, clip]:

        |d| < W1:           pos_q = f_q,                                       pos_k = f_k
        W1 <= |d| < W2, d>0: pos_q = f_q//G1 + M,                               pos_k = f_k//G1
        |d| >= W2, d>0:      pos_q = min(f_q//G2 + W2 - W2//G2 - (W2-W1)//G1, clip), pos_k = f_k//G2
        (d < 0: the same with the roles of query and key swapped), M = W1 - W1//G1 or the sixth
        entry of vrpr = [W1, W2, G1, G2, clip, M] (:func:`mid_shift`).

    vrpr None: the plain frame indices. Returns int64 tensors of the broadcast shape.
    """
    frame_q, frame_k = torch.broadcast_tensors(frame_q.long(), frame_k.long())
    if vrpr is None:
        return frame_q.clone(), frame_k.clone()
    w1, w2, g1, g2, clip = (int(v) for v in vrpr[:5])
    d = frame_q - frame_k
    dist = d.abs()
    later_q = d > 0
    # The later side of the pair gets the shifted position, the earlier side the plain grouped one.
    mid_shift = vrpr_mid_shift(vrpr)
    far_shift = w2 - w2 // g2 - (w2 - w1) // g1
    mid_q = torch.where(later_q, frame_q // g1 + mid_shift, frame_q // g1)
    mid_k = torch.where(later_q, frame_k // g1, frame_k // g1 + mid_shift)
    far_q = torch.where(later_q, (frame_q // g2 + far_shift).clamp(max=clip), frame_q // g2)
    far_k = torch.where(later_q, frame_k // g2, (frame_k // g2 + far_shift).clamp(max=clip))
    pos_q = torch.where(dist < w1, frame_q, torch.where(dist < w2, mid_q, far_q))
    pos_k = torch.where(dist < w1, frame_k, torch.where(dist < w2, mid_k, far_k))
    return pos_q, pos_k


def vrpr_mid_shift(vrpr: Sequence[float]) -> int:
    """The mid band's shift M of vrpr: its sixth entry if given, else W1 - W1 // G1 (the paper's
    floor(W1 / G1)). FreeLOC's released code computes int(f // G1 + W1 - W1 / G1) in floating point,
    i.e. M = floor(W1 - W1 / G1) = W1 - ceil(W1 / G1); equal when G1 divides W1."""
    if len(vrpr) > 5:
        return int(vrpr[5])
    w1, g1 = int(vrpr[0]), int(vrpr[2])
    return w1 - w1 // g1


COMBO_Q_VARIANT = (0, 1, 2, 3, 4)
COMBO_K_VARIANT = (0, 2, 1, 4, 3)


def position_variants(num_frames: int, vrpr: Optional[Sequence[float]] = None,
                      sink_rope: Optional[Sequence[int]] = None, device=None) -> torch.Tensor:
    """int64 (5, F): the temporal position of a token of frame f under each variant.

    With vrpr = [W1, W2, G1, G2, clip(, M)]: 0: f, 1: f//G1 + M, 2: f//G1,
    3: min(f//G2 + W2 - W2//G2 - (W2-W1)//G1, clip), 4: f//G2.
    With sink_rope = [G, M] (token tiers): 0: f, 1: f//G + M, 2: f//G, 3 and 4: f (unused).
    Neither: every variant is f.
    """
    f = torch.arange(num_frames, device=device, dtype=torch.int64)
    if vrpr is not None:
        w1, w2, g1, g2, clip = (int(v) for v in vrpr[:5])
        return torch.stack([f, f // g1 + vrpr_mid_shift(vrpr), f // g1,
                            torch.clamp(f // g2 + w2 - w2 // g2 - (w2 - w1) // g1, max=clip), f // g2])
    if sink_rope is not None:
        g, m = int(sink_rope[0]), int(sink_rope[1])
        return torch.stack([f, f // g + m, f // g, f, f])
    return f[None, :].expand(5, num_frames).clone()


def pair_classes(query_index: torch.Tensor, key_index: torch.Tensor, frame_tokens: int, local_frames: int,
                 stripe_frames: int = 0, stripe_width: int = 0, sink_frames: int = 1,
                 vrpr: Optional[Sequence[float]] = None, token_bands: Optional[Sequence[int]] = None,
                 token_tiers: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(attended bool (Sq, Sk), combo int64 (Sq, Sk)) of the pairs query_index x key_index.

    Combos: 0 exact band / plain positions; 1 mid band, query later; 2 mid band, key later; 3 far
    band, query later; 4 far band, key later. Token tiers use 0 (local, stripe, and sink keys
    within St tokens), 1 (sink keys j < K further than St tokens before the query) and 2 (late
    keys j > J further than St tokens after the query). Combos of pairs not attended are 0.
    """
    i, j = query_index[:, None], key_index[None, :]
    fi, pi = i // frame_tokens, i % frame_tokens
    fj, pj = j // frame_tokens, j % frame_tokens
    t = i - j
    near_p = (pi - pj).abs() < stripe_width
    if token_tiers is not None:
        lt, st, k_end, j_start = (int(x) for x in token_tiers)
        plain = (t.abs() <= lt) | ((t.abs() <= st) & (near_p | (j < k_end)))
        sink = (j < k_end) & (t > st)
        late = (j > j_start) & (-t > st)
        mask = plain | sink | late
        combo = torch.where(sink, 1, torch.where(late, 2, 0))
        return mask, combo.long()
    mask = tier_mask(0, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
                     query_index=query_index, key_index=key_index)
    if token_bands is not None:
        e, b1, b2 = (int(x) for x in token_bands)
        a = t.abs()
        mask = mask & ~((a > e) & (a < b1))  # the band gap
        combo = torch.where(a <= e, 0, torch.where(a < b2, torch.where(t > 0, 1, 2), torch.where(t > 0, 3, 4)))
    elif vrpr is not None:
        w1, w2 = int(vrpr[0]), int(vrpr[1])
        d = fi - fj
        a = d.abs()
        combo = torch.where(a < w1, 0, torch.where(a < w2, torch.where(d > 0, 1, 2), torch.where(d > 0, 3, 4)))
    else:
        combo = torch.zeros_like(t)
    combo = torch.where(mask, combo, 0)
    return mask, combo.long()


def rotate_temporal(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the temporal RoPE pairs (channels [0, 2R)) of x by angle pos * freqs[i].

    x (..., D) float32, pos broadcastable to x.shape[:-1], freqs (R,). Pair i = channels (2i, 2i+1):
    (x0, x1) -> (x0 cos a - x1 sin a, x0 sin a + x1 cos a). Channels >= 2R are unchanged.
    """
    r = freqs.numel()
    angle = pos.to(torch.float64)[..., None] * freqs.to(torch.float64)  # (..., R), float64 angles
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x0, x1 = x[..., 0:2 * r:2], x[..., 1:2 * r:2]
    rot = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((rot, x[..., 2 * r:]), dim=-1)


def _masked_terms(p: torch.Tensor, mask: torch.Tensor, v: torch.Tensor, budget: int = 64 << 20) -> torch.Tensor:
    """sum_j where(mask_ij, p_ij * v_j, 0): p (B, H, C, K), mask (C, K), v (B, H, K, Dv) -> (B, H, C, Dv),
    in slices of keys that keep the (B, H, C, k, Dv) products near `budget` bytes."""
    B, H, C, K = p.shape
    Dv = v.shape[-1]
    step = max(1, budget // max(1, B * H * C * Dv * 4))
    acc = p.new_zeros(B, H, C, Dv)
    for j0 in range(0, K, step):
        pj, mj, vj = p[..., j0:j0 + step], mask[:, j0:j0 + step], v[:, :, j0:j0 + step]
        prod = pj[..., None] * vj[:, :, None]                              # (B, H, C, k, Dv)
        acc = acc + torch.where(mj[None, None, :, :, None], prod, prod.new_zeros(())).sum(-2)
    return acc


def tiered_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_tokens: int,
                                      local_frames: int, stripe_frames: int = 0, stripe_width: int = 0,
                                      sink_frames: int = 1, scale: Optional[float] = None,
                                      rope_t_freqs: Optional[torch.Tensor] = None,
                                      vrpr: Optional[Sequence[float]] = None,
                                      token_bands: Optional[Sequence[int]] = None,
                                      token_tiers: Optional[Sequence[int]] = None,
                                      sink_rope: Optional[Sequence[int]] = None,
                                      query_chunk: Optional[int] = None,
                                      query_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense masked attention with explicit per-pair temporal rotations; returns q's dtype.

    out_i = sum_j softmax_j(scale * <rot(q_i, pos_q(i,j)), rot(k_j, pos_k(i,j))> + mask_ij) v_j
    with mask_ij = 0 where :func:`pair_classes` says attended, else -inf, and the positions of the
    pair's combo (:func:`position_variants`). ``query_rows`` (int64 indices): only those rows,
    (B, H, len(query_rows), Dv) (checks at real sequence lengths on sampled rows).

    NaN/inf rule: a key/value row that query i does not attend never reaches out_i, whatever its
    values (the sum runs over the attended keys only: where-selection, never a product with a zero
    probability, which would turn a NaN or inf in a masked v row into NaN); attended ones enter by
    IEEE arithmetic. Empty input (B, H, S or Dv zero) gives an empty (B, H, S, Dv) result.
    """
    B, H, S, D = q.shape
    if B * H * S * v.shape[-1] == 0:
        return q.new_empty(B, H, S, v.shape[-1])
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qf, kf, vf = q.float(), k.float(), v.float()
    # Key rows whose v holds a NaN/inf in some (b, h): their terms are summed with where-selection
    # below, the others by the plain matmul (where they are zeroed). One host sync per call (the
    # reference is the slow ground truth; the fast backends never sync on v).
    bad_keys = (~torch.isfinite(vf)).flatten(0, 1).any(0).any(-1).nonzero().squeeze(1)
    if bad_keys.numel():
        v_bad = vf[:, :, bad_keys]
        vf = vf.clone()
        vf[:, :, bad_keys] = 0.0
    frame = torch.arange(S, device=q.device) // frame_tokens
    per_pair = rope_t_freqs is not None and (vrpr is not None or sink_rope is not None)
    if rope_t_freqs is not None and not per_pair:
        # Positions are the frame indices: one rotation per token suffices.
        qf = rotate_temporal(qf, frame, rope_t_freqs)
        kf = rotate_temporal(kf, frame, rope_t_freqs)
    r2 = 2 * rope_t_freqs.numel() if per_pair else 0
    variants = position_variants(S // frame_tokens, vrpr, sink_rope, device=q.device) if per_pair else None
    q_var = torch.tensor(COMBO_Q_VARIANT, device=q.device)
    k_var = torch.tensor(COMBO_K_VARIANT, device=q.device)
    if query_chunk is None:
        # Per-pair rotation materialises (B, H, chunk, S, 2R) floats: keep that near 64 MiB on
        # CPU (1 GiB on a GPU, where the reference checks the kernels at real shapes).
        per_row = B * H * S * max(r2, 1) * 4 * (3 if per_pair else 1)
        budget = (1 << 30) if q.device.type == "cuda" else (64 << 20)
        query_chunk = max(1, min(S, budget // max(per_row, 1)))
    all_rows = torch.arange(S, device=q.device) if query_rows is None else query_rows.to(q.device).long()
    out = torch.empty(B, H, all_rows.numel(), vf.shape[-1], dtype=torch.float32, device=q.device)
    key_index = torch.arange(S, device=q.device)
    for start in range(0, all_rows.numel(), query_chunk):
        sel = slice(start, start + query_chunk)
        rows = all_rows[sel]
        mask, combo = pair_classes(rows, key_index, frame_tokens, local_frames, stripe_frames, stripe_width,
                                   sink_frames, vrpr, token_bands, token_tiers)
        qc = qf[:, :, rows]
        if per_pair:
            pos_q = variants[q_var[combo], frame[rows][:, None]]   # (C, S)
            pos_k = variants[k_var[combo], frame[None, :]]
            # Explicit per-pair rotations of the temporal channels: (B, H, C, S, 2R).
            q_t = rotate_temporal(qc[:, :, :, None, :r2].expand(B, H, rows.numel(), S, r2), pos_q, rope_t_freqs)
            k_t = rotate_temporal(kf[:, :, None, :, :r2].expand(B, H, rows.numel(), S, r2), pos_k, rope_t_freqs)
            logits = (q_t * k_t).sum(-1) + qc[..., r2:] @ kf[..., r2:].transpose(-1, -2)
        else:
            logits = qc @ kf.transpose(-1, -2)
        logits = (logits * scale).masked_fill(~mask, float("-inf"))
        p = torch.softmax(logits, dim=-1)  # every row attends at least itself (|t| = 0)
        res = p @ vf
        if bad_keys.numel():
            res = res + _masked_terms(p[..., bad_keys], mask[:, bad_keys], v_bad)
        out[:, :, sel] = res
    return out.to(q.dtype)
