"""``torch.ops.longvideo.tiered_sparse_attention``: FreeLOC's tiered sparse attention with its
video relative position re-encoding (VRPR) fused (docs/ops.md), at frame granularity (the paper)
or token granularity (FreeLOC's released code: ``token_bands``, ``token_tiers``, ``sink_rope``).

Backends: ``reference`` (dense masked attention, CPU/CUDA), ``triton`` (block-sparse flash
attention over a cached block schedule, temporal RoPE rotated in-kernel per band) and ``cuda``
(tensor-core mma.sync kernel over the same schedule: FlashAttention-2's tiling with a cp.async
pipeline, or the older kernel with ``LONGVIDEO_TSA_CUDA=legacy``). The block schedule is built on the
device from the tier parameters alone by the plan layer (``longvideo.ops.plan.tiered``:
:func:`build_schedule`, cached per shape); :func:`schedule_density` reports how much of the
dense problem it computes.
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Optional

import torch

from . import _registry as R
from ._constraints import HALF_DTYPES, aligned, dtype_in, head_dim_in, on_device, requires, strides_multiple_of
from ._constraints import ArgumentTypes, unit_last_stride
from .plan.tiered import band_edges, build_schedule, layout_code, rope_tables, token_edges
from .plan.tiered import schedule_density  # noqa: F401  (part of this module's interface)
from ..reference.tiered_sparse_attention import tiered_sparse_attention_reference

OP = "tiered_sparse_attention"


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


def _int_list(name, values, length):
    """values as a list of `length` Python ints, or ValueError naming the argument."""
    if isinstance(values, (str, bytes, torch.Tensor)) or not hasattr(values, "__len__"):
        raise ValueError(f"tiered_sparse_attention: {name} must be a list of {length} integers, got {values!r}")
    if len(values) != length or not all(_finite_number(x) and float(x) == int(x) for x in values):
        raise ValueError(f"tiered_sparse_attention: {name} must be a list of {length} integers, got {list(values)}")
    return [int(x) for x in values]


def _check(q, k, v, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames, scale,
           rope_t_freqs, vrpr, token_bands=None, token_tiers=None, sink_rope=None):
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
        if len(vrpr) not in (5, 6):
            raise ValueError(f"tiered_sparse_attention: vrpr must be [W1, W2, G1, G2, clip] or "
                             f"[W1, W2, G1, G2, clip, M], got {list(vrpr)}")
        if not all(_finite_number(x) for x in vrpr):
            raise ValueError(f"tiered_sparse_attention: vrpr values must be finite integers, got {list(vrpr)}")
        if any(float(x) != int(x) for x in vrpr):
            raise ValueError(f"tiered_sparse_attention: vrpr values must be integers, got {list(vrpr)}")
        w1, w2, g1, g2, _clip = (int(x) for x in vrpr[:5])
        if w1 < 1:
            raise ValueError(f"tiered_sparse_attention: vrpr W1 must be >= 1, got {w1}")
        if w1 > w2:
            raise ValueError(f"tiered_sparse_attention: vrpr W1={w1} must be <= W2={w2}")
        if g1 < 1 or g2 < 1:
            raise ValueError(f"tiered_sparse_attention: vrpr group sizes G1={g1}, G2={g2} must be >= 1")
    if token_bands is not None:
        e, b1, b2 = _int_list("token_bands", token_bands, 3)
        if vrpr is None:
            raise ValueError("tiered_sparse_attention: token_bands cut VRPR's bands by token distance and "
                             "require vrpr (the positions of the bands)")
        if not 0 <= e < b1 <= b2:
            raise ValueError(f"tiered_sparse_attention: token_bands [E, B1, B2] need 0 <= E < B1 <= B2, "
                             f"got {[e, b1, b2]}")
    if token_tiers is not None:
        lt, st, k_end, j_start = _int_list("token_tiers", token_tiers, 4)
        if not 0 <= lt <= st or k_end < 0 or j_start < -1:
            raise ValueError(f"tiered_sparse_attention: token_tiers [L, St, K, J] need 0 <= L <= St, K >= 0 and "
                             f"J >= -1, got {[lt, st, k_end, j_start]}")
        if vrpr is not None or token_bands is not None:
            raise ValueError("tiered_sparse_attention: token_tiers do not combine with vrpr or token_bands "
                             "(their positions are plain, or sink_rope's)")
        if (local_frames, stripe_frames, sink_frames) != (1, 0, 0):
            raise ValueError(f"tiered_sparse_attention: token_tiers replace the frame tiers: pass local_frames=1, "
                             f"stripe_frames=0, sink_frames=0 (got {local_frames}, {stripe_frames}, {sink_frames})")
    if sink_rope is not None:
        g, _m = _int_list("sink_rope", sink_rope, 2)
        if token_tiers is None or rope_t_freqs is None:
            raise ValueError("tiered_sparse_attention: sink_rope re-encodes the sink of token_tiers and requires "
                             "token_tiers and rope_t_freqs")
        if g < 1:
            raise ValueError(f"tiered_sparse_attention: sink_rope group G must be >= 1, got {g}")


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
           "float[]? vrpr=None, int[]? token_bands=None, int[]? token_tiers=None, int[]? sink_rope=None) -> Tensor")
def _tiered_sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_tokens: int,
                                local_frames: int, stripe_frames: int = 0, stripe_width: int = 0,
                                sink_frames: int = 1, scale: Optional[float] = None,
                                rope_t_freqs: Optional[torch.Tensor] = None,
                                vrpr: Optional[list[float]] = None, token_bands: Optional[list[int]] = None,
                                token_tiers: Optional[list[int]] = None,
                                sink_rope: Optional[list[int]] = None) -> torch.Tensor:
    """The registered op (what ``torch.ops.longvideo.tiered_sparse_attention`` runs): the checks
    on values, then the backend. Documented at :func:`tiered_sparse_attention`."""
    _check(q, k, v, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames, scale,
           rope_t_freqs, vrpr, token_bands, token_tiers, sink_rope)
    _check_rope_values(rope_t_freqs)
    if q.shape[0] * q.shape[1] * q.shape[2] * v.shape[3] == 0:
        return _empty_result(q, v)  # before dispatch: uniform over backends, as the fake kernel
    return R.dispatch(OP, q.device, q, k, v, frame_tokens, local_frames, stripe_frames, stripe_width,
                      sink_frames, scale, rope_t_freqs, vrpr, token_bands, token_tiers, sink_rope)


@_tiered_sparse_attention_op.register_fake
def _(q, k, v, frame_tokens, local_frames, stripe_frames=0, stripe_width=0, sink_frames=1, scale=None,
      rope_t_freqs=None, vrpr=None, token_bands=None, token_tiers=None, sink_rope=None):
    _check(q, k, v, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames, scale,
           rope_t_freqs, vrpr, token_bands, token_tiers, sink_rope)
    return _empty_result(q, v)


def _no_backward(ctx, grad_out):
    raise RuntimeError("tiered_sparse_attention is not differentiable (no backward kernel): a forward under "
                       "grad mode works, a backward through it does not")


_tiered_sparse_attention_op.register_autograd(_no_backward, setup_context=lambda ctx, inputs, output: None)

_OP = torch.ops.longvideo.tiered_sparse_attention.default
_argument_types = ArgumentTypes(_OP)


def tiered_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_tokens: int,
                            local_frames: int, stripe_frames: int = 0, stripe_width: int = 0,
                            sink_frames: int = 1, scale: Optional[float] = None,
                            rope_t_freqs: Optional[torch.Tensor] = None,
                            vrpr: Optional[list[float]] = None, token_bands: Optional[list[int]] = None,
                            token_tiers: Optional[list[int]] = None,
                            sink_rope: Optional[list[int]] = None) -> torch.Tensor:
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
    ``longvideo.reference.tiered_sparse_attention.vrpr_positions``), chosen per pair by |d|. A sixth
    entry M of vrpr replaces the mid band's shift W1 - W1 // G1.

    Token-granular layouts (FreeLOC's released code, docs/ops.md and docs/fidelity.md), t = i - j:
    - token_bands [E, B1, B2] (needs vrpr, 0 <= E < B1 <= B2): the VRPR band is chosen by |t|:
      |t| <= E exact, B1 <= |t| < B2 mid, |t| >= B2 far; pairs with E < |t| < B1 are not
      attended (the band gap). The frame tiers still apply.
    - token_tiers [L, St, K, J] (replace the frame tiers: local_frames=1, stripe_frames=0,
      sink_frames=0; not with vrpr/token_bands): i attends j iff |t| <= L, or |t| <= St and
      (|p(i) - p(j)| < stripe_width or j < K), or (j < K and t > St), or (j > J and -t > St).
      Positions are the frame indices except, with sink_rope [G, M], for j < K with t > St
      (pos_q = f(i)//G + M, pos_k = f(j)//G) and for j > J with -t > St (pos_q = f(i)//G,
      pos_k = f(j)//G + M).
    ``longvideo.reference.tiered_sparse_attention.pair_classes`` is the readable definition.

    Bad arguments raise ValueError naming them, NaN/inf in scale, vrpr and rope_t_freqs included,
    and so do arguments of the wrong Python type (a float or a bool for frame_tokens and the other
    int arguments or inside token_bands / token_tiers / sink_rope, a bool for scale or inside vrpr),
    checked here before torch's schema parser would refuse them in several lines or convert them.
    Empty input (B, H or S zero, or Dv zero) returns an empty (B, H, S, Dv) tensor on every backend.
    Not differentiable: a backward through the result raises a RuntimeError saying so.

    NaN rule (q, k, v are not checked for NaN/inf: that would cost a host sync per call): a
    key/value row that query i does not attend never reaches out[i], whatever its values. A NaN in
    q[i] or in an attended k[j] makes the whole row out[i] NaN; a NaN in channel c of an attended
    v[j] makes out[i, c] NaN (an inf there makes it inf or NaN). The reference follows it exactly
    (where-selection over the attended keys), and so does the Triton backend: masked scores are
    replaced by -inf with a where (a NaN/inf in a masked k row is never summed), and in a *partial*
    key block (tier, sink or band edge inside) NaN/inf values of v enter p @ v as 0 and the attended
    ones are added afterwards, so no masked value meets p = 0 (tests/test_op_inputs.py, every layout).
    Where an attended inf meets a probability that underflowed to 0 the reference gives NaN and the
    Triton backend inf. The CUDA backend's default kernel follows it too (non-finite v values of a
    partial block zeroed in p @ v, then NaN where an attended key has one; not yet run on a GPU).
    The CUDA legacy kernel (LONGVIDEO_TSA_CUDA=legacy) multiplies whole partial blocks by v: there a
    NaN/inf of a masked v row can reach the queries of that block.
    """
    _argument_types({"q": q, "k": k, "v": v, "frame_tokens": frame_tokens, "local_frames": local_frames,
                     "stripe_frames": stripe_frames, "stripe_width": stripe_width, "sink_frames": sink_frames,
                     "scale": scale, "rope_t_freqs": rope_t_freqs, "vrpr": vrpr, "token_bands": token_bands,
                     "token_tiers": token_tiers, "sink_rope": sink_rope})
    return _OP(q, k, v, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames, scale, rope_t_freqs,
               vrpr, token_bands, token_tiers, sink_rope)


