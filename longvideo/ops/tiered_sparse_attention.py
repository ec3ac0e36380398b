"""``torch.ops.longvideo.tiered_sparse_attention``: FreeLOC's tiered sparse attention with its
video relative position re-encoding (VRPR) fused (DESIGN.md section 2, METHODS.md section 5).

Backends: ``reference`` (dense masked attention, CPU/CUDA), ``triton`` (block-sparse flash
attention over a cached block schedule, temporal RoPE rotated in-kernel per band) and ``cuda``
(tensor-core mma.sync kernel over the same schedule). The block schedule is built on the
device from the tier parameters alone (:func:`build_schedule`); :func:`schedule_density`
reports how much of the dense problem it computes.
"""
from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import _registry as R
from ..reference.tiered_sparse_attention import tiered_sparse_attention_reference

OP = "tiered_sparse_attention"

# VRPR combos of a (query, key) pair: 0 exact band; 1 mid band, query later; 2 mid band, key
# later; 3 far band, query later; 4 far band, key later. Each combo rotates q and k with one of
# five position "variants" (functions of the token's own frame only):
#   0: f   1: f//G1 + W1 - W1//G1   2: f//G1   3: min(f//G2 + W2 - W2//G2 - (W2-W1)//G1, clip)   4: f//G2
COMBO_Q_VARIANT = (0, 1, 2, 3, 4)
COMBO_K_VARIANT = (0, 2, 1, 4, 3)
NUM_COMBOS = 5


# ---------------------------------------------------------------------------------------------
# argument checks (shared by the op and its fake kernel)
def _finite_number(x) -> bool:
    """A real Python/NumPy number that is not NaN or +-inf (bools and tensors are not numbers here)."""
    if isinstance(x, (bool, torch.Tensor)):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _check(q, k, v, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames, scale,
           rope_t_freqs, vrpr):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"tiered_sparse_attention: {name} must be a 4-D tensor (B, H, S, D), "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"tiered_sparse_attention: {name} must be float16/bfloat16/float32, got {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"tiered_sparse_attention: k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"tiered_sparse_attention: v shape {tuple(v.shape)} must match q in (B, H, S)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"tiered_sparse_attention: {name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"tiered_sparse_attention: {name} is on {t.device}, q on {q.device}")
    S, D = q.shape[2], q.shape[3]
    if D < 1 and q.shape[0] * q.shape[1] * S * v.shape[3] > 0:
        raise ValueError(f"tiered_sparse_attention: q and k need a head dim D >= 1, got q shape {tuple(q.shape)}")
    if frame_tokens < 1:
        raise ValueError(f"tiered_sparse_attention: frame_tokens must be >= 1, got {frame_tokens}")
    if S % frame_tokens != 0:
        raise ValueError(f"tiered_sparse_attention: sequence length S={S} is not a multiple of "
                         f"frame_tokens={frame_tokens}")
    if local_frames < 1:
        raise ValueError(f"tiered_sparse_attention: local_frames must be >= 1, got {local_frames}")
    if stripe_frames < 0:
        raise ValueError(f"tiered_sparse_attention: stripe_frames must be >= 0, got {stripe_frames}")
    if stripe_width < 0:
        raise ValueError(f"tiered_sparse_attention: stripe_width must be >= 0, got {stripe_width}")
    if sink_frames < 0:
        raise ValueError(f"tiered_sparse_attention: sink_frames must be >= 0, got {sink_frames}")
    if scale is not None and not _finite_number(scale):
        raise ValueError(f"tiered_sparse_attention: scale must be a finite float or None, got {scale!r}")
    if rope_t_freqs is not None:
        if not isinstance(rope_t_freqs, torch.Tensor) or rope_t_freqs.dim() != 1:
            raise ValueError("tiered_sparse_attention: rope_t_freqs must be a 1-D tensor (R,)")
        if not rope_t_freqs.is_floating_point():
            raise ValueError(f"tiered_sparse_attention: rope_t_freqs must be floating point, got {rope_t_freqs.dtype}")
        if 2 * rope_t_freqs.numel() > D:
            raise ValueError(f"tiered_sparse_attention: rope_t_freqs has R={rope_t_freqs.numel()} pairs, "
                             f"more than head_dim/2 = {D // 2}")
        if rope_t_freqs.device != q.device:
            raise ValueError(f"tiered_sparse_attention: rope_t_freqs is on {rope_t_freqs.device}, q on {q.device}")
    if vrpr is not None:
        if rope_t_freqs is None:
            raise ValueError("tiered_sparse_attention: vrpr re-encodes RoPE positions and requires rope_t_freqs")
        if len(vrpr) != 5:
            raise ValueError(f"tiered_sparse_attention: vrpr must be [W1, W2, G1, G2, clip], got {list(vrpr)}")
        if not all(_finite_number(x) for x in vrpr):
            raise ValueError(f"tiered_sparse_attention: vrpr values must be finite integers, got {list(vrpr)}")
        if any(float(x) != int(x) for x in vrpr):
            raise ValueError(f"tiered_sparse_attention: vrpr values must be integers, got {list(vrpr)}")
        w1, w2, g1, g2, _clip = (int(x) for x in vrpr)
        if w1 < 1:
            raise ValueError(f"tiered_sparse_attention: vrpr W1 must be >= 1, got {w1}")
        if w1 > w2:
            raise ValueError(f"tiered_sparse_attention: vrpr W1={w1} must be <= W2={w2}")
        if g1 < 1 or g2 < 1:
            raise ValueError(f"tiered_sparse_attention: vrpr group sizes G1={g1}, G2={g2} must be >= 1")


