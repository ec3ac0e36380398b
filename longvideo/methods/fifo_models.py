"""Model families for FIFO-Diffusion: noise levels, per-frame model calls, per-frame updates, decoding.

FIFO's queue holds frames at *different* noise levels, so each family needs (a) a way to give the
model one noise level per frame and (b) the scheduler's update written per frame. Levels are
indexed ``0 .. L`` (0 clean, L the tail); queue slot ``k`` sits at level ``k + 1`` and one
iteration moves it to level ``k``.

``WanFamily`` (flow matching; WanTransformer3DModel)
    Levels are the pipeline scheduler's own flow sigmas for L steps (shift included), ascending:
    ``sigma_0 = 0 < ... < sigma_L``. Per-frame update (Euler, what FlowMatchEulerDiscreteScheduler.step
    does for one frame):  ``x_{sigma'} = x_sigma + (sigma' - sigma) * v(x, sigma)``.
    Per-frame timesteps: diffusers' WanTransformer3DModel accepts a 2-D timestep ``(B, seq)``
    (one per token, flattened through the time embedding and unflattened to per-token modulation),
    so a frame's timestep ``1000 * sigma`` is repeated over its ``(h/2) * (w/2)`` patch tokens.
    Frames are *latent* frames: Wan's causal VAE compresses time by 4, latent frame 0 decodes to 1
    video frame, every later latent frame to 4. Each popped latent frame is decoded together with
    the previous popped one (the causal VAE needs the frame before it for context) and the last 4
    decoded frames are emitted; the very first popped frame is decoded alone as the VAE's special
    first frame (1 video frame). So N iterations give ``1 + 4 (N - 1)`` video frames.

``AnimateDiffFamily`` (DDIM, epsilon prediction; UNetMotionModel)
    Levels are the scheduler's timesteps for L steps, ascending, with level 0 the scheduler's
    final alpha (``final_alpha_cumprod``). Per-frame update (deterministic DDIM, eta = 0):
    ``x0 = (x - sqrt(1 - a) eps) / sqrt(a)``, ``x' = sqrt(a') x0 + sqrt(1 - a') eps`` with
    ``a = abar(t_k)``, ``a' = abar(t_{k-1})``: consecutive timesteps of the schedule, as FIFO's
    official DDIM sampler does. (diffusers' DDIMScheduler.step steps to ``t - 1000 // L``, which is
    the next schedule timestep for "leading"/"trailing" spacing but not always for "linspace";
    the tests compare with DDIMScheduler.step on a "leading" schedule.)
    Per-frame timesteps: UNetMotionModel computes ONE time embedding per video and repeats it over
    the frames folded into the batch; :func:`per_frame_time_embedding` computes the embedding of a
    ``(B * F,)`` timestep vector (same frame-major order as that repeat) and hands it to every
    down/mid/up block in place of the repeated one (forward pre-hooks; nothing is patched in
    diffusers' code). With equal timesteps it is exactly the model's own call.
    Frames are latent frames 1:1 with video frames (AnimateDiff's VAE is per image).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Levels:
    """Noise levels 0 (clean) .. L (tail) and the model timestep of each."""

    t_model: torch.Tensor            # (L+1,) float: the timestep the model is told at each level
    sigma: Optional[torch.Tensor] = None   # flow matching: (L+1,) ascending, sigma[0] = 0
    abar: Optional[torch.Tensor] = None    # DDIM: (L+1,) descending alphas_cumprod


def family_of(pipe) -> str:
    """'wan' or 'animatediff' from the pipeline's denoiser."""
    if hasattr(pipe, "transformer") and hasattr(getattr(pipe.transformer, "config", None), "patch_size"):
        return "wan"
    if hasattr(pipe, "unet") and hasattr(pipe.unet, "down_blocks"):
        return "animatediff"
    raise ValueError("pipe: FIFO supports Wan-family pipelines (WanTransformer3DModel) and AnimateDiff pipelines "
                     f"(UNetMotionModel); got {type(pipe).__name__}")


def make_family(pipe):
    return {"wan": WanFamily, "animatediff": AnimateDiffFamily}[family_of(pipe)](pipe)


def _to_uint8(video):
    from ..video import to_uint8_frames

    return to_uint8_frames(((video.float() + 1) / 2).clamp(0, 1))


