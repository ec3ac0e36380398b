"""Ouroboros-Diffusion attention processors: SACFA, subject maps, subject features (differences from
the authors' demo code: docs/fidelity.md).

Data flow: the FIFO method (``longvideo.methods.fifo``) owns an :class:`OuroborosContext`, sets it
up before each model call of a window (the window's subject masks, what to record) and reads what
the processors recorded afterwards. The processors call ``torch.ops.longvideo.consistent_attention``.

Self-attention (``attn1``)
    *AnimateDiff* (spatial layers of the UNet; the motion modules are left alone): the UNet folds
    the window's F frames into the batch, rows ``[half * F, (half + 1) * F)`` per CFG half. SACFA
    (Subject-Aware Cross-Frame Attention, Ouroboros Eq. 4): each frame's keys/values are extended
    with the subject tokens of the OTHER frames of its window, i.e. ``consistent_attention(q, k, v,
    sample_idx, group_size=F)`` with ``sample_idx`` the flat indices of the tokens inside the
    frames' subject masks (both CFG halves use the same masks; the halves are separate groups).
    ``sacfa_tokens="official_demo"`` (the authors' demo): the subject tokens of ALL frames of the
    window, the frame's own included (so its own subject tokens count twice in the softmax), i.e.
    ``consistent_attention(q, k, v, [], group_size=F, bank_k, bank_v)`` with one bank per CFG half
    = the keys/values of that half's subject tokens (gathered: only those tokens are copied).
    *Wan*: the window's self-attention is already full spatio-temporal (every frame attends to all
    tokens of all frames), so SACFA's cross-frame extension is the identity there; only the subject
    maps and features are used (self-recurrent guidance).
    Under context parallelism (``longvideo.parallel``) each rank holds S/N tokens; the Wan
    processor turns q, k, v into all tokens x H/N heads (all-to-all) and runs the attention
    unchanged on them (see ``OuroborosWanProcessor``).
    Subject features (for self-recurrent guidance): the layer's keys (after the key norm, before
    Wan's RoPE, so they do not depend on the frame's position) of the conditional half, recorded
    with their autograd graph (under context parallelism: this rank's heads of every token). In a guided call the attention itself always goes through
    ``consistent_attention`` (with no sampled tokens it equals SDPA), so the guidance gradient is
    the op's backward (except in a layer called with an attention mask, e.g. SkyReels-V2's
    block-causal windows, which stays on SDPA: the op has no mask argument).

Cross-attention (``attn2``)
    Output unchanged (SDPA, as diffusers' processors); when asked, also the attention map of the
    subject words: ``softmax(q k^T / sqrt(D))`` over the text tokens, averaged over heads and the
    subject's token positions, conditional half only, per frame at the layer's resolution.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..hooks import PatchHandle


class OuroborosContext:
    """State shared by the processors of one model for the current window call."""

    def __init__(self, latent_hw):
        self.latent_hw = tuple(latent_hw)
        self.active = False
        self.frames = 1                 # F: frames of the window (one CFG half)
        self.masks: Optional[torch.Tensor] = None   # (F, h, w) bool subject masks at latent size
        self.sacfa = False
        self.sacfa_tokens = "paper"     # "paper" (other frames) | "official_demo" (all frames, own twice)
        self.use_op = False             # route self-attention through the op (guided calls)
        self.subject_ids: Sequence[int] = ()
        self.record_maps = False
        self.feature_layers: set = set()
        self._maps_sum = None
        self._maps_count = 0
        self.features: Dict[str, torch.Tensor] = {}
        self.feature_parallel: dict = {}   # layer -> SequenceParallel when its features are head-sharded
        self._idx_cache: dict = {}

    # -- per window ----------------------------------------------------------------------------
    def begin(self, frames: int, masks, sacfa: bool, use_op: bool, record_maps: bool, feature_layers=(),
              sacfa_tokens: str = "paper"):
        self.active, self.frames, self.masks = True, frames, masks
        self.sacfa, self.use_op, self.record_maps = sacfa, use_op, record_maps
        self.sacfa_tokens = sacfa_tokens
        self.feature_layers = set(feature_layers)
        self._maps_sum, self._maps_count = None, 0
        self.features, self.feature_parallel, self._idx_cache = {}, {}, {}

    def end(self):
        self.active = False
        self.masks, self.features, self.feature_parallel, self._idx_cache = None, {}, {}, {}

    # -- masks at a layer's resolution ---------------------------------------------------------
    def layer_hw(self, n_tokens: int):
        h, w = self.latent_hw
        for s in (1, 2, 4, 8, 16, 32, 64):
            if (h // s) * (w // s) == n_tokens and h % s == 0 and w % s == 0:
                return h // s, w // s
        raise RuntimeError(f"Ouroboros: cannot map {n_tokens} tokens per frame onto the latent size {h}x{w}")

    def layer_masks(self, n_tokens: int) -> Optional[torch.Tensor]:
        """(F, n_tokens) bool: a token is a subject token if any latent pixel it covers is."""
        if self.masks is None:
            return None
        key = ("m", n_tokens)
        if key not in self._idx_cache:
            hh, ww = self.layer_hw(n_tokens)
            m = F.adaptive_max_pool2d(self.masks[:, None].float(), (hh, ww))[:, 0] > 0
            self._idx_cache[key] = m.reshape(m.shape[0], -1)
        return self._idx_cache[key]

    def sample_idx(self, batch: int, n_tokens: int, device) -> Optional[torch.Tensor]:
        """Sorted flat indices into [0, batch * n_tokens) of the subject tokens of every row."""
        key = ("i", batch, n_tokens)
        if key not in self._idx_cache:
            m = self.layer_masks(n_tokens)
            if m is None or not bool(m.any()):
                self._idx_cache[key] = None
            else:
                rows = m.repeat(batch // self.frames, 1)  # every CFG half uses the same masks
                self._idx_cache[key] = rows.reshape(-1).nonzero()[:, 0].to(device=device, dtype=torch.int64)
        return self._idx_cache[key]

    # -- recording -----------------------------------------------------------------------------
    def add_map(self, subject_map: torch.Tensor):
        """subject_map: (F, hh, ww) attention mass on the subject words, resized to latent size."""
        m = F.interpolate(subject_map[:, None].float(), size=self.latent_hw, mode="bilinear",
                          align_corners=False)[:, 0]
        self._maps_sum = m if self._maps_sum is None else self._maps_sum + m
        self._maps_count += 1

    def maps(self) -> Optional[torch.Tensor]:
        """(F, h, w) in [0, 1]: the mean over layers, min-max normalised per frame."""
        if self._maps_sum is None:
            return None
        m = self._maps_sum.detach() / self._maps_count
        lo = m.flatten(1).amin(1).view(-1, 1, 1)
        hi = m.flatten(1).amax(1).view(-1, 1, 1)
        return (m - lo) / (hi - lo).clamp_min(1e-12)

    def add_features(self, name: str, keys: torch.Tensor, parallel=None):
        """keys: (F, H, N, D) of the conditional half, with their graph. `parallel`: the
        ``longvideo.parallel.SequenceParallel`` the layer ran under, whose rank then holds only
        heads ``parallel.head_range(H)`` of the layer (None: all heads)."""
        if name in self.feature_layers:
            self.features[name] = keys
            if parallel is not None:
                self.feature_parallel[name] = parallel
            else:
                self.feature_parallel.pop(name, None)


def _cond_rows(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The conditional CFG half: the last `frames` rows (the method batches [uncond, cond])."""
    return x[-frames:]


