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

    pipe.enable_free_init(num_iters=3, method="butterworth")
    enable_fast_free_init(pipe)        # same outputs, no Python-loop filter
    ...
    disable_fast_free_init(pipe)       # back to diffusers' own code

Besides diffusers' "gaussian", "butterworth" and "ideal", ``method="box"`` (the original FreeInit
repository's box filter) works once the drop-in is enabled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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


def enable_fast_free_init(pipe):
    """Make `pipe`'s FreeInit use ``lowfreq_mix`` (idempotent; returns `pipe`).

    `pipe` must be a diffusers pipeline with FreeInit (``FreeInitMixin``: ``_get_free_init_freq_filter``
    and ``_apply_freq_filter``). Only this instance changes. A zero stop frequency (diffusers' all-zero
    filter) and unknown filter names keep diffusers' own behaviour (its result, its error).
    """
    from ..ops import lowfreq_mix
    from ..reference.lowfreq_mix import FILTERS

    if not all(callable(getattr(pipe, a, None)) for a in _ATTRS):
        raise ValueError(f"pipe must be a diffusers FreeInit pipeline (FreeInitMixin), got {type(pipe).__name__}")
    if getattr(pipe, _STATE, None) is not None:
        return pipe
    # What the instance held before (normally nothing: the class methods), restored by disable.
    saved = {a: pipe.__dict__.get(a) for a in _ATTRS}
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

    pipe._get_free_init_freq_filter = _get_free_init_freq_filter
    pipe._apply_freq_filter = _apply_freq_filter
    setattr(pipe, _STATE, saved)
    return pipe


def disable_fast_free_init(pipe):
    """Undo :func:`enable_fast_free_init` on `pipe` (no-op if it is not enabled); returns `pipe`."""
    saved = getattr(pipe, _STATE, None)
    if saved is None:
        return pipe
    for attr, prior in saved.items():
        if prior is None:
            pipe.__dict__.pop(attr, None)
        else:
            pipe.__dict__[attr] = prior
    setattr(pipe, _STATE, None)
    return pipe


def fast_free_init_enabled(pipe) -> bool:
    return getattr(pipe, _STATE, None) is not None
