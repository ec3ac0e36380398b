"""Wan 2.2 TI2V-5B (``WanPipeline`` / ``WanImageToVideoPipeline`` with ``expand_timesteps``): one
transformer with a timestep per latent token, the 4x16x16 VAE (48 channels), text- and
image-to-video in one model (``longvideo.models.wan22_ti2v``).

Everything FIFO needs per frame is Wan 2.1's (flow sigmas, the Euler update, the causal streamed
decode: :class:`~.wan.WanFamily`); what differs:

- The denoiser is always called the way diffusers' pipelines call this model: a timestep per
  token, shape (B, F * h/2 * w/2). A FIFO window (one level per latent frame) gives each frame's
  tokens its own level's timestep -- the per-token input the model was trained with, FIFO's
  diagonal queue needs no other mechanism; a clip at one timestep gives every token that t.
- Sizes: the VAE compresses 16x in space, so heights and widths are multiples of 32 (the VAE's 16
  times the transformer's patch 2); 704 x 1280 and 31 trained latent frames (121 frames) on the
  real model.
- Image mode (``set_image``): the model's own image-to-video. The image is encoded alone as a
  latent frame and FIFO's initial clip is sampled the way ``WanImageToVideoPipeline`` with
  ``expand_timesteps`` samples: that frame fixed as the clip's frame 0 and told t = 0 at every
  step. From there on the video continues from its clip as FIFO does: the clip fills the queue,
  and with lookahead the c context frames before each window are clean frames -- first copies of
  the clip's frame 0 (the image's latents), then the frames that left the queue. With
  ``FIFODiffusion(lookahead_context="clean")`` the model is told t = 0 for them: exactly the
  TI2V model's image conditioning (clean tokens at t = 0 in front of noisy ones), carried along
  the video by its own latest frames. (``"official"`` noises the context to the grid's t_0, as
  the official FIFO code.) The video's first frame is the image re-denoised by the queue with
  the image as its clean context, not the image's pixels.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from .base import per_frame_timesteps
from .wan import WanFamily

TINY_SIZE = (64, 64)          # longvideo.models.wan22_ti2v.TINY_SIZE (a model module is not imported here)


def is_ti2v(pipe) -> bool:
    """Whether `pipe` runs the TI2V way: a Wan transformer and ``expand_timesteps`` in its config."""
    config = getattr(pipe, "config", None)
    return (WanFamily.matches(pipe) and config is not None and bool(getattr(config, "expand_timesteps", False))
            and getattr(config, "boundary_ratio", None) is None)


class Wan22TI2VFamily(WanFamily):
    name = "wan22_ti2v"
    description = "Wan 2.2 TI2V pipelines (WanPipeline / WanImageToVideoPipeline with expand_timesteps)"
    supports = frozenset({"fifo"})
    full_size = (704, 1280)        # Wan2.2-TI2V-5B's 720p
    trained_latent_frames = 31     # 121 frames at 24 fps

    def __init__(self, pipe):
        super().__init__(pipe)
        self.image = None          # the preprocessed image (1, 3, H, W) in [-1, 1], or None: text only
        self._image_key = None

    @classmethod
    def matches(cls, pipe) -> bool:
        return is_ti2v(pipe)

    def check_supported(self, method: str) -> None:
        if getattr(self.pipe, "transformer", None) is None:
            raise ValueError("pipe: the TI2V pipeline has no transformer")

    def default_size(self):
        """(height, width): 64 x 64 on the built-in tiny model (trained length 3), else 704 x 1280."""
        tiny = getattr(self.pipe, "longvideo_trained_latent_frames", None) == 3
        return TINY_SIZE if tiny else self.full_size

    def run_settings(self) -> dict:
        return {"image": self._image_key}

    # the denoiser ------------------------------------------------------------------------------
    @staticmethod
    def token_timesteps(tr, x, timestep) -> torch.Tensor:
        """The (B, F * h/ph * w/pw) per-token timesteps of latents x (B, C, F, h, w): a 0-dim
        `timestep` for every token (WanPipeline with expand_timesteps, text-to-video), or one per
        latent frame (F,) repeated over that frame's tokens (a FIFO window)."""
        _, ph, pw = tr.config.patch_size
        tokens = (x.shape[3] // ph) * (x.shape[4] // pw)
        per_frame = timestep if per_frame_timesteps(timestep) else timestep.expand(x.shape[2])
        if per_frame.numel() != x.shape[2]:
            raise ValueError(f"timestep: {per_frame.numel()} timesteps for {x.shape[2]} latent frames")
        return per_frame.float().repeat_interleave(tokens)[None].expand(x.shape[0], -1)

    @staticmethod
    def call_transformer(tr, x, timestep, embeds):
        t = Wan22TI2VFamily.token_timesteps(tr, x, timestep).to(x.device)
        return tr(hidden_states=x.to(tr.dtype), timestep=t, encoder_hidden_states=embeds.to(tr.dtype),
                  return_dict=False)[0].float()

    # image mode --------------------------------------------------------------------------------
    def set_image(self, image) -> None:
        """Condition FIFO's video on `image` (module docstring), or back to text only with None.

        image: a PIL image, or a float tensor (3, H, W) / (1, 3, H, W) in [0, 1]; resized to the
        run's size by the pipeline's video processor when the clip is sampled. The run's
        settings (compared on resume) record a hash of it."""
        if image is None:
            self.image, self._image_key = None, None
            return
        if isinstance(image, torch.Tensor):
            if image.ndim == 3:
                image = image[None]
            if image.ndim != 4 or image.shape[:2] != (1, 3) or not image.is_floating_point():
                raise ValueError(f"image: expected a float tensor (3, H, W) or (1, 3, H, W) in [0, 1], got "
                                 f"{tuple(image.shape)} {image.dtype}")
            raw = image.detach().float().cpu().contiguous()
            key = hashlib.sha1(raw.numpy().tobytes()).hexdigest()[:16]
            image = raw
        else:
            try:
                import PIL.Image
            except ImportError:  # pragma: no cover - Pillow comes with diffusers
                PIL = None
            if PIL is None or not isinstance(image, PIL.Image.Image):
                raise ValueError(f"image: expected a PIL image or a tensor, got {type(image).__name__}")
            image = image.convert("RGB")
            key = hashlib.sha1(image.tobytes()).hexdigest()[:16]
        self.image, self._image_key = image, key

    def _i2v_pipeline(self):
        """The pipeline as WanImageToVideoPipeline(expand_timesteps=True), sharing its components."""
        from diffusers import WanImageToVideoPipeline

        if isinstance(self.pipe, WanImageToVideoPipeline):
            return self.pipe
        comps = {k: v for k, v in self.pipe.components.items() if k in ("tokenizer", "text_encoder", "vae",
                                                                           "scheduler", "transformer")}
        view = WanImageToVideoPipeline(**comps, expand_timesteps=True)
        view.set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {}))
        return view

    def _t2v_pipeline(self):
        """The pipeline as WanPipeline(expand_timesteps=True), sharing its components."""
        from diffusers import WanPipeline

        if isinstance(self.pipe, WanPipeline):
            return self.pipe
        comps = {k: v for k, v in self.pipe.components.items() if k in ("tokenizer", "text_encoder", "vae",
                                                                           "scheduler", "transformer")}
        view = WanPipeline(**comps, expand_timesteps=True)
        view.set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {}))
        return view

    def sample_clip(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        """FIFO's initial clip of f latent frames, float32: the text-to-video pipeline's sampling,
        or with an image (``set_image``) the image-to-video pipeline's (frame 0 = the image's
        latents, told t = 0)."""
        frames = (f - 1) * self.pipe.vae_scale_factor_temporal + 1
        kwargs = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height,
                      width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generator, output_type="latent")
        if self.image is None:
            return self._t2v_pipeline()(**kwargs).frames.float()
        return self._i2v_pipeline()(image=self.image, **kwargs).frames.float()

    def image_latents(self, height: int, width: int) -> Optional[torch.Tensor]:
        """The image's latent frame (1, C, 1, h, w), normalised as the pipelines do (posterior
        mode, (z - mean) / std), or None without an image."""
        if self.image is None:
            return None
        from .base import retrieve_latents

        image = self.pipe.video_processor.preprocess(self.image, height=height, width=width)
        vae = self.pipe.vae
        with torch.no_grad():
            z = retrieve_latents(vae.encode(image[:, :, None].to(self.execution_device, vae.dtype)),
                                 sample_mode="argmax").float()
        mean, std = self._latent_stats(z.device, torch.float32)
        return (z - mean) * (1.0 / std)
