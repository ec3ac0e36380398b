"""``torch.ops.longvideo.consistent_attention``: fused consistent self-attention.

Schema (the contract: docs/ops.md, consistent_attention)::

    consistent_attention(Tensor q, Tensor k, Tensor v, Tensor sample_idx, int group_size,
                         int window=-1, Tensor? bank_k=None, Tensor? bank_v=None,
                         float? scale=None) -> Tensor

Row ``b`` of q (B, H, N, D) attends with one softmax over its own N keys, the sampled tokens
``sample_idx`` (sorted unique flat indices into [0, B*N)) of the OTHER images of its group
(``b // group_size``), restricted to ``|src - b| <= window`` when ``window >= 0``, and the bank
rows (shared (H, E, D) or per group (B // group_size, H, E, D)):

    out[b] = softmax(q[b] [k[b]; k_sampled(b); bank]^T * scale) [v[b]; v_sampled(b); bank_v]

(StoryDiffusion's consistent self-attention, Ouroboros' SACFA). See
``longvideo.reference.consistent_attention`` for the explicit-concatenation ground truth.

Structure: the public op is CompositeImplicitAutograd and only validates and resolves the
scale; it calls the private op ``longvideo::_consistent_attention_forward`` which returns
``(out, lse)`` (lse: float32 (B, H, N) log-sum-exp, saved for the backward, as SDPA's flash
path does) and carries the autograd formula. The backward is its own op,
``longvideo::consistent_attention_backward``, dispatched to the same backend family as the
forward (the backend setting of ``consistent_attention`` selects both).
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch

from . import _registry as R
from ._constraints import HALF_DTYPES, aligned, dtype_in, head_dim_in, on_device, requires, strides_multiple_of
from ._constraints import ArgumentTypes, unit_last_stride
from .plan.consistent import segment_table
from ..reference.consistent_attention import (
    consistent_attention_backward_reference,
    consistent_attention_reference_with_lse,
)

OP = "consistent_attention"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)

SCHEMA = ("consistent_attention(Tensor q, Tensor k, Tensor v, Tensor sample_idx, int group_size, "
          "int window=-1, Tensor? bank_k=None, Tensor? bank_v=None, float? scale=None) -> Tensor")


# ----------------------------------------------------------------------------------------------
# argument checks
def _check(q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale):
    """Metadata checks (shapes, dtypes, devices, parameters); valid on fake tensors too."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"consistent_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"consistent_attention: {name} must be (B, H, N, D), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"consistent_attention: {name} dtype must be float16/bfloat16/float32, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"consistent_attention: {name} shape {tuple(t.shape)} must equal q's {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"consistent_attention: {name} dtype {t.dtype} must equal q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"consistent_attention: {name} is on {t.device}, q on {q.device}")
    B, H, N, D = q.shape
    if not isinstance(sample_idx, torch.Tensor) or sample_idx.dim() != 1:
        raise ValueError("consistent_attention: sample_idx must be a 1-D integer tensor (M,)")
    if sample_idx.dtype not in _INDEX_DTYPES:
        raise ValueError(f"consistent_attention: sample_idx dtype must be int32 or int64, got {sample_idx.dtype}")
    if sample_idx.device != q.device:
        raise ValueError(f"consistent_attention: sample_idx is on {sample_idx.device}, q on {q.device}")
    if sample_idx.dtype == torch.int32 and B * N > 2**31 - 1:
        raise ValueError("consistent_attention: sample_idx must be int64 when B*N >= 2**31")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"consistent_attention: group_size must be a positive int, got {group_size!r}")
    if B % group_size != 0:
        raise ValueError(f"consistent_attention: batch size B={B} is not divisible by group_size={group_size}")
    if not isinstance(window, int) or isinstance(window, bool) or window < -1:
        raise ValueError(f"consistent_attention: window must be an int >= -1 (-1: whole group), got {window!r}")
    if (bank_k is None) != (bank_v is None):
        raise ValueError("consistent_attention: bank_k and bank_v must be given together (or neither)")
    if bank_k is not None:
        for name, t in (("bank_k", bank_k), ("bank_v", bank_v)):
            if t.dim() == 3:
                ok = t.shape[0] == H and t.shape[2] == D
            elif t.dim() == 4:
                ok = t.shape[0] == B // group_size and t.shape[1] == H and t.shape[3] == D
            else:
                ok = False
            if not ok:
                raise ValueError(f"consistent_attention: {name} must be (H={H}, E, D={D}) or "
                                 f"(B//group_size={B // group_size}, H={H}, E, D={D}), got {tuple(t.shape)}")
            if t.dtype != q.dtype:
                raise ValueError(f"consistent_attention: {name} dtype {t.dtype} must equal q's {q.dtype}")
            if t.device != q.device:
                raise ValueError(f"consistent_attention: {name} is on {t.device}, q on {q.device}")
        if bank_k.shape != bank_v.shape:
            raise ValueError(f"consistent_attention: bank_k {tuple(bank_k.shape)} and bank_v "
                             f"{tuple(bank_v.shape)} must have one shape")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"consistent_attention: scale must be a finite float or None, got {scale!r}")


