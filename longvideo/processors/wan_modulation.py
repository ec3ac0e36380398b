"""longvideo's forward for diffusers' ``WanTransformer3DModel``: diffusers' output, without the
per-token modulation copies and the float32 temporaries.

Why: FIFO-Diffusion / Ouroboros denoise a window whose latent frames sit at different noise
levels, so every Wan call gets a 2-D timestep ``(B, S)`` -- one value per token, the frame's value
repeated over its H' x W' tokens (Wan 2.2 TI2V's own pipeline does the same: the image frame at
0, the rest at t). diffusers then embeds S timesteps instead of F and every block adds its
``scale_shift_table`` to a per-token ``(B, S, 6, dim)`` float32 tensor: for Wan2.1-14B at 480x832
and a 21-frame window with classifier-free guidance that is 15 GiB per block (the sum and temb's
float32 copy) next to 4.4 GiB of per-token time embeddings (planner figures), most of a FIFO
call's activation memory, all of it H' x W' copies of F distinct rows. And in every call, per
block, each modulated norm and each gated residual ``(h.float() + y * gate).type_as(h)`` makes up
to three (B, S, dim) float32 temporaries where one suffices.

What the patch does:

- when a call's timestep is piecewise constant along the sequence (runs of equal values, the
  same boundaries in every batch row -- FIFO's frames, TI2V's image frame, a rank's slice of
  either under context parallelism), the transformer embeds one timestep per run (``R`` runs
  instead of ``S`` tokens) and each block applies its shift / scale / gate to the tokens of a
  run by broadcasting, as diffusers does for a 1-D timestep (one run: the 1-D case itself). With
  equal run lengths (whole frames) the tokens are viewed as ``(B, R, L, dim)``; otherwise each
  run is a slice;
- without autograd, the modulation is applied in place on the norm's output
  (``x.mul_(1 + scale).add_(shift)``) and a gated residual is computed into one float32 buffer
  (``mul(y, gate, out=buf).add_(h)``), cast to the model dtype in the same expression. With
  autograd (Ouroboros' guidance pass) diffusers' out-of-place expressions are kept.

Every elementwise operation is diffusers', in the same order and precision, on the same values
(IEEE addition is commutative and a bf16 operand is promoted to float32 exactly, as ``.float()``
does), so the output equals the unpatched model's up to the time embedder's matmul, which runs
over R rows instead of S (a row does not depend on the others, but a kernel chosen for another
row count may round differently: 0 for FIFO's runs and for a 1-D timestep, 6e-7 for a single run
of a 2-D one in float32 on CPU, tests/test_wan_modulation.py).

Everything else goes to diffusers' own forward unchanged: a timestep with more than ``S // 2``
runs, LoRA scaling through ``attention_kwargs``, gradient checkpointing (its recomputation would
run after the call's run table is gone). Hooks on the transformer and its blocks (offloading,
``longvideo.parallel``'s splits, Ouroboros' stop) fire as before: the patched forward calls the
same submodules the same way. Offloading hooks wrap ``forward``: apply the patch first (the CLI
does, right after loading); applied to an already wrapped model it is refused.

Use::

    handle = apply_lean_wan_forward(pipe)     # a PatchHandle (longvideo/hooks.py)
    ...
    handle.remove()

The FIFO / Ouroboros methods apply it to every Wan expert for the duration of a run; the CLI to
every Wan pipeline it loads. See docs/methods.md, "Longvideo's Wan forward".
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from ..hooks import PatchHandle, active_patches

__all__ = ["apply_lean_wan_forward", "lean_wan_forward_where_possible", "lean_forward_active", "wan_transformers",
           "timestep_runs", "LEAN_WAN_FORWARD"]

LEAN_WAN_FORWARD = "forward"   # the resource a handle claims on the transformer


class TimestepRuns:
    """Runs of equal timesteps along a call's token sequence.

    values: (B, R) the timestep of each run; lengths: the R run lengths (sum S), or None for one
    run over every token (a 1-D timestep); uniform: whether every run has the same length."""

    def __init__(self, values: torch.Tensor, lengths: Optional[List[int]]):
        self.values, self.lengths = values, lengths
        self.uniform = lengths is None or all(n == lengths[0] for n in lengths)

    def __len__(self) -> int:
        return 1 if self.lengths is None else len(self.lengths)


def timestep_runs(timestep: torch.Tensor, max_runs: Optional[int] = None) -> Optional[TimestepRuns]:
    """The runs of a 2-D timestep ``(B, S)``: maximal stretches of tokens whose timestep is the
    same in every batch row's stretch (boundaries are the union over the rows). None when
    `timestep` is not 2-D or has more than `max_runs` runs (default ``S // 2``: then broadcasting
    saves nothing worth a second code path). Costs one host synchronisation."""
    if not torch.is_tensor(timestep) or timestep.ndim != 2 or timestep.shape[1] < 1:
        return None
    S = timestep.shape[1]
    changes = (timestep[:, 1:] != timestep[:, :-1]).any(dim=0).nonzero().flatten().tolist()
    starts = [0] + [c + 1 for c in changes]
    if len(starts) > (S // 2 if max_runs is None else max_runs):
        return None
    lengths = [b - a for a, b in zip(starts, starts[1:] + [S])]
    values = timestep[:, torch.tensor(starts, device=timestep.device)]
    return TimestepRuns(values, lengths)


def per_run(fn: Callable, runs: TimestepRuns, tokens: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
            inplace: bool = False, out: Optional[torch.Tensor] = None):
    """``fn(*tokens, *params)`` where each of `tokens` is (B, S, ...) per token and each of
    `params` is (B, R, ...) per run: every token uses its run's row of the params, as if the
    params had been repeated over the run's tokens. ``inplace``: fn writes into its first token
    argument, which is returned whole; ``out``: fn takes one more argument, the part of `out`
    (B, S, ...) to write, and `out` is returned."""
    B, S = tokens[0].shape[:2]
    extra = () if out is None else (out,)
    if runs.uniform:
        R = len(runs)
        L = S // R
        res = fn(*(t.reshape(B, R, L, *t.shape[2:]) for t in tokens), *(p.unsqueeze(2) for p in params),
                 *(t.reshape(B, R, L, *t.shape[2:]) for t in extra))
        return tokens[0] if inplace else out if out is not None else res.reshape(B, S, *res.shape[3:])
    pieces, a = [], 0
    for r, n in enumerate(runs.lengths):
        pieces.append(fn(*(t[:, a:a + n] for t in tokens), *(p[:, r:r + 1] for p in params),
                         *(t[:, a:a + n] for t in extra)))
        a += n
    return tokens[0] if inplace else out if out is not None else torch.cat(pieces, dim=1)


# the operations of diffusers' Wan block, elementwise, each with the order and precision of its
# expression there. Out of place (autograd: the same graph) ...
def _modulate(x, scale, shift):
    return x * (1 + scale) + shift


def _gate(h, y, gate):
    return h + y * gate


def _gate_float(h, y, gate):
    return h + y.float() * gate   # y's float32 copy dies with the product, as in diffusers


# ... and without autograd, with no float32 temporaries: the same values (x * (1 + s) + b on x's
# own storage; y * g computed into one buffer, then h added: IEEE addition is commutative, and
# a bf16 operand is promoted to float32 exactly, as .float() does)
def _modulate_(x, scale, shift):
    return x.mul_(1 + scale).add_(shift)


def _gate_into(h, y, gate, out):
    torch.mul(y, gate, out=out)
    return out.add_(h)


class _CallState:
    """The run table of the call in progress (read by the patched blocks)."""

    def __init__(self):
        self.runs: Optional[TimestepRuns] = None


def _block_forward(block, state: _CallState):
    original = type(block).forward

    def forward(hidden_states, encoder_hidden_states, temb, rotary_emb):
        runs = state.runs
        if runs is None or temb.ndim != 4 or temb.shape[1] != len(runs):
            return original(block, hidden_states, encoder_hidden_states, temb, rotary_emb)
        if runs.lengths is not None and hidden_states.shape[1] != sum(runs.lengths):
            # (after a context-parallel split the block sees the rank's slice, and so did the runs)
            raise ValueError(f"lean modulation: the timestep covers {sum(runs.lengths)} tokens, the block's "
                             f"input {hidden_states.shape[1]}")
        # (table + temb) per run: float32 (B, R, 6, dim), as diffusers' per-token branch per token
        mod = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (m.squeeze(2) for m in mod)
        if torch.is_grad_enabled():
            return _block_autograd(block, runs, hidden_states, encoder_hidden_states, rotary_emb, shift_msa,
                                   scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa)
        dtype = hidden_states.dtype

        def residual(h, y, gate):
            buf = torch.empty(h.shape, dtype=torch.float32, device=h.device)
            return per_run(_gate_into, runs, [h, y], [gate], out=buf).to(dtype)

        # 1. self-attention
        # (the float32 norm is cast in the same expression: it must not stay alive through the attention)
        norm = per_run(_modulate_, runs, [block.norm1(hidden_states.float())], [scale_msa, shift_msa],
                       inplace=True).to(dtype)
        attn_output = block.attn1(norm, None, None, rotary_emb)
        del norm
        hidden_states = residual(hidden_states, attn_output, gate_msa)
        # 2. cross-attention (no modulation)
        attn_output = block.attn2(block.norm2(hidden_states.float()).to(dtype), encoder_hidden_states, None, None)
        hidden_states = hidden_states + attn_output
        del attn_output
        # 3. feed-forward
        norm = per_run(_modulate_, runs, [block.norm3(hidden_states.float())], [c_scale_msa, c_shift_msa],
                       inplace=True).to(dtype)
        ff_output = block.ffn(norm)
        del norm
        return residual(hidden_states, ff_output, c_gate_msa)

    return forward


def _block_autograd(block, runs, hidden_states, encoder_hidden_states, rotary_emb, shift_msa, scale_msa, gate_msa,
                    c_shift_msa, c_scale_msa, c_gate_msa):
    """The block with autograd (Ouroboros' guidance pass): diffusers' expressions, out of place."""
    # 1. self-attention (each float32 result is cast at once, as in diffusers' one expression: it
    # must not stay alive through the attention)
    norm = per_run(_modulate, runs, [block.norm1(hidden_states.float())], [scale_msa, shift_msa]).type_as(
        hidden_states)
    attn_output = block.attn1(norm, None, None, rotary_emb)
    hidden_states = per_run(_gate, runs, [hidden_states.float(), attn_output], [gate_msa]).type_as(hidden_states)
    # 2. cross-attention (no modulation)
    norm = block.norm2(hidden_states.float()).type_as(hidden_states)
    attn_output = block.attn2(norm, encoder_hidden_states, None, None)
    hidden_states = hidden_states + attn_output
    # 3. feed-forward
    norm = per_run(_modulate, runs, [block.norm3(hidden_states.float())], [c_scale_msa, c_shift_msa]).type_as(
        hidden_states)
    ff_output = block.ffn(norm)
    return per_run(_gate_float, runs, [hidden_states.float(), ff_output], [c_gate_msa]).type_as(hidden_states)


def _transformer_forward(tr, state: _CallState):
    original = tr.forward   # the bound class method (with diffusers' LoRA-scale decorator)

    def forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                return_dict=True, attention_kwargs=None):
        plain = ((attention_kwargs or {}).get("scale") is not None or timestep.ndim not in (1, 2)
                 or (torch.is_grad_enabled() and getattr(tr, "gradient_checkpointing", False)))
        runs = None
        if not plain:
            runs = TimestepRuns(timestep[:, None], None) if timestep.ndim == 1 else timestep_runs(timestep)
        if runs is None:
            return original(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                            return_dict=return_dict, attention_kwargs=attention_kwargs)
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = tr.config.patch_size
        frames, rows, cols = num_frames // p_t, height // p_h, width // p_w

        rotary_emb = tr.rope(hidden_states)
        hidden_states = tr.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        if timestep.ndim == 1:   # diffusers' own call, its (B, dim) / (B, 6 dim) viewed as one run
            temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = tr.condition_embedder(
                timestep, encoder_hidden_states, encoder_hidden_states_image)
            temb, timestep_proj = temb.unsqueeze(1), timestep_proj.unsqueeze(1)
        else:                    # one embedding per run: (B, R, dim) and (B, R, 6 dim)
            temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = tr.condition_embedder(
                runs.values.flatten(), encoder_hidden_states, encoder_hidden_states_image,
                timestep_seq_len=len(runs))
        timestep_proj = timestep_proj.unflatten(2, (6, -1))
        if encoder_hidden_states_image is not None:
            encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

        state.runs = runs
        try:
            for block in tr.blocks:
                hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
        finally:
            state.runs = None

        shift, scale = (tr.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
        shift, scale = shift.squeeze(2).to(hidden_states.device), scale.squeeze(2).to(hidden_states.device)
        lean = not torch.is_grad_enabled()
        hidden_states = tr.proj_out(per_run(_modulate_ if lean else _modulate, runs, [tr.norm_out(hidden_states.float())],
                                            [scale, shift], inplace=lean).type_as(hidden_states))
        hidden_states = hidden_states.reshape(batch_size, frames, rows, cols, p_t, p_h, p_w, -1)
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (output,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=output)

    return forward


def wan_transformers(pipe_or_model) -> list:
    """The ``WanTransformer3DModel`` s of a pipeline (``transformer``, Wan 2.2's ``transformer_2``)
    or the model itself; [] when there is none (SkyReels-V2, other families)."""
    from diffusers import WanTransformer3DModel

    # the class itself: SkyReels-V2's transformer has the same blocks but its own forward
    # (per-frame timesteps natively), which this patch must not replace
    if isinstance(pipe_or_model, WanTransformer3DModel):
        return [pipe_or_model]
    components = getattr(pipe_or_model, "components", None)
    if not isinstance(components, dict):
        return []
    return [m for name, m in sorted(components.items()) if isinstance(m, WanTransformer3DModel)]


def lean_forward_active(transformer) -> bool:
    """Whether `transformer` carries an active lean-forward patch."""
    return LEAN_WAN_FORWARD in active_patches(transformer)


def apply_lean_wan_forward(pipe_or_model) -> PatchHandle:
    """Patch a ``WanTransformer3DModel`` (Wan 2.1 / 2.2, T2V / I2V / TI2V), or every one of a
    pipeline's, with longvideo's forward: a piecewise constant 2-D timestep embedded and applied
    per run instead of per token, and without autograd the modulation in place and each gated
    residual in one float32 buffer (module docstring: diffusers' output, less memory). Returns
    the handle; ``remove()`` restores the models' own forwards.

    Raises TypeError when there is no Wan transformer (SkyReels-V2's has Wan's blocks but embeds
    per-frame timesteps itself, in its own forward, and is not patched); ValueError when a
    model's forward is already wrapped by offloading hooks (apply the patch before offloading)
    or already patched."""
    models = wan_transformers(pipe_or_model)
    if not models:
        raise TypeError(f"apply_lean_wan_forward: {type(pipe_or_model).__name__} is not (and has no) Wan "
                        "transformer (diffusers' WanTransformer3DModel)")
    handle = PatchHandle("lean Wan forward")
    try:
        for transformer in models:
            handle.claim(transformer, LEAN_WAN_FORWARD)
            parts = [("transformer", transformer)] + [(f"blocks.{i}", b) for i, b in enumerate(transformer.blocks)]
            wrapped = [name for name, m in parts if "forward" in m.__dict__]
            if wrapped:
                # offloading (accelerate / diffusers hooks) wraps forward; replacing it would drop the hook
                raise ValueError(f"apply_lean_wan_forward: the forward of {wrapped[0]} is already wrapped "
                                 "(offloading or another hook): apply it before enabling offloading")
            state = _CallState()
            handle.set_attr(transformer, "forward", _transformer_forward(transformer, state))
            for block in transformer.blocks:
                handle.set_attr(block, "forward", _block_forward(block, state))
    except BaseException:
        handle.remove()
        raise
    return handle


def lean_wan_forward_where_possible(pipe_or_model, who: str) -> List[PatchHandle]:
    """What a method does for the duration of its patch (FIFO's run, a FreeLOC handle): longvideo's
    Wan forward on every Wan transformer of `pipe_or_model` that does not have it yet; where
    offloading hooks already wrap a forward, diffusers' forward stays (the same output, more
    memory) and a warning naming `who` says so. Returns the handles it added (remove them to undo)."""
    import warnings

    handles = []
    for model in wan_transformers(pipe_or_model):
        if lean_forward_active(model):
            continue
        try:
            handles.append(apply_lean_wan_forward(model))
        except ValueError as exc:
            warnings.warn(f"{who}: {exc}; diffusers' forward stays (same output, more memory)", stacklevel=3)
    return handles
