"""FreeLOC's layer-adaptive probing (docs/methods.md, FreeLOC: Probing): which layers get TSA, which VRPR.

For every self-attention layer, during an ordinary run of the pipeline (a few denoising steps on
a prompt), :func:`probe_layers` measures on the layer's attention output H (heads concatenated,
before the output projection; dense attention at the original positions):

- position sensitivity: the mean of ||H_s - H|| / ||H|| over key-position shifts s (default
  +-20 and +-40 frames, FreeLOC's choice): H_s has every key's temporal RoPE position moved
  by s. A layer whose output follows the temporal positions closely is hurt by positions beyond
  the trained range and needs VRPR.
- context sensitivity: ||H_w - H|| / ||H||, H_w with a local window of `window` frames (default:
  FreeLOC's local tier, 8 frames scaled to the trained length). A large change means the layer
  mixes information from far frames, i.e. its behaviour depends on how much context it sees:
  at a longer length its attention is diluted over more frames.

Both are averaged over every transformer call of the run (each step, each CFG branch). The
layer configuration (:meth:`ProbeResult.layer_config`), following the paper ("position-
sensitive layers get VRPR, context-sensitive layers VRPR+TSA"; docs/methods.md):

- "tsa" for the `tsa_fraction` of layers with the highest context sensitivity (default 17/30, the
  share of the released Wan2.1-1.3B list), or, with `context_threshold`, for every layer at or
  above it; ``tsa_rule="least_sensitive"`` selects the lowest instead (layers that already
  attend locally, where the tiers change least);
- "vrpr" for the other layers whose position sensitivity is >= `position_threshold` (default
  0: all of them, as in the released list);
- "dense" for the rest.

Two-expert pipelines (Wan 2.2 A14B): ``expert="transformer_2"`` probes the low-noise expert
instead of ``transformer``; its layers are measured on the calls WanPipeline makes to it (the
steps below the boundary timestep), and the JSON is FreeLOC's ``layer_config_2``.

The JSON written by :func:`write_layer_config` is the format ``FreeLOC(layer_config=path)``
loads (``longvideo.methods.freeloc.load_layer_config``), with the measurements under "probe".
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..processors.wan import apply_probe_processors
from .freeloc import (LAYER_CONFIG_FORMAT, OFFICIAL_LOCAL_FRAMES, WAN21_1_3B_TSA_LAYERS, WAN_TRAINED_LATENT_FRAMES,
                      _check_int, _round, _transformers)

DEFAULT_SHIFTS = (20.0, -20.0, 40.0, -40.0)
DEFAULT_TSA_FRACTION = len(WAN21_1_3B_TSA_LAYERS) / 30.0
TSA_RULES = ("most_sensitive", "least_sensitive")
EXPERTS = ("transformer", "transformer_2")  # which transformer probe_layers measures


@dataclass
class ProbeResult:
    """Per-layer sensitivities of one probing run."""

    position: list[float]
    context: list[float]
    shifts: list[float]
    window: int
    num_frames: int            # latent frames of the probing run
    calls: int                 # transformer calls averaged over
    model: str = ""
    settings: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.context)

    def layer_config(self, tsa_fraction: Optional[float] = DEFAULT_TSA_FRACTION,
                     context_threshold: Optional[float] = None, position_threshold: float = 0.0,
                     tsa_rule: str = "most_sensitive") -> dict:
        """The layer configuration dict (FreeLOC's JSON format) chosen by the module's rule."""
        n = self.num_layers
        if tsa_rule not in TSA_RULES:
            raise ValueError(f"tsa_rule must be one of {TSA_RULES}, got {tsa_rule!r}")
        sign = 1.0 if tsa_rule == "most_sensitive" else -1.0
        if context_threshold is not None:
            tsa = {i for i, c in enumerate(self.context) if sign * (c - float(context_threshold)) >= 0}
            rule = f"tsa: context sensitivity {'>=' if sign > 0 else '<='} {context_threshold}"
        else:
            if tsa_fraction is None or not 0.0 <= float(tsa_fraction) <= 1.0:
                raise ValueError(f"tsa_fraction must be in [0, 1], got {tsa_fraction!r}")
            k = _round(float(tsa_fraction) * n)
            order = sorted(range(n), key=lambda i: (-sign * self.context[i], i))
            tsa = set(order[:k])
            rule = f"tsa: the {k} of {n} layers with the {'highest' if sign > 0 else 'lowest'} context sensitivity"
        layers = []
        for i in range(n):
            if i in tsa:
                layers.append("tsa")
            elif self.position[i] >= position_threshold:
                layers.append("vrpr")
            else:
                layers.append("dense")
        rule += f"; vrpr: other layers with position sensitivity >= {position_threshold}; dense: the rest"
        return {
            "format": LAYER_CONFIG_FORMAT,
            "model": self.model,
            "num_layers": n,
            "layers": layers,
            "probe": {
                "position_sensitivity": self.position,
                "context_sensitivity": self.context,
                "shifts": self.shifts,
                "window": self.window,
                "num_frames": self.num_frames,
                "calls": self.calls,
                "rule": rule,
                "settings": self.settings,
            },
        }


def probe_layers(pipe, prompt: str = "a red panda walking through a bamboo forest, cinematic",
                 num_frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: int = 4, guidance_scale: float = 5.0, seed: int = 0,
                 shifts: Sequence[float] = DEFAULT_SHIFTS, window: Optional[int] = None,
                 trained_frames: Optional[int] = None, progress: bool = False,
                 expert: str = "transformer") -> ProbeResult:
    """Probe every self-attention layer of one of the pipeline's transformers during one run.

    num_frames: video frames of the probing run (default: the trained length, 81 for Wan); window:
    local window in latent frames (default FreeLOC's local tier scaled to the trained length).
    expert: "transformer" (default) or, on a two-expert pipeline (Wan 2.2 A14B), "transformer_2"
    (the low-noise expert, called on the steps below the boundary; ValueError naming ``expert``
    elsewhere, RuntimeError if the run made no call to it).
    """
    if expert not in EXPERTS:
        raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
    transformers = _transformers(pipe)
    if expert == "transformer_2" and getattr(pipe, "transformer_2", None) is None:
        raise ValueError(f"expert: {type(pipe).__name__} has no transformer_2 (a low-noise expert, as Wan 2.2 A14B)")
    transformer = transformers[EXPERTS.index(expert)]
    if trained_frames is None:
        trained_frames = getattr(pipe, "longvideo_trained_latent_frames", WAN_TRAINED_LATENT_FRAMES)
    trained_frames = _check_int("trained_frames", trained_frames, 1)
    factor = getattr(pipe, "vae_scale_factor_temporal", 4)
    if num_frames is None:
        num_frames = (trained_frames - 1) * factor + 1
    num_frames = _check_int("num_frames", num_frames, 1)
    if window is None:
        window = max(1, _round(OFFICIAL_LOCAL_FRAMES * trained_frames / WAN_TRAINED_LATENT_FRAMES))
    window = _check_int("window", window, 1)
    kwargs = {}
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=not progress)
    try:
        with torch.no_grad(), apply_probe_processors(transformer, shifts, window) as patch:
            probes = patch.probes
            pipe(prompt=prompt, num_frames=num_frames, num_inference_steps=num_inference_steps,
                 guidance_scale=guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
                 output_type="latent", **kwargs)
    finally:
        pipe._progress_bar_config = saved
    calls = len(probes[0].context)
    if calls == 0:
        raise RuntimeError(f"probe: {expert} was never called in {num_inference_steps} steps"
                           + (" (no step below the boundary timestep: use more steps)"
                              if expert == "transformer_2" else ""))
    latent = (num_frames - 1) // factor + 1
    name = getattr(getattr(transformer, "config", None), "_name_or_path", "") or type(transformer).__name__
    return ProbeResult(
        position=[sum(p.position) / max(len(p.position), 1) for p in probes],
        context=[sum(p.context) / len(p.context) for p in probes],
        shifts=[float(s) for s in shifts], window=window, num_frames=latent, calls=calls, model=str(name),
        settings=dict(prompt=prompt, video_frames=num_frames, steps=num_inference_steps, expert=expert,
                      guidance_scale=guidance_scale, seed=seed, trained_frames=trained_frames, **kwargs))


def write_layer_config(path, result: ProbeResult, **rule) -> Path:
    """Write ``result.layer_config(**rule)`` as JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.layer_config(**rule), indent=2) + "\n")
    return path


__all__ = ["ProbeResult", "probe_layers", "write_layer_config"]
