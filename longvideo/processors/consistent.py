"""Consistent self-attention for diffusers ``Attention`` layers (StoryDiffusion; how this differs from
the official code: docs/fidelity.md).

Three pieces, data flowing one way (method -> controller -> processor -> op); the third, the bank,
has its own module:

``ConsistentAttnProcessor``
    A diffusers attention processor for a self-attention layer (``attn1``). It projects q, k, v
    with the layer's own weights, views them as (B, H, N, D) (transposed views of the
    projections, no copies), and calls ``torch.ops.longvideo.consistent_attention`` with the plan
    the controller gives for this call: the step's sampled token indices, the group size (images
    per CFG half), an optional frame window, and the id bank (the cached self-attention inputs of
    the id images, projected here by the same layer's to_k / to_v). Row b attends with one softmax
    over its own tokens, the sampled tokens of the other images of its group and the bank:

        out[b] = softmax(q[b] [k[b]; k_S(b); K_bank]^T / sqrt(D)) [v[b]; v_S(b); V_bank]

    When the controller says "off" for the call, it is exactly diffusers' ``AttnProcessor2_0``.

``ConsistentAttentionController``
    Shared state of all processors of one model: the mode ("off", "write", "read"), the denoising
    step (counted by a forward pre-hook on the model: one model call = one step), the token
    sampling (a Bernoulli(sampling_rate) subset per image, drawn once per step from a seeded
    ``torch.Generator``, shared by all layers of the same resolution and by every group, i.e. both
    CFG halves), the official per-call probability schedule, the early steps (before the
    schedule's start: plain attention, or, as the official app reads, the WHOLE id bank), and the
    id bank.

``IdBank`` (``longvideo/processors/id_bank.py``, re-exported here)
    The id bank: the cached self-attention inputs of the id images per key and (step, layer),
    on the device within a budget, in pinned host memory or in a safetensors file.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

# The storage layer lives in its own module; its public names stay importable from here.
from .id_bank import (  # noqa: F401  (re-exported)
    BANK_FORMAT,
    DEFAULT_GPU_BUDGET_FRACTION,
    IdBank,
    keeps_on_device,
    parse_gpu_budget,
)


def _derive_seed(*parts) -> int:
    """A 63-bit seed that is a fixed function of `parts` (stable across processes and runs)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------
# the controller
@dataclass
class ConsistencyPlan:
    """What one attention call computes (see ConsistentAttnProcessor)."""

    sample_idx: torch.Tensor  # (M,) int64 flat token indices into [0, B*N)
    group_size: int
    window: int = -1
    bank: Optional[torch.Tensor] = None  # (groups, E, C) or (1, E, C) self-attention inputs


def bernoulli_token_subset(seed: int, call_key, step: int, tokens: int, count: int, rate: float) -> torch.Tensor:
    """Sorted indices in [0, count) of the tokens a write/read call shares at `step` at the
    resolution of `tokens` tokens per image: one Bernoulli(rate) draw per token of the group's
    `count` = images * tokens, from a generator seeded by (seed, call_key, step, tokens) only, so
    that the draw (and the id bank's size) can be replayed without running the model."""
    gen = torch.Generator().manual_seed(_derive_seed(seed, "sample", call_key, step, tokens))
    return torch.nonzero(torch.rand(count, generator=gen) < rate).flatten()


SCHEDULES = ("official_app", "low_vram")
"""StoryDiffusion's two official schedules of the steps before consistent attention starts:

* ``"official_app"`` (app.py, predict.py): consistent attention from step 5; before it, a write
  call runs plain self-attention (and the id bank keeps the WHOLE self-attention inputs of the id
  images), a read call attends to its own tokens plus the whole id bank.
* ``"low_vram"`` (gradio_app_sdxl_specific_id_low_vram.py): consistent attention from step 1;
  step 0 is plain self-attention in both phases (nothing is written for it)."""

SCHEDULE_START = {"official_app": 5, "low_vram": 1}


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return schedule


def step_kind(step: int, probability: float, start_step: int, full_bank_early: bool) -> str:
    """What consistent attention does at `step`: "full" (before `start_step` when the early
    steps read the whole id bank: the official app), "sampled" (the scheduled probability is
    > 0: write and read with the sampled token subset), or "none" (plain attention)."""
    if full_bank_early and step < start_step:
        return "full"
    return "sampled" if probability > 0 else "none"


def official_probability(step: int, start_step: int = 5, prob_early: float = 0.7, prob_late: float = 0.9,
                         late_step: int = 20) -> float:
    """StoryDiffusion's per-call schedule: off before `start_step`, then consistent attention with
    probability `prob_early` while step < `late_step`, `prob_late` afterwards (official app:
    5, 0.7, 0.9, 20)."""
    if step < start_step:
        return 0.0
    return prob_early if step < late_step else prob_late