# The last rope_t_freqs tensor whose values passed the check, with its version counter: a model
# passes one frequency tensor to every layer of every step, so only the first call pays the sync.
# A weak reference, so a freed tensor whose memory is reused never matches.
_last_finite_freqs: list = [None, -1]


def _check_rope_values(rope_t_freqs: Optional[torch.Tensor]) -> None:
    """rope_t_freqs must be finite (a NaN would make every rotated pair, hence every output, NaN).

    Data-dependent, so not part of :func:`_check` (the fake kernel cannot read values). On CUDA
    this is a host sync: acceptable because rope_t_freqs is tiny (R <= D/2, Wan: 22 entries), and it is paid
    once per tensor (cached on the tensor's identity and version) and skipped while a CUDA graph is
    captured. No such value check is done on q, k or v (a sync on big tensors per call): NaNs
    there propagate by the rule in the op's docstring."""
    if rope_t_freqs is None or rope_t_freqs.numel() == 0:
        return
    if rope_t_freqs.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    ref, version = _last_finite_freqs
    if ref is not None and ref() is rope_t_freqs and version == rope_t_freqs._version:
        return
    if not bool(torch.isfinite(rope_t_freqs).all()):
        bad = rope_t_freqs[~torch.isfinite(rope_t_freqs)]
        raise ValueError(f"tiered_sparse_attention: rope_t_freqs must be finite, got {bad.numel()} "
                         f"NaN/inf value(s) (first: {bad[0].item()})")
    _last_finite_freqs[:] = [weakref.ref(rope_t_freqs), rope_t_freqs._version]


def _empty_result(q, v):
    return q.new_empty(q.shape[:3] + (v.shape[3],))


# ---------------------------------------------------------------------------------------------
# the op
@torch.library.custom_op(
    "longvideo::tiered_sparse_attention", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, int frame_tokens, int local_frames, int stripe_frames=0, "
           "int stripe_width=0, int sink_frames=1, float? scale=None, Tensor? rope_t_freqs=None, "
           "float[]? vrpr=None) -> Tensor")