def _attention(ctx: OuroborosContext, q, k, v, sacfa: bool):
    """(B, H, N, D) attention: the op when SACFA has tokens to share or a gradient must pass
    through it, SDPA otherwise."""
    B, N = q.shape[0], q.shape[2]
    idx = ctx.sample_idx(B, N, q.device) if (ctx.active and sacfa and ctx.masks is not None) else None
    if idx is not None and ctx.sacfa_tokens == "official_demo":
        # every frame's keys += the subject tokens of all frames of its CFG half (own ones again):
        # one bank per group, gathered from k / v at the subject positions
        groups = B // ctx.frames
        row, tok = idx // N, idx % N
        bank_k = k[row, :, tok].view(groups, -1, k.shape[1], k.shape[3]).transpose(1, 2)
        bank_v = v[row, :, tok].view(groups, -1, v.shape[1], v.shape[3]).transpose(1, 2)
        empty = idx[:0]
        return torch.ops.longvideo.consistent_attention(q, k, v, empty, ctx.frames, -1, bank_k, bank_v)
    if idx is not None:
        return torch.ops.longvideo.consistent_attention(q, k, v, idx, ctx.frames)
    if ctx.active and ctx.use_op:
        empty = torch.zeros(0, dtype=torch.int64, device=q.device)
        return torch.ops.longvideo.consistent_attention(q, k, v, empty, 1)
    return F.scaled_dot_product_attention(q, k, v)