class ConsistentAttentionController:
    """State shared by the consistent-attention processors of one model.

    sampling_rate   fraction of each image's tokens shared with the other images of its group
                    (Bernoulli per token; official 0.5). A float, or {tokens_per_image: rate}
                    (the official code has one rate per resolution, sa32 / sa64).
    start_step, prob_early, prob_late, late_step
                    the per-call probability schedule (:func:`official_probability`), or
                    `probability` = any callable(step) -> float replacing it.
    full_bank_early steps < start_step are "full" steps (:func:`step_kind`; StoryDiffusion's
                    ``schedule="official_app"``): a write call runs plain attention and stores
                    the WHOLE inputs of its images in the bank, a read call attends to its own
                    tokens plus all of them (the consistent_attention op with the bank and no
                    sampled tokens), with no per-call draw. False (default): those steps follow
                    the probability (0 in the official schedule: plain attention, nothing stored).
    window          frame window for video (images b, b' interact only if |b - b'| <= window);
                    -1 = whole group.
    bank            the IdBank; `bank_step_key` False keys bank entries by layer only (for
                    callers whose model calls are not aligned denoising steps, e.g. FIFO).
    seed            makes sampling and the per-call draws reproducible: a call's draws depend
                    only on (seed, call_key, step, resolution).
    """

    def __init__(self, sampling_rate: Union[float, dict] = 0.5, start_step: int = 5, prob_early: float = 0.7,
                 prob_late: float = 0.9, late_step: int = 20, probability: Optional[Callable[[int], float]] = None,
                 window: int = -1, bank: Optional[IdBank] = None, seed: int = 0, bank_step_key: bool = True,
                 full_bank_early: bool = False):
        rates = sampling_rate.values() if isinstance(sampling_rate, dict) else [sampling_rate]
        for r in rates:
            if not 0.0 <= float(r) <= 1.0:
                raise ValueError(f"sampling_rate must lie in [0, 1], got {sampling_rate!r}")
        for name, p in (("prob_early", prob_early), ("prob_late", prob_late)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p!r}")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if not isinstance(window, int) or window < -1:
            raise ValueError(f"window must be an int >= -1, got {window!r}")
        self.sampling_rate = sampling_rate
        self.start_step, self.prob_early, self.prob_late, self.late_step = start_step, prob_early, prob_late, late_step
        self.probability = probability
        self.full_bank_early = bool(full_bank_early)
        self.window = window
        self.bank = bank if bank is not None else IdBank()
        self.bank_step_key = bank_step_key
        self.seed = seed
        # per-call state, set by the method around each pipeline call
        self.mode = "off"  # "off" | "write" | "read"
        self.group_size: Optional[int] = None  # images per group (per CFG half); None: batch // groups
        self.num_groups = 2
        self.write_key: Optional[str] = None
        self.read_keys: list[str] = []
        self.call_key: object = 0
        self.step = -1
        self._samples: dict = {}
        self._call_gen: Optional[torch.Generator] = None
        self._handles: list = []  # PatchHandles install() made itself
        self._installed: dict = {}  # id(model) -> the patched layer names (the bank prefetch reads them)
        self.trace: Optional[list] = None  # set to [] to record (step, layer, used) per call (tests)

    # -- per call ---------------------------------------------------------------------------------
    def begin_call(self, mode: str, call_key=0, group_size: Optional[int] = None, write_key: Optional[str] = None,
                   read_keys: Sequence[str] = ()) -> None:
        if mode not in ("off", "write", "read"):
            raise ValueError(f"mode must be 'off', 'write' or 'read', got {mode!r}")
        if mode == "write" and not write_key:
            raise ValueError("write mode needs write_key (the character whose id bank is written)")
        self.mode, self.call_key, self.group_size = mode, call_key, group_size
        self.write_key, self.read_keys = write_key, list(read_keys)
        self.step = -1
        self._samples = {}
        self._call_gen = torch.Generator().manual_seed(_derive_seed(self.seed, "calls", call_key))

    def end_call(self) -> None:
        self.mode = "off"
        self.bank._prefetched.clear()
        self.bank.synchronize()

    def on_model_call(self, module=None, *_args, **_kwargs) -> None:
        """Forward pre-hook of the denoiser: one model call is one denoising step. In read mode
        with a host-memory bank, starts the step's bank transfer to the model's device."""
        self.step += 1
        self._samples = {}
        if self.mode == "read" and self.read_keys and module is not None and self.step_kind(self.step) != "none":
            param = next(module.parameters(), None)
            layers = self._installed.get(id(module), [])
            if param is not None and param.device.type == "cuda" and layers:
                self.bank.prefetch(self.read_keys, self.step if self.bank_step_key else None, list(layers),
                                   param.device, param.dtype)

    def probability_at(self, step: int) -> float:
        if self.probability is not None:
            return float(self.probability(step))
        return official_probability(step, self.start_step, self.prob_early, self.prob_late, self.late_step)

    def step_kind(self, step: int) -> str:
        """"full", "sampled" or "none" (see :func:`step_kind`)."""
        return step_kind(step, self.probability_at(step), self.start_step, self.full_bank_early)

    def rate_for(self, tokens: int) -> float:
        if isinstance(self.sampling_rate, dict):
            return float(self.sampling_rate.get(tokens, 0.0))
        return float(self.sampling_rate)

    def sample_indices(self, step: int, tokens: int, group_size: int, groups: int,
                       device: torch.device) -> torch.Tensor:
        """Sorted flat indices of the tokens shared at `step` by images of `tokens` tokens: one
        Bernoulli(rate) draw per (image of a group, token), repeated for every group (both CFG
        halves see the same subset). Cached per step and resolution."""
        key = (tokens, group_size, groups, device)
        if self.step == step and key in self._samples:
            return self._samples[key]
        rate = self.rate_for(tokens)
        per_group = group_size * tokens
        if rate <= 0.0 or group_size <= 1 and self.mode != "write":
            half = torch.empty(0, dtype=torch.int64)
        else:
            half = bernoulli_token_subset(self.seed, self.call_key, step, tokens, per_group, rate)
        idx = torch.cat([half + g * per_group for g in range(groups)]) if groups > 1 else half
        idx = idx.to(device)
        if self.step == step:
            self._samples[key] = idx
        return idx

    def plan(self, layer: str, hidden_states: torch.Tensor) -> Optional[ConsistencyPlan]:
        """The plan of one self-attention call (None: plain attention), recording the bank in write
        mode. hidden_states: (B, N, C), the inputs of to_q/to_k/to_v."""
        if self.mode == "off":
            return None
        B, N, C = hidden_states.shape
        group_size = self.group_size or max(1, B // self.num_groups)
        if B % group_size:
            raise RuntimeError(f"consistent attention: batch {B} is not a multiple of group_size {group_size}")
        groups = B // group_size
        step = max(self.step, 0)
        kind = self.step_kind(step)
        if kind == "none":
            return None
        bank_step = step if self.bank_step_key else None
        if kind == "full":
            # the official app before start_step: a write runs plain attention and keeps the WHOLE
            # inputs of its images (groups, group_size * N, C); a read attends to its own tokens
            # plus all of them (no sampled tokens, no per-call draw)
            if self.mode == "write":
                self.bank.put(self.write_key, bank_step, layer,
                              hidden_states.detach().reshape(groups, group_size * N, C).clone())
            bank = self._read_bank(bank_step, layer, hidden_states, groups) if self.mode == "read" else None
            if self.trace is not None:
                self.trace.append((step, layer, bank is not None))
            if bank is None:
                return None
            empty = torch.empty(0, dtype=torch.int64, device=hidden_states.device)
            return ConsistencyPlan(sample_idx=empty, group_size=group_size, window=-1, bank=bank)
        p = self.probability_at(step)
        sample_idx = self.sample_indices(step, N, group_size, groups, hidden_states.device)
        if self.mode == "write":
            # the id images' sampled tokens (the same subset their write-mode attention shares),
            # kept per group: (groups, E, C)
            shared = hidden_states.reshape(B * N, C).index_select(0, sample_idx).view(groups, -1, C)
            self.bank.put(self.write_key, bank_step, layer, shared)
        used = p >= 1.0 or bool(torch.rand((), generator=self._call_gen) < p)
        if self.trace is not None:
            self.trace.append((step, layer, used))
        if not used:
            return None
        bank = self._read_bank(bank_step, layer, hidden_states, groups) if self.mode == "read" else None
        return ConsistencyPlan(sample_idx=sample_idx, group_size=group_size, window=self.window, bank=bank)

    def _read_bank(self, bank_step, layer: str, hidden_states: torch.Tensor, groups: int) -> Optional[torch.Tensor]:
        """The read keys' bank entries for (step, layer), (groups or 1, E, C); None when empty."""
        if not self.read_keys:
            return None
        bank = self.bank.get(self.read_keys, bank_step, layer, hidden_states.device, hidden_states.dtype)
        if bank.shape[0] not in (1, groups):
            raise RuntimeError(f"id bank has {bank.shape[0]} groups but this call has {groups} (one per CFG "
                               f"half): write and read with the same guidance setting")
        return None if bank.shape[1] == 0 else bank

    # -- installation ------------------------------------------------------------------------------
    def install(self, model: torch.nn.Module, layers: Union[str, Sequence[str], Callable[[str], bool]] = "up",
                handle=None) -> list:
        """Put a ConsistentAttnProcessor on the selected self-attention layers of `model` and a
        step-counting pre-hook on `model`, recorded in `handle` (a :class:`longvideo.hooks.PatchHandle`,
        which claims the model's attention processors; None: a handle of the controller's own,
        removed by :meth:`uninstall`). Returns the patched layer names.

        layers: "up" (attn1 of up_blocks: the official choice), "up+mid", "all", "spatial" (every
        attn1 outside temporal/motion modules: video UNets), a list of layer names, or a predicate
        on the layer name.
        """
        from ..hooks import PatchHandle

        selected = self_attention_layers(model, layers)
        if not selected:
            raise ValueError(f"layers={layers!r} selects no self-attention layer of {type(model).__name__}")
        own = handle is None
        if own:
            handle = PatchHandle("consistent self-attention")
        try:
            handle.claim(model)
            for name, module in selected:
                handle.set_processor(module, ConsistentAttnProcessor(self, name))
            handle.add_hook(model.register_forward_pre_hook(self.on_model_call))
            self._installed[id(model)] = [name for name, _ in selected]
            handle.on_remove(lambda: self._installed.pop(id(model), None))
        except BaseException:
            if own:
                handle.remove()
            raise
        if own:
            self._handles.append(handle)
        return [name for name, _ in selected]

    def uninstall(self) -> None:
        """Restore the original processors and remove the hooks of the handles :meth:`install`
        made itself (a handle given to install is removed by its owner)."""
        while self._handles:
            self._handles.pop().remove()


def self_attention_layers(model: torch.nn.Module, layers="up") -> list:
    """[(name, Attention module)] of the self-attention layers of `model` that `layers` selects
    (see ConsistentAttentionController.install); the layers that install() patches."""
    from diffusers.models.attention_processor import Attention

    select = _layer_selector(layers)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, Attention) and not getattr(module, "is_cross_attention", False) and select(name)]