def tiered_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_tokens: int,
                            local_frames: int, stripe_frames: int = 0, stripe_width: int = 0,
                            sink_frames: int = 1, scale: Optional[float] = None,
                            rope_t_freqs: Optional[torch.Tensor] = None,
                            vrpr: Optional[list[float]] = None) -> torch.Tensor:
    """FreeLOC tiered sparse attention (TSA) with video relative position re-encoding (VRPR).

    q, k: (B, H, S, D), v: (B, H, S, Dv), S = F * frame_tokens in frame-major order; token s is in
    frame f(s) = s // frame_tokens at spatial index p(s) = s % frame_tokens. With d = f(i) - f(j),
    query i attends key j iff
        |d| < local_frames  or  (|d| < stripe_frames and |p(i) - p(j)| < stripe_width)
        or  f(j) < sink_frames
    (local_frames >= F is dense attention). out = softmax(scale * logits + mask) v, softmax in
    float32, scale defaulting to 1/sqrt(D).

    rope_t_freqs (R,): channels [0, 2R) of q and k are Wan's temporal RoPE pairs, not yet rotated;
    pair i of a token at position P is rotated by P * rope_t_freqs[i]. Positions are frame indices,
    or with vrpr = [W1, W2, G1, G2, clip] FreeLOC's per-band re-encoded positions (FreeLOC eq. for
    VRPR: P = floor(P_ori / G) + sign(P_ori)(W - floor(W / G)) per band; see
    ``longvideo.reference.tiered_sparse_attention.vrpr_positions``), chosen per pair by |d|.

    Bad arguments raise ValueError naming them, NaN/inf in scale, vrpr and rope_t_freqs included.
    Empty input (B, H or S zero, or Dv zero) returns an empty (B, H, S, Dv) tensor on every backend.

    NaN rule (q, k, v are not checked for NaN/inf: that would cost a host sync per call): a
    key/value row that query i does not attend never reaches out[i], whatever its values. A NaN in
    q[i] or in an attended k[j] makes the whole row out[i] NaN; a NaN in channel c of an attended
    v[j] makes out[i, c] NaN (an inf there makes it inf or NaN). The reference follows it exactly
    (where-selection over the attended keys). Known gap: the Triton and CUDA kernels compute
    p @ v over whole key blocks, so in a *partial* block (tier, sink or band edge inside) a NaN/inf
    of a masked v row still reaches the queries of that block through p = 0 times NaN
    (tests/test_op_inputs.py marks it xfail until the kernels zero it); q and k NaN follow the rule.
    """
    _check(q, k, v, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames, scale,
           rope_t_freqs, vrpr)
    _check_rope_values(rope_t_freqs)
    if q.shape[0] * q.shape[1] * q.shape[2] * v.shape[3] == 0:
        return _empty_result(q, v)  # before dispatch: uniform over backends, as the fake kernel
    return R.dispatch(OP, q.device, q, k, v, frame_tokens, local_frames, stripe_frames, stripe_width,
                      sink_frames, scale, rope_t_freqs, vrpr)


@tiered_sparse_attention.register_fake
def _(q, k, v, frame_tokens, local_frames, stripe_frames=0, stripe_width=0, sink_frames=1, scale=None,
      rope_t_freqs=None, vrpr=None):
    _check(q, k, v, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames, scale,
           rope_t_freqs, vrpr)
    return _empty_result(q, v)


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
                   split_combos: bool = False) -> BlockSchedule:
    """The block schedule for these parameters, built with torch ops on `device` and cached.

    Cached per (S, frame_tokens, tiers, VRPR band edges, block sizes, device, layout): a diffusion
    run calls the op thousands of times with one set of parameters and pays the build once.

    `split_combos=False`: ``*_combo`` hold each entry's bitmask of combos (the CUDA kernel selects
    per element); True: one combo index per entry (:func:`_pack_split`; the Triton kernel).
    """
    device = torch.device(device)
    vkey = None if vrpr is None else (int(vrpr[0]), int(vrpr[1]))
    key = (seq_len, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames, block_m, block_n,
           str(device), vkey, bool(split_combos))
    with _SCHEDULE_LOCK:
        hit = _SCHEDULE_CACHE.get(key)
    if hit is not None:
        return hit
    nonempty, full = _classify(seq_len, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
                               block_m, block_n, device)
    combos = _combo_bits(seq_len, frame_tokens, block_m, block_n, vrpr, device)
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


