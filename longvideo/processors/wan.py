"""Self-attention processors for diffusers' ``WanTransformer3DModel`` (and the transformers that
share its attention and RoPE layout: SkyReels-V2, Wan VACE) that route self-attention through
``torch.ops.longvideo.tiered_sparse_attention`` (FreeLOC, docs/methods.md).

Wan's RoPE (diffusers ``WanRotaryPosEmbed``): a head of D channels is split into a temporal part
of t = D - 4 (D // 6) channels followed by height and width parts of 2 (D // 6) channels each
(D = 128: 44 / 42 / 42). Every part is a run of interleaved pairs (2i, 2i + 1) rotated together
(``repeat_interleave_real=True``, and ``apply_rotary_emb`` rotates (x[2i], x[2i+1])), the
temporal position is the latent frame index (after temporal patching) and the temporal
frequencies are theta ** (-2i / t). That is exactly the op's contract for ``rope_t_freqs``
(channels [0, 2R) hold the temporal pairs, interleaved), so no channel permutation is needed:
the processors rotate the spatial channels [t, D) like diffusers does and hand the temporal
channels [0, t) to the op unrotated, with R = t / 2 frequencies read back from the model's own
RoPE tables (so a model built with another theta stays exact).

Tokens are in Wan's frame-major order (patch embedding flattened over (F', H', W')), so the op's
``frame_tokens`` is H' * W'. The processors learn the token grid from a forward pre-hook on the
transformer's ``rope`` module (:class:`WanTokenGrid`), which sees the latent video before
patching on every transformer call.

Which tiers and which re-encoding a layer uses is decided by the caller through a ``settings``
callable: ``settings(mode, num_frames, frame_tokens) -> TieredAttentionSettings | None``; None
means "attend as the model was trained" and the processor defers to the original diffusers
processor, which makes an inactive configuration bit-for-bit the plain pipeline.
Cross-attention (``attn2``) is never touched: on Wan 2.1 I2V that is where the image key/value
projections (``add_k_proj`` / ``add_v_proj``) are, so image-to-video transformers keep diffusers'
image branch as it is; a self-attention layer carrying them is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..hooks import PatchHandle

MODES = ("dense", "vrpr", "tsa")


@dataclass(frozen=True)
class TieredAttentionSettings:
    """Arguments of one ``tiered_sparse_attention`` call (the op's docstring, docs/ops.md).

    local_frames >= number of frames: dense attention. vrpr: [W1, W2, G1, G2, clip(, M)] or None
    (temporal RoPE at the original frame positions). token_bands [E, B1, B2], token_tiers
    [L, St, K, J] and sink_rope [G, M]: the token-granular layouts of FreeLOC's released code.
    """

    local_frames: int
    stripe_frames: int = 0
    stripe_width: int = 0
    sink_frames: int = 0
    vrpr: Optional[tuple] = None
    token_bands: Optional[tuple] = None
    token_tiers: Optional[tuple] = None
    sink_rope: Optional[tuple] = None

    def op_kwargs(self) -> dict:
        kw = dict(local_frames=int(self.local_frames), stripe_frames=int(self.stripe_frames),
                  stripe_width=int(self.stripe_width), sink_frames=int(self.sink_frames),
                  vrpr=None if self.vrpr is None else [float(x) for x in self.vrpr])
        for name in ("token_bands", "token_tiers", "sink_rope"):
            value = getattr(self, name)
            if value is not None:  # only when set: the frame-granular call stays the op's old signature
                kw[name] = [int(x) for x in value]
        return kw


SettingsFn = Callable[[str, int, int], Optional[TieredAttentionSettings]]


# ---------------------------------------------------------------------------------------------
# RoPE layout
def rope_split(transformer) -> tuple[int, int, int]:
    """(t_dim, h_dim, w_dim): the channels of a head given to each RoPE axis, in that order."""
    rope = _rope_module(transformer)
    return int(rope.t_dim), int(rope.h_dim), int(rope.w_dim)


def temporal_frequencies(transformer, dtype=torch.float32, device=None) -> torch.Tensor:
    """The R = t_dim / 2 temporal RoPE frequencies, read from the model's RoPE tables.

    Row P of the tables holds cos / sin(P * freq_i) repeated over each pair; at P = 1 the angle is
    the frequency itself (all frequencies are <= 1 < pi, so atan2 recovers it exactly).
    """
    rope = _rope_module(transformer)
    t_dim = int(rope.t_dim)
    if t_dim % 2 or t_dim == 0:
        raise ValueError(f"temporal RoPE part must have an even, positive channel count, got {t_dim}")
    cos, sin = rope.freqs_cos[1, 0:t_dim:2], rope.freqs_sin[1, 0:t_dim:2]
    freqs = torch.atan2(sin.double(), cos.double())
    return freqs.to(dtype=dtype, device=device if device is not None else freqs.device)


def _rope_module(transformer):
    rope = getattr(transformer, "rope", None)
    if rope is None or not all(hasattr(rope, a) for a in ("t_dim", "h_dim", "w_dim", "patch_size", "freqs_cos")):
        raise ValueError(f"{type(transformer).__name__} has no Wan-style `rope` module (t_dim/h_dim/w_dim, "
                         "patch_size, freqs_cos/freqs_sin): FreeLOC needs Wan's 3-D RoPE layout")
    return rope


def self_attention_modules(transformer) -> list:
    """The self-attention modules (``blocks[i].attn1``) in layer order."""
    blocks = getattr(transformer, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn1") for b in blocks):
        raise ValueError(f"{type(transformer).__name__} has no `blocks[i].attn1` self-attention layers")
    return [b.attn1 for b in blocks]


# ---------------------------------------------------------------------------------------------
# token grid capture
class WanTokenGrid:
    """The post-patching token grid (F', H', W') of the transformer's current forward call.

    A forward pre-hook on ``transformer.rope`` reads the latent video (B, C, F, H, W) that the
    transformer is about to patch (diffusers calls ``self.rope(hidden_states)`` first thing in
    ``forward``) and divides by the patch size.
    """

    def __init__(self, transformer):
        self.rope = _rope_module(transformer)
        self.frames = self.height = self.width = None
        self._handle = self.rope.register_forward_pre_hook(self._hook)

    def _hook(self, module, args, kwargs=None):
        x = args[0] if args else None
        if x is None or x.dim() != 5:
            raise RuntimeError("WanTokenGrid: expected the rope module to be called with the latent video (B, C, F, H, W)")
        p_t, p_h, p_w = module.patch_size
        self.frames, self.height, self.width = x.shape[2] // p_t, x.shape[3] // p_h, x.shape[4] // p_w

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    def get(self, seq_len: int) -> tuple[int, int]:
        """(frames, frame_tokens) for a self-attention call over `seq_len` tokens, checked."""
        if self.frames is None:
            raise RuntimeError("Wan token grid unknown: the processor ran outside the transformer's forward "
                               "(the grid is captured by a pre-hook on transformer.rope)")
        if self.frames * self.frame_tokens != seq_len:
            raise RuntimeError(f"Wan token grid {self.frames}x{self.height}x{self.width} does not match the "
                               f"self-attention sequence length {seq_len}")
        return self.frames, self.frame_tokens

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# ---------------------------------------------------------------------------------------------
# q / k / v as diffusers' WanAttnProcessor computes them
def project_qkv(attn, hidden_states: torch.Tensor):
    """q, k, v as (B, S, H, D) after the q/k RMS norms (no RoPE yet), like WanAttnProcessor."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key = attn.norm_q(query), attn.norm_k(key)
    heads = attn.heads
    return query.unflatten(2, (heads, -1)), key.unflatten(2, (heads, -1)), value.unflatten(2, (heads, -1))


def apply_rope_channels(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor, start: int) -> torch.Tensor:
    """Rotate channels [start, D) of x (B, S, H, D) with diffusers' Wan rotary tables (1, S, 1, D),
    leaving channels [0, start) as they are. Same arithmetic as diffusers' ``apply_rotary_emb``
    (in the tables' dtype, then cast back), restricted to the spatial pairs."""
    tail = x[..., start:]
    x1, x2 = tail.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., start::2]
    sin = freqs_sin[..., start + 1::2]
    rot = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)
    return torch.cat((x[..., :start], rot), dim=-1)