def _layer_selector(layers) -> Callable[[str], bool]:
    if callable(layers):
        return layers
    if isinstance(layers, str):
        if layers == "up":
            return lambda n: n.startswith("up_blocks.") and n.endswith("attn1")
        if layers == "up+mid":
            return lambda n: n.startswith(("up_blocks.", "mid_block.")) and n.endswith("attn1")
        if layers == "all":
            return lambda n: n.endswith("attn1")
        if layers == "spatial":  # video UNets: not the temporal attention of motion modules
            return lambda n: n.endswith("attn1") and not any(t in n for t in ("motion", "temporal", "temp_"))
        raise ValueError(f"layers must be 'up', 'up+mid', 'all', 'spatial', a list of names or a predicate, "
                         f"got {layers!r}")
    wanted = set(layers)
    return lambda n: n in wanted


# ----------------------------------------------------------------------------------------------
# the processor
class ConsistentAttnProcessor:
    """Self-attention through ``torch.ops.longvideo.consistent_attention`` (see module docstring).

    Works with any diffusers ``Attention`` used as self-attention (SD/SDXL UNets, AnimateDiff's
    spatial layers, other 2D/3D UNets and transformers built on ``Attention``): images or frames
    are the batch axis. Cross-attention calls, attention masks and calls the controller switches
    off run exactly like diffusers' ``AttnProcessor2_0``.
    """

    def __init__(self, controller: ConsistentAttentionController, name: str):
        self.controller = controller
        self.name = name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        B, N, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        plan = None
        if encoder_hidden_states is None and attention_mask is None:
            plan = self.controller.plan(self.name, hidden_states)
        context = hidden_states
        if encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        Bc = context.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], Bc)
            attention_mask = attention_mask.view(Bc, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # (B, N, H*D) -> (B, H, N, D): transposed views of the projections, no copies
        query = query.view(B, -1, heads, head_dim).transpose(1, 2)
        key = key.view(Bc, -1, heads, head_dim).transpose(1, 2)
        value = value.view(Bc, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if plan is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)
        else:
            bank_k = bank_v = None
            if plan.bank is not None:
                G, E, _ = plan.bank.shape
                bank_k = attn.to_k(plan.bank).view(G, E, heads, head_dim).transpose(1, 2)
                bank_v = attn.to_v(plan.bank).view(G, E, heads, head_dim).transpose(1, 2)
                if attn.norm_k is not None:
                    bank_k = attn.norm_k(bank_k)
                if G == 1:  # one bank shared by every group: the op's (H, E, D) form
                    bank_k, bank_v = bank_k[0], bank_v[0]
            out = torch.ops.longvideo.consistent_attention(query, key, value, plan.sample_idx, plan.group_size,
                                                           plan.window, bank_k, bank_v, attn.scale)

        out = out.transpose(1, 2).reshape(B, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
