"""Wan 2.2 A14B-shaped pipelines: two experts switched at a boundary timestep.

``tiny_pipeline(kind)`` builds diffusers' `WanPipeline` ("t2v"; "v2v" gives the same pipeline: diffusers
has no two-expert video-to-video pipeline, and randomized blending runs its own SDEdit loop on
WanPipeline's components, docs/methods.md) with two
random-weight tiny transformers, offline: ``transformer`` (the high-noise expert) and
``transformer_2`` (the low-noise expert), each shaped like the tiny Wan 2.1 transformer of
``longvideo.models.wan`` (4 layers, 2 heads of 32 channels, patch (1, 2, 2)) but with different
weights, and the pipeline config's ``boundary_ratio`` (default 0.875, Wan2.2-T2V-A14B's): the
pipeline calls ``transformer`` for timesteps ``t >= boundary_ratio * num_train_timesteps`` and
``transformer_2`` below. VAE, text encoder, tokenizer and scheduler are the tiny Wan 2.1 ones (the
A14B models keep Wan 2.1's VAE and UMT5 encoder).

``from_pretrained(path, kind)`` loads a local diffusers Wan 2.2 A14B checkpoint folder
(``model_index.json`` naming ``transformer_2`` and a ``boundary_ratio``); WanPipeline loads both
experts from it.
"""
from __future__ import annotations

import torch

from . import wan

KINDS = ("t2v", "v2v")  # "v2v": the same WanPipeline (module docstring)
TINY_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B's boundary_ratio (its model_index.json)


def _check_kind(kind: str) -> str:
    kind = str(kind).lower()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} for Wan 2.2 two-expert pipelines, got {kind!r}")
    return kind


def tiny_pipeline(kind: str = "t2v", seed: int = 0, dtype: torch.dtype = torch.float32,
                  boundary_ratio: float = TINY_BOUNDARY_RATIO):
    """A random-weight two-expert WanPipeline. The high-noise expert has the weights of
    ``wan.tiny_pipeline(seed=seed)``'s transformer, the low-noise expert those of seed + 1 (so the
    experts differ); everything is a deterministic function of `seed` and the global RNG state is
    restored afterwards. `boundary_ratio` in (0, 1)."""
    from diffusers import WanPipeline

    _check_kind(kind)
    if not 0.0 < float(boundary_ratio) < 1.0:
        raise ValueError(f"boundary_ratio must be in (0, 1), got {boundary_ratio!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        low_noise = wan._tiny_transformer()

    def make(**components):
        return WanPipeline(**components, transformer_2=low_noise, boundary_ratio=float(boundary_ratio))

    pipe = wan.build_tiny_pipeline(make, wan._tiny_transformer, wan._scheduler, seed, dtype)
    if dtype != torch.float32:
        wan._cast_transformer(pipe.transformer_2, dtype)
    return pipe


def is_two_expert_index(index: dict) -> bool:
    """Whether a parsed model_index.json describes a two-expert Wan 2.2 pipeline: a ``transformer_2``
    component that is present (not ``[null, null]``) and a ``boundary_ratio``."""
    second = index.get("transformer_2")
    has_second = isinstance(second, (list, tuple)) and any(part is not None for part in second)
    return has_second and index.get("boundary_ratio") is not None


def from_pretrained(path, kind: str = "t2v", dtype: torch.dtype = torch.bfloat16):
    """Load a local diffusers Wan 2.2 A14B checkpoint folder (e.g. Wan2.2-T2V-A14B-Diffusers) as
    `WanPipeline` with both experts; the VAE in float32, the rest in `dtype`; nothing is
    downloaded. ValueError if the folder is not a two-expert checkpoint."""
    _check_kind(kind)
    path = wan._checkpoint_dir(path)
    index = wan._read_model_index(path)
    if not isinstance(index, dict) or not is_two_expert_index(index):
        raise ValueError(f"model path {path!r} is not a two-expert Wan 2.2 checkpoint "
                         "(model_index.json needs transformer_2 and boundary_ratio)")
    from diffusers import WanPipeline

    pipe = wan._load_with_float32_vae(WanPipeline, path, dtype, f"Wan 2.2 checkpoint {path!r}")
    pipe.longvideo_trained_latent_frames = wan.WAN_TRAINED_LATENT_FRAMES
    return pipe
