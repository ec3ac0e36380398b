"""The diffusers conventions every method entry point shares (docs/methods.md#python-api-conventions).

- ``output_type`` in ``OUTPUT_TYPES`` = ("np", "pil", "pt", "latent"), and ONE return type per
  output type across the video methods, :class:`VideoOutput` (``.frames``, batched as diffusers'
  video pipelines return them):

  ======== =====================================================================
  "np"     numpy float32 (B, F, H, W, 3) in [0, 1]
  "pt"     torch float32 (B, F, 3, H, W) in [0, 1]
  "pil"    a list (per video) of lists of F ``PIL.Image.Image``
  "latent" the method's latents as a torch tensor (B, C, F', h, w)
  ======== =====================================================================

  B is 1: every method generates one video per call. StoryDiffusion, an image method, returns
  ``StoryResult.images`` in diffusers' image convention: np (N, H, W, 3), pt (N, 3, H, W), pil a
  list of N images, latent (N, C, h, w).
- ``generator``: a ``torch.Generator`` or a list of them (one per video: a list of one for the
  video methods; one per prompt for StoryDiffusion); it replaces ``seed`` where both exist.
- ``callback_on_step_end(method, step, timestep, callback_kwargs) -> dict`` where the method owns
  the loop, with ``callback_on_step_end_tensor_inputs`` naming the tensors passed in
  ``callback_kwargs``; returned tensors replace them; setting ``method._interrupt = True`` stops
  the loop after the current step (as diffusers' pipelines' ``interrupt``).
- the progress bar: ``method.set_progress_bar_config(disable=True)`` (tqdm's keywords); by default
  a method follows its pipeline's ``set_progress_bar_config``.
- input checks at the entry point, a ValueError naming the argument (``check_*`` below).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

OUTPUT_TYPES = ("np", "pil", "pt", "latent")

__all__ = ["OUTPUT_TYPES", "VideoOutput", "ProgressBarMixin", "check_output_type", "check_prompt",
           "check_frame_count", "check_positive_int", "check_size", "resolve_generator", "video_output",
           "check_callback"]


@dataclass
class VideoOutput:
    """One call's video: ``frames`` batched as diffusers' video pipelines (see the module docstring)."""

    frames: Any


# ----------------------------------------------------------------------------------------------
# input checks (ValueError naming the argument)
def check_output_type(output_type) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    return output_type


def check_prompt(prompt, name: str = "prompt", allow_list: bool = False, allow_empty: bool = False):
    """A string (non-empty unless `allow_empty`), or with `allow_list` a non-empty list of them."""
    if isinstance(prompt, str):
        if not allow_empty and not prompt.strip():
            raise ValueError(f"{name} must be a non-empty string, got {prompt!r}")
        return prompt
    if allow_list and isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    kind = "a string or a list of strings" if allow_list else "a string"
    raise ValueError(f"{name} must be {kind}, got {type(prompt).__name__} {prompt!r}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_frame_count(value, name: str = "num_frames") -> int:
    return check_positive_int(value, name, 1)


def check_size(value, name: str, multiple: int) -> Optional[int]:
    """None (the default size) or a positive int divisible by `multiple`."""
    if value is None:
        return None
    value = check_positive_int(value, name, 1)
    if value % multiple:
        raise ValueError(f"{name} must be divisible by {multiple} for this model, got {value}")
    return value


def check_callback(callback, tensor_inputs: Sequence[str], allowed: Sequence[str]) -> None:
    if callback is not None and not callable(callback):
        raise ValueError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
    bad = [k for k in tensor_inputs if k not in allowed]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs: {bad} are not among {list(allowed)}")


def resolve_generator(generator, seed, batch: int = 1, device: Optional[str] = None,
                      name: str = "generator") -> list:
    """The generators of a call as a list of `batch`: `generator` (one, or a list of `batch`), else
    one new CPU generator seeded with `seed` (an int) per item. `device`: the device type every
    generator must have (e.g. "cpu" where the method draws on the CPU)."""
    if generator is None:
        if not _is_int(seed):
            raise ValueError(f"seed must be an int (or pass generator=torch.Generator(...)), got "
                             f"{type(seed).__name__} {seed!r}")
        return [torch.Generator("cpu").manual_seed(int(seed)) for _ in range(batch)]
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if isinstance(generator, (list, tuple)) and len(gens) != batch:
        raise ValueError(f"{name}: a list of {len(gens)} generators for {batch} output(s); give one per output "
                         f"or a single generator")
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise ValueError(f"{name} must be a torch.Generator or a list of them, got {type(g).__name__}")
        if device is not None and g.device.type != device:
            raise ValueError(f"{name} must be a {device} generator (this method draws its noise there), got one "
                             f"on {g.device}")
    return gens if len(gens) == batch else gens * batch


# ----------------------------------------------------------------------------------------------
# outputs
def video_output(frames, output_type: str) -> VideoOutput:
    """One video's decoded frames -> :class:`VideoOutput` in `output_type` ("np", "pt", "pil").

    frames: numpy (F, H, W, 3) uint8 (0..255; divided by 255 in float32) or float in [0, 1], or a
    torch tensor (F, 3, H, W) float in [0, 1]."""
    check_output_type(output_type)
    if output_type == "latent":
        raise ValueError("video_output: latents are returned as they are, not converted from frames")
    if isinstance(frames, torch.Tensor):
        arr = frames.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    else:
        arr = np.asarray(frames)
        arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"video_output: expected frames (F, H, W, 3), got shape {arr.shape}")
    if output_type == "np":
        return VideoOutput(frames=arr[None])
    if output_type == "pt":
        return VideoOutput(frames=torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)[None])
    from PIL import Image

    return VideoOutput(frames=[[Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in arr]])


# ----------------------------------------------------------------------------------------------
# progress bar
class ProgressBarMixin:
    """``set_progress_bar_config(**tqdm_kwargs)`` on a method object, as on a diffusers pipeline
    (``disable=True`` hides the bar). Until it is called the method follows its pipeline's
    configuration (``self.pipe._progress_bar_config``)."""

    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress_bar_config = dict(kwargs)

    def _bar_config(self) -> dict:
        own = getattr(self, "_progress_bar_config", None)
        if own is not None:
            return dict(own)
        return dict(getattr(getattr(self, "pipe", None), "_progress_bar_config", {}) or {})

    def progress_bar(self, total: Optional[int] = None, **kwargs):
        from tqdm.auto import tqdm

        config = {**self._bar_config(), **kwargs}
        return tqdm(total=total, **config)
