"""SkyReels-V2 (``SkyReelsV2Transformer3DModel``, a Wan-architecture transformer; FIFO only).

Everything but the model call is Wan's: the same flow-matching levels (the pipeline scheduler's
sigmas; SkyReels-V2 ships UniPC with flow shift 8), the same Euler update, the same Wan VAE and
causal decoding. Per-frame timesteps: SkyReelsV2Transformer3DModel does NOT take Wan's per-token
2-D timestep (its blocks would read a ``(B, seq, 6, D)`` modulation as ``(B, 6, seq, D)``); it
takes one timestep per latent frame, ``timestep`` of shape ``(B, F)`` with
``enable_diffusion_forcing=True`` (the diffusion-forcing path its DF checkpoints were trained
with), and repeats each frame's modulation over that frame's patch tokens itself. With equal
timesteps this is exactly its ordinary ``(B,)`` call, and with distinct ones exactly Wan's
per-token call with the same weights (tests/test_fifo_skyreels.py checks both).
``inject_sample_info`` checkpoints (SkyReels-V2-DF-1.3B) add an fps embedding (index 0 for
16 fps, 1 otherwise, as the pipelines map it; ``SkyReelsFamily.fps``, default 24) to the
modulation. It is passed as a one-element list: the transformer repeats the fps term over frames
as ``(F, 6, D)``, which broadcasts over a CFG batch of 2 only when it was computed for one row
(a per-row list would not broadcast), and every row shares the same fps anyway.
``num_frame_per_block = b > 1`` makes the transformer attend block-causally (each block of b
frames sees itself and the blocks before it). FIFO's windows are ordered cleanest first, the
direction diffusion forcing denoises in, so this is supported when the window f is a multiple of
b (the mask is built for whole blocks); otherwise ``ValueError`` (``frames_per_window``).
Image-conditioned transformers (``image_dim`` / ``added_kv_proj_dim``) are rejected (FIFO here
is text-to-video). Initial clip: the pipeline itself with ``output_type="latent"`` when its
``__call__`` can sample from text embeddings alone (SkyReelsV2DiffusionForcingPipeline, run
synchronously: every frame at the same timestep, ``base_num_frames`` = the clip so no long-video
chunking); otherwise (the DF video-/image-to-video pipelines need a video/image, the plain
SkyReelsV2Pipeline passes no fps to an inject_sample_info transformer) a flow-matching Euler loop
over the family's own levels and model call, all frames at one level, from Gaussian noise drawn
exactly as the DF pipeline draws it.
"""
from __future__ import annotations

import torch

from .base import per_frame_timesteps
from .wan import WanFamily