# The last sample_idx tensor that passed the value check, with its version counter and bound:
# a method passes the same index tensor to every layer of a step, so only the first call pays the
# host sync. A weak reference, so a freed tensor whose memory is reused never matches.
_last_valid: list = [None, -1, -1]


def _check_sample_values(sample_idx: torch.Tensor, total: int):
    """sample_idx must be strictly increasing and inside [0, total). Data-dependent: one fused
    reduction and one host sync (skipped while a CUDA graph is being captured, and for the very
    tensor, unmodified, that passed the check last with the same bound)."""
    M = sample_idx.numel()
    if M == 0:
        return
    if sample_idx.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    ref, version, bound = _last_valid
    if ref is not None and ref() is sample_idx and version == sample_idx._version and bound == total:
        return
    ok = (sample_idx[0] >= 0) & (sample_idx[-1] < total)
    if M > 1:
        ok = ok & (sample_idx[1:] > sample_idx[:-1]).all()
    if bool(ok):
        _last_valid[:] = [weakref.ref(sample_idx), sample_idx._version, total]
        return
    if M > 1 and not bool((sample_idx[1:] > sample_idx[:-1]).all()):
        raise ValueError("consistent_attention: sample_idx must be sorted in increasing order without repeats")
    raise ValueError(f"consistent_attention: sample_idx values must lie in [0, B*N) = [0, {total}); "
                     f"got min {int(sample_idx.min())}, max {int(sample_idx.max())}")


def _resolve_scale(scale, D):
    # max(D, 1): D == 0 (q empty, an empty result) must not divide by zero
    return 1.0 / math.sqrt(max(D, 1)) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------
# public op: composite (checks + scale) over the private forward, which holds the autograd
_lib = torch.library.Library("longvideo", "FRAGMENT")
_lib.define(SCHEMA)


def _consistent_attention_composite(q, k, v, sample_idx, group_size, window=-1, bank_k=None, bank_v=None,
                                    scale=None):
    _check(q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale)
    out, _ = torch.ops.longvideo._consistent_attention_forward(
        q, k, v, sample_idx, group_size, window, bank_k, bank_v, _resolve_scale(scale, q.shape[-1]))
    return out


_lib.impl("consistent_attention", _consistent_attention_composite, "CompositeImplicitAutograd")
_argument_types = ArgumentTypes(torch.ops.longvideo.consistent_attention.default)