def rotate_temporal_by(x: torch.Tensor, offset: float, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the temporal pairs (channels [0, 2R)) of x (..., D) by the constant angle offset * freqs[i].

    Rotations compose, so rotating a key by `offset` before the op rotates it by its frame index
    shifts that key's temporal position by `offset` (the probe's position perturbation).
    """
    r = freqs.numel()
    angle = (float(offset) * freqs.double()).to(torch.float32)
    cos, sin = angle.cos(), angle.sin()
    xf = x.float()
    x0, x1 = xf[..., 0:2 * r:2], xf[..., 1:2 * r:2]
    rot = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((rot.to(x.dtype), x[..., 2 * r:]), dim=-1)


class _TemporalFreqCache:
    """rope_t_freqs as a float32 tensor on the device of the call (built once per device)."""

    def __init__(self, transformer):
        self.host = temporal_frequencies(transformer, torch.float32, torch.device("cpu"))
        self.t_dim = 2 * self.host.numel()
        self._by_device = {}

    def on(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._by_device:
            self._by_device[key] = self.host.to(device)
        return self._by_device[key]


# ---------------------------------------------------------------------------------------------
# processors
class WanTieredAttnProcessor:
    """Wan self-attention through ``tiered_sparse_attention`` (FreeLOC's TSA and/or VRPR).

    ``mode``: "vrpr" (dense attention, re-encoded temporal positions), "tsa" (the tiers + VRPR)
    or "dense" (plain positions; useful to check the processor itself). ``settings(mode, F,
    frame_tokens)`` returns the op's arguments for the current video, or None to run
    ``fallback`` (the original diffusers processor) unchanged.

    out = to_out( TSA_VRPR( rope_hw(norm_q(x Wq)), rope_hw(norm_k(x Wk)), x Wv ) ), with the
    temporal RoPE (and its re-encoding) applied inside the op.
    """

    def __init__(self, grid: WanTokenGrid, freqs: _TemporalFreqCache, mode: str, settings: SettingsFn,
                 fallback, layer_index: Optional[int] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.grid, self.freqs, self.mode, self.settings = grid, freqs, mode, settings
        self.fallback = fallback
        self.layer_index = layer_index

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, rotary_emb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise RuntimeError("WanTieredAttnProcessor is a self-attention processor; it was installed on a "
                               "cross-attention layer")
        sp = getattr(attn, "longvideo_sequence_parallel", None)  # context parallel: longvideo/parallel.py
        frames, frame_tokens = self.grid.get(hidden_states.shape[1] * (sp.world_size if sp is not None else 1))
        settings = self.settings(self.mode, frames, frame_tokens)
        if settings is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if attention_mask is not None:
            raise RuntimeError("FreeLOC processors do not combine with an attention mask (e.g. SkyReels-V2's "
                               "causal diffusion-forcing blocks); run those without FreeLOC")
        if rotary_emb is None:
            raise RuntimeError("Wan self-attention was called without rotary embeddings")
        query, key, value = project_qkv(attn, hidden_states)
        if sp is not None:  # all tokens, H/N heads on this rank; back to S/N tokens after the op
            query, key, value, rotary_emb = sp.full_sequence(query, key, value)
        out = attend(query, key, value, rotary_emb, self.freqs, frame_tokens, settings).transpose(1, 2)
        out = (sp.local_sequence(out) if sp is not None else out).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class WanProbeAttnProcessor:
    """Measures one self-attention layer's sensitivities while returning its ordinary output.

    Per call, with H the layer's attention output (heads concatenated, before the output
    projection) at the original positions and dense attention:
    - position sensitivity: mean over `shifts` s of ||H(keys' temporal positions + s) - H|| / ||H||
      (FreeLOC's probe shifts the key positions by +-20 and +-40);
    - context sensitivity: ||H(local window of `window` frames) - H|| / ||H|| (the layer's
      change when it only sees nearby frames; no sink).
    Every variant goes through the op. Results accumulate in ``position`` / ``context`` (one
    value per call) until read. The returned output is to_out(H): the forward pass is the plain
    model's (up to the op's float rounding), so all layers are probed in one run.
    """

    def __init__(self, grid: WanTokenGrid, freqs: _TemporalFreqCache, shifts: Sequence[float], window: int):
        self.grid, self.freqs = grid, freqs
        self.shifts = [float(s) for s in shifts]
        self.window = int(window)
        self.position: list[float] = []
        self.context: list[float] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None:
            raise RuntimeError("WanProbeAttnProcessor probes Wan self-attention (no mask, with rotary embeddings)")
        frames, frame_tokens = self.grid.get(hidden_states.shape[1])
        query, key, value = project_qkv(attn, hidden_states)
        dense = TieredAttentionSettings(local_frames=frames)
        base = attend(query, key, value, rotary_emb, self.freqs, frame_tokens, dense).float()
        norm = base.norm().clamp_min(1e-12)
        if self.shifts:
            changes = [float((attend(query, key, value, rotary_emb, self.freqs, frame_tokens, dense,
                                     key_position_offset=s).float() - base).norm() / norm) for s in self.shifts]
            self.position.append(sum(changes) / len(changes))
        local = TieredAttentionSettings(local_frames=max(1, min(self.window, frames)))
        self.context.append(float((attend(query, key, value, rotary_emb, self.freqs, frame_tokens, local).float()
                                   - base).norm() / norm))
        out = base.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def apply_probe_processors(transformer, shifts: Sequence[float], window: int) -> PatchHandle:
    """Probe processors on every self-attention layer; the handle's ``probes`` lists them in layer
    order and ``remove()`` restores the original processors and removes the grid hook."""
    layers = self_attention_modules(transformer)
    handle = PatchHandle("FreeLOC layer probe")
    try:
        handle.claim(transformer)
        grid = WanTokenGrid(transformer)
        handle.on_remove(grid.remove)
        freqs = _TemporalFreqCache(transformer)
        handle.probes = [WanProbeAttnProcessor(grid, freqs, shifts, window) for _ in layers]
        for attn, proc in zip(layers, handle.probes):
            handle.set_processor(attn, proc)
    except BaseException:
        handle.remove()
        raise
    return handle


def install_probe(transformer, shifts: Sequence[float], window: int):
    """Thin alias of :func:`apply_probe_processors` kept for callers: returns (processors, restore)."""
    handle = apply_probe_processors(transformer, shifts, window)
    return handle.probes, handle.remove


def attend(query, key, value, rotary_emb, freqs: _TemporalFreqCache, frame_tokens: int,
           settings: TieredAttentionSettings, key_position_offset: float = 0.0) -> torch.Tensor:
    """The attention of one Wan self-attention layer via the op: (B, S, H, D) in, (B, H, S, Dv) out.

    Spatial RoPE applied here, temporal RoPE (with VRPR) inside the op; `key_position_offset`
    shifts every key's temporal position (layer probing).
    """
    cos, sin = rotary_emb
    t_dim = freqs.t_dim
    query = apply_rope_channels(query, cos, sin, t_dim)
    key = apply_rope_channels(key, cos, sin, t_dim)
    rope_t = freqs.on(query.device)
    if key_position_offset:
        key = rotate_temporal_by(key, key_position_offset, rope_t)
    # (B, S, H, D) -> (B, H, S, D) views: the op takes any strides.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    return torch.ops.longvideo.tiered_sparse_attention(q, k, v, frame_tokens, scale=None, rope_t_freqs=rope_t,
                                                       **settings.op_kwargs())


def patch_tiered_processors(handle: PatchHandle, transformer, modes: Sequence[str], settings: SettingsFn):
    """Add FreeLOC processors on every self-attention layer whose mode is not None to `handle`
    (which claims the transformer's attention processors); returns the token grid.
    ``modes[i]`` in MODES or None (leave layer i alone)."""
    layers = self_attention_modules(transformer)
    if len(modes) != len(layers):
        raise ValueError(f"got {len(modes)} layer modes for {len(layers)} self-attention layers")
    for i, (attn, mode) in enumerate(zip(layers, modes)):
        # Wan I2V's image projections live on the cross-attention layers (attn2), which these
        # processors never replace; a self-attention layer with them would need its image branch
        if mode is not None and getattr(attn, "add_k_proj", None) is not None:
            raise ValueError(f"self-attention layer {i} has image key/value projections (add_k_proj / add_v_proj); "
                             "FreeLOC's processors compute self-attention without them and cannot be installed there")
    handle.claim(transformer)
    grid = WanTokenGrid(transformer)
    handle.on_remove(grid.remove)
    freqs = _TemporalFreqCache(transformer)
    for i, (attn, mode) in enumerate(zip(layers, modes)):
        if mode is not None:
            handle.set_processor(attn, WanTieredAttnProcessor(grid, freqs, mode, settings, attn.processor,
                                                              layer_index=i))
    return grid


def install(transformer, modes: Sequence[str], settings: SettingsFn):
    """Thin alias kept for callers: FreeLOC processors on one transformer, as a handle's
    (grid, restore) pair; restore() puts the original processors back and removes the grid hook."""
    handle = PatchHandle("FreeLOC processors")
    try:
        grid = patch_tiered_processors(handle, transformer, modes, settings)
    except BaseException:
        handle.remove()
        raise
    return grid, handle.remove


def dense_attention_reference(query, key, value, rotary_emb) -> torch.Tensor:
    """Wan self-attention exactly as diffusers computes it (full RoPE + SDPA), (B, H, S, D) out."""
    cos, sin = rotary_emb
    query = apply_rope_channels(query, cos, sin, 0)
    key = apply_rope_channels(key, cos, sin, 0)
    return torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                                            value.transpose(1, 2))


__all__ = ["MODES", "TieredAttentionSettings", "WanTokenGrid", "WanTieredAttnProcessor", "WanProbeAttnProcessor",
           "attend", "install", "install_probe", "apply_probe_processors", "patch_tiered_processors",
           "rope_split", "temporal_frequencies", "self_attention_modules", "project_qkv", "apply_rope_channels",
           "rotate_temporal_by", "dense_attention_reference"]