def _subject_map(q, k, subject_ids, chunk: int = 4096):
    """Mean over heads and subject tokens of softmax(q k^T / sqrt(D)) over the text: (B, N)."""
    ids = torch.as_tensor(list(subject_ids), dtype=torch.long, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = []
    for s in range(0, q.shape[2], chunk):  # bounded memory for Wan's long token axis
        p = torch.softmax(torch.matmul(q[:, :, s: s + chunk].float(), k.float().transpose(-1, -2)) * scale, dim=-1)
        out.append(p[..., ids].mean(dim=(1, 3)))
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------------
# AnimateDiff / diffusers `Attention`
class _DiffusersAttnBase:
    def __init__(self, ctx: OuroborosContext, name: str):
        self.ctx, self.name = ctx, name

    @staticmethod
    def _pre(attn, hidden_states, temb):
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = None
        if hidden_states.ndim == 4:
            shape4 = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, shape4

    @staticmethod
    def _post(attn, out, residual, shape4):
        out = attn.to_out[1](attn.to_out[0](out))
        if shape4 is not None:
            out = out.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _heads(attn, x, B):
        return x.view(B, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    @classmethod
    def _qkv(cls, attn, hidden_states, context):
        """(B, H, N, D) queries of `hidden_states`, keys/values of `context`, after the q/k norms."""
        B = hidden_states.shape[0]
        q = cls._heads(attn, attn.to_q(hidden_states), B)
        k = cls._heads(attn, attn.to_k(context), B)
        v = cls._heads(attn, attn.to_v(context), B)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return q, k, v


class OuroborosSelfAttnProcessor(_DiffusersAttnBase):
    """attn1 of a spatial transformer block: SACFA through consistent_attention + subject keys."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        ctx = self.ctx
        residual = hidden_states
        hidden_states, shape4 = self._pre(attn, hidden_states, temb)
        B = hidden_states.shape[0]
        q, k, v = self._qkv(attn, hidden_states, hidden_states)
        if attention_mask is not None:
            if ctx.active:
                raise RuntimeError("Ouroboros: self-attention with an attention mask is not supported")
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        else:
            out = _attention(ctx, q, k, v, ctx.sacfa)
        if ctx.active and self.name in ctx.feature_layers:
            ctx.add_features(self.name, _cond_rows(k, ctx.frames))
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * q.shape[-1]).to(q.dtype)
        return self._post(attn, out, residual, shape4)


class OuroborosCrossAttnProcessor(_DiffusersAttnBase):
    """attn2 of a spatial transformer block: plain attention, plus the subject words' map."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        ctx = self.ctx
        residual = hidden_states
        hidden_states, shape4 = self._pre(attn, hidden_states, temb)
        B = hidden_states.shape[0]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], B)
            attention_mask = attention_mask.view(B, attn.heads, -1, attention_mask.shape[-1])
        q, k, v = self._qkv(attn, hidden_states, encoder_hidden_states)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        if ctx.active and ctx.record_maps and ctx.subject_ids:
            with torch.no_grad():
                m = _subject_map(_cond_rows(q, ctx.frames), _cond_rows(k, ctx.frames), ctx.subject_ids)
                ctx.add_map(m.view(ctx.frames, *ctx.layer_hw(q.shape[2])))
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * q.shape[-1]).to(q.dtype)
        return self._post(attn, out, residual, shape4)


def _unet_processors(unet, ctx: OuroborosContext):
    """({name: processor} for every layer of a UNetMotionModel, the self-attention layer names):
    Ouroboros' processors on the spatial attention layers, the motion modules' own kept."""
    procs, self_layers = {}, []
    for name, proc in unet.attn_processors.items():
        if "motion_modules" in name:
            procs[name] = proc
        elif name.endswith("attn1.processor"):
            procs[name] = OuroborosSelfAttnProcessor(ctx, name)
            self_layers.append(name)
        elif name.endswith("attn2.processor"):
            procs[name] = OuroborosCrossAttnProcessor(ctx, name)
        else:
            procs[name] = proc
    return procs, self_layers


def install_unet(unet, ctx: OuroborosContext) -> List[str]:
    """Thin alias kept for callers (nothing to undo it: prefer :func:`apply_ouroboros_processors`):
    install the processors on a UNetMotionModel; returns the self-attention layer names."""
    procs, self_layers = _unet_processors(unet, ctx)
    unet.set_attn_processor(procs)
    return self_layers


