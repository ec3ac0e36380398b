"""Wan 2.1 (``WanTransformer3DModel``; ``WanPipeline``, ``WanVideoToVideoPipeline``): flow
matching, a causal VAE with temporal compression 4, CFG as two calls in the pipelines.

FIFO (docs/methods.md, "Model families"). Levels are the pipeline scheduler's own flow sigmas for
L steps (shift included), ascending: ``sigma_0 = 0 < ... < sigma_L`` (both timestep grids: flow
matching has no DDPM-timestep linspace, and the official FIFO code's diffusers branch takes the
scheduler's timesteps, so "official" is "scheduler" here). Per-frame update (Euler, what
FlowMatchEulerDiscreteScheduler.step does for one frame):
``x_{sigma'} = x_sigma + (sigma' - sigma) * v(x, sigma)``. Per-frame timesteps: diffusers'
WanTransformer3DModel accepts a 2-D timestep ``(B, seq)`` (one per token, flattened through the
time embedding and unflattened to per-token modulation), so a frame's timestep is repeated over
its ``(h/2) * (w/2)`` patch tokens. Frames are *latent* frames: latent frame 0 decodes to 1 video
frame, every later latent frame to 4. Popped latent frames are decoded as a stream the way the VAE
decodes a whole video (``AutoencoderKLWan._decode``: one latent frame per decoder call, the causal
convolutions' cache carried from call to call, the first call marked ``first_chunk``), so the
streamed frames equal the VAE's decode of all popped latents at once. The cache is part of the
queue state (and of the checkpoint).

Randomized blending: the pipeline's encode (posterior mode, normalised by the VAE's latents
mean/std), its scheduler's ``add_noise`` or flow matching's ``scale_noise``, two CFG calls and no
extra step arguments, exactly as ``WanVideoToVideoPipeline``.
"""
from __future__ import annotations

import math
import sys

import torch

from .base import Family, Levels, check_grid, per_frame_timesteps, retrieve_latents, to_uint8


def ftfy_fallback(pipe) -> None:
    """diffusers' Wan pipelines clean prompts with ``ftfy.fix_text`` but import ftfy only if it is
    installed, so without it ``encode_prompt`` fails with a NameError. ftfy only repairs mis-decoded
    unicode; where it is missing, the pipeline module gets a pass-through in its place."""
    module = sys.modules.get(type(pipe).__module__)
    if module is None or not hasattr(module, "prompt_clean") or hasattr(module, "ftfy"):
        return
    try:
        import ftfy
    except ImportError:
        import types

        ftfy = types.SimpleNamespace(fix_text=lambda text: text)
    module.ftfy = ftfy


