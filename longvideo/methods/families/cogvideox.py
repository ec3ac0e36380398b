"""CogVideoX (``CogVideoXTransformer3DModel``; ``CogVideoXVideoToVideoPipeline``; randomized
blending only): latents (B, F, C, h, w) in the model, a causal VAE (temporal compression 4), CFG
batched, rotary embeddings for the clip length, CogVideoX-DDIM or -DPM scheduler (the DPM one keeps
the previous x0 prediction: per-trajectory state, :meth:`CogVideoXFamily.step`).
"""
from __future__ import annotations

import torch

from .base import Family, per_frame_timesteps, retrieve_latents


class CogVideoXFamily(Family):
    name = "cogvideox"
    description = "CogVideoX pipelines (CogVideoXTransformer3DModel)"
    supports = frozenset({"blending"})
    causal = True
    noise_frame_major = True       # the pipeline draws (B, F, C, h, w)
    pipeline_max_sequence_length = 226

    def __init__(self, pipe):
        super().__init__(pipe)
        self.temporal_compression = int(pipe.vae_scale_factor_temporal)
        self._rotary = {}

    @classmethod
    def matches(cls, pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__.startswith("CogVideoX")

    def size_multiple(self):
        return int(self.pipe.vae_scale_factor_spatial) * int(self.denoiser.config.patch_size)

    def check_window(self, frames, name="chunk_frames"):
        p_t = self.denoiser.config.patch_size_t
        if p_t is not None and frames % p_t != 0:
            raise ValueError(f"{name} gives {frames} latent frames per chunk; "
                             f"this CogVideoX model needs a multiple of patch_size_t={p_t}")
        return frames

    def encode_prompt(self, prompt, negative_prompt, cfg, device, max_sequence_length=None):
        extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        return self.pipe.encode_prompt(prompt, negative_prompt, cfg, num_videos_per_prompt=1, device=device, **extra)

    def _rotary_emb(self, height, width, frames):
        if not self.denoiser.config.use_rotary_positional_embeddings:
            return None
        key = (height, width, frames)
        if key not in self._rotary:
            self._rotary[key] = self.pipe._prepare_rotary_positional_embeddings(height, width, frames,
                                                                                self.execution_device)
        return self._rotary[key]

    def forward(self, x, timestep, embeds):
        if per_frame_timesteps(timestep):
            raise NotImplementedError("CogVideoX: one timestep per frame is not implemented")
        tr = self.denoiser
        _, _, f, h, w = x.shape
        s = int(self.pipe.vae_scale_factor_spatial)
        y = tr(hidden_states=x.permute(0, 2, 1, 3, 4).to(tr.dtype), encoder_hidden_states=embeds.to(tr.dtype),
               timestep=timestep.expand(x.shape[0]), image_rotary_emb=self._rotary_emb(h * s, w * s, f),
               return_dict=False)[0].float()
        return y.permute(0, 2, 1, 3, 4)

    def encode(self, video, generator):
        pipe = self.pipe
        video = video.to(device=self.execution_device, dtype=pipe.transformer.dtype)
        lat = retrieve_latents(pipe.vae.encode(video), generator).to(torch.float32)  # (1, C, F, h, w)
        return pipe.vae_scaling_factor_image * lat

    def add_noise(self, scheduler, x0, noise, t):
        return scheduler.add_noise(x0, noise, t) * scheduler.init_noise_sigma

    def decode_video(self, latents):
        return self.pipe.decode_latents(latents.permute(0, 2, 1, 3, 4).to(self.pipe.vae.dtype))

    def step(self, scheduler, y, t, x, state, i, timesteps, extra):
        from diffusers import CogVideoXDPMScheduler

        y_f, x_f = y.permute(0, 2, 1, 3, 4), x.permute(0, 2, 1, 3, 4)
        if isinstance(scheduler, CogVideoXDPMScheduler):
            out, state["old_x0"] = scheduler.step(y_f, state.get("old_x0"), t, timesteps[i - 1] if i > 0 else None,
                                                  x_f, **extra, return_dict=False)
        else:
            out = scheduler.step(y_f, t, x_f, **extra, return_dict=False)[0]
        return out.float().permute(0, 2, 1, 3, 4)
