"""Wan 2.2 A14B (``WanPipeline`` with ``transformer``, ``transformer_2`` and ``boundary_ratio``):
two experts of the Wan 2.1 architecture switched at a boundary timestep.

diffusers' WanPipeline calls ``transformer`` (the high-noise expert) for timesteps
``t >= boundary_ratio * num_train_timesteps`` with ``guidance_scale``, and ``transformer_2`` (the
low-noise expert) below with ``guidance_scale_2`` (None: ``guidance_scale``). Everything else
(VAE, text encoder, scheduler, FIFO's levels and updates, the streamed decode) is Wan 2.1's, so
this family is a :class:`~.wan.WanFamily` that routes each denoiser call.

FIFO (docs/methods.md, "Wan 2.2: two experts in one window"). A FIFO window holds frames at
different noise levels, so it can straddle the boundary; every frame is routed to the expert of
its own timestep. ``expert_routing``:

- ``"split"`` (the default): the window's frames are split into the two experts' sub-windows
  (frames kept in order) and each expert runs once on its own sub-window; the outputs are put
  back in place. Each frame's self-attention then spans only the frames of its own expert.
- ``"select"``: both experts run on the whole window and each frame takes the output of its
  expert. Each frame attends to the whole window, as with one model, at the cost of one more
  window call wherever a window straddles the boundary.

A window whose frames are all on one side costs one expert call either way.

Ouroboros (SACFA, self-recurrent guidance) drives the same calls itself (:meth:`expert_calls`,
:meth:`expert_output`): each expert has Ouroboros' processors, each call records the maps and
subject keys of the frames it is given, the guidance gradient of a frame flows through its own
expert, and the subject bank keeps one part per expert (``longvideo.methods.fifo``).

Randomized blending (docs/methods.md, "Wan 2.2"). diffusers has no two-expert video-to-video
pipeline (``WanVideoToVideoPipeline`` has no ``transformer_2``), so blending runs its own SDEdit
loop on the two-expert ``WanPipeline``'s components: the VAE, video processor and scheduler are Wan
2.1's (the WanFamily hooks), and every solver step (one timestep for all chunks) goes to the expert
WanPipeline picks for that timestep, with that expert's guidance scale -- what
``WanVideoToVideoPipeline`` computes with its transformer switched at the boundary.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import model_fingerprint, per_frame_timesteps
from .wan import WanFamily

EXPERT_ROUTINGS = ("split", "select")


class Wan22Family(WanFamily):
    name = "wan22"
    description = "Wan 2.2 two-expert pipelines (WanPipeline with transformer_2 and boundary_ratio)"
    supports = frozenset({"fifo", "blending"})
    two_experts = True
    expert_routing = "split"   # see the module docstring; "select" is the alternative

    def __init__(self, pipe):
        super().__init__(pipe)
        self.guidance_scale_2: Optional[float] = None  # None: guidance_scale, as the pipeline

    @classmethod
    def matches(cls, pipe) -> bool:
        config = getattr(pipe, "config", None)
        ratio = getattr(config, "boundary_ratio", None) if config is not None else None
        return WanFamily.matches(pipe) and ratio is not None

    def check_supported(self, method: str) -> None:
        if getattr(self.pipe, "transformer_2", None) is None:
            raise ValueError("pipe: the pipeline's config has a boundary_ratio but no transformer_2 (the low-noise "
                             "expert); diffusers' WanPipeline cannot denoise below the boundary without it")

    # the experts -----------------------------------------------------------------------------
    @property
    def experts(self):
        """(high-noise expert, low-noise expert): ``transformer``, ``transformer_2``."""
        return self.pipe.transformer, self.pipe.transformer_2

    @property
    def boundary_timestep(self) -> float:
        """``boundary_ratio * num_train_timesteps``: timesteps at or above it go to ``transformer``."""
        return float(self.pipe.config.boundary_ratio) * float(self.pipe.scheduler.config.num_train_timesteps)

    def expert_of(self, timestep: torch.Tensor) -> torch.Tensor:
        """0 (high-noise expert) or 1 (low-noise expert) for each timestep, as WanPipeline picks."""
        return (timestep < self.boundary_timestep).long()

    def set_guidance_scale_2(self, value: Optional[float]) -> None:
        """The low-noise expert's guidance scale (None: the same as guidance_scale)."""
        if value is not None and not float(value) >= 0.0:
            raise ValueError(f"guidance_scale_2 must be a number >= 0 or None, got {value!r}")
        self.guidance_scale_2 = None if value is None else float(value)

    def run_settings(self) -> dict:
        return {"guidance_scale_2": self.guidance_scale_2, "expert_routing": self.expert_routing,
                "boundary_timestep": self.boundary_timestep, "model_2": model_fingerprint(self.pipe.transformer_2)}

    def _route(self, x, timestep, call):
        """Outputs of `call(expert_index, x_sub, t_sub)` put together frame by frame (module docstring)."""
        if self.expert_routing not in EXPERT_ROUTINGS:
            raise ValueError(f"expert_routing must be one of {EXPERT_ROUTINGS}, got {self.expert_routing!r}")
        if not per_frame_timesteps(timestep):
            return call(int(self.expert_of(timestep)), x, timestep)
        expert = self.expert_of(timestep)
        present = [e for e in (0, 1) if bool((expert == e).any())]
        if len(present) == 1:
            return call(present[0], x, timestep)
        if self.expert_routing == "select":
            outs = [call(e, x, timestep) for e in (0, 1)]
            return torch.where(self._b(expert == 0).to(outs[0].device), outs[0], outs[1])
        out = None
        for e in (0, 1):
            idx = (expert == e).nonzero().squeeze(1)
            y = call(e, x.index_select(2, idx.to(x.device)), timestep.index_select(0, idx))
            if out is None:
                out = y.new_empty(y.shape[:2] + x.shape[2:])
            out[:, :, idx.to(out.device)] = y
        return out

    # the denoiser ------------------------------------------------------------------------------
    def forward(self, x, timestep, embeds):
        experts = self.experts
        return self._route(x, timestep, lambda e, xs, ts: self.call_transformer(experts[e], xs, ts, embeds))

    def model_output(self, x, timestep, prompt_embeds, negative_embeds, guidance_scale: float,
                     batch_cfg: bool = False) -> torch.Tensor:
        """As :meth:`Family.model_output`, per expert: frames of the high-noise expert are guided
        with `guidance_scale`, those of the low-noise expert with ``guidance_scale_2`` (None:
        `guidance_scale`), each with its expert's own conditional and unconditional calls (two
        calls, conditional first, as WanPipeline)."""
        return self._route(x, timestep, lambda e, xs, ts: self.expert_output(e, xs, ts, prompt_embeds,
                                                                             negative_embeds, guidance_scale))

    def expert_output(self, expert: int, x, timestep, prompt_embeds, negative_embeds,
                      guidance_scale: float) -> torch.Tensor:
        """The guided output of ONE expert (0: ``transformer``, 1: ``transformer_2``) for every frame
        of x (B, C, F, h, w), whatever the frames' timesteps: its conditional call, then (with
        negative embeddings and guidance_scale > 1) its unconditional call, combined with the
        expert's scale (``guidance_scale_2`` for expert 1, None: `guidance_scale`)."""
        scale = guidance_scale if expert == 0 or self.guidance_scale_2 is None else self.guidance_scale_2
        n = x.shape[0]
        tr = self.experts[expert]
        y_c = self.call_transformer(tr, x, timestep, prompt_embeds.expand(n, -1, -1))
        # WanPipeline's CFG switch is guidance_scale > 1 (the first expert's scale) for both experts
        if negative_embeds is None or guidance_scale <= 1.0:
            return y_c
        y_u = self.call_transformer(tr, x, timestep, negative_embeds.expand(n, -1, -1))
        return y_u + scale * (y_c - y_u)

    def expert_calls(self, timestep: torch.Tensor) -> list:
        """The expert calls :meth:`model_output` makes for a window with one timestep per frame
        (F,), as a list of ``(expert, inputs, owned)``: the expert's index, the window positions of
        the frames given to the call (in order) and the window positions whose output the call
        gives (their positions within the call: ``inputs.tolist().index(j)``). ``"split"``: inputs
        = owned = the expert's frames; ``"select"`` (across the boundary): inputs = every frame,
        owned = the expert's frames; one call with every frame when the window is on one side."""
        if self.expert_routing not in EXPERT_ROUTINGS:
            raise ValueError(f"expert_routing must be one of {EXPERT_ROUTINGS}, got {self.expert_routing!r}")
        expert = self.expert_of(timestep).cpu()
        every = torch.arange(expert.numel())
        present = [e for e in (0, 1) if bool((expert == e).any())]
        if len(present) == 1:
            return [(present[0], every, every)]
        own = {e: (expert == e).nonzero().squeeze(1) for e in (0, 1)}
        if self.expert_routing == "select":
            return [(e, every, own[e]) for e in (0, 1)]
        return [(e, own[e], own[e]) for e in (0, 1)]

    def sample_clip(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        """FIFO's initial clip: WanPipeline's own two-expert sampling (with guidance_scale_2)."""
        pipe = self.pipe
        return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height, width=width,
                    num_frames=(f - 1) * pipe.vae_scale_factor_temporal + 1, num_inference_steps=steps,
                    guidance_scale=guidance_scale, guidance_scale_2=self.guidance_scale_2, generator=generator,
                    output_type="latent").frames.float()
