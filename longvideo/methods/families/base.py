"""The base of the model-family layer: what every family gives the methods, and the helpers the
families share. The hooks and how to add a family: docs/contributing.md ("Add a model family").

Canonical latent layout everywhere in this layer: ``(B, C, F, h, w)`` (batch, channels, latent
frames, latent height, latent width), float32 outside the denoiser. A family converts to its
model's own layout inside its hooks (CogVideoX: ``(B, F, C, h, w)``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch

TIMESTEP_GRIDS = ("official", "scheduler")
"""FIFO's timestep grids (``FIFODiffusion(timestep_grid=...)``): docs/methods.md, FIFO-Diffusion."""


def check_grid(grid: str) -> str:
    """`grid` if it names one of TIMESTEP_GRIDS, else ValueError naming ``timestep_grid``."""
    if grid not in TIMESTEP_GRIDS:
        raise ValueError(f"timestep_grid must be one of {TIMESTEP_GRIDS}, got {grid!r}")
    return grid


@dataclass
class Levels:
    """FIFO's noise levels 0 (clean) .. L (tail) and the model timestep of each."""

    t_model: torch.Tensor            # (L+1,) float: the timestep the model is told at each level
    sigma: Optional[torch.Tensor] = None   # flow matching: (L+1,) ascending, sigma[0] = 0
    abar: Optional[torch.Tensor] = None    # DDIM: (L+1,) descending alphas_cumprod


def to_uint8(video: torch.Tensor):
    """Frames in [-1, 1] (F, 3, H, W) -> uint8 numpy (F, H, W, 3)."""
    from ...video import to_uint8_frames

    return to_uint8_frames(((video.float() + 1) / 2).clamp(0, 1))


def retrieve_latents(encoder_output, generator=None, sample_mode: str = "sample") -> torch.Tensor:
    """Latents of a VAE's encode output: a posterior sample (drawn from `generator`) or its mode
    (``sample_mode="argmax"``), or the encoder's plain latents."""
    if hasattr(encoder_output, "latent_dist"):
        dist = encoder_output.latent_dist
        return dist.sample(generator) if sample_mode == "sample" else dist.mode()
    if hasattr(encoder_output, "latents"):
        return encoder_output.latents
    raise AttributeError("could not access latents of the VAE encoder output")


def per_frame_timesteps(timestep: torch.Tensor) -> bool:
    """Whether a denoiser call's `timestep` gives one timestep per latent frame ((F,), FIFO) rather
    than one for every frame of every clip (a 0-dim tensor, randomized blending)."""
    return timestep.ndim > 0


