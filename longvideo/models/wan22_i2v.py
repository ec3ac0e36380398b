"""Wan 2.2 A14B image-to-video pipelines: two experts, no image encoder.

``tiny_pipeline("i2v")`` builds diffusers' `WanImageToVideoPipeline` with two random-weight tiny
I2V transformers (``transformer``, the high-noise expert, and ``transformer_2``, the low-noise
expert; each as ``wan_i2v.image_transformer()``: the latents + mask + condition-latent input of
``2 z + 4`` channels, and no ``image_dim`` / ``added_kv_proj_dim``: Wan 2.2 A14B I2V takes no CLIP
features), no image encoder or processor, and the pipeline config's ``boundary_ratio`` (default
0.9, Wan2.2-I2V-A14B's). VAE, text encoder and scheduler are the tiny Wan 2.1 ones.

``from_pretrained(path)`` loads a local Wan2.2-I2V-A14B-Diffusers-style folder (model_index.json
naming ``transformer_2`` and a ``boundary_ratio``).
"""
from __future__ import annotations

import torch

from . import wan, wan22
from .wan_i2v import check_kind, image_transformer, load_i2v

KINDS = ("i2v",)
TINY_BOUNDARY_RATIO = 0.9  # Wan2.2-I2V-A14B's boundary_ratio


def tiny_pipeline(kind: str = "i2v", seed: int = 0, dtype: torch.dtype = torch.float32,
                  boundary_ratio: float = TINY_BOUNDARY_RATIO):
    """A random-weight two-expert WanImageToVideoPipeline (module docstring): the high-noise expert
    drawn from `seed`, the low-noise one from seed + 1; deterministic in `seed`, the global RNG
    state restored. `boundary_ratio` in (0, 1)."""
    from diffusers import WanImageToVideoPipeline

    check_kind(kind, "Wan 2.2 A14B image-to-video")
    if not 0.0 < float(boundary_ratio) < 1.0:
        raise ValueError(f"boundary_ratio must be in (0, 1), got {boundary_ratio!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        low_noise = image_transformer()

    def make(**components):
        return WanImageToVideoPipeline(**components, transformer_2=low_noise, boundary_ratio=float(boundary_ratio))

    pipe = wan.build_tiny_pipeline(make, image_transformer, wan._scheduler, seed, dtype)
    if dtype != torch.float32:
        wan._cast_transformer(pipe.transformer_2, dtype)
    pipe.longvideo_freeloc_layers = list(wan.TINY_FREELOC_LAYERS)
    return pipe


def from_pretrained(path, kind: str = "i2v", dtype: torch.dtype = torch.bfloat16):
    """Load a local diffusers Wan 2.2 A14B I2V checkpoint folder (both experts); the VAE in
    float32, the rest in `dtype`; nothing is downloaded. ValueError if the folder is not a
    two-expert checkpoint."""
    check_kind(kind, "Wan 2.2 A14B image-to-video")
    path = wan._checkpoint_dir(path)
    index = wan._read_model_index(path)
    if not isinstance(index, dict) or not wan22.is_two_expert_index(index):
        raise ValueError(f"model path {path!r} is not a two-expert Wan 2.2 checkpoint "
                         "(model_index.json needs transformer_2 and boundary_ratio)")
    from diffusers import WanImageToVideoPipeline

    pipe = load_i2v(WanImageToVideoPipeline, path, dtype, f"Wan 2.2 A14B I2V checkpoint {path!r}")
    pipe.longvideo_trained_latent_frames = wan.WAN_TRAINED_LATENT_FRAMES
    return pipe