def consistent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sample_idx: torch.Tensor,
                         group_size: int, window: int = -1, bank_k: Optional[torch.Tensor] = None,
                         bank_v: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Consistent self-attention (StoryDiffusion, Ouroboros' SACFA); see the module docstring.

    q, k, v: (B, H, N, D), any strides, float16/bfloat16/float32. sample_idx: sorted unique int32/
    int64 (M,) flat token indices into [0, B*N), M may be 0. group_size divides B. window -1
    (whole group) or >= 0. bank_k/bank_v: (H, E, D) or (B // group_size, H, E, D). scale defaults
    to 1/sqrt(D). Returns (B, H, N, D) in q's dtype (laid out like q). Differentiable in q, k, v,
    bank_k, bank_v. Bad arguments raise ValueError naming them, wrong Python types included (a
    float or a bool for group_size or window, a bool for scale), checked before torch's schema
    parser would refuse or convert them.
    """
    _argument_types({"q": q, "k": k, "v": v, "sample_idx": sample_idx, "group_size": group_size,
                     "window": window, "bank_k": bank_k, "bank_v": bank_v, "scale": scale})
    return torch.ops.longvideo.consistent_attention.default(q, k, v, sample_idx, group_size, window,
                                                            bank_k, bank_v, scale)


# ----------------------------------------------------------------------------------------------
# private forward (out, lse) and the backward op
def _empty_forward(q):
    B, H, N, _ = q.shape
    return torch.empty_like(q), torch.empty(B, H, N, dtype=torch.float32, device=q.device)


@torch.library.custom_op("longvideo::_consistent_attention_forward", mutates_args=())
def _consistent_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sample_idx: torch.Tensor,
                                  group_size: int, window: int, bank_k: Optional[torch.Tensor],
                                  bank_v: Optional[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of consistent attention; lse is the float32 (B, H, N) softmax log-normaliser."""
    _check(q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale)
    B, H, N, D = q.shape
    _check_sample_values(sample_idx, B * N)
    if q.numel() == 0:
        return _empty_forward(q)
    return R.dispatch(OP, q.device, q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale)


@_consistent_attention_forward.register_fake
def _(q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale):
    _check(q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale)  # no value check: data-dependent
    return _empty_forward(q)


def _empty_bank_grad(q):
    return q.new_empty(0)


@torch.library.custom_op("longvideo::consistent_attention_backward", mutates_args=())
def consistent_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  sample_idx: torch.Tensor, group_size: int, window: int,
                                  bank_k: Optional[torch.Tensor], bank_v: Optional[torch.Tensor], scale: float,
                                  out: torch.Tensor, lse: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbank_k, dbank_v) given dL/dout; dbank_* are empty (0,) tensors without a bank.

    out and lse are the forward's results (the fused kernels use them instead of recomputing the
    softmax statistics). Runs on the backend the forward's setting selects for these inputs.
    """
    if grad_out.shape != q.shape:
        raise ValueError(f"consistent_attention_backward: grad_out shape {tuple(grad_out.shape)} must equal "
                         f"q's {tuple(q.shape)}")
    if q.numel() == 0:
        zb = (torch.zeros_like(bank_k), torch.zeros_like(bank_v)) if bank_k is not None else \
            (_empty_bank_grad(q), _empty_bank_grad(q))
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), *zb
    be = R.select(OP, q.device, q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale)
    dq, dk, dv, dbk, dbv = _BACKWARD[be.name](grad_out, q, k, v, sample_idx, group_size, window,
                                              bank_k, bank_v, scale, out, lse)
    if dbk is None:
        dbk, dbv = _empty_bank_grad(q), _empty_bank_grad(q)
    return dq, dk, dv, dbk, dbv


@consistent_attention_backward.register_fake
def _(grad_out, q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale, out, lse):
    if bank_k is None:
        dbk, dbv = _empty_bank_grad(q), _empty_bank_grad(q)
    else:
        dbk, dbv = torch.empty_like(bank_k), torch.empty_like(bank_v)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbk, dbv


def _setup_context(ctx, inputs, output):
    q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.params = (group_size, window, scale)
    ctx.has_bank = bank_k is not None
    ctx.save_for_backward(q, k, v, sample_idx, bank_k, bank_v, out, lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, sample_idx, bank_k, bank_v, out, lse = ctx.saved_tensors
    group_size, window, scale = ctx.params
    dq, dk, dv, dbk, dbv = torch.ops.longvideo.consistent_attention_backward(
        grad_out, q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale, out, lse)
    if not ctx.has_bank:
        dbk = dbv = None
    return dq, dk, dv, None, None, None, dbk, dbv, None


_consistent_attention_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# backends
def _like(t: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result` in the memory layout of `t` (what the fused kernels produce), so that every
    backend (and the fake kernel) returns the same strides."""
    out = torch.empty_like(t)
    out.copy_(result)
    return out