# ---------------------------------------------------------------------------------------------
# backends
def _reference_impl(q, k, v, frame_tokens, local_frames, stripe_frames=0, stripe_width=0, sink_frames=1,
                    scale=None, rope_t_freqs=None, vrpr=None, token_bands=None, token_tiers=None, sink_rope=None):
    return tiered_sparse_attention_reference(q, k, v, frame_tokens, local_frames, stripe_frames, stripe_width,
                                             sink_frames, scale, rope_t_freqs, vrpr, token_bands, token_tiers,
                                             sink_rope)


def triton_module():
    return R.triton_module(OP)


def _triton_impl(q, k, v, frame_tokens, local_frames, stripe_frames=0, stripe_width=0, sink_frames=1,
                 scale=None, rope_t_freqs=None, vrpr=None, token_bands=None, token_tiers=None, sink_rope=None):
    dtype = q.dtype
    if dtype == torch.bfloat16 and q.device.type == "cpu" and R.triton_interpreting():
        # The CPU interpreter has no bf16 dot or arithmetic (it returned garbage, ~1e9): compute
        # in float32 and round once, as the consistent_attention kernels do under the interpreter.
        q, k, v = q.float(), k.float(), v.float()
    out = triton_module().tiered_sparse_attention_fwd(q, k, v, frame_tokens, local_frames, stripe_frames,
                                                      stripe_width, sink_frames, scale, rope_t_freqs, vrpr,
                                                      token_bands=token_bands, token_tiers=token_tiers,
                                                      sink_rope=sink_rope)
    return out.to(dtype)


