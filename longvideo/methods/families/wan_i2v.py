"""Wan image-to-video (``WanImageToVideoPipeline``): Wan 2.1 I2V (one transformer, CLIP image
features) and Wan 2.2 A14B I2V (two experts, no image encoder).

What the diffusers pipeline does (0.42, ``pipeline_wan_i2v.py``), for a clip of ``F`` latent
frames (``4 (F - 1) + 1`` video frames) and an image resized to the video's size:

- the conditioning video is the image followed by ``4 (F - 1)`` all-zero frames (zero = mid-grey
  in [-1, 1]); the VAE encodes it (posterior mode) and the latents are normalised with the VAE's
  latents mean / std: ``c`` (B, z, F, h, w). The encoder is causal, so latent frame k of ``c``
  depends on the image and the zero frames before it, not on the clip's length;
- a mask ``m`` (B, 4, F, h, w): one channel per video frame a latent frame holds, all ones in
  latent frame 0 (the image is known), zeros in every later latent frame;
- every transformer call gets ``cat([x, m, c], dim=1)`` (z + 4 + z channels; the real models:
  16 + 4 + 16 = 36) with one timestep for the clip, and, where the transformer has an ``image_dim``
  (Wan 2.1 I2V), ``encoder_hidden_states_image``: the CLIP vision encoder's penultimate hidden
  states of the image (the same tensor in every call). Wan 2.2 A14B routes each step to the
  expert of its timestep like WanPipeline (``boundary_ratio``, ``guidance_scale_2``).

FIFO (docs/methods.md, "Image-to-video"): the endless video is read as one pipeline clip of
unbounded length. Latent frame k of the output video (k = 0 is the image's frame) carries the
pipeline's condition of frame k in any clip longer than k: the mask is ones for k = 0 and zeros
after it, and ``c_k`` is the streamed causal encoding of [image, zeros ...] up to that frame
(:class:`ImageCondition`). A window sees the conditions of the frames it holds, so the windows
that still hold frame 0 see the image as a known frame, and once frame 0 has left the queue the
windows see all-zero masks and the zero frames' latents, exactly as the pipeline's own frames > 0
do; the CLIP features go on conditioning every window through cross-attention. Frames before
frame 0 (the warm-up copies of the initial clip's first frame and the lookahead context built
from it) are copies of frame 0 and get frame 0's condition.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from .wan import WanFamily
from .wan22 import Wan22Family


def is_image_to_video(pipe) -> bool:
    """Whether `pipe` is a Wan image-to-video pipeline of the channel-concatenation kind: a Wan
    transformer (or, A14B, its high-noise expert) taking more input channels than it outputs (the
    mask and the condition latents), without the per-token timesteps of Wan 2.2 TI2V-5B
    (``expand_timesteps``, whose image latents replace frame 0 instead)."""
    tr = getattr(pipe, "transformer", None) or getattr(pipe, "transformer_2", None)
    if not type(tr).__name__.startswith("Wan"):
        return False
    cfg = tr.config
    expand = bool(getattr(getattr(pipe, "config", None), "expand_timesteps", False))
    return int(cfg.in_channels) > int(cfg.out_channels or cfg.in_channels) and not expand


class ImageCondition:
    """The pipeline's mask and condition latents for any latent frame of an unbounded video.

    ``frames(indices)`` -> (1, 4 + z, F, h, w) float32: for each latent frame index k (negative
    indices count as 0), ``cat([m_k, c_k])`` with the mask ``m_k`` (ones for k = 0, else zeros;
    4 = the VAE's temporal factor) and ``c_k`` latent frame k of the normalised VAE encoding of
    [image, zeros ...], as ``WanImageToVideoPipeline.prepare_latents`` computes it.

    The encoding is streamed the way ``AutoencoderKLWan._encode`` runs: one encoder call per latent
    frame (the image alone, then 4 zero frames per call) with the causal convolutions' cache carried
    from call to call, so ``c_k`` does not depend on how long a clip is asked for. Once a call
    returns the same latent frame and the same cache as the call before it (the zero frames have
    flushed the image out of every cache), every later call would repeat it bit for bit: that frame
    is kept as the value of every later index (``steady_from``) and the encoder is not run again.
    Computed frames below the lowest index still needed are dropped (:meth:`release_before`).

    image: (1, 3, H, W) in [-1, 1] (the pipeline's ``video_processor.preprocess``).
    """

    def __init__(self, pipe, image: torch.Tensor, device):
        self.pipe, self.device = pipe, torch.device(device)
        vae = pipe.vae
        self.temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4))
        self.image = image.to(device=self.device, dtype=torch.float32)
        z = int(vae.config.z_dim)
        self.mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(self.device, torch.float32)
        self.inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(self.device, torch.float32)
        self._frames: dict = {}
        self._cache: Optional[list] = None
        self._next = 0
        self.steady_from: Optional[int] = None
        self._steady: Optional[torch.Tensor] = None

    def fingerprint(self) -> str:
        """A hash of the preprocessed image (what a FIFO checkpoint's queue depends on)."""
        data = self.image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return hashlib.sha256(data).hexdigest()[:16]

    def _encode_next(self) -> torch.Tensor:
        from ...offload import onloaded

        vae = self.pipe.vae
        k = self._next
        if k == 0:
            vae.clear_cache()  # sizes the cache: one slot per causal convolution of the encoder
            self._cache = [None] * len(vae._enc_feat_map)
            chunk = self.image[:, :, None]
        else:
            chunk = self.image.new_zeros(self.image.shape[0], 3, self.temporal, *self.image.shape[2:])
        chunk = chunk.to(dtype=vae.dtype)
        if getattr(vae.config, "patch_size", None) is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

            chunk = patchify(chunk, patch_size=vae.config.patch_size)
        before = list(self._cache)
        with onloaded(vae):
            out = vae.encoder(chunk, feat_cache=self._cache, feat_idx=[0])
            moments = vae.quant_conv(out)
        lat = moments[:, : int(vae.config.z_dim)].to(self.device, torch.float32)  # the posterior's mode
        lat = (lat - self.mean) * self.inv_std
        self._next = k + 1
        prev = self._frames.get(k - 1)
        if k >= 2 and prev is not None and torch.equal(prev, lat) and _same_cache(before, self._cache):
            self.steady_from, self._steady = k, lat
            self._cache = None
        return lat

    def latent(self, k: int) -> torch.Tensor:
        """c_k, (1, z, 1, h, w) float32."""
        k = max(int(k), 0)
        if self.steady_from is not None and k >= self.steady_from:
            return self._steady
        if k in self._frames:
            return self._frames[k]
        if k < self._next:
            raise RuntimeError(f"ImageCondition: latent frame {k} was released; the streamed encoding only moves "
                               "forward (release_before was called with a larger index)")
        while self._next <= k and self.steady_from is None:
            idx = self._next
            self._frames[idx] = self._encode_next()
        return self.latent(k)

    def mask(self, k: int, like: torch.Tensor) -> torch.Tensor:
        m = like.new_zeros(like.shape[0], self.temporal, 1, *like.shape[3:])
        return m + 1.0 if int(k) <= 0 else m

    def frames(self, indices) -> torch.Tensor:
        """cat([mask, condition latents]) of latent frames `indices`, (1, 4 + z, F, h, w) float32."""
        parts = []
        for k in indices:
            lat = self.latent(int(k))
            parts.append(torch.cat([self.mask(int(k), lat), lat], dim=1))
        return torch.cat(parts, dim=2)

    def release_before(self, index: int) -> None:
        """Drop computed frames below `index` (never asked for again: FIFO's frames only move on);
        frame 0's and the steady frame stay cheap to give."""
        for k in [k for k in self._frames if k < index and k != 0 and k != self._next - 1]:
            del self._frames[k]


def _same_cache(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                    and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


class _ImageConditioned:
    """What the Wan I2V families add to the text-to-video ones (module docstring): the condition
    of each window's frames concatenated to its latents, the CLIP features passed to every call."""

    image_conditioned = True
    supports = frozenset({"fifo"})

    def __init__(self, pipe):
        super().__init__(pipe)
        self.condition: Optional[ImageCondition] = None
        self.image = None
        self.image_embeds: Optional[torch.Tensor] = None
        self.window_start = 0  # latent frame index of the next call's first frame

    @classmethod
    def matches(cls, pipe) -> bool:
        return super().matches(pipe) and is_image_to_video(pipe)

    def check_supported(self, method: str) -> None:
        super().check_supported(method)
        pipe = self.pipe
        tr = getattr(pipe, "transformer", None) or pipe.transformer_2
        z = int(pipe.vae.config.z_dim)
        want = 2 * z + int(getattr(pipe, "vae_scale_factor_temporal", 4))
        if int(tr.config.in_channels) != want:
            raise ValueError(f"pipe: a Wan image-to-video transformer with in_channels={tr.config.in_channels}; "
                             f"the pipeline's conditioning (latents + mask + condition latents) needs {want}")
        if tr.config.image_dim is not None and getattr(pipe, "image_encoder", None) is None:
            raise ValueError("pipe: the transformer takes CLIP image features (image_dim) but the pipeline has no "
                             "image_encoder")

    # the image ------------------------------------------------------------------------------
    def set_image(self, image, height: int, width: int, device=None) -> None:
        """Condition the following calls on `image` (a PIL image or a tensor, as the pipeline's
        ``image`` argument) at the video size: the pipeline's preprocessing (resize to height x
        width, [-1, 1]), its CLIP features where the transformer takes them, and a fresh
        :class:`ImageCondition`."""
        import PIL.Image

        if not isinstance(image, (PIL.Image.Image, torch.Tensor)):
            raise ValueError(f"image must be a PIL image or a torch.Tensor (as WanImageToVideoPipeline's), got "
                             f"{type(image).__name__}")
        pipe = self.pipe
        device = self.execution_device if device is None else device
        self.image = image
        tr = getattr(pipe, "transformer", None) or pipe.transformer_2
        self.image_embeds = None
        if tr.config.image_dim is not None:  # as the pipeline: only Wan 2.1 I2V takes CLIP features
            self.image_embeds = pipe.encode_image(image, device).to(tr.dtype)
        processed = pipe.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)
        self.condition = ImageCondition(pipe, processed, device)
        self.window_start = 0

    def set_window_start(self, index: int) -> None:
        self.window_start = int(index)

    def release_frames_before(self, index: int) -> None:
        if self.condition is not None:
            self.condition.release_before(int(index))

    def conditioned(self, x: torch.Tensor) -> torch.Tensor:
        """cat([x, mask, condition latents]) on the channel axis for the window's frames
        ``window_start ..`` (x: (B, z, F, h, w))."""
        if self.condition is None:
            raise RuntimeError("an image-to-video family needs set_image(...) before a denoiser call")
        idx = range(self.window_start, self.window_start + x.shape[2])
        cond = self.condition.frames(idx).to(x.device, x.dtype)
        return torch.cat([x, cond.expand(x.shape[0], -1, -1, -1, -1)], dim=1)

    def run_settings(self) -> dict:
        settings = dict(super().run_settings())
        settings["image"] = None if self.condition is None else self.condition.fingerprint()
        return settings

    # the denoiser ----------------------------------------------------------------------------
    def forward(self, x, timestep, embeds):
        return super().forward(self.conditioned(x), timestep, embeds)

    def call_transformer(self, tr, x, timestep, embeds):
        """One call of the I2V transformer `tr` on already conditioned input x (B, 2z + 4, F, h, w),
        with the CLIP features where `tr` takes them."""
        from .base import per_frame_timesteps

        if per_frame_timesteps(timestep):
            _, ph, pw = tr.config.patch_size
            tokens = (x.shape[3] // ph) * (x.shape[4] // pw)
            t = timestep.repeat_interleave(tokens)[None].expand(x.shape[0], -1)
        else:
            t = timestep.expand(x.shape[0])
        image = None
        if tr.config.image_dim is not None:
            image = self.image_embeds.to(tr.dtype).expand(x.shape[0], -1, -1)
        return tr(hidden_states=x.to(tr.dtype), timestep=t, encoder_hidden_states=embeds.to(tr.dtype),
                  encoder_hidden_states_image=image, return_dict=False)[0].float()

    def sample_clip(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        """FIFO's initial clip: the I2V pipeline's own sampling from the image."""
        pipe = self.pipe
        extra = {"guidance_scale_2": self.guidance_scale_2} if getattr(self, "two_experts", False) else {}
        return pipe(image=self.image, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                    height=height, width=width, num_frames=(f - 1) * pipe.vae_scale_factor_temporal + 1,
                    num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                    output_type="latent", **extra).frames.float()


class WanI2VFamily(_ImageConditioned, WanFamily):
    name = "wan_i2v"
    description = "Wan 2.1 image-to-video pipelines (WanImageToVideoPipeline)"

    def run_settings(self) -> dict:
        settings = super().run_settings()
        if self.image_embeds is not None:  # the CLIP features: what the run takes from the image encoder
            data = self.image_embeds.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
            settings["image_embeds"] = hashlib.sha256(data).hexdigest()[:16]
        return settings


class Wan22I2VFamily(_ImageConditioned, Wan22Family):
    name = "wan22_i2v"
    description = "Wan 2.2 A14B image-to-video pipelines (WanImageToVideoPipeline with transformer_2)"

    def model_output(self, x, timestep, prompt_embeds, negative_embeds, guidance_scale: float,
                     batch_cfg: bool = False) -> torch.Tensor:
        # the two-expert guidance routes frames and calls the experts directly: condition first,
        # so each frame's mask and condition latents travel with it to its expert
        return super().model_output(self.conditioned(x), timestep, prompt_embeds, negative_embeds, guidance_scale,
                                    batch_cfg)
