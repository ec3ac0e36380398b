"""Context parallelism (Ulysses sequence parallelism) for Wan transformers, with our processors.

Transformers split: diffusers' ``WanTransformer3DModel``, i.e. Wan 2.1 (T2V and I2V), Wan 2.2
A14B (both experts, ``transformer`` and ``transformer_2``, each split over the same ranks), Wan
2.2 TI2V-5B (its per-token timesteps split with the tokens) and Wan 2.2 A14B I2V. Only
self-attention runs Ulysses: cross-attention (text keys/values, and the I2V models' image
keys/values from ``add_k_proj`` / ``add_v_proj``) is computed per query token, so each rank runs
it on its own tokens against the whole, unsplit, text and image states. SkyReels-V2's
``SkyReelsV2Transformer3DModel`` is refused: it expands its per-frame timesteps to every token
and builds its attention mask inside its forward, past the split points below.

N processes (``torchrun --nproc-per-node N``, one GPU each, or CPU processes over gloo) run the
same pipeline on the same inputs. Inside the transformer each rank holds 1/N of the token
sequence: the sequence is split after patching (the input of ``blocks[0]``, the RoPE tables, a
per-token timestep) and gathered again at ``proj_out``; everything between is per token except
self-attention. Around self-attention an all-to-all turns "S/N tokens, all H heads" into "all S
tokens, H/N heads" and back (Ulysses, Jacobs et al. 2023), so each rank runs the attention
op -- ``tiered_sparse_attention`` for FreeLOC's layers, SDPA for the others -- on complete
sequences, unchanged. The split points are those of diffusers' Wan context-parallel plan
(``WanTransformer3DModel._cp_plan``); diffusers' own implementation is not used because it moves
attention into its dispatcher, which our processors do not call, and because its mesh setup
needs an accelerator. See docs/methods.md ("Several GPUs").

Ouroboros' Wan processors (longvideo/processors/ouroboros.py) run the same all-to-alls
themselves when they find the split, and FIFO / Ouroboros run their windows over groups of ranks
(:func:`context_parallel_groups`: contiguous groups of N ranks, each window's sequence over one
group, the windows over the groups). The all-to-alls and the gather are differentiable when their
input requires grad (self-recurrent guidance's backward): the backward of each all-to-all is the
other, of the gather its adjoint (all_reduce, then this rank's slice); the gradients are those of
the sum of every rank's loss.

Requirements: the token count S (frames x tokens per frame after patching) and the head count H
divisible by N. Collectives: ``all_to_all_single`` and ``all_gather_single`` / ``all_gather_into_tensor`` (both
exist on gloo: the CPU tests run the real path, checked with torch 2.13).

Usage::

    torch.distributed.init_process_group(...)
    cp = enable_context_parallel(pipe)        # before FreeLOC(pipe); cp.remove() undoes it
    with FreeLOC(pipe):
        video = pipe(...)                      # every rank gets the whole video
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["init_from_environment", "SequenceParallel", "UlyssesAttnProcessor", "enable_context_parallel", "sequence_parallel_of",
           "heads_to_sequence", "sequence_to_heads", "context_parallel_groups", "ContextParallelGroups", "window_groups"]

# the attribute our hooks leave on every attention module (self and cross) of a parallel
# transformer, and on the transformer itself; the processors in longvideo/processors/wan.py and
# longvideo/processors/ouroboros.py and the FIFO method read it (their only dependency on this module)
ATTR = "longvideo_sequence_parallel"


def sequence_parallel_of(attn) -> Optional["SequenceParallel"]:
    """The :class:`SequenceParallel` a self-attention module runs under, or None."""
    return getattr(attn, ATTR, None)


def init_from_environment(device: Optional[str] = None) -> tuple:
    """Join the process group a launcher such as torchrun describes (WORLD_SIZE > 1 in the
    environment): NCCL when CUDA is available, else gloo. Returns (rank, world_size, device), the
    device being ``cuda:LOCAL_RANK`` on GPUs and `device` otherwise; (0, 1, device) when not
    launched that way."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(torch.device(device))
    return rank, dist.get_world_size(), device


