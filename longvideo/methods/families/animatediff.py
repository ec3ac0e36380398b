"""AnimateDiff (``UNetMotionModel``; ``AnimateDiffPipeline``, ``AnimateDiffVideoToVideoPipeline``):
an image VAE (one latent frame per video frame), DDIM-family schedulers, CFG batched as
[uncond, cond] with the text embeddings repeated per frame.

FIFO (docs/methods.md, "Model families"; DDIM, epsilon prediction only). Levels:
``timestep_grid="official"``: ``t_k = round(linspace(0, T - 1, L))[k - 1]`` for level k >= 1
(T = num_train_timesteps), level 0 ``alphas_cumprod[0]`` (so the head's last step, from t = 0, is
the identity, as in the official sampler); ``"scheduler"``: the scheduler's timesteps
for L steps, ascending, with level 0 the scheduler's final alpha (``final_alpha_cumprod``).
Per-frame update (DDIM; shown for eta = 0):
``x0 = (x - sqrt(1 - a) eps) / sqrt(a)``, ``x' = sqrt(a') x0 + sqrt(1 - a') eps`` with
``a = abar(t_k)``, ``a' = abar(t_{k-1})``: consecutive timesteps of the schedule, as FIFO's
official DDIM sampler does. (diffusers' DDIMScheduler.step steps to ``t - 1000 // L``, which is
the next schedule timestep for "leading"/"trailing" spacing but not always for "linspace";
the tests compare with DDIMScheduler.step on a "leading" schedule.) ``eta`` (FIFODiffusion's
option): 0 (default, diffusers' DDIM default) is deterministic; the official FIFO code runs
eta = 1, which adds ``sigma z`` to every frame at every step (DDIM Eq. 12), with z drawn for the
whole queue once per iteration from the run's CPU generator (the same on every rank and after
a resume).
Per-frame timesteps: UNetMotionModel computes ONE time embedding per video and repeats it over
the frames folded into the batch; :func:`per_frame_time_embedding` computes the embedding of a
``(B * F,)`` timestep vector (same frame-major order as that repeat) and hands it to every
down/mid/up block in place of the repeated one (forward pre-hooks; nothing is patched in
diffusers' code). With equal timesteps it is exactly the model's own call.
Frames are latent frames 1:1 with video frames (AnimateDiff's VAE is per image).

Randomized blending: frames encoded by the pipeline's ``encode_video`` (posterior samples from the
run's generator) times the VAE's scaling factor, noise drawn frame-major as the pipeline draws it,
``decode_latents`` in chunks of ``decode_chunk_size`` frames.
"""
from __future__ import annotations

import contextlib

import torch

from .base import Family, Levels, check_grid, per_frame_timesteps, retrieve_latents, to_uint8


@contextlib.contextmanager
def per_frame_time_embedding(unet, timesteps: torch.Tensor):
    """Inside the block, every block of a UNetMotionModel gets the time embedding of ``timesteps``
    (B * F,), one per frame in the batch-major / frame-minor order the UNet folds frames in,
    instead of the per-video embedding repeated over frames."""
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype), None)

    def swap(module, args, kwargs):
        if "temb" in kwargs:
            kwargs["temb"] = emb
        elif len(args) > 1:  # mid block: called as mid_block(sample, emb, ...)
            args = (args[0], emb) + tuple(args[2:])
        return args, kwargs

    blocks = list(unet.down_blocks) + list(unet.up_blocks) + ([unet.mid_block] if unet.mid_block is not None else [])
    handles = [b.register_forward_pre_hook(swap, with_kwargs=True) for b in blocks]
    try:
        yield emb
    finally:
        for h in handles:
            h.remove()