def schedule_density(num_frames: int, frame_tokens: int, local_frames: int, stripe_frames: int = 0,
                     stripe_width: int = 0, sink_frames: int = 1, block_m: int = 128, block_n: int = 128,
                     device="cpu") -> dict:
    """How much of the dense F*T x F*T problem the tiers keep, at the element and block level.

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
    nonempty, full = _classify(S, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
                               block_m, block_n, torch.device(device))
    nq, nk = nonempty.shape
    rows = torch.clamp(S - torch.arange(nq) * block_m, max=block_m).to(torch.float64)
    cols = torch.clamp(S - torch.arange(nk) * block_n, max=block_n).to(torch.float64)
    computed = float((nonempty.cpu().double() * rows[:, None] * cols[None, :]).sum())
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
# backends
def _reference_impl(q, k, v, frame_tokens, local_frames, stripe_frames=0, stripe_width=0, sink_frames=1,
                    scale=None, rope_t_freqs=None, vrpr=None):
    return tiered_sparse_attention_reference(q, k, v, frame_tokens, local_frames, stripe_frames, stripe_width,
                                             sink_frames, scale, rope_t_freqs, vrpr)


def _triton_supports(q, k, v, *args, **kwargs):
    if q.shape[3] > 256 or v.shape[3] > 256:
        return f"head dims up to 256 (got {q.shape[3]}, {v.shape[3]})"
    if q.numel() == 0:
        return "empty input"
    return None


def triton_module():
    return R.triton_module(OP)


def _triton_impl(q, k, v, frame_tokens, local_frames, stripe_frames=0, stripe_width=0, sink_frames=1,
                 scale=None, rope_t_freqs=None, vrpr=None):
    dtype = q.dtype
    if dtype == torch.bfloat16 and q.device.type == "cpu" and R.triton_interpreting():
        # The CPU interpreter has no bf16 dot or arithmetic (it returned garbage, ~1e9): compute
        # in float32 and round once, as the consistent_attention kernels do under the interpreter.
        q, k, v = q.float(), k.float(), v.float()
    out = triton_module().tiered_sparse_attention_fwd(q, k, v, frame_tokens, local_frames, stripe_frames,
                                                      stripe_width, sink_frames, scale, rope_t_freqs, vrpr,
                                                      build_schedule=build_schedule)
    return out.to(dtype)


def _cuda_supports(q, k, v, frame_tokens, local_frames, stripe_frames=0, stripe_width=0, sink_frames=1,
                   scale=None, rope_t_freqs=None, vrpr=None):
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"float16/bfloat16 only (got {q.dtype})"
    if q.shape[3] not in (64, 128) or v.shape[3] != q.shape[3]:
        return f"head dims 64 and 128 with Dv == D (got {q.shape[3]}, {v.shape[3]})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        # the kernel moves 16-byte vectors of 8 channels
        if t.stride(3) != 1:
            return f"{name} must have unit stride in its last dim"
        if any(st % 8 for st in t.stride()[:3]) or t.data_ptr() % 16:
            return f"{name} strides must be multiples of 8 elements and its data 16-byte aligned"
    if q.shape[2] >= 2 ** 31 // 8:
        return "sequence too long for int32 indexing"
    return None


def _cuda_impl(q, k, v, frame_tokens, local_frames, stripe_frames=0, stripe_width=0, sink_frames=1,
               scale=None, rope_t_freqs=None, vrpr=None):
    B, H, S, D = q.shape
    block_m, block_n = 64, 64
    sched = build_schedule(S, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
                           block_m, block_n, q.device, vrpr)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if rope_t_freqs is not None:
        cos_t, sin_t = triton_module().rope_tables(S // frame_tokens, rope_t_freqs, vrpr, q.device)
        rope_pairs = rope_t_freqs.numel()
    else:
        cos_t = sin_t = q.new_empty(0, dtype=torch.float32)
        rope_pairs = 0
    w1, w2 = (int(vrpr[0]), int(vrpr[1])) if vrpr is not None else (1 << 30, 1 << 30)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    return torch.ops.longvideo._tiered_sparse_attention_cuda(
        q, k, v, sched.full_idx, sched.full_cnt, sched.full_combo, sched.part_idx, sched.part_cnt,
        sched.part_combo, cos_t, sin_t, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
        rope_pairs, w1, w2, scale, stream)


R.register_backend(OP, "reference", _reference_impl, rank=100, devices=("cpu", "cuda"))
R.register_backend(OP, "triton", _triton_impl, available=R.triton_available, rank=10,
                   tolerances={torch.float32: (2e-4, 2e-4), torch.float16: (4e-3, 4e-3),
                               torch.bfloat16: (2e-2, 2e-2)},
                   supports=_triton_supports, devices=("cuda",))
R.register_backend(OP, "cuda", _cuda_impl, available=R.cuda_extension_available("_tiered_sparse_attention_cuda"),
                   rank=20, tolerances={torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)},
                   supports=_cuda_supports, devices=("cuda",))