# The CUDA kernels (docs/ops.md): name -> (kernel code of the private op, query rows per block of
# the schedule). "pipelined" (default): 32 query rows per warp (128 per CTA), K/V double-buffered with
# cp.async, the NaN rule for masked v rows; "legacy": 16 rows per warp (64 per CTA), tiles staged
# synchronously, kept for side-by-side benchmarks (it lets a NaN/inf in a masked v row of a partial
# block reach that block's queries). Chosen per call by the environment variable LONGVIDEO_TSA_CUDA.
CUDA_KERNELS = {"pipelined": (1, 128), "legacy": (0, 64)}


def cuda_kernel_choice() -> str:
    """The CUDA kernel LONGVIDEO_TSA_CUDA selects ("pipelined" unless set), or ValueError naming it."""
    name = os.environ.get("LONGVIDEO_TSA_CUDA", "pipelined")
    if name not in CUDA_KERNELS:
        raise ValueError(f"LONGVIDEO_TSA_CUDA must be one of {sorted(CUDA_KERNELS)}, got {name!r}")
    return name


def _cuda_impl(q, k, v, frame_tokens, local_frames, stripe_frames=0, stripe_width=0, sink_frames=1,
               scale=None, rope_t_freqs=None, vrpr=None, token_bands=None, token_tiers=None, sink_rope=None):
    B, H, S, D = q.shape
    kernel, block_m = CUDA_KERNELS[cuda_kernel_choice()]
    block_n = 64
    has_rope = rope_t_freqs is not None and rope_t_freqs.numel() > 0
    sched = build_schedule(S, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
                           block_m, block_n, q.device, vrpr, token_bands=token_bands, token_tiers=token_tiers,
                           plain_positions=not (has_rope and (vrpr is not None or sink_rope is not None)))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if rope_t_freqs is not None:
        cos_t, sin_t = rope_tables(S // frame_tokens, rope_t_freqs, vrpr, q.device, sink_rope=sink_rope)
        rope_pairs = rope_t_freqs.numel()
    else:
        cos_t = sin_t = q.new_empty(0, dtype=torch.float32)
        rope_pairs = 0
    w1, w2 = band_edges(vrpr)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    return torch.ops.longvideo._tiered_sparse_attention_cuda(
        q, k, v, sched.full_idx, sched.full_cnt, sched.full_combo, sched.part_idx, sched.part_cnt,
        sched.part_combo, cos_t, sin_t, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames,
        rope_pairs, w1, w2, layout_code(token_bands, token_tiers), list(token_edges(token_bands, token_tiers)),
        scale, kernel, block_m, stream)


_QKV = ("q", "k", "v")
R.register_backend(OP, "reference", _reference_impl, rank=100, constraints=(on_device("cpu", "cuda"),))
R.register_backend(OP, "triton", _triton_impl, available=R.triton_available, rank=10,
                   tolerances={torch.float32: (2e-4, 2e-4), torch.float16: (4e-3, 4e-3),
                               torch.bfloat16: (2e-2, 2e-2)},
                   constraints=(
                       on_device("cuda"),
                       head_dim_in(range(257), "head dims up to 256 (got {D}, {Dv})", ("q", "v")),
                       requires("nonempty", lambda a: a["q"].numel() > 0, "empty input"),
                   ))
R.register_backend(OP, "cuda", _cuda_impl, available=R.cuda_extension_available("_tiered_sparse_attention_cuda"),
                   rank=20, tolerances={torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)},
                   constraints=(
                       on_device("cuda"),
                       dtype_in("q", HALF_DTYPES, "float16/bfloat16 only (got {dtype})"),
                       head_dim_in({64, 128}, "head dims 64 and 128 with Dv == D (got {D}, {Dv})", ("q", "v"),
                                   equal=True),
                       # the kernel moves 16-byte vectors of 8 channels
                       unit_last_stride(_QKV, "{name} must have unit stride in its last dim"),
                       strides_multiple_of(_QKV, 8, "{name} strides must be multiples of 8 elements and its data "
                                                    "16-byte aligned"),
                       aligned(_QKV, 16, "{name} strides must be multiples of 8 elements and its data 16-byte aligned"),
                       requires("int32_index", lambda a: a["q"].shape[2] < 2 ** 31 // 8,
                                "sequence too long for int32 indexing"),
                   ))