class AnimateDiffFamily(Family):
    name = "animatediff"
    description = "AnimateDiff pipelines (UNetMotionModel)"
    supports = frozenset({"fifo", "blending"})
    denoiser_attr = "unet"
    temporal_compression = 1
    flow_matching = False
    default_guidance_scale = 7.5
    trained_latent_frames = 16     # the motion modules' training clips (the tiny model says 4)
    noise_frame_major = True       # the pipeline draws (B, F, C, h, w)
    decode_chunk_size = 16         # frames per VAE call (the pipelines' default)

    @classmethod
    def matches(cls, pipe) -> bool:
        unet = getattr(pipe, "unet", None)
        return unet is not None and (getattr(pipe, "motion_adapter", None) is not None
                                     or type(pipe).__name__.startswith("AnimateDiff")
                                     or type(unet).__name__ == "UNetMotionModel")

    def check_supported(self, method):
        if method == "fifo" and getattr(self.pipe.scheduler.config, "prediction_type", "epsilon") != "epsilon":
            raise ValueError("pipe: FIFO's DDIM update needs an epsilon-prediction scheduler, got "
                             f"{self.pipe.scheduler.config.prediction_type!r}")

    def size_multiple(self):
        return int(self.pipe.vae_scale_factor) * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def check_window(self, frames: int, name: str = "frames_per_window") -> int:
        """`frames` if the motion modules take a clip that long, else ValueError naming `name`: their
        learned positional embedding has ``motion_max_seq_length`` rows (32 in AnimateDiff's
        adapters), and a longer clip fails deep inside the UNet with a shape error."""
        limit = getattr(self.denoiser.config, "motion_max_seq_length", None)
        if limit is not None and frames > int(limit):
            raise ValueError(f"{name}: AnimateDiff's motion modules take clips of at most motion_max_seq_length = "
                             f"{int(limit)} frames (their positional embedding has that many rows); got {frames}")
        return frames

    # prompts and the denoiser ------------------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt, cfg, device, max_sequence_length=None):
        """(CLIP's fixed prompt length: `max_sequence_length` does not apply.)"""
        return self.pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt=negative_prompt)

    def forward(self, x, timestep, embeds):
        """One call; the pipeline's per-frame text embeddings (each row's repeated over its F
        frames). Per-frame timesteps: every block gets the time embedding of each frame's timestep
        (:func:`per_frame_time_embedding`), the UNet's own per-video one being replaced."""
        unet = self.denoiser
        emb = embeds.to(unet.dtype).repeat_interleave(x.shape[2], dim=0)
        if not per_frame_timesteps(timestep):
            return unet(x.to(unet.dtype), timestep, encoder_hidden_states=emb).sample.float()
        with per_frame_time_embedding(unet, timestep.repeat(x.shape[0])):  # (B * F,), frame index fastest
            return unet(x.to(unet.dtype), timestep[0], encoder_hidden_states=emb).sample.float()

    def default_size(self):
        s = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return s, s

    @staticmethod
    def resolve_grid(grid: str) -> str:
        return check_grid(grid)

    def levels(self, L: int, device, grid: str = "scheduler") -> Levels:
        """L + 1 levels (see the module docstring): the official linspace grid or the scheduler's."""
        sched = self.pipe.scheduler
        if check_grid(grid) == "official":
            import numpy as np

            T = int(sched.config.num_train_timesteps)
            ts = torch.from_numpy(np.linspace(0, T - 1, L).round().astype(np.int64))   # ascending (L,)
            ac = sched.alphas_cumprod.to(torch.float32)
            abar = torch.cat([ac[:1], ac[ts]])  # level 0: the official alphas_prev[0] = alphas_cumprod[0]
            t_model = torch.cat([ts.new_zeros(1), ts]).to(torch.float32)
            return Levels(t_model=t_model.to(device), abar=abar.to(device))
        sched.set_timesteps(L, device="cpu")
        if sched.timesteps.numel() != L:
            raise ValueError(f"pipe.scheduler: FIFO needs one timestep per level, but {type(sched).__name__} gives "
                             f"{sched.timesteps.numel()} timesteps for {L} steps (use DDIMScheduler)")
        ts = sched.timesteps.flip(0).to(torch.float32)                    # ascending (L,)
        ac = sched.alphas_cumprod.to(torch.float32)
        final = getattr(sched, "final_alpha_cumprod", ac[0])
        abar = torch.cat([torch.as_tensor(final, dtype=torch.float32).view(1), ac[ts.long()]])
        return Levels(t_model=torch.cat([ts.new_zeros(1), ts]).to(device), abar=abar.to(device))

    def _sigma(self, lv: Levels, k_in, k_out, eta: float):
        """DDIM's sigma_t (Song et al. Eq. 16): eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')."""
        a, a_prev = self._b(lv.abar[k_in]), self._b(lv.abar[k_out])
        return eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()

    def update(self, lv: Levels, x, eps, k_in, k_out, eta: float = 0.0, noise=None):
        """DDIM step of every frame from level k_in to level k_out:
        x' = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z (sigma = 0 for eta = 0)."""
        a, a_prev = self._b(lv.abar[k_in]), self._b(lv.abar[k_out])
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if not eta:
            return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        sigma = self._sigma(lv, k_in, k_out, eta)
        return a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps + sigma * noise

    def noise_clean(self, lv: Levels, x0, k, noise):
        a = self._b(lv.abar[k])
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def renoise(self, lv: Levels, z, k_from, k_to, noise):
        """DDPM forward from level k_from to the noisier k_to in one step:
        z' = sqrt(abar_to / abar_from) z + sqrt(1 - abar_to / abar_from) eps (Ouroboros' tail)."""
        r = self._b(lv.abar[k_to] / lv.abar[k_from])
        return r.sqrt() * z + (1 - r).sqrt() * noise

    def guidance_coefficient(self, lv: Levels, k_in, k_out, eta: float = 0.0):
        """sqrt(1 - abar_prev - sigma^2) sqrt(1 - abar_t) (the eps term's coefficient times the
        eps <- eps + sqrt(1 - abar_t) grad of classifier guidance)."""
        s2 = self._sigma(lv, k_in, k_out, eta) ** 2 if eta else 0.0
        return (self._b(1 - lv.abar[k_out]) - s2).clamp_min(0).sqrt() * self._b((1 - lv.abar[k_in]).sqrt())

    def sample_clip(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        return self.pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height,
                         width=width, num_frames=f, num_inference_steps=steps, guidance_scale=guidance_scale,
                         generator=generator, output_type="latent").frames.float()

    def decode(self, latent, cache):
        """One image per latent frame (AnimateDiff's VAE is per image): no state between frames."""
        vae = self.pipe.vae
        img = vae.decode((latent[:, :, 0] / vae.config.scaling_factor).to(vae.dtype)).sample  # (1, 3, H, W)
        return to_uint8(img), None

    # latents ---------------------------------------------------------------------------------
    def encode(self, video, generator):
        # As AnimateDiffVideoToVideoPipeline.prepare_latents: frames through the pipeline's
        # encode_video (posterior samples, drawn from `generator`), times the scaling factor.
        pipe = self.pipe
        frames = video[0].permute(1, 0, 2, 3).to(device=self.execution_device, dtype=pipe.vae.dtype)  # (F, 3, H, W)
        upcast = bool(pipe.vae.config.force_upcast) and pipe.vae.dtype != torch.float32
        if upcast:
            frames = frames.float()
            pipe.vae.to(dtype=torch.float32)
        try:
            if hasattr(pipe, "encode_video"):
                lat = pipe.encode_video(frames, generator, self.decode_chunk_size)  # (F, C, h, w)
            else:  # AnimateDiffPipeline (t2v): the same loop as the v2v pipeline's encode_video
                lat = torch.cat([retrieve_latents(pipe.vae.encode(frames[i:i + self.decode_chunk_size]), generator)
                                 for i in range(0, len(frames), self.decode_chunk_size)])
        finally:
            if upcast:
                pipe.vae.to(dtype=pipe.unet.dtype)
        lat = pipe.vae.config.scaling_factor * lat.to(torch.float32)
        return lat.permute(1, 0, 2, 3).unsqueeze(0)

    def decode_video(self, latents):
        pipe = self.pipe
        return pipe.decode_latents(latents.to(pipe.vae.dtype), self.decode_chunk_size)