class Family:
    """One kind of diffusers pipeline as the methods see it.

    Subclasses set the constants below and implement the hooks of the methods they support
    (``supports``): :meth:`forward` (one denoiser call) always; FIFO needs ``levels``,
    ``resolve_grid``, ``update``, ``noise_clean``, ``renoise``, ``guidance_coefficient``,
    ``sample_clip``, ``decode`` and ``default_size``; randomized blending needs ``size_multiple``,
    ``encode`` and ``decode_video`` (the rest has defaults here). The table of hooks:
    docs/contributing.md, "Add a model family".
    """

    name = "?"
    description = "?"             # for error messages: "Wan pipelines (WanTransformer3DModel)"
    supports = frozenset()        # method names ("fifo", "blending") this family serves
    denoiser_attr = "transformer"  # the pipeline attribute holding the denoiser
    temporal_compression = 1      # video frames per latent frame (after the first one, if causal)
    causal = False                # the VAE is causal in time: latent frame 0 holds one video frame
    flow_matching = False         # FIFO: levels are flow sigmas (else DDIM's alphas_cumprod)
    default_guidance_scale = 5.0  # FIFO's default classifier-free guidance scale
    trained_latent_frames = 16    # FIFO's default window: latent frames of the training clips
    pipeline_batches_cfg = True   # the diffusers pipeline runs both CFG halves as one batch
    scales_model_input = True     # the diffusers pipeline calls scheduler.scale_model_input
    noise_frame_major = False     # the pipeline draws its noise as (B, F, C, h, w)
    pipeline_max_sequence_length: Optional[int] = None  # the pipeline __call__'s prompt length

    def __init__(self, pipe):
        self.pipe = pipe

    # detection -------------------------------------------------------------------------------
    @classmethod
    def matches(cls, pipe) -> bool:
        """Whether `pipe` is of this family (decided from its components, so a text-to-video and a
        video-to-video pipeline of one family are both recognised)."""
        raise NotImplementedError

    def check_supported(self, method: str) -> None:
        """Raise ValueError (naming ``pipe``) if this pipeline cannot serve `method` although the
        family can (e.g. an image-conditioned checkpoint, a scheduler the method cannot use)."""

    image_conditioned = False     # the denoiser is conditioned on an image (set_image before FIFO runs)

    def set_window_start(self, index: int) -> None:
        """FIFO tells the family the output-video latent frame index of the next denoiser call's
        first frame (negative before the video starts); used by image-conditioned families to give
        each frame its own condition (docs/methods.md, "Image-to-video"), ignored otherwise."""

    def release_frames_before(self, index: int) -> None:
        """FIFO will not ask for frames below `index` again (per-frame state may be freed)."""

    def run_settings(self) -> dict:
        """Family settings a FIFO checkpoint's queue depends on beyond the common ones (compared on
        resume); none by default."""
        return {}

    # devices and sizes -----------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The transformer or UNet (attention processors are installed there)."""
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def device(self) -> torch.device:
        """The device FIFO runs on: the pipeline's execution device (the denoiser's parameters are
        on the host between calls under model offload), else the denoiser's."""
        return getattr(self.pipe, "_execution_device", None) or self.denoiser.device

    @property
    def execution_device(self) -> torch.device:
        """The pipeline's execution device (the denoiser's, or the accelerator under CPU offload)."""
        return self.pipe._execution_device

    def trained_window(self) -> int:
        """Latent frames of the training clips (a pipeline's ``longvideo_trained_latent_frames``
        overrides the class default, as the tiny models do)."""
        return int(getattr(self.pipe, "longvideo_trained_latent_frames", 0) or self.trained_latent_frames)

    def default_window(self) -> int:
        """FIFO's default window f (latent frames)."""
        return self.trained_window()

    def check_window(self, frames: int, name: str = "frames_per_window") -> int:
        """`frames` if the denoiser accepts a clip of that many latent frames, else ValueError
        naming the user's argument `name`."""
        return frames

    @staticmethod
    def _b(t):
        """A per-frame vector (F,) shaped to broadcast over (B, C, F, h, w)."""
        return t.view(1, 1, -1, 1, 1)

    def size_multiple(self) -> int:
        """Height and width must be multiples of this (pixels)."""
        raise NotImplementedError

    # prompts ---------------------------------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt, cfg: bool, device, max_sequence_length: Optional[int] = None):
        """(prompt_embeds, negative_embeds or None) from the pipeline's own ``encode_prompt``, one
        video per prompt. `max_sequence_length` None: the default of the pipeline's encode_prompt."""
        raise NotImplementedError

    # the denoiser ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """One denoiser call: the model output (float32, canonical layout) for latents x
        (B, C, F, h, w) and text embeddings (B, S, D). `timestep`: a 0-dim tensor (every frame at
        that timestep) or (F,), one timestep per latent frame (the same for every row)."""
        raise NotImplementedError

    def model_output(self, x, timestep, prompt_embeds, negative_embeds, guidance_scale: float,
                     batch_cfg: bool = True) -> torch.Tensor:
        """The classifier-free-guided model output for latents x (B, C, F, h, w):
        ``y_u + guidance_scale * (y_c - y_u)`` (plain ``y_c`` without negative embeddings or for
        guidance_scale <= 1). Embeddings (1 or B, S, D) are broadcast over the B rows. `timestep`
        as in :meth:`forward`. `batch_cfg`: both halves in one call of batch 2B ([uncond, cond]),
        else two calls (cond first), as the family's pipeline does when ``pipeline_batches_cfg``
        is False."""
        n = x.shape[0]
        pos = prompt_embeds.expand(n, -1, -1)
        if negative_embeds is None or guidance_scale <= 1.0:
            return self.forward(x, timestep, pos)
        neg = negative_embeds.expand(n, -1, -1)
        if batch_cfg:
            y_u, y_c = self.forward(torch.cat([x, x]), timestep, torch.cat([neg, pos])).chunk(2)
        else:
            y_c = self.forward(x, timestep, pos)
            y_u = self.forward(x, timestep, neg)
        return y_u + guidance_scale * (y_c - y_u)

    # randomized blending: latents through the pipeline's scheduler -----------------------------
    def preprocess(self, frames, height: int, width: int) -> torch.Tensor:
        """Video frames (F, H, W, 3) in [0, 1] -> (1, 3, F, H, W) in [-1, 1] via the pipeline's
        video processor."""
        return self.pipe.video_processor.preprocess_video(frames[None], height=height, width=width)

    def encode(self, video: torch.Tensor, generator) -> torch.Tensor:
        """Latents (1, C, F_latent, h, w), float32, of a preprocessed video, as the family's
        video-to-video pipeline prepares them."""
        raise NotImplementedError

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """The whole latent video decoded at once, in the layout the pipeline's video processor
        post-processes."""
        raise NotImplementedError

    def draw_noise(self, shape, generator) -> torch.Tensor:
        """Gaussian noise of canonical `shape`, float32 on the execution device, drawn in the
        order the pipeline draws it (frame-major for ``noise_frame_major``), so that a single clip
        gets the pipeline's own noise."""
        from diffusers.utils.torch_utils import randn_tensor

        if not self.noise_frame_major:
            return randn_tensor(tuple(shape), generator=generator, device=self.execution_device, dtype=torch.float32)
        b, c, f, h, w = shape
        return randn_tensor((b, f, c, h, w), generator=generator, device=self.execution_device,
                            dtype=torch.float32).permute(0, 2, 1, 3, 4)

    def add_noise(self, scheduler, x0, noise, t) -> torch.Tensor:
        """The forward process to timestep t with the pipeline's scheduler (SDEdit's start)."""
        return scheduler.add_noise(x0, noise, t)

    def predict(self, scheduler, x, t, cond, guidance_scale: float) -> torch.Tensor:
        """Guided model output for a batch of clips x (n, C, l, h, w) at the scheduler's timestep t
        (0-dim), as the family's pipeline computes it (input scaling, CFG batching)."""
        if self.scales_model_input:
            x = scheduler.scale_model_input(x, t)
        pos, neg = cond
        return self.model_output(x, t, pos, neg, guidance_scale, batch_cfg=self.pipeline_batches_cfg)

    def new_state(self) -> dict:
        """Per-trajectory solver state the scheduler object does not keep (see :meth:`step`)."""
        return {}

    def step(self, scheduler, y, t, x, state: dict, i: int, timesteps, extra: dict) -> torch.Tensor:
        """One solver step of the pipeline's scheduler from x at t with model output y."""
        return scheduler.step(y, t, x, **extra, return_dict=False)[0].float()

    def step_kwargs(self, scheduler, generator, eta) -> dict:
        """Extra ``scheduler.step`` arguments (eta, generator) where the pipeline passes them."""
        params = set(inspect.signature(scheduler.step).parameters)
        kw = {}
        if "eta" in params:
            kw["eta"] = eta
        if "generator" in params:
            kw["generator"] = generator
        return kw


def model_fingerprint(model: torch.nn.Module, samples: int = 64) -> str:
    """What identifies a model's outputs, the same in every process and for every spelling of its
    path: ``Class:config:weights`` hashes of the PUBLIC config keys (diffusers' private ones such as
    ``_use_default_values`` are lists whose order follows PYTHONHASHSEED, and ``_name_or_path`` is
    the path as typed) and of the weights: per parameter and buffer, its name, shape, dtype and
    `samples` values at fixed strides (their exact bits: one small device-to-host copy per run,
    deterministic, unlike a reduction). Two different checkpoints of one architecture differ
    in the weights part; the same checkpoint loaded from another path does not."""
    import hashlib
    import json

    config = {k: v for k, v in dict(getattr(model, "config", {}) or {}).items() if not str(k).startswith("_")}
    cfg = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    h = hashlib.sha1()
    picks = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if flat.numel():
            idx = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
            picks.append(flat[idx].contiguous().view(torch.uint8))
    if picks:
        h.update(torch.cat(picks).cpu().numpy().tobytes())
    return f"{type(model).__name__}:config {cfg}:weights {h.hexdigest()[:12]}"