class WanFamily:
    name = "wan"
    temporal_compression = 4

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = pipe.transformer

    @property
    def device(self):
        return self.denoiser.device

    def default_window(self) -> int:
        return int(getattr(self.pipe, "longvideo_trained_latent_frames", 0) or 21)

    def levels(self, L: int, device) -> Levels:
        sched = self.pipe.scheduler
        sched.set_timesteps(L, device=device)
        s = sched.sigmas.to(device=device, dtype=torch.float32)
        if s.numel() != L + 1:
            s = torch.cat([s[:L], s.new_zeros(1)])
        s = s.flip(0)
        return Levels(t_model=s * sched.config.num_train_timesteps, sigma=s)

    def encode_prompt(self, text, negative, cfg, device):
        return self.pipe.encode_prompt(prompt=text, negative_prompt=negative, do_classifier_free_guidance=cfg,
                                       device=device)

    def model_output(self, x, t_frames, prompt_embeds, negative_embeds, guidance_scale):
        """Velocity for window x (1, C, F, h, w) at per-frame model timesteps t_frames (F,)."""
        tr = self.denoiser
        _, ph, pw = tr.config.patch_size
        tokens = (x.shape[3] // ph) * (x.shape[4] // pw)
        t = t_frames.repeat_interleave(tokens)[None]  # (1, F * tokens): one timestep per token
        cfg = negative_embeds is not None and guidance_scale > 1.0
        xin = torch.cat([x, x]) if cfg else x
        emb = torch.cat([negative_embeds, prompt_embeds]) if cfg else prompt_embeds
        v = tr(hidden_states=xin.to(tr.dtype), timestep=t.expand(xin.shape[0], -1), encoder_hidden_states=emb,
               return_dict=False)[0].float()
        if cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        return v

    @staticmethod
    def _b(t):
        return t.view(1, 1, -1, 1, 1)

    def update(self, lv: Levels, x, out, k_in, k_out):
        """Euler step of every frame from level k_in to level k_out (index tensors (F,))."""
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

    def guidance_coefficient(self, lv: Levels, k_in, k_out):
        """Self-recurrent guidance step size per frame: sigma_out * sigma_in (the flow-matching
        analogue of DDIM's sqrt(1 - abar_prev) sqrt(1 - abar_t))."""
        return self._b(lv.sigma[k_out] * lv.sigma[k_in])

    def sample_clip(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        pipe = self.pipe
        return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height, width=width,
                    num_frames=(f - 1) * pipe.vae_scale_factor_temporal + 1, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generator, output_type="latent").frames.float()

    def decode(self, latent, prev):
        """uint8 (F, H, W, 3) video frames of one popped latent frame (see the module docstring)."""
        vae = self.pipe.vae
        z = latent if prev is None else torch.cat([prev, latent], dim=2)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
        video = vae.decode((z * std + mean).to(vae.dtype), return_dict=False)[0]  # (1, 3, F, H, W) in [-1, 1]
        if prev is not None:
            video = video[:, :, 1:]  # the previous frame's 1 or 4 frames were emitted already
            video = video[:, :, -self.temporal_compression:]
        return _to_uint8(video[0].permute(1, 0, 2, 3))


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


class AnimateDiffFamily:
    name = "animatediff"
    temporal_compression = 1

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = pipe.unet
        if getattr(pipe.scheduler.config, "prediction_type", "epsilon") != "epsilon":
            raise ValueError("pipe: FIFO's DDIM update needs an epsilon-prediction scheduler, got "
                             f"{pipe.scheduler.config.prediction_type!r}")

    @property
    def device(self):
        return self.denoiser.device

    def default_window(self) -> int:
        return 16  # AnimateDiff's motion modules were trained on 16-frame clips

    def levels(self, L: int, device) -> Levels:
        sched = self.pipe.scheduler
        sched.set_timesteps(L, device="cpu")
        ts = sched.timesteps.flip(0).to(torch.float32)                    # ascending (L,)
        ac = sched.alphas_cumprod.to(torch.float32)
        final = getattr(sched, "final_alpha_cumprod", ac[0])
        abar = torch.cat([torch.as_tensor(final, dtype=torch.float32).view(1), ac[ts.long()]])
        return Levels(t_model=torch.cat([ts.new_zeros(1), ts]).to(device), abar=abar.to(device))

    def encode_prompt(self, text, negative, cfg, device):
        return self.pipe.encode_prompt(text, device, 1, cfg, negative_prompt=negative)

    def model_output(self, x, t_frames, prompt_embeds, negative_embeds, guidance_scale):
        """Noise prediction for window x (1, C, F, h, w) at per-frame timesteps t_frames (F,)."""
        unet = self.denoiser
        F = x.shape[2]
        cfg = negative_embeds is not None and guidance_scale > 1.0
        xin = torch.cat([x, x]) if cfg else x
        emb = torch.cat([negative_embeds, prompt_embeds]) if cfg else prompt_embeds
        emb = emb.repeat_interleave(F, dim=0)  # the pipeline's own per-frame text embeddings
        t_vec = t_frames.repeat(xin.shape[0])  # (B * F,), frame index fastest
        with per_frame_time_embedding(unet, t_vec):
            eps = unet(xin.to(unet.dtype), t_frames[0], encoder_hidden_states=emb).sample.float()
        if cfg:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance_scale * (e_c - e_u)
        return eps

    @staticmethod
    def _b(t):
        return t.view(1, 1, -1, 1, 1)

    def update(self, lv: Levels, x, eps, k_in, k_out):
        """Deterministic DDIM step of every frame from level k_in to level k_out."""
        a, a_prev = self._b(lv.abar[k_in]), self._b(lv.abar[k_out])
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    def noise_clean(self, lv: Levels, x0, k, noise):
        a = self._b(lv.abar[k])
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def renoise(self, lv: Levels, z, k_from, k_to, noise):
        """DDPM forward from level k_from to the noisier k_to in one step:
        z' = sqrt(abar_to / abar_from) z + sqrt(1 - abar_to / abar_from) eps (Ouroboros' tail)."""
        r = self._b(lv.abar[k_to] / lv.abar[k_from])
        return r.sqrt() * z + (1 - r).sqrt() * noise

    def guidance_coefficient(self, lv: Levels, k_in, k_out):
        """sqrt(1 - abar_prev - sigma^2) sqrt(1 - abar_t) with DDIM's sigma = 0 (eta = 0)."""
        return self._b((1 - lv.abar[k_out]).sqrt() * (1 - lv.abar[k_in]).sqrt())

    def sample_clip(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        return self.pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height,
                         width=width, num_frames=f, num_inference_steps=steps, guidance_scale=guidance_scale,
                         generator=generator, output_type="latent").frames.float()

    def decode(self, latent, prev):
        vae = self.pipe.vae
        img = vae.decode((latent[:, :, 0] / vae.config.scaling_factor).to(vae.dtype)).sample  # (1, 3, H, W)
        return _to_uint8(img)
