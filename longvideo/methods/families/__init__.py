"""The model-family layer: one class per kind of diffusers pipeline, used by every method that
drives the denoiser itself (FIFO-Diffusion / Ouroboros and randomized blending).

A family wraps the pipeline's own pieces (``encode_prompt``, VAE, scheduler, denoiser) behind one
interface (:class:`~.base.Family`): prompt encoding, one denoiser call with one timestep for the
clip or one per frame, classifier-free guidance, encoding/decoding, noising, and FIFO's per-frame
levels and updates. :func:`family_for` picks the family of a pipeline from its components and
refuses a pipeline no family (or no family serving the method) recognises. Hooks and how to add
a family: docs/contributing.md, "Add a model family"; the families' behaviour per method:
docs/methods.md.
"""
from __future__ import annotations

from typing import Optional

from .animatediff import AnimateDiffFamily, per_frame_time_embedding
from .base import TIMESTEP_GRIDS, Family, Levels, check_grid, to_uint8
from .cogvideox import CogVideoXFamily
from .skyreels import SkyReelsFamily
from .wan import WanFamily, ftfy_fallback
from .wan22 import EXPERT_ROUTINGS, Wan22Family
from .wan22_ti2v import Wan22TI2VFamily
from .wan_i2v import ImageCondition, Wan22I2VFamily, WanI2VFamily, is_image_to_video

FAMILIES = (Wan22I2VFamily, WanI2VFamily, SkyReelsFamily, Wan22Family, Wan22TI2VFamily, WanFamily, CogVideoXFamily,
            AnimateDiffFamily)
"""Detection order: more specific first (a family whose check would also accept another's
pipeline comes after it)."""

METHOD_NAMES = {"fifo": "FIFO", "blending": "randomized blending"}

__all__ = ["EXPERT_ROUTINGS", "FAMILIES", "TIMESTEP_GRIDS", "AnimateDiffFamily", "CogVideoXFamily", "Family", "Levels",
           "ImageCondition", "SkyReelsFamily", "Wan22Family", "Wan22I2VFamily", "Wan22TI2VFamily", "WanFamily",
           "WanI2VFamily", "is_image_to_video", "check_grid", "family_for", "family_of", "ftfy_fallback",
           "per_frame_time_embedding", "to_uint8"]


def _supported(method: Optional[str]) -> str:
    names = [cls.description for cls in FAMILIES if method is None or method in cls.supports]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def family_of(pipe) -> str:
    """The name of `pipe`'s family ('wan22_i2v', 'wan_i2v', 'skyreels', 'wan22', 'wan22_ti2v', 'wan',
    'cogvideox', 'animatediff');
    ValueError naming ``pipe`` when no family recognises it."""
    for cls in FAMILIES:
        if cls.matches(pipe):
            return cls.name
    raise ValueError(f"pipe: unsupported pipeline {type(pipe).__name__}; supported: {_supported(None)}")


def family_for(pipe, method: Optional[str] = None) -> Family:
    """The family object wrapping `pipe`. With `method` ("fifo" or "blending"), a family that does
    not serve that method, or a pipeline the family cannot run it with, is refused with a
    ValueError naming ``pipe`` and what the method supports."""
    if method is not None and method not in METHOD_NAMES:
        raise ValueError(f"method must be one of {sorted(METHOD_NAMES)} or None, got {method!r}")
    cls = next((c for c in FAMILIES if c.matches(pipe)), None)
    if cls is None or (method is not None and method not in cls.supports):
        what = METHOD_NAMES.get(method, "this package")
        raise ValueError(f"pipe: {what} supports {_supported(method)}; got {type(pipe).__name__}"
                         + (f" ({cls.description})" if cls is not None else ""))
    family = cls(pipe)
    if method is not None:
        family.check_supported(method)
    return family