# ----------------------------------------------------------------------------------------------
# Wan / WanAttention
def _wan_rope(x, freqs_cos, freqs_sin):
    """Wan's interleaved rotary embedding on (B, S, H, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


# the attribute longvideo/parallel.py leaves on the attention modules of a context-parallel
# transformer (its SequenceParallel); read here by name so that processors do not import it
_SEQUENCE_PARALLEL = "longvideo_sequence_parallel"


class OuroborosWanProcessor:
    """A WanAttention processor for both attn1 (subject keys; the op in guided calls) and attn2
    (subject-word maps). Text-to-video only (no image-conditioning projections).

    Under context parallelism (``longvideo.parallel.enable_context_parallel`` before these
    processors are installed) the layer's input holds S/N tokens: self-attention turns q, k, v into
    all S tokens x H/N heads (Ulysses all-to-all, differentiable for the guidance's backward), so
    the attention (SDPA or ``consistent_attention``) runs unchanged on this rank's heads, and the
    subject keys it records are this rank's heads (``OuroborosContext.feature_parallel`` says so);
    cross-attention runs on the local tokens and gathers the per-token subject map over the ranks.
    """

    def __init__(self, ctx: OuroborosContext, name: str, cross: bool):
        self.ctx, self.name, self.cross = ctx, name, cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx = self.ctx
        if attn.add_k_proj is not None:
            raise RuntimeError("Ouroboros on Wan supports text-to-video transformers (no image projections)")
        sp = getattr(attn, _SEQUENCE_PARALLEL, None)
        ctx_states = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(ctx_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(ctx_states).unflatten(2, (attn.heads, -1))
        if sp is not None and not self.cross:
            if attention_mask is not None:
                raise RuntimeError("Ouroboros under context parallelism: self-attention with an attention mask "
                                   "(SkyReels-V2's causal blocks) is not supported")
            q, k, v, rotary_emb = sp.full_sequence(q, k, v)   # (B, S, H/N, D) each, the whole RoPE tables
        S = q.shape[1]
        if not self.cross and ctx.active and self.name in ctx.feature_layers:
            # pre-RoPE keys of the conditional row, per frame: (F, H, tokens, D) (H/N heads under CP)
            kc = k[-1:].reshape(ctx.frames, S // ctx.frames, k.shape[2], -1).permute(0, 2, 1, 3)
            ctx.add_features(self.name, kc, parallel=sp)
        if rotary_emb is not None:
            q, k = _wan_rope(q, *rotary_emb), _wan_rope(k, *rotary_emb)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
        if self.cross or attention_mask is not None:
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attention_mask)
        else:
            out = _attention(ctx, qt, kt, vt, sacfa=False)  # full 3-D attention: SACFA is the identity
        if self.cross and ctx.active and ctx.record_maps and ctx.subject_ids:
            with torch.no_grad():
                m = _subject_map(qt[-1:], kt[-1:], ctx.subject_ids)  # (1, S) (S/N tokens under CP)
                if sp is not None:
                    m = sp.gather_sequence(m, 1)
                ctx.add_map(m.view(ctx.frames, *ctx.layer_hw(m.shape[1] // ctx.frames)))
        out = out.transpose(1, 2)
        if sp is not None and not self.cross:
            out = sp.local_sequence(out)                       # back to (B, S/N, H, D)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_processors(transformer, ctx: OuroborosContext):
    procs, self_layers = {}, []
    for name in transformer.attn_processors:
        cross = ".attn2." in name
        procs[name] = OuroborosWanProcessor(ctx, name, cross)
        if not cross:
            self_layers.append(name)
    return procs, self_layers


def install_wan(transformer, ctx: OuroborosContext) -> List[str]:
    """Thin alias kept for callers (nothing to undo it: prefer :func:`apply_ouroboros_processors`):
    install the processors on a Wan transformer; returns the self-attention layer names."""
    procs, self_layers = _wan_processors(transformer, ctx)
    transformer.set_attn_processor(procs)
    return self_layers


def apply_ouroboros_processors(model, ctx: OuroborosContext) -> PatchHandle:
    """Ouroboros' processors (SACFA, subject maps, guidance features) on every attention layer of
    `model`: a UNetMotionModel (AnimateDiff; the motion modules keep theirs) or a Wan / SkyReels-V2
    transformer. Returns a :class:`longvideo.hooks.PatchHandle` whose ``self_layers`` lists the
    self-attention layers (the candidates for subject features); ``remove()`` restores every
    previous processor. The processors read `ctx` (what the current call computes)."""
    handle = PatchHandle("Ouroboros")
    try:
        handle.claim(model)
        build = _unet_processors if hasattr(model, "down_blocks") else _wan_processors
        procs, handle.self_layers = build(model, ctx)
        handle.set_attn_processors(model, procs)
    except BaseException:
        handle.remove()
        raise
    return handle
