"""Drop-in fast FreeInit for diffusers pipelines (AnimateDiff and every other ``FreeInitMixin`` user).

diffusers' FreeInit (``pipelines/free_init_utils.py``) re-initialises the latents between
iterations with ``_apply_freq_filter(z_t, z_rand, _get_free_init_freq_filter(...))``: the filter is
built by a Python triple loop over T*H*W (about a microsecond per element, every iteration) and the
mix costs three complex FFTs plus shifts. :func:`enable_fast_free_init` patches those two methods
on ONE pipeline instance so that the filter becomes a parameter record and the mix one call of
``torch.ops.longvideo.lowfreq_mix`` (same formula, FreeInit eq. 5-6; Triton/CUDA kernels on GPUs).
Everything else in ``_apply_free_init`` (the re-noising with ``scheduler.add_noise``, the draws
from the user's generator, the coarse-to-fine schedule) is untouched, so results match diffusers'
up to floating-point rounding of the FFTs::

    with apply_free_init(pipe, FreeInitConfig(num_iters=3, method="butterworth")):
        video = pipe(...).frames[0]    # diffusers' FreeInit, its filter through lowfreq_mix
    # leaving the block: FreeInit as it was before (disabled), diffusers' own filter code

    pipe.enable_free_init(num_iters=3)  # the older form, still supported:
    enable_fast_free_init(pipe)        # same outputs, no Python-loop filter
    disable_fast_free_init(pipe)       # back to diffusers' own code

Besides diffusers' "gaussian", "butterworth" and "ideal", ``method="box"`` (the original FreeInit
repository's box filter) works once the drop-in is enabled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..hooks import PatchHandle

_ATTRS = ("_get_free_init_freq_filter", "_apply_freq_filter")
_STATE = "_longvideo_fast_free_init_saved"


@dataclass(frozen=True)
class FreqFilterSpec:
    """What diffusers' filter tensor stands for: lowfreq_mix's filter arguments (no tensor built)."""

    filter: str
    d_s: float
    d_t: float
    order: float
    shape: tuple


FREE_INIT_FILTER = "FreeInit frequency filter"


def _check_free_init_pipeline(pipe) -> None:
    if not all(callable(getattr(pipe, a, None)) for a in _ATTRS):
        raise ValueError(f"pipe must be a diffusers FreeInit pipeline (FreeInitMixin), got {type(pipe).__name__}")


def _patch_filter(handle, pipe) -> None:
    """Replace `pipe`'s two FreeInit filter methods (instance attributes over the class's), in `handle`."""
    from ..ops import lowfreq_mix
    from ..reference.lowfreq_mix import FILTERS

    handle.claim(pipe, FREE_INIT_FILTER)
    original_get = pipe._get_free_init_freq_filter
    original_apply = pipe._apply_freq_filter

    def _get_free_init_freq_filter(shape, device, filter_type, order, spatial_stop_frequency,
                                   temporal_stop_frequency):
        if spatial_stop_frequency == 0 or temporal_stop_frequency == 0 or filter_type not in FILTERS:
            return original_get(shape, device, filter_type, order, spatial_stop_frequency, temporal_stop_frequency)
        return FreqFilterSpec(filter_type, float(spatial_stop_frequency), float(temporal_stop_frequency),
                              float(order), tuple(shape))

    def _apply_freq_filter(x: torch.Tensor, noise: torch.Tensor, low_pass_filter) -> torch.Tensor:
        if not isinstance(low_pass_filter, FreqFilterSpec):
            return original_apply(x, noise, low_pass_filter)
        spec = low_pass_filter
        if tuple(x.shape[-3:]) != spec.shape[-3:]:
            raise ValueError(f"free init: latents {tuple(x.shape)} do not match the filter shape {spec.shape}")
        return lowfreq_mix(x, noise, spec.filter, spec.d_s, spec.d_t, spec.order)

    handle.set_attr(pipe, "_get_free_init_freq_filter", _get_free_init_freq_filter)
    handle.set_attr(pipe, "_apply_freq_filter", _apply_freq_filter)


@dataclass(frozen=True)
class FreeInitConfig:
    """diffusers' FreeInit settings (``FreeInitMixin.enable_free_init``'s arguments), validated at
    construction (ValueError naming the field), plus `fast`: the ``lowfreq_mix`` drop-in.

    num_iters >= 1; method "butterworth" | "gaussian" | "ideal" | "box" ("box": the original
    FreeInit repository's filter, only with fast=True); order > 0 (butterworth); stop frequencies
    in (0, 1]; use_fast_sampling: diffusers' coarse-to-fine schedule."""

    num_iters: int = 3
    use_fast_sampling: bool = False
    method: str = "butterworth"
    order: int = 4
    spatial_stop_frequency: float = 0.25
    temporal_stop_frequency: float = 0.25
    fast: bool = True

    def __post_init__(self):
        if isinstance(self.num_iters, bool) or not isinstance(self.num_iters, int) or self.num_iters < 1:
            raise ValueError(f"num_iters must be an int >= 1, got {self.num_iters!r}")
        methods = ("butterworth", "gaussian", "ideal") + (("box",) if self.fast else ())
        if self.method not in methods:
            raise ValueError(f"method must be one of {methods}, got {self.method!r}"
                             + (" ('box' needs fast=True)" if self.method == "box" else ""))
        if isinstance(self.order, bool) or not isinstance(self.order, (int, float)) or self.order <= 0:
            raise ValueError(f"order must be a number > 0, got {self.order!r}")
        for name in ("spatial_stop_frequency", "temporal_stop_frequency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {v!r}")


_FREE_INIT_ATTRS = {"num_iters": "_free_init_num_iters", "use_fast_sampling": "_free_init_use_fast_sampling",
                    "method": "_free_init_method", "order": "_free_init_order",
                    "spatial_stop_frequency": "_free_init_spatial_stop_frequency",
                    "temporal_stop_frequency": "_free_init_temporal_stop_frequency"}


def apply_free_init(pipe, config: Optional[FreeInitConfig] = None) -> PatchHandle:
    """Enable FreeInit on `pipe` with `config` (diffusers' own attributes, as ``enable_free_init``
    sets them) and, with ``config.fast``, the ``lowfreq_mix`` drop-in. Returns a
    :class:`longvideo.hooks.PatchHandle`; ``remove()`` restores the pipeline's previous FreeInit
    state (enabled or not, its settings) and diffusers' filter code."""
    config = config if config is not None else FreeInitConfig()
    if not isinstance(config, FreeInitConfig):
        raise ValueError(f"config must be a FreeInitConfig, got {type(config).__name__}")
    _check_free_init_pipeline(pipe)
    handle = PatchHandle("FreeInit")
    try:
        handle.claim(pipe, "FreeInit settings")
        for field, attr in _FREE_INIT_ATTRS.items():
            handle.set_attr(pipe, attr, getattr(config, field))
        if config.fast:
            _patch_filter(handle, pipe)
    except BaseException:
        handle.remove()
        raise
    return handle


def enable_fast_free_init(pipe):
    """Make `pipe`'s FreeInit use ``lowfreq_mix`` (idempotent; returns `pipe`). A thin alias kept
    for callers: the patch is a :class:`longvideo.hooks.PatchHandle` kept on the pipeline;
    :func:`disable_fast_free_init` removes it. Prefer :func:`apply_free_init`.

    `pipe` must be a diffusers pipeline with FreeInit (``FreeInitMixin``: ``_get_free_init_freq_filter``
    and ``_apply_freq_filter``). Only this instance changes. A zero stop frequency (diffusers' all-zero
    filter) and unknown filter names keep diffusers' own behaviour (its result, its error).
    """
    _check_free_init_pipeline(pipe)
    held = pipe.__dict__.get(_STATE)
    if held is not None and held.active:
        return pipe
    handle = PatchHandle("fast FreeInit")
    try:
        _patch_filter(handle, pipe)
    except BaseException:
        handle.remove()
        raise
    pipe.__dict__[_STATE] = handle
    return pipe


def disable_fast_free_init(pipe):
    """Undo :func:`enable_fast_free_init` on `pipe` (no-op if it is not enabled); returns `pipe`."""
    handle = pipe.__dict__.pop(_STATE, None)
    if handle is not None:
        handle.remove()
    return pipe


def fast_free_init_enabled(pipe) -> bool:
    """True while the ``lowfreq_mix`` drop-in is on `pipe` (by either entry point)."""
    from ..hooks import active_patches

    return FREE_INIT_FILTER in active_patches(pipe)