class WanFamily(Family):
    name = "wan"
    description = "Wan pipelines (WanTransformer3DModel)"
    supports = frozenset({"fifo", "blending"})
    causal = True
    flow_matching = True           # levels are flow sigmas (Ouroboros' tail keeps z; see renoise)
    default_guidance_scale = 5.0   # the Wan pipelines' default
    full_size = (480, 832)         # Wan 2.1 480p
    trained_latent_frames = 21     # 81 video frames
    pipeline_batches_cfg = False   # the Wan pipelines call the transformer once per CFG half
    scales_model_input = False     # ... and never call scheduler.scale_model_input
    pipeline_max_sequence_length = 512

    def __init__(self, pipe):
        super().__init__(pipe)
        self.temporal_compression = int(getattr(pipe, "vae_scale_factor_temporal", 4))
        self.spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8))

    @classmethod
    def matches(cls, pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__.startswith("Wan")

    # sizes -----------------------------------------------------------------------------------
    def default_size(self):
        """(height, width): 32x32 on the built-in tiny model (trained length 3), else full_size."""
        tiny = getattr(self.pipe, "longvideo_trained_latent_frames", None) == 3
        return (32, 32) if tiny else self.full_size

    def size_multiple(self):
        # latent patches, and the Wan pipelines' own check (multiples of 16)
        return math.lcm(16, self.spatial * int(self.denoiser.config.patch_size[1]))

    # prompts and the denoiser ------------------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt, cfg, device, max_sequence_length=None):
        ftfy_fallback(self.pipe)
        extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        return self.pipe.encode_prompt(prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=cfg,
                                       num_videos_per_prompt=1, device=device, **extra)

    def forward(self, x, timestep, embeds):
        return self.call_transformer(self.denoiser, x, timestep, embeds)

    @staticmethod
    def call_transformer(tr, x, timestep, embeds):
        """One call of the Wan transformer `tr` (arguments as :meth:`forward`)."""
        if per_frame_timesteps(timestep):
            _, ph, pw = tr.config.patch_size
            tokens = (x.shape[3] // ph) * (x.shape[4] // pw)
            t = timestep.repeat_interleave(tokens)[None].expand(x.shape[0], -1)  # one timestep per token
        else:
            t = timestep.expand(x.shape[0])
        return tr(hidden_states=x.to(tr.dtype), timestep=t, encoder_hidden_states=embeds.to(tr.dtype),
                  return_dict=False)[0].float()

    # FIFO: per-frame levels and updates ----------------------------------------------------------
    @staticmethod
    def resolve_grid(grid: str) -> str:
        """The grid in effect: "scheduler" for both names (module docstring)."""
        check_grid(grid)
        return "scheduler"

    def levels(self, L: int, device, grid: str = "scheduler") -> Levels:
        """The scheduler's flow sigmas for L steps, ascending."""
        self.resolve_grid(grid)
        sched = self.pipe.scheduler
        sched.set_timesteps(L, device=device)
        s = sched.sigmas.to(device=device, dtype=torch.float32)
        if s.numel() != L + 1:
            s = torch.cat([s[:L], s.new_zeros(1)])
        s = s.flip(0)
        return Levels(t_model=s * sched.config.num_train_timesteps, sigma=s)

    def update(self, lv: Levels, x, out, k_in, k_out, eta: float = 0.0, noise=None):
        """Euler step of every frame from level k_in to level k_out (index tensors (F,)). `eta` and
        `noise` are DDIM's (FIFODiffusion rejects eta > 0 for flow matching): unused here."""
        return x + self._b(lv.sigma[k_out] - lv.sigma[k_in]) * out

    def noise_clean(self, lv: Levels, x0, k, noise):
        """Forward process from clean: x = (1 - sigma) x0 + sigma eps."""
        s = self._b(lv.sigma[k])
        return (1 - s) * x0 + s * noise

    def renoise(self, lv: Levels, z, k_from, k_to, noise):
        """Tail re-noising for Ouroboros (see OuroborosConfig): Wan's schedule ends at sigma_L = 1,
        where the forward relation would return pure, unrelated noise, so z is kept as it is
        (one level below the tail, unit variance like the tail); noise is not used."""
        return z

    def guidance_coefficient(self, lv: Levels, k_in, k_out, eta: float = 0.0):
        """Self-recurrent guidance step size per frame: sigma_out * sigma_in (the flow-matching
        analogue of DDIM's sqrt(1 - abar_prev) sqrt(1 - abar_t))."""
        return self._b(lv.sigma[k_out] * lv.sigma[k_in])

    def sample_clip(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        """FIFO's initial clip of f latent frames (1, C, f, h, w), float32: the pipeline's own sampling."""
        pipe = self.pipe
        return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height, width=width,
                    num_frames=(f - 1) * pipe.vae_scale_factor_temporal + 1, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generator, output_type="latent").frames.float()

    # latents ---------------------------------------------------------------------------------
    def _latent_stats(self, device, dtype):
        """The VAE's per-channel latents mean and std, (1, C, 1, 1, 1)."""
        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(device, dtype)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(device, dtype)
        return mean, std

    def decode(self, latent, cache):
        """FIFO's streamed decode: video frames of one popped latent frame, as uint8 (F, H, W, 3),
        and the decoder cache to pass with the next one (``cache=None`` for the first frame of the
        video; module docstring). The VAE's own cache is not touched: a list of ours is handed to
        its decoder."""
        from ...offload import onloaded

        vae = self.pipe.vae
        mean, std = self._latent_stats(latent.device, latent.dtype)
        first = cache is None
        if first:
            vae.clear_cache()  # sizes the cache: one slot per causal convolution of the decoder
            cache = [None] * len(vae._feat_map)
        cache = list(cache)    # the decoder replaces entries: the state passed in stays as it was
        with onloaded(vae):    # the submodules are called below vae.decode, where model offload's hook runs
            x = vae.post_quant_conv((latent * std + mean).to(vae.dtype))
            video = vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first)
        if getattr(vae.config, "patch_size", None) is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            video = unpatchify(video, patch_size=vae.config.patch_size)
        video = video.clamp(-1.0, 1.0)                      # (1, 3, 1 or 4, H, W) in [-1, 1]
        return to_uint8(video[0].permute(1, 0, 2, 3)), cache

    def encode(self, video, generator):
        # As WanVideoToVideoPipeline.prepare_latents: the mode of the posterior, then normalised.
        device = self.execution_device
        video = video.to(device=device, dtype=self.pipe.vae.dtype)
        lat = retrieve_latents(self.pipe.vae.encode(video), sample_mode="argmax").to(torch.float32)
        mean, std = self._latent_stats(device, torch.float32)
        return (lat - mean) * (1.0 / std)

    def decode_video(self, latents):
        # As the Wan pipelines: divide by the inverse std (not a product with std: the last bit differs).
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        mean, std = self._latent_stats(self.execution_device, latents.dtype)
        return vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]

    def add_noise(self, scheduler, x0, noise, t):
        if hasattr(scheduler, "add_noise"):
            return scheduler.add_noise(x0, noise, t)
        return scheduler.scale_noise(x0, t, noise)  # flow matching: (1 - sigma) x0 + sigma noise

    def step_kwargs(self, scheduler, generator, eta):
        return {}  # as the Wan pipelines: the scheduler steps without extra arguments