def _reference_forward(q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale):
    out, lse = consistent_attention_reference_with_lse(q, k, v, sample_idx, group_size, window,
                                                       bank_k, bank_v, scale)
    return _like(q, out), lse.contiguous()


def _reference_backward(grad_out, q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale, out, lse):
    dq, dk, dv, dbk, dbv = consistent_attention_backward_reference(grad_out, q, k, v, sample_idx, group_size,
                                                                   window, bank_k, bank_v, scale)
    return (_like(q, dq), _like(k, dk), _like(v, dv),
            None if dbk is None else _like(bank_k, dbk), None if dbv is None else _like(bank_v, dbv))


def _triton_module():
    return R.triton_module(OP)


def _triton_forward(q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale):
    return _triton_module().consistent_attention_forward(q, k, v, sample_idx, group_size, window,
                                                         bank_k, bank_v, scale)


def _triton_backward(grad_out, q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale, out, lse):
    return _triton_module().consistent_attention_backward(grad_out, q, k, v, sample_idx, group_size, window,
                                                          bank_k, bank_v, scale, out, lse)


# CUDA extension: tensor-core forward (csrc/consistent_attention*.{cpp,cu}); its backward reuses
# the Triton backward kernels (they consume the same (out, lse)).
def _cuda_forward(q, k, v, sample_idx, group_size, window, bank_k, bank_v, scale):
    B, _, N, _ = q.shape
    seg = segment_table(sample_idx, B, N, group_size, window)
    if sample_idx.dtype != torch.int32 and B * N < 2**31:
        sample_idx = sample_idx.to(torch.int32)  # 32-bit divisions in the kernel's gathers
    stream = torch.cuda.current_stream(q.device).cuda_stream
    return torch.ops.longvideo._consistent_attention_cuda(q, k, v, sample_idx, seg, group_size, bank_k, bank_v,
                                                          scale, stream)


_TENSORS = ("q", "k", "v", "bank_k", "bank_v")
R.register_backend(OP, "reference", _reference_forward, rank=100,
                   tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3),
                               torch.bfloat16: (8e-3, 8e-3)},
                   constraints=(on_device("cpu", "cuda"),))
R.register_backend(OP, "triton", _triton_forward, available=R.triton_available, rank=10,
                   tolerances={torch.float32: (2e-4, 2e-4), torch.float16: (4e-3, 4e-3),
                               torch.bfloat16: (2.5e-2, 2.5e-2)},
                   constraints=(
                       on_device("cuda"),
                       head_dim_in(range(1, 257), "head dim {D} outside 1..256"),
                   ))
R.register_backend(OP, "cuda", _cuda_forward, available=R.cuda_extension_available("_consistent_attention_cuda"),
                   rank=20, tolerances={torch.float16: (4e-3, 4e-3), torch.bfloat16: (2.5e-2, 2.5e-2)},
                   constraints=(
                       on_device("cuda"),
                       dtype_in("q", HALF_DTYPES, "dtype {dtype} (the CUDA kernel is fp16/bf16 tensor-core only)"),
                       head_dim_in(range(8, 257, 8), "head dim {D} (the CUDA kernel takes multiples of 8 up to 256)"),
                       requires("grid_y", lambda a: a["q"].shape[0] * a["q"].shape[1] <= 65535, "B*H > 65535"),
                       unit_last_stride(_TENSORS, "{name} must have unit stride in the head dim"),
                       aligned(_TENSORS, 16, "{name} must be 16-byte aligned"),
                       strides_multiple_of(_TENSORS, 8, "{name} strides must be multiples of 8 elements (16-byte rows)",
                                           skip_size_one=True),
                   ))


def _cuda_backward(*args):
    """The CUDA extension has no backward kernel of its own: the Triton backward consumes the same
    (out, lse); without Triton, the reference backward."""
    if R.triton_available()[0]:
        return _triton_backward(*args)
    return _reference_backward(*args)


_BACKWARD = {"reference": _reference_backward, "triton": _triton_backward, "cuda": _cuda_backward}