# ---------------------------------------------------------------------------------------------
# the two all-to-alls
def heads_to_sequence(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, S/N, H, D) on each rank (rank r holds tokens [r S/N, (r+1) S/N)) -> (B, S, H/N, D)
    (rank r holds heads [r H/N, (r+1) H/N) of every token). One all_to_all_single."""
    n = dist.get_world_size(group)
    b, s_local, h, d = x.shape
    if h % n:
        raise ValueError(f"context parallel: {h} attention heads are not divisible by {n} ranks")
    # chunk j of the send buffer (heads of group j) goes to rank j; chunk i received came from
    # rank i and holds its tokens
    send = x.reshape(b, s_local, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, n * s_local, h // n, d)


def sequence_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """The inverse of :func:`heads_to_sequence`: (B, S, H/N, D) -> (B, S/N, H, D)."""
    n = dist.get_world_size(group)
    b, s, h_local, d = x.shape
    if s % n:
        raise ValueError(f"context parallel: {s} tokens are not divisible by {n} ranks")
    send = x.reshape(b, n, s // n, h_local, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // n, n * h_local, d)


def _gather_sequence(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    n = dist.get_world_size(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
    # all_gather_single is the newer name of all_gather_into_tensor (deprecated in torch 2.13)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group)
    return out.movedim(0, dim)


class _AllToAll(torch.autograd.Function):
    """The all-to-alls with their gradient. Both are permutations of the tensor spread over the
    ranks, so the adjoint of each is the other: the backward of heads_to_sequence is one
    sequence_to_heads of the incoming gradient (and vice versa). Gradients are those of the sum
    of every rank's loss (each rank holds a part of it, as the head-sharded losses of
    self-recurrent guidance are; docs/methods.md, "Several GPUs (context parallelism)")."""

    @staticmethod
    def forward(ctx, x, group, to_sequence: bool):
        ctx.group, ctx.to_sequence = group, to_sequence
        return heads_to_sequence(x, group) if to_sequence else sequence_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        back = sequence_to_heads if ctx.to_sequence else heads_to_sequence
        return back(grad, ctx.group), None, None


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim` with its adjoint as gradient: the incoming gradients of every rank
    summed (all_reduce), this rank's slice kept."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather_sequence(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        n, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(n, dim=ctx.dim)[r], None, None


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


# ---------------------------------------------------------------------------------------------
class SequenceParallel:
    """The sequence split of one Wan transformer over a process group (see the module docstring).

    ``rotary_full``: the RoPE tables (cos, sin), each (1, S, 1, D), of the current call, kept
    whole for the attention ranks (which see every token); the blocks get the local slice.
    """

    def __init__(self, transformer, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("context parallel: torch.distributed is not initialized (launch with torchrun, "
                               "or call torch.distributed.init_process_group first)")
        self.transformer, self.group = transformer, group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        heads = int(transformer.config.num_attention_heads)
        if heads % self.world_size:
            raise ValueError(f"context parallel: the transformer's {heads} attention heads are not divisible by "
                             f"{self.world_size} ranks")
        self.rotary_full = None
        self._handles = []
        self._processors = []
        self._marked = []

    # hooks -----------------------------------------------------------------------------------
    def _local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if x.shape[dim] % self.world_size:
            raise ValueError(f"context parallel: a sequence of {x.shape[dim]} tokens is not divisible by "
                             f"{self.world_size} ranks (choose frames / size so that frames x tokens per frame is)")
        return x.chunk(self.world_size, dim=dim)[self.rank]

    def _split_timestep(self, module, args, kwargs):
        # Wan 2.2 TI2V passes a per-token timestep (B, S); a (B,) timestep is shared by every token
        if "timestep" in kwargs and torch.is_tensor(kwargs["timestep"]) and kwargs["timestep"].ndim == 2:
            kwargs = dict(kwargs, timestep=self._local(kwargs["timestep"], 1))
        elif len(args) > 1 and torch.is_tensor(args[1]) and args[1].ndim == 2:
            args = (args[0], self._local(args[1], 1)) + tuple(args[2:])
        return args, kwargs

    def _split_rope(self, module, args, output):
        self.rotary_full = tuple(output)
        return tuple(self._local(t, 1) for t in output)

    def _split_hidden(self, module, args, kwargs):
        if args:
            return (self._local(args[0], 1),) + tuple(args[1:]), kwargs
        return args, dict(kwargs, hidden_states=self._local(kwargs["hidden_states"], 1))

    def _gather_output(self, module, args, output):
        return self.gather_sequence(output, 1)

    def install(self) -> "SequenceParallel":
        """Install the split (hooks and Ulysses processors); returns self. ValueError for a
        transformer other than diffusers' ``WanTransformer3DModel`` (module docstring)."""
        tr = self.transformer
        _check_wan_transformer(tr)
        from .processors.wan import _rope_module, self_attention_modules

        rope = _rope_module(tr)
        blocks = tr.blocks
        self._handles = [
            tr.register_forward_pre_hook(self._split_timestep, with_kwargs=True),
            rope.register_forward_hook(self._split_rope),
            blocks[0].register_forward_pre_hook(self._split_hidden, with_kwargs=True),
            tr.proj_out.register_forward_hook(self._gather_output),
        ]
        attns = self_attention_modules(tr)
        for attn in attns:
            kind = type(attn.processor).__name__
            if kind in _REFUSED_BELOW:
                self.remove()
                raise RuntimeError(f"context parallel: enable it before installing {_REFUSED_BELOW[kind]}")
        for attn in attns:
            self._processors.append((attn, attn.processor))
            setattr(attn, ATTR, self)
            attn.set_processor(UlyssesAttnProcessor())
        # cross-attention runs per token (no all-to-all); the attribute lets a processor that
        # records per-token results (Ouroboros' subject maps) gather them over the ranks
        self._marked = [b.attn2 for b in tr.blocks if hasattr(b, "attn2")] + [tr]
        for module in self._marked:
            setattr(module, ATTR, self)
        return self

    def remove(self) -> None:
        """Undo :meth:`install` (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for attn, proc in self._processors:
            attn.set_processor(proc)
            if hasattr(attn, ATTR):
                delattr(attn, ATTR)
        self._processors = []
        for module in getattr(self, "_marked", []):
            if getattr(module, ATTR, None) is self:
                delattr(module, ATTR)
        self._marked = []

    # what the attention processors call -------------------------------------------------------
    def full_sequence(self, query, key, value):
        """(B, S/N, H, D) x 3 -> (B, S, H/N, D) x 3 and the whole RoPE tables (cos, sin)."""
        if self.rotary_full is None:
            raise RuntimeError("context parallel: RoPE tables unknown (the processor ran outside the transformer)")
        q, k, v = (self.to_sequence(t) for t in (query, key, value))
        return q, k, v, self.rotary_full

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S/N, H, D) -> (B, S, H/N, D) (:func:`heads_to_sequence`; differentiable when `x`
        requires grad: the backward is the reverse all-to-all)."""
        return _AllToAll.apply(x, self.group, True) if _needs_grad(x) else heads_to_sequence(x, self.group)

    def local_sequence(self, out: torch.Tensor) -> torch.Tensor:
        """(B, S, H/N, D) attention output -> (B, S/N, H, D) (differentiable like :meth:`to_sequence`)."""
        return _AllToAll.apply(out, self.group, False) if _needs_grad(out) else sequence_to_heads(out, self.group)

    def gather_sequence(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's slice of a per-token tensor, concatenated along `dim` (rank order = token
        order): the whole sequence on every rank. Differentiable (the adjoint: gradients summed
        over the ranks, this rank's slice kept)."""
        return _GatherSequence.apply(x, dim, self.group) if _needs_grad(x) else _gather_sequence(x, dim, self.group)

    def gather_heads(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's heads [rank H/N, (rank+1) H/N) of a per-head result (along `dim`) -> all H
        heads, on every rank (no gradient: for detached results such as subject features)."""
        return _gather_sequence(x.detach(), dim, self.group)

    def head_range(self, heads_here: int) -> tuple:
        """(first, stop) of the heads this rank holds after :meth:`full_sequence`."""
        return self.rank * heads_here, (self.rank + 1) * heads_here

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks of the group (in place; returned)."""
        dist.all_reduce(x, group=self.group)
        return x


def _check_wan_transformer(tr) -> None:
    """ValueError unless `tr` is diffusers' WanTransformer3DModel (or a subclass): the split points
    and the Ulysses processor are that model's (module docstring)."""
    if not any(c.__name__ == "WanTransformer3DModel" for c in type(tr).__mro__):
        raise ValueError(f"context parallel: {type(tr).__name__} is not split (Ulysses runs diffusers' "
                         "WanTransformer3DModel: Wan 2.1, Wan 2.2 A14B / TI2V-5B and their image-to-video "
                         "models; SkyReels-V2 expands its per-frame timesteps and attention mask inside its "
                         "forward)")


# processors that must be installed after enable_context_parallel (they read its attribute),
# by class name -> what to name in the error
_REFUSED_BELOW = {
    "WanTieredAttnProcessor": "FreeLOC (FreeLOC's processors keep the processor they replace for their dense layers)",
    "OuroborosWanProcessor": "Ouroboros' processors (they run the all-to-alls themselves when they find it)",
}


class UlyssesAttnProcessor:
    """Wan self-attention under context parallelism, computed as diffusers' ``WanAttnProcessor``
    does it (q/k RMS norms, full 3-D RoPE, SDPA), on all tokens and H/N heads per rank. It is
    what FreeLOC's dense layers (and every layer of a direct run) use as their processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        from .processors.wan import dense_attention_reference, project_qkv

        sp = sequence_parallel_of(attn)
        if encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None or sp is None:
            raise RuntimeError("UlyssesAttnProcessor runs Wan self-attention (no mask, with rotary embeddings) "
                               "inside a context-parallel transformer")
        q, k, v, rotary = sp.full_sequence(*project_qkv(attn, hidden_states))
        out = dense_attention_reference(q, k, v, rotary).transpose(1, 2)     # (B, S, H/N, D)
        out = sp.local_sequence(out).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _transformers(pipe) -> list:
    found = [getattr(pipe, n, None) for n in ("transformer", "transformer_2")]
    found = [t for t in found if t is not None]
    if not found:
        raise ValueError(f"context parallel: {type(pipe).__name__} has no `transformer`")
    return found


class _PipelineParallel:
    """What :func:`enable_context_parallel` returns: one :class:`SequenceParallel` per transformer
    (``parts``), removed together."""

    def __init__(self, parts):
        self.parts = parts

    @property
    def world_size(self) -> int:
        return self.parts[0].world_size

    @property
    def rank(self) -> int:
        return self.parts[0].rank

    def remove(self) -> None:
        for p in self.parts:
            p.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class ContextParallelGroups:
    """The world split into ``count`` contiguous groups of ``size`` ranks (ranks
    ``[i size, (i + 1) size)`` form group ``i``): ``group`` is this rank's (a process group, or
    None for the whole world), ``index`` its number. One video sequence is split over a group
    (Ulysses); FIFO / Ouroboros run different windows on different groups."""

    def __init__(self, group, size: int, index: int, count: int):
        self.group, self.size, self.index, self.count = group, size, index, count

    def __repr__(self):
        return f"ContextParallelGroups(size={self.size}, index={self.index}, count={self.count})"


def context_parallel_groups(size: int) -> ContextParallelGroups:
    """Split the initialised world into contiguous groups of `size` ranks (every rank must call
    this, with the same `size`: creating process groups is collective). ValueError when the
    world size is not a multiple of `size`."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context parallel: torch.distributed is not initialized (launch with torchrun, "
                           "or call torch.distributed.init_process_group first)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or world % size:
        raise ValueError(f"context parallel: size={size!r} must be a positive divisor of the {world} ranks")
    if size == world:
        return ContextParallelGroups(None, size, 0, 1)
    groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(world // size)]
    return ContextParallelGroups(groups[rank // size], size, rank // size, world // size)


def window_groups(sp: Optional[SequenceParallel]) -> Optional[tuple]:
    """(index, count, leader) of the contiguous group `sp` splits a sequence over: which group
    this rank is in, how many such groups the world holds, and whether this rank is the group's
    first (the one whose results count once when the groups' results are summed). None without
    context parallelism (or over one rank). ValueError when the group is not contiguous ranks
    ``[i N, (i + 1) N)`` (what :func:`context_parallel_groups` builds)."""
    if sp is None or sp.world_size == 1:
        return None
    ranks = dist.get_process_group_ranks(sp.group if sp.group is not None else dist.group.WORLD)
    n, world = sp.world_size, dist.get_world_size()
    start = ranks[0]
    if world % n or start % n or list(ranks) != list(range(start, start + n)):
        raise ValueError(f"context parallel: the group of ranks {list(ranks)} is not one of the contiguous groups "
                         f"of {n} of the {world} ranks (build it with longvideo.parallel.context_parallel_groups)")
    return start // n, world // n, sp.rank == 0


def enable_context_parallel(pipe, group=None) -> _PipelineParallel:
    """Split the sequence of every Wan transformer of `pipe` (``transformer``, and Wan 2.2 A14B's
    low-noise expert ``transformer_2``: each its own :class:`SequenceParallel` over the same
    ranks) across the ranks of `group` (default: the world; a :class:`ContextParallelGroups`
    gives its ``group``). Call before installing FreeLOC or Ouroboros' processors; returns an
    object with ``remove()``, ``rank`` and ``world_size`` (also a context manager). ValueError for
    a transformer that is not a ``WanTransformer3DModel`` (SkyReels-V2's), nothing installed."""
    if isinstance(group, ContextParallelGroups):
        group = group.group
    parts = []
    found = _transformers(pipe)
    for tr in found:  # before any hook goes in (and before the head count is checked against the ranks)
        _check_wan_transformer(tr)
    try:
        for tr in found:
            parts.append(SequenceParallel(tr, group).install())
    except Exception:
        for p in parts:
            p.remove()
        raise
    return _PipelineParallel(parts)
