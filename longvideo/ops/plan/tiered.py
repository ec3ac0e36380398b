"""Plan of ``tiered_sparse_attention``: what every backend needs besides q, k and v, computed
from the op's parameters alone (host side, torch ops only, no kernel): the block schedule, its
density, and the temporal RoPE tables of the position variants.

The block schedule depends on (S, frame_tokens, tiers, VRPR band edges, tile, device, layout)
and is cached per such key (:func:`build_schedule`): a diffusion run calls the op thousands of
times with one set of parameters and pays the build once, as flashinfer's plan/run split. The
tile is the backend's (the Triton launch code's ``default_blocks``, the CUDA kernel's 64 x 64);
the layout is the backend's too: a bitmask of combos per entry (CUDA) or one combo per entry
(``split_combos=True``, Triton). The RoPE tables depend on the values of ``rope_t_freqs`` and
are built per call (:func:`rope_tables`).

VRPR combos of a (query, key) pair: 0 exact band; 1 mid band, query later; 2 mid band, key
later; 3 far band, query later; 4 far band, key later. Each combo rotates q and k with one of
five position "variants" (functions of the token's own frame only, :func:`variant_positions`):
  0: f   1: f//G1 + M   2: f//G1   3: min(f//G2 + W2 - W2//G2 - (W2-W1)//G1, clip)   4: f//G2
(M = W1 - W1//G1 unless vrpr carries it as a sixth entry). The token-granular layouts of FreeLOC's
released code (``token_bands``, ``token_tiers``; the op's docstring) use the same combos: token
bands choose them by token distance (with a gap no pair attends), token tiers use 0 (plain), 1
(far sink: variant 1 = f//G + M of ``sink_rope`` for q, 2 = f//G for k) and 2 (late keys,
mirrored).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

COMBO_Q_VARIANT = (0, 1, 2, 3, 4)
COMBO_K_VARIANT = (0, 2, 1, 4, 3)
NUM_COMBOS = 5
NUM_VARIANTS = 5
# band edges (W1, W2) that no frame distance reaches: VRPR off
NO_BANDS = (1 << 30, 1 << 30)


def band_edges(vrpr: Optional[Sequence[float]]) -> tuple[int, int]:
    """(W1, W2) of vrpr = [W1, W2, G1, G2, clip(, M)]; :data:`NO_BANDS` without VRPR."""
    return (int(vrpr[0]), int(vrpr[1])) if vrpr is not None else NO_BANDS


# layout codes of the kernels: frame tiers (+ frame bands), frame tiers + token bands, token tiers
LAYOUT_FRAME, LAYOUT_TOKEN_BANDS, LAYOUT_TOKEN_TIERS = 0, 1, 2


def layout_code(token_bands=None, token_tiers=None) -> int:
    if token_tiers is not None:
        return LAYOUT_TOKEN_TIERS
    return LAYOUT_TOKEN_BANDS if token_bands is not None else LAYOUT_FRAME


def token_edges(token_bands=None, token_tiers=None) -> tuple[int, int, int, int]:
    """The four token edges a kernel reads: token bands [E, B1, B2, 0], token tiers [L, St, K, J],
    (0, 0, 0, 0) in the frame layout."""
    if token_tiers is not None:
        return tuple(int(x) for x in token_tiers)
    if token_bands is not None:
        return tuple(int(x) for x in token_bands) + (0,)
    return (0, 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# block schedule
@dataclass
class BlockSchedule:
    """Per query block, the key blocks to visit, split into full and partial lists.

    full_idx / part_idx: int32 (num_q_blocks, width) key-block indices, padded with 0;
    full_cnt / part_cnt: int32 (num_q_blocks,) how many entries are valid;
    full_combo / part_combo: int32, same shape as the index tensors: bitmask of the VRPR combos
    (bit c = combo c, see COMBO_Q_VARIANT) the block pair may contain (1 when VRPR is off); in a
    schedule built with ``split_combos=True``, the index of the entry's one combo instead (0 when
    VRPR is off), a block pair spanning several bands being listed once per band.
    A "full" pair has every element attended (no element mask), a "partial" one needs the
    element mask (tier edges, sink edges, the sequence end).
    """

    block_m: int
    block_n: int
    num_q_blocks: int
    num_k_blocks: int
    full_idx: torch.Tensor
    full_cnt: torch.Tensor
    full_combo: torch.Tensor
    part_idx: torch.Tensor
    part_cnt: torch.Tensor
    part_combo: torch.Tensor
    num_full: int
    num_partial: int


def _block_segments(seq_len: int, frame_tokens: int, block: int, device):
    """Each block as up to `nseg` (frame, p_lo, p_hi) runs of consecutive tokens of one frame.

    Returns frame (nb, nseg), p_lo, p_hi (inclusive), valid (nb, nseg) and the block's first/last
    frame. A block of `block` tokens touches at most ceil((block - 1) / frame_tokens) + 1 frames.
    """
    nb = -(-seq_len // block)
    start = torch.arange(nb, device=device) * block
    last = torch.clamp(start + block, max=seq_len) - 1
    f0, f1 = start // frame_tokens, last // frame_tokens
    nseg = min(-(-(block - 1) // frame_tokens) + 1, block)
    frame = f0[:, None] + torch.arange(nseg, device=device)[None, :]
    valid = frame <= f1[:, None]
    lo = torch.maximum(start[:, None], frame * frame_tokens) - frame * frame_tokens
    hi = torch.minimum(last[:, None], frame * frame_tokens + frame_tokens - 1) - frame * frame_tokens
    return frame, lo, hi, valid, f0, f1


def _classify(seq_len, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
              block_m, block_n, device, q_rows: Optional[slice] = None):
    """(nonempty, full) boolean (nq, nk) for the block pairs, exact at the element level.

    Segment pair (frame f, [a, b]) x (frame g, [c, e]): with d = f - g, all pairs attend if
    g < sink or |d| < local; else if |d| < stripe_frames the pairs with |p - p'| < width attend:
    some iff the interval gap max(0, c - b, a - e) < width, all iff the widest distance
    max(b - c, e - a) < width; else none.
    """
    qf, qlo, qhi, qvalid, _, _ = _block_segments(seq_len, frame_tokens, block_m, device)
    kf, klo, khi, kvalid, _, _ = _block_segments(seq_len, frame_tokens, block_n, device)
    if q_rows is not None:
        qf, qlo, qhi, qvalid = qf[q_rows], qlo[q_rows], qhi[q_rows], qvalid[q_rows]
    # shapes (nq, 1, sq, 1) x (1, nk, 1, sk)
    f, a, b, vq = (t[:, None, :, None] for t in (qf, qlo, qhi, qvalid))
    g, c, e, vk = (t[None, :, None, :] for t in (kf, klo, khi, kvalid))
    dist = (f - g).abs()
    whole = (g < sink_frames) | (dist < local_frames)
    in_stripe = dist < stripe_frames
    gap = torch.clamp(torch.maximum(c - b, a - e), min=0)
    widest = torch.maximum(b - c, e - a)
    some = whole | (in_stripe & (gap < stripe_width))
    all_ = whole | (in_stripe & (widest < stripe_width))
    pair_valid = vq & vk
    nonempty = (some & pair_valid).flatten(2).any(-1)
    full = (all_ | ~pair_valid).flatten(2).all(-1)
    # a key block running past the sequence end needs the bounds mask: never "full"
    k_inside = (torch.arange(full.shape[1], device=device) + 1) * block_n <= seq_len
    return nonempty, full & nonempty & k_inside[None, :]


def _token_ranges(seq_len, block_m, block_n, device):
    """Per block pair the range [tlo, thi] of t = i - j (every integer in it occurs) and of |t|."""
    nq, nk = -(-seq_len // block_m), -(-seq_len // block_n)
    qs = torch.arange(nq, device=device) * block_m
    ks = torch.arange(nk, device=device) * block_n
    qe = torch.clamp(qs + block_m, max=seq_len) - 1
    ke = torch.clamp(ks + block_n, max=seq_len) - 1
    tlo = qs[:, None] - ke[None, :]
    thi = qe[:, None] - ks[None, :]
    amin = torch.where((tlo <= 0) & (thi >= 0), torch.zeros_like(tlo), torch.minimum(tlo.abs(), thi.abs()))
    amax = torch.maximum(tlo.abs(), thi.abs())
    return tlo, thi, amin, amax, ks, ke


def _classify_token_tiers(seq_len, frame_tokens, stripe_width, token_tiers, block_m, block_n, device):
    """(nonempty, full, combo bits) of the token tiers [L, St, K, J] (op docstring): nonempty a
    superset and full a subset of the exact sets (the kernel's element mask decides the rest)."""
    lt, st, k_end, j_start = (int(x) for x in token_tiers)
    tlo, thi, amin, amax, ks, ke = _token_ranges(seq_len, block_m, block_n, device)
    some_local = amin <= lt
    all_local = amax <= lt
    # stripe: exact on the spatial side per segment pair (as _classify), conservative on |t|
    qf, qlo, qhi, qvalid, _, _ = _block_segments(seq_len, frame_tokens, block_m, device)
    kf, klo, khi, kvalid, _, _ = _block_segments(seq_len, frame_tokens, block_n, device)
    f, a, b, vq = (x[:, None, :, None] for x in (qf, qlo, qhi, qvalid))
    g, c, e, vk = (x[None, :, None, :] for x in (kf, klo, khi, kvalid))
    s_tlo = f * frame_tokens + a - (g * frame_tokens + e)
    s_thi = f * frame_tokens + b - (g * frame_tokens + c)
    s_amin = torch.where((s_tlo <= 0) & (s_thi >= 0), torch.zeros_like(s_tlo),
                         torch.minimum(s_tlo.abs(), s_thi.abs()))
    gap = torch.clamp(torch.maximum(c - b, a - e), min=0)
    some_stripe = ((gap < stripe_width) & (s_amin <= st) & vq & vk).flatten(2).any(-1)
    sink_some = (ks < k_end)[None, :]
    sink_all = (ke < k_end)[None, :]
    late_some = (ke > j_start)[None, :] & (-tlo > st)
    late_all = (ks > j_start)[None, :] & (-thi > st)
    nonempty = some_local | some_stripe | sink_some | late_some
    full = all_local | sink_all | late_all
    k_inside = (torch.arange(full.shape[1], device=device) + 1) * block_n <= seq_len
    full = full & nonempty & k_inside[None, :]
    bits = (some_local | some_stripe | (sink_some & (amin <= st))).int()
    bits = bits | ((sink_some & (thi > st)).int() << 1)
    bits = bits | (late_some.int() << 2)
    return nonempty, full, bits.to(torch.int32)


def _token_band_bits(seq_len, token_bands, block_m, block_n, device):
    """(combo bits, touches the gap, lies in the gap) of the token bands [E, B1, B2] per block pair."""
    e_, b1, b2 = (int(x) for x in token_bands)
    tlo, thi, amin, amax, _, _ = _token_ranges(seq_len, block_m, block_n, device)
    big = 1 << 40

    def hits(lo, hi):
        return torch.maximum(tlo, torch.full_like(tlo, lo)) <= torch.minimum(thi, torch.full_like(thi, hi))

    bits = hits(-e_, e_).int()
    bits = bits | (hits(b1, b2 - 1).int() << 1)
    bits = bits | (hits(-(b2 - 1), -b1).int() << 2)
    bits = bits | (hits(b2, big).int() << 3)
    bits = bits | (hits(-big, -b2).int() << 4)
    touches_gap = hits(e_ + 1, b1 - 1) | hits(-(b1 - 1), -(e_ + 1))
    in_gap = (amin > e_) & (amax < b1)
    return bits.to(torch.int32), touches_gap, in_gap


def classify(seq_len, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames, block_m, block_n,
             device, vrpr=None, token_bands=None, token_tiers=None):
    """(nonempty, full, combo bits) (nq, nk) of any layout."""
    if token_tiers is not None:
        return _classify_token_tiers(seq_len, frame_tokens, stripe_width, token_tiers, block_m, block_n, device)
    nonempty, full = _classify(seq_len, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
                               block_m, block_n, device)
    if token_bands is not None:
        bits, touches_gap, in_gap = _token_band_bits(seq_len, token_bands, block_m, block_n, device)
        nonempty = nonempty & ~in_gap
        full = full & ~touches_gap & nonempty
        return nonempty, full, bits
    return nonempty, full, _combo_bits(seq_len, frame_tokens, block_m, block_n, vrpr, device)


def _combo_bits(seq_len, frame_tokens, block_m, block_n, vrpr, device):
    """int32 (nq, nk) bitmask of the VRPR combos that the frame distances of a block pair span."""
    nq, nk = -(-seq_len // block_m), -(-seq_len // block_n)
    if vrpr is None:
        return torch.ones(nq, nk, dtype=torch.int32, device=device)
    w1, w2 = int(vrpr[0]), int(vrpr[1])
    qs = torch.arange(nq, device=device) * block_m
    ks = torch.arange(nk, device=device) * block_n
    qf0, qf1 = qs // frame_tokens, (torch.clamp(qs + block_m, max=seq_len) - 1) // frame_tokens
    kf0, kf1 = ks // frame_tokens, (torch.clamp(ks + block_n, max=seq_len) - 1) // frame_tokens
    dlo = qf0[:, None] - kf1[None, :]  # every integer d in [dlo, dhi] occurs in the pair
    dhi = qf1[:, None] - kf0[None, :]
    big = 1 << 40

    def hits(lo, hi):  # does [dlo, dhi] meet [lo, hi]?
        return (torch.maximum(dlo, torch.full_like(dlo, lo)) <= torch.minimum(dhi, torch.full_like(dhi, hi)))

    bits = hits(-(w1 - 1), w1 - 1).int()                    # exact band |d| < W1
    bits = bits | (hits(w1, w2 - 1).int() << 1)              # mid band, query later
    bits = bits | (hits(-(w2 - 1), -w1).int() << 2)          # mid band, key later
    bits = bits | (hits(w2, big).int() << 3)                 # far band, query later
    bits = bits | (hits(-big, -w2).int() << 4)               # far band, key later
    return bits.to(torch.int32)


def _pack(select: torch.Tensor, combos: torch.Tensor):
    """Compact a boolean (nq, nk) selection into padded index / count / combo tensors (on device)."""
    cnt = select.sum(1, dtype=torch.int32)
    width = max(int(cnt.max().item()) if cnt.numel() else 0, 1)
    # stable sort puts the selected key blocks first, in increasing order
    order = torch.sort((~select).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=select.device)[None, :] < cnt[:, None]
    idx = torch.where(valid, order, torch.zeros_like(order)).to(torch.int32).contiguous()
    combo = torch.where(valid, torch.gather(combos, 1, order), torch.zeros_like(order)).to(torch.int32).contiguous()
    return idx, cnt.contiguous(), combo


def _pack_split(full: torch.Tensor, partial: torch.Tensor, combos: torch.Tensor):
    """Full and partial lists with ONE combo per entry (the combo's index, not a bitmask).

    A block pair whose frame distances span several VRPR bands becomes one partial entry per band
    present: each visit then rotates with a single pair of variants and masks the elements of its
    band, and the online softmax folds the visits of one key block like any others (the bands
    partition its elements). A full entry stays full only when it lies in one band. Entries of a
    row are grouped by combo (combo-major, key blocks increasing within a combo)."""
    bits = torch.stack([(combos >> c) & 1 for c in range(NUM_COMBOS)], 1).bool()  # (nq, 5, nk)
    single = (combos & (combos - 1)) == 0
    full_c = (full & single)[:, None, :] & bits
    part_c = ((partial | (full & ~single))[:, None, :]) & bits
    nq, _, nk = bits.shape
    out = []
    for sel in (full_c, part_c):
        flat = sel.reshape(nq, NUM_COMBOS * nk)
        idx, cnt, _ = _pack(flat, torch.zeros_like(flat, dtype=torch.int32))
        combo = torch.where(torch.arange(idx.shape[1], device=idx.device)[None, :] < cnt[:, None],
                            idx // nk, torch.zeros_like(idx)).to(torch.int32).contiguous()
        out.append(((idx % nk).to(torch.int32).contiguous(), cnt, combo))
    return out


_SCHEDULE_CACHE: dict = {}
_SCHEDULE_LOCK = threading.Lock()


def build_schedule(seq_len: int, frame_tokens: int, local_frames: int, stripe_frames: int, stripe_width: int,
                   sink_frames: int, block_m: int, block_n: int, device, vrpr: Optional[Sequence[float]] = None,
                   split_combos: bool = False, token_bands: Optional[Sequence[int]] = None,
                   token_tiers: Optional[Sequence[int]] = None, plain_positions: bool = False) -> BlockSchedule:
    """The block schedule for these parameters, built with torch ops on `device` and cached.

    token_bands / token_tiers: the token-granular layouts (the op's docstring); their edges join the key.
    plain_positions: every combo rotates with the same positions (no RoPE re-encoding): one combo (0)
    per entry, whatever the layout's bands.
    Cached per (S, frame_tokens, tiers, VRPR band edges, block sizes, device, layout): a diffusion
    run calls the op thousands of times with one set of parameters and pays the build once.

    `split_combos=False`: ``*_combo`` hold each entry's bitmask of combos (the CUDA kernel selects
    per element); True: one combo index per entry (:func:`_pack_split`; the Triton kernel).
    """
    device = torch.device(device)
    vkey = None if vrpr is None else (int(vrpr[0]), int(vrpr[1]))
    key = (seq_len, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames, block_m, block_n,
           str(device), vkey, bool(split_combos),
           None if token_bands is None else tuple(int(x) for x in token_bands),
           None if token_tiers is None else tuple(int(x) for x in token_tiers), bool(plain_positions))
    with _SCHEDULE_LOCK:
        hit = _SCHEDULE_CACHE.get(key)
    if hit is not None:
        return hit
    nonempty, full, combos = classify(seq_len, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
                                      block_m, block_n, device, vrpr, token_bands, token_tiers)
    if plain_positions:
        combos = torch.ones_like(combos)
    partial = nonempty & ~full
    if split_combos:
        (full_idx, full_cnt, full_combo), (part_idx, part_cnt, part_combo) = _pack_split(full, partial, combos)
    else:
        full_idx, full_cnt, full_combo = _pack(full, combos)
        part_idx, part_cnt, part_combo = _pack(partial, combos)
    sched = BlockSchedule(block_m, block_n, full.shape[0], full.shape[1], full_idx, full_cnt, full_combo,
                          part_idx, part_cnt, part_combo, int(full_cnt.sum().item()), int(part_cnt.sum().item()))
    with _SCHEDULE_LOCK:
        if len(_SCHEDULE_CACHE) > 64:  # bounded: parameters rarely vary within a process
            _SCHEDULE_CACHE.clear()
        _SCHEDULE_CACHE[key] = sched
    return sched


def _pair_count(num_frames: int, frame_tokens: int, local_frames: int, stripe_frames: int, stripe_width: int,
                sink_frames: int) -> int:
    """Exact number of attended (query, key) pairs, summed per frame pair in closed form."""
    f = torch.arange(num_frames, dtype=torch.int64)
    dist = (f[:, None] - f[None, :]).abs()
    whole = (f[None, :] < sink_frames) | (dist < local_frames)
    w = min(stripe_width, frame_tokens)
    # pairs (p, p') in [0, T)^2 with |p - p'| < w: T for p = p', 2 (T - k) for each offset 1 <= k < w
    stripe_pairs = 0 if w <= 0 else frame_tokens + sum(2 * (frame_tokens - kk) for kk in range(1, w))
    stripe = (~whole) & (dist < stripe_frames)
    return int(whole.sum()) * frame_tokens * frame_tokens + int(stripe.sum()) * stripe_pairs


def _ilen(lo: torch.Tensor, hi) -> torch.Tensor:
    """Number of integers in [lo, hi] (0 when empty)."""
    return torch.clamp(hi - lo + 1, min=0)


def token_pair_count(num_frames: int, frame_tokens: int, stripe_width: int = 0,
                     token_bands: Optional[Sequence[int]] = None,
                     token_tiers: Optional[Sequence[int]] = None) -> int:
    """Exact number of attended (query, key) pairs of a token-granular layout, by interval
    arithmetic per query row (no S x S mask): token_tiers [L, St, K, J] with this stripe width, or
    token_bands [E, B1, B2] over dense attention (S^2 minus the band gap)."""
    S, T = num_frames * frame_tokens, frame_tokens
    i = torch.arange(S, dtype=torch.int64)
    zero, last = torch.zeros_like(i), torch.full_like(i, S - 1)
    if token_tiers is None:
        e, b1, _b2 = (int(x) for x in token_bands)
        gap = _ilen(i + e + 1, torch.minimum(last, i + b1 - 1)) + _ilen(torch.maximum(zero, i - b1 + 1), i - e - 1)
        return int(S * S - gap.sum())
    lt, st, k_end, j_start = (int(x) for x in token_tiers)
    kc = min(max(k_end, 0), S)
    local = _ilen(torch.maximum(zero, i - lt), torch.minimum(last, i + lt))
    sink_local = _ilen(torch.maximum(zero, i - lt), torch.minimum(last, torch.minimum(i + lt, i.new_tensor(kc - 1))))
    stripe = torch.zeros_like(i)
    sink_stripe = torch.zeros_like(i)
    if stripe_width > 0:
        p = i % T
        for g in range(num_frames):
            plo = g * T + torch.clamp(p - stripe_width + 1, min=0)
            phi = g * T + torch.clamp(p + stripe_width - 1, max=T - 1)
            for rlo, rhi in ((i - st, i - lt - 1), (i + lt + 1, i + st)):
                lo, hi = torch.maximum(plo, rlo), torch.minimum(phi, rhi)
                stripe += _ilen(lo, hi)
                sink_stripe += _ilen(lo, torch.minimum(hi, i.new_tensor(kc - 1)))
    late = _ilen(torch.clamp(torch.maximum(i + st + 1, i.new_tensor(max(j_start + 1, kc))), min=0), last)
    per_row = local + stripe + (kc - sink_local - sink_stripe) + late
    return int(per_row.sum())


def schedule_density(num_frames: int, frame_tokens: int, local_frames: int, stripe_frames: int = 0,
                     stripe_width: int = 0, sink_frames: int = 1, block_m: int = 128, block_n: int = 128,
                     device="cpu", token_bands: Optional[Sequence[int]] = None,
                     token_tiers: Optional[Sequence[int]] = None) -> dict:
    """How much of the dense F*T x F*T problem the tiers keep, at the element and block level.

    token_tiers (with local_frames 1, stripe_frames 0, sink_frames 0) or token_bands (with dense
    frame tiers, local_frames >= num_frames): the token-granular layouts of the op's docstring; the
    pair count is then :func:`token_pair_count` (exact, per query row).

    Returns a dict: ``pair_density`` (attended pairs / S^2), ``block_density`` (visited blocks /
    all block pairs), ``full_blocks``, ``partial_blocks``, ``total_blocks``, ``computed_pair_density``
    (pairs in visited blocks / S^2: what a block-sparse kernel actually computes), ``seq_len``.
    """
    if num_frames < 1 or frame_tokens < 1:
        raise ValueError(f"schedule_density: num_frames and frame_tokens must be >= 1, got {num_frames}, {frame_tokens}")
    if local_frames < 1 or stripe_frames < 0 or stripe_width < 0 or sink_frames < 0:
        raise ValueError("schedule_density: need local_frames >= 1 and stripe_frames, stripe_width, sink_frames >= 0")
    if block_m < 1 or block_n < 1:
        raise ValueError(f"schedule_density: block sizes must be >= 1, got {block_m}, {block_n}")
    S = num_frames * frame_tokens
    if token_bands is not None and local_frames < num_frames:
        raise ValueError("schedule_density: token_bands are counted with dense frame tiers only "
                         "(local_frames >= num_frames)")
    nonempty, full, _ = classify(S, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
                                 block_m, block_n, torch.device(device), None, token_bands, token_tiers)
    nq, nk = nonempty.shape
    rows = torch.clamp(S - torch.arange(nq) * block_m, max=block_m).to(torch.float64)
    cols = torch.clamp(S - torch.arange(nk) * block_n, max=block_n).to(torch.float64)
    computed = float((nonempty.cpu().double() * rows[:, None] * cols[None, :]).sum())
    if token_bands is not None or token_tiers is not None:
        pairs = token_pair_count(num_frames, frame_tokens, stripe_width, token_bands, token_tiers)
    else:
        pairs = _pair_count(num_frames, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames)
    return {
        "seq_len": S,
        "pair_density": pairs / float(S) ** 2,
        "computed_pair_density": computed / float(S) ** 2,
        "block_density": float(nonempty.sum()) / (nq * nk),
        "full_blocks": int(full.sum()),
        "partial_blocks": int((nonempty & ~full).sum()),
        "total_blocks": nq * nk,
    }


# ---------------------------------------------------------------------------------------------
# temporal RoPE tables
def variant_positions(num_frames: int, vrpr: Optional[Sequence[float]], device,
                      sink_rope: Optional[Sequence[int]] = None) -> torch.Tensor:
    """int64 (5, F): the temporal position of a token of frame f under each rotation variant.

    0: f   1: f//G1 + M   2: f//G1   3: min(f//G2 + W2 - W2//G2 - (W2-W1)//G1, clip)   4: f//G2
    (M = W1 - W1//G1, or vrpr's sixth entry); with sink_rope = [G, M] instead (token tiers):
    0: f   1: f//G + M   2: f//G   3, 4: f; with neither every variant is f. Combo c of a pair
    rotates q with variant COMBO_Q_VARIANT[c] and k with COMBO_K_VARIANT[c].
    """
    f = torch.arange(num_frames, device=device, dtype=torch.int64)
    if vrpr is not None:
        w1, w2, g1, g2, clip = (int(x) for x in vrpr[:5])
        mid = int(vrpr[5]) if len(vrpr) > 5 else w1 - w1 // g1
        return torch.stack([
            f,
            f // g1 + mid,
            f // g1,
            torch.clamp(f // g2 + w2 - w2 // g2 - (w2 - w1) // g1, max=clip),
            f // g2,
        ])
    if sink_rope is not None:
        g, mid = int(sink_rope[0]), int(sink_rope[1])
        return torch.stack([f, f // g + mid, f // g, f, f])
    return f[None, :].expand(NUM_VARIANTS, num_frames).contiguous()


def rope_tables(num_frames: int, rope_t_freqs: torch.Tensor, vrpr: Optional[Sequence[float]], device,
                width: Optional[int] = None,
                sink_rope: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (5, F, width) tables COS and signed SIN for the in-kernel rotation.

    Channel c < 2R: COS = cos(P w_{c//2}), SIN = -sin(P w_{c//2}) for even c, +sin for odd c, so that
    rot(x)_c = x_c COS_c + x_{c^1} SIN_c. Channels 2R <= c < width: COS = 1, SIN = 0 (identity).
    """
    r = rope_t_freqs.numel()
    width = 2 * r if width is None else width
    pos = variant_positions(num_frames, vrpr, device, sink_rope).to(torch.float64)  # (5, F)
    ang = pos[..., None] * rope_t_freqs.to(device=device, dtype=torch.float64)  # (5, F, R)
    cos = ang.cos().repeat_interleave(2, dim=-1)
    sin = torch.stack((-ang.sin(), ang.sin()), dim=-1).flatten(-2)
    cos_t = torch.ones(NUM_VARIANTS, num_frames, width, dtype=torch.float64, device=device)
    sin_t = torch.zeros_like(cos_t)
    cos_t[..., :2 * r] = cos
    sin_t[..., :2 * r] = sin
    return cos_t.float().contiguous(), sin_t.float().contiguous()