class SkyReelsFamily(WanFamily):
    """SkyReels-V2 (module docstring): Wan's levels, Euler update, re-noising and causal VAE
    decoding; the model is told one timestep per latent frame (diffusion forcing)."""

    name = "skyreels"
    description = "SkyReels-V2 pipelines (SkyReelsV2Transformer3DModel)"
    supports = frozenset({"fifo"})
    default_guidance_scale = 6.0   # the SkyReels-V2 text-to-video pipelines' default
    full_size = (544, 960)         # SkyReels-V2 540P
    trained_latent_frames = 25     # the DF pipelines' base_num_frames = 97 video frames
    fps = 24                       # fps conditioning of inject_sample_info checkpoints (16 or 24)

    @classmethod
    def matches(cls, pipe) -> bool:
        try:
            from diffusers import SkyReelsV2Transformer3DModel
        except ImportError:  # a diffusers without SkyReels-V2
            return False
        return isinstance(getattr(pipe, "transformer", None), SkyReelsV2Transformer3DModel)

    def check_supported(self, method):
        cfg = self.denoiser.config
        if getattr(cfg, "image_dim", None) is not None or getattr(cfg, "added_kv_proj_dim", None) is not None:
            raise ValueError("pipe: FIFO runs SkyReels-V2 text-to-video transformers; this one is image-conditioned "
                             f"(image_dim={cfg.image_dim}, added_kv_proj_dim={cfg.added_kv_proj_dim})")

    @property
    def block_size(self) -> int:
        """num_frame_per_block: latent frames per causal attention block (1: full attention)."""
        return int(getattr(self.denoiser.config, "num_frame_per_block", 1) or 1)

    def default_window(self) -> int:
        f = self.trained_window()
        b = self.block_size
        return max(b, f // b * b)

    def check_window(self, f: int, name: str = "frames_per_window") -> int:
        """`f` if a window of f latent frames is whole causal blocks, else ValueError naming `name`."""
        b = self.block_size
        if b > 1 and f % b:
            raise ValueError(f"{name}: the SkyReels-V2 transformer attends block-causally in blocks of "
                             f"num_frame_per_block = {b} latent frames, so FIFO's window must be a multiple of {b}; "
                             f"got f = {f}")
        return f

    def _fps_kwargs(self) -> dict:
        if not getattr(self.denoiser.config, "inject_sample_info", False):
            return {}
        # One entry, broadcast over the batch by the transformer (see the module docstring); the
        # pipelines' mapping: 16 fps -> embedding 0, anything else -> 1.
        return {"fps": [0 if int(self.fps) == 16 else 1]}

    def forward(self, x, timestep, embeds):
        """One call. Per-frame timesteps: ``timestep`` (B, F) with ``enable_diffusion_forcing=True``
        (module docstring); a 0-dim timestep: the ordinary (B,) call."""
        tr = self.denoiser
        if per_frame_timesteps(timestep):
            self.check_window(x.shape[2])
            t = timestep.to(device=x.device, dtype=torch.float32)[None].repeat(x.shape[0], 1)  # (B, F)
            extra = {"enable_diffusion_forcing": True}
        else:
            t, extra = timestep.expand(x.shape[0]), {}
        return tr(hidden_states=x.to(tr.dtype), timestep=t, encoder_hidden_states=embeds.to(tr.dtype),
                  return_dict=False, **extra, **self._fps_kwargs())[0].float()

    def pipeline_can_sample(self) -> bool:
        """Whether the pipeline's own __call__ can sample the initial clip from text embeddings alone
        (latent output, no image/video input, and fps conditioning where the transformer needs it)."""
        import inspect

        try:
            params = inspect.signature(type(self.pipe).__call__).parameters
        except (TypeError, ValueError):
            return False
        needed = {"prompt_embeds", "negative_prompt_embeds", "output_type", "num_frames", "height", "width",
                  "num_inference_steps", "guidance_scale", "generator"}
        if not needed <= set(params):
            return False
        required = [n for n, p in params.items() if n not in ("self", "prompt") and p.default is p.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if required:
            return False
        return "fps" in params or not self._fps_kwargs()

    def sample_clip(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        """Initial clip of f latent frames (1, C, f, h, w), float32 (see the module docstring)."""
        self.check_window(f)
        if not self.pipeline_can_sample():
            return self.sample_clip_euler(prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale,
                                          generator)
        import inspect

        pipe = self.pipe
        num_frames = (f - 1) * self.temporal_compression + 1
        params = inspect.signature(type(pipe).__call__).parameters
        extra = {}
        if "fps" in params:
            extra["fps"] = self.fps
        if "base_num_frames" in params:  # one chunk: no long-video overlap logic
            extra["base_num_frames"] = num_frames
        return pipe(prompt=None, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height,
                    width=width, num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=generator, output_type="latent", **extra).frames.float()

    def sample_clip_euler(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        """Plain flow-matching Euler sampling of f latent frames over the family's own levels for
        `steps` steps (every frame at the same level), starting from noise drawn as the SkyReels-V2
        DF pipelines draw it (float32 on the CPU generator, shape (1, C, f, H / s, W / s))."""
        self.check_window(f)
        s = getattr(self.pipe, "vae_scale_factor_spatial", None) or 8
        shape = (1, self.denoiser.config.in_channels, f, height // s, width // s)
        x = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        lv = self.levels(steps, self.device)
        for k in range(steps, 0, -1):
            v = self.model_output(x, lv.t_model[k].repeat(f), prompt_embeds, negative_embeds, guidance_scale)
            x = x + (lv.sigma[k - 1] - lv.sigma[k]) * v
        return x
