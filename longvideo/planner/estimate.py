"""The planner: peak GPU memory of a long-video method, component by component, and what fits.

``plan(method, model, height, width, num_frames, dtype, ..., gpu_memory=None) -> Plan``

A run is cut into phases (text encoding, the initial clip, one denoising step / FIFO iteration /
story call, VAE decode; Ouroboros' guided window: its guidance pass with autograd, then its
model call; image-to-video: the image encoder, the VAE encode of the condition, FIFO's streamed
condition -- see ``plan(image=...)``). The peak of a phase is

    resident weights (by offload mode)  +  state that lives across the phase (latents, FIFO queue
    and the causal VAE's cache, id banks, ...)  +  the peak of the phase's model call

where the model call's peak and its breakdown come from :mod:`longvideo.planner.activations`
(an op-by-op walk of the diffusers forward pass). The plan's peak is the largest phase peak.
With ``gpu_memory`` the planner tries settings from the fastest to the slowest and keeps the
first that fits (``Plan.choice``, with the reason for every option tried).

Settings (``Settings``):

* ``offload``: "none" (everything resident), "text" (the text encoders on the device only while
  the prompts are encoded, everything else resident: what model offload does for them, without
  swapping the denoiser and the VAE; not a diffusers switch, a caller moves the encoder), "model"
  (diffusers' enable_model_cpu_offload: only the component in use is on the device), "group"
  (diffusers' block-level group offloading with CUDA streams: a component's non-block weights
  plus two blocks, the one running and the one being prefetched), "sequential"
  (enable_sequential_cpu_offload: one leaf module's weights at a time). FIFO on Wan keeps the VAE
  resident in every mode (it calls vae.decoder directly, below the components' offload hooks)
  and is not offered model offload.
* ``vae_tiling`` / ``vae_slicing``: the VAE's enable_tiling (Wan: 256 px tiles, stride 192;
  KL: the config's tile, 25% overlap) and enable_slicing (one image at a time).
* ``bank_location`` (story): "device", "auto" (on the device up to ``bank_budget``, default 10%
  of ``gpu_memory``, the rest in pinned host memory), "cpu" (host; the current step's entries
  are brought to the device).
* ``frames_per_window`` / ``num_partitions`` (FIFO): the window f (activations scale with it;
  the default is the model's trained clip) and n (the queue holds 2 n floor(f/2) latent frames).
* ``chunk_batch`` (enhance): chunks per transformer call (default: all chunks at once).

The decode phase of direct / freeloc / enhance on a Wan VAE (``plan(..., decode=...)``):
"streamed" (default) models what the CLI runs, longvideo.decode's one latent frame per decoder
call with the causal cache (one cache per tile with ``vae_tiling``), each chunk written before
the next (:func:`longvideo.planner.activations.wan_vae_decode_streamed`: flat in the length,
plus the latent video); "whole" models diffusers' ``vae.decode`` of the whole video, for a
pipeline called from Python (:func:`longvideo.planner.activations.wan_vae_decode`).

Context parallelism (``plan(..., context_parallel=N)``, Wan-family direct / freeloc / fifo /
ouroboros; Wan 2.1, Wan 2.2 A14B (each expert's call), TI2V-5B and the I2V models, whose image
tokens are whole on every rank): the prediction is per rank, for one rank of
``longvideo.parallel.enable_context_parallel`` over N ranks (``torchrun --nproc-per-node N``
for direct / freeloc; ``--context-parallel N`` for FIFO's and Ouroboros' windows). Every rank
holds the whole weights, latents, queue (Ouroboros: its subject maps and bank too) and VAE
decode (every rank runs the pipeline and gets the whole video); only the transformer call is
split (:func:`longvideo.planner.activations.wan_call`: S/N tokens outside self-attention, all S
tokens of H/N heads inside it, the all-to-all buffers). Ouroboros' processors run the
all-to-alls themselves: its window calls record the subject maps on the rank's S/N tokens and
the subject keys of this rank's H/N heads; its guidance pass runs with autograd through the
all-to-alls, its backward on S/N tokens (the keys' gradient back through the all-to-all); the
initial clip runs through its processors, inactive (on two-expert Wan 2.2, each expert's calls).

Time: ``Plan.time`` quotes the benchmark records in ``benchmarks/results/*.json`` when one
matches the case (same method, model shape and size; the FIFO records ran 6 of 30 blocks and are
scaled by the block count, which the plan says), else None.
"""
from __future__ import annotations

import contextvars
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from . import activations as A
from .models import ModelSpec, load_model_spec
from .sim import Sim

__all__ = ["plan", "Plan", "Phase", "Part", "Settings", "TimeEstimate", "parse_bytes", "format_bytes",
           "METHODS", "OFFLOAD_MODES", "GUIDANCE_IMPLS"]

METHODS = ("direct", "freeloc", "fifo", "ouroboros", "story", "enhance")
OFFLOAD_MODES = ("none", "text", "model", "group", "sequential")
GUIDANCE_IMPLS = ("prefix", "whole_call")
DECODE_MODES = ("streamed", "whole")   # plan(decode=...): longvideo.decode's streamed decode, or vae.decode
_METHOD_ALIASES = {"blending": "enhance", "streamingt2v": "enhance", "storydiffusion": "story", "plain": "direct"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

# which forward the Wan transformers run while a plan is built (plan's wan_forward): "longvideo"
# (processors/wan_modulation.py, installed by the CLI and FIFO) or "diffusers"
_WAN_FORWARD: contextvars.ContextVar = contextvars.ContextVar("wan_forward", default="longvideo")


def parse_bytes(value) -> int:
    """``"24GB"`` -> 24e9, ``"24GiB"`` -> 24 * 2**30, ``141e9`` -> 141e9 (ValueError otherwise)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0 or not math.isfinite(value):
            raise ValueError(f"a size must be positive, got {value!r}")
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    num = text.rstrip("kmgtib")
    unit = text[len(num):]
    try:
        out = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"expected a size such as '24GB' or '80GiB', got {value!r}") from None
    if not (out > 0 and math.isfinite(out)):
        raise ValueError(f"a size must be positive and finite, got {value!r}")
    return int(out)


def format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0


# ---------------------------------------------------------------------------------------------
@dataclass
class Part:
    """One line of a phase's breakdown. kind: "weights", "state", "activations", "workspace"."""

    name: str
    nbytes: int
    kind: str
    note: str = ""


@dataclass
class Phase:
    name: str
    parts: list
    where: str = ""            # where in the model call the peak falls
    detail: dict = field(default_factory=dict)   # a phase of several calls: their peaks (bytes), what they are

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def by_kind(self, kind: str) -> int:
        return sum(p.nbytes for p in self.parts if p.kind == kind)

    @property
    def beyond_weights(self) -> int:
        return self.nbytes - self.by_kind("weights")


@dataclass
class Settings:
    offload: str = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False
    bank_location: str = "auto"
    bank_budget: Optional[int] = None
    frames_per_window: Optional[int] = None
    num_partitions: int = 4
    chunk_batch: Optional[int] = None

    def describe(self) -> str:
        out = [f"offload={self.offload}"]
        if self.vae_tiling:
            out.append("vae_tiling")
        if self.vae_slicing:
            out.append("vae_slicing")
        if self.bank_location != "auto":
            out.append(f"bank={self.bank_location}")
        if self.frames_per_window:
            out.append(f"window={self.frames_per_window}")
        if self.chunk_batch:
            out.append(f"chunk_batch={self.chunk_batch}")
        return ", ".join(out)


@dataclass
class TimeEstimate:
    """Seconds per step quoted from a benchmark record. scaled: the record ran fewer transformer
    blocks than the model has and the time was scaled by the block count (``note`` says so);
    otherwise the number is the record's own (per step: the record's unit times the calls a
    step makes, as ``note`` states)."""

    seconds_per_step: float
    step: str                  # what a step is for this method
    record: str                # the record file
    case: str
    impl: str
    note: str = ""
    scaled: bool = False


@dataclass
class Candidate:
    settings: Settings
    peak: int
    fits: bool
    reason: str


@dataclass
class Plan:
    method: str
    model: str
    settings: Settings
    phases: list
    sizes: dict
    time: Optional[TimeEstimate] = None
    time_note: str = ""
    gpu_memory: Optional[int] = None
    candidates: list = field(default_factory=list)
    choice: str = ""
    notes: list = field(default_factory=list)
    usable: Optional[int] = None           # gpu_memory less the headroom

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.nbytes)

    @property
    def peak_bytes(self) -> int:
        return self.peak_phase.nbytes

    @property
    def fits(self) -> Optional[bool]:
        if self.gpu_memory is None:
            return None
        return self.peak_bytes <= (self.usable if self.usable is not None else self.gpu_memory)

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"no phase {name!r}; phases: {[p.name for p in self.phases]}")

    def components(self) -> dict:
        """{part name: bytes} at the peak phase."""
        return {p.name: p.nbytes for p in self.peak_phase.parts}

    def to_dict(self) -> dict:
        return {"method": self.method, "model": self.model, "settings": asdict(self.settings), "sizes": self.sizes,
                "peak_bytes": self.peak_bytes, "peak_phase": self.peak_phase.name,
                "phases": [{"name": p.name, "bytes": p.nbytes, "where": p.where, "detail": p.detail,
                            "parts": [asdict(x) for x in p.parts]} for p in self.phases],
                "time": None if self.time is None else asdict(self.time), "time_note": self.time_note,
                "gpu_memory": self.gpu_memory, "usable": self.usable, "fits": self.fits, "choice": self.choice,
                "candidates": [{"settings": asdict(c.settings), "peak": c.peak, "fits": c.fits, "reason": c.reason}
                               for c in self.candidates], "notes": self.notes}

    def summary(self) -> str:
        """A human-readable report: sizes, phases, the peak phase's breakdown, time, the choice."""
        fb = format_bytes
        peak = self.peak_phase
        lines = [f"{self.method} on {self.model}: " + ", ".join(f"{k}={v}" for k, v in self.sizes.items()),
                 f"settings: {self.settings.describe()}",
                 ("predicted peak" + (f" per rank (one of {self.sizes['context_parallel']} context-parallel ranks)"
                                      if self.sizes.get("context_parallel") else "")
                  + f": {fb(self.peak_bytes)} in phase '{peak.name}'")
                 + (f" ({peak.where})" if peak.where else "")]
        wide = max([22] + [len(ph.name) for ph in self.phases])
        for ph in self.phases:
            lines.append(f"  phase {ph.name:<{wide}} {fb(ph.nbytes):>12}  (weights {fb(ph.by_kind('weights'))}, "
                         f"beyond weights {fb(ph.beyond_weights)})")
        lines.append(f"breakdown at the peak ({peak.name}):")
        wide = max([50] + [len(p.name) for p in peak.parts if p.nbytes])
        for p in sorted(peak.parts, key=lambda x: -x.nbytes):
            if p.nbytes:
                lines.append(f"  {p.kind:<11} {p.name:<{wide}} {fb(p.nbytes):>12}" + (f"  {p.note}" if p.note else ""))
        t = self.time
        if t is not None:
            lines.append(f"time: {t.seconds_per_step:.3f} s per {t.step} (record {t.record}, case {t.case}, "
                         f"impl {t.impl})" + (f"; {t.note}" if t.note else ""))
        else:
            lines.append("time: no matching benchmark record" + (f" ({self.time_note})" if self.time_note else ""))
        if self.gpu_memory is not None:
            lines.append(f"GPU memory {fb(self.gpu_memory)} ({fb(self.usable or self.gpu_memory)} usable): "
                         f"{'fits' if self.fits else 'does NOT fit'}")
            for c in self.candidates:
                lines.append(f"  {'FITS' if c.fits else 'no  '} {c.settings.describe():<44} {fb(c.peak):>12}  "
                             f"{c.reason}")
            if self.choice:
                lines.append(f"choice: {self.choice}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)

    __str__ = summary


# ---------------------------------------------------------------------------------------------
# resident weights
def _resident_weights(spec: ModelSpec, dtype, offload: str, active: list, extra_fp32: Optional[str] = None,
                      keep: tuple = ()) -> list:
    """Parts for the weights on the device while `active` components run. keep: components that
    stay resident whatever the mode (FIFO on Wan calls the VAE's submodules directly, which
    diffusers' offload hooks on the component do not see)."""
    parts = []
    texts = set(spec.text_encoders)
    text_phase = bool(active) and all(a in texts for a in active)
    for name in spec.components:
        mode = "none" if name in keep else offload
        if mode == "none":
            on = True
        elif mode == "text":                # text encoders on the device only while encoding, the rest after
            on = (name in texts) if text_phase else (name not in texts)
            if name == "image_encoder":     # longvideo.offload hooks an I2V image encoder as a text encoder
                on = name in active
            mode = "none"
        else:
            on = name in active
        if not on:
            continue
        total = spec.weight_bytes(name, dtype)
        if name == extra_fp32:              # SDXL's VAE upcast to float32 for the decode
            total = spec.weight_bytes(name, torch.float32)
        if mode in ("none", "model"):
            note = "copy the pipeline keeps; the UNet holds its own" if name == "motion_adapter" else ""
            parts.append(Part(f"{name} weights", total, "weights", note))
        elif mode == "group":
            outside, block = spec.block_bytes(name, dtype)
            nb = outside + 2 * block if block else total
            parts.append(Part(f"{name} weights (group offload)", min(total, nb), "weights",
                              "non-block weights + 2 blocks (running, prefetched)"))
        elif mode == "sequential":
            parts.append(Part(f"{name} weights (sequential offload)", spec.largest_leaf_bytes(name, dtype), "weights",
                              "the largest single module"))
    return parts


def _sim_parts(sim: Sim, label: str) -> list:
    """The sim's per-tag bytes at its peak as parts."""
    parts = []
    for tag, n in sorted(sim.peak_tags.items(), key=lambda kv: -kv[1]):
        if n <= 0:
            continue
        kind = "workspace" if tag in ("attention workspace", "attention mask") else (
            "state" if tag in ("id bank", "vae cache") else "activations")
        parts.append(Part(f"{label}: {tag}", n, kind))
    return parts


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# text encoders (coarse: see activations.text_encoder_call)
def _text_phase(spec: ModelSpec, dtype, st: Settings, prompts: int = 1, batch: int = 1,
                text_len: Optional[int] = None, keep: tuple = ()) -> Phase:
    parts = _resident_weights(spec, dtype, st.offload, spec.text_encoders, keep=keep)
    e = _itemsize(dtype)
    peak = 0
    for name in spec.text_encoders:
        peak = max(peak, A.text_encoder_peak(spec.components[name], batch, text_len or spec.text_len, e))
    parts.append(Part("text encoder activations", peak, "activations", "coarse model"))
    return Phase("text", parts)


# ---------------------------------------------------------------------------------------------
# model-call simulations
def _wan_arch(spec: ModelSpec, name: str = "transformer") -> A.WanArch:
    comp = spec.components[name]
    return A.WanArch.from_config(comp.config, skyreels=comp.class_name.startswith("SkyReels"))


def _text_dim(spec: ModelSpec) -> int:
    return int(spec.components["transformer"].config.get("text_dim", 4096))


def _vae_scale(spec: ModelSpec) -> tuple:
    """(spatial, temporal) compression of the pipeline's VAE."""
    cfg = spec.components["vae"].config
    if spec.components["vae"].class_name == "AutoencoderKLWan":
        s = cfg.get("scale_factor_spatial") or 2 ** len(cfg.get("temperal_downsample", [False, True, True]))
        return int(s), int(cfg.get("scale_factor_temporal") or 4)
    return 2 ** (len(cfg.get("block_out_channels", [1, 1, 1, 1])) - 1), 1


def _wan_call_sim(spec, dtype, device, batch, frames, h, w, timestep, self_attn="sdpa", grad=False, modes=None,
                  feature_layers=(), record_maps=False, name="transformer", text_len=512,
                  freeloc_semantics="official", context_parallel=1) -> Sim:
    sim = Sim(grad=grad)
    call = A.WanCall(batch=batch, frames=frames, height=h, width=w, text_len=text_len, itemsize=_itemsize(dtype),
                     lean=_WAN_FORWARD.get() == "longvideo",
                     timestep=timestep, self_attn=self_attn, freeloc_modes=modes,
                     freeloc_semantics=freeloc_semantics, use_op=grad,
                     feature_layers=tuple(feature_layers), record_maps=record_maps,
                     context_parallel=context_parallel, image_len=_image_tokens(spec))
    A.wan_call(sim, _wan_arch(spec, name), call, device)
    return sim


def _image_tokens(spec: ModelSpec) -> int:
    """CLIP image tokens a Wan 2.1 I2V transformer is given (its image encoder's patches + the class
    token: 257 for ViT-H/14 at 224 px); 0 without an image encoder."""
    if not spec.has("image_encoder"):
        return 0
    cfg = spec.components["image_encoder"].config
    cfg = cfg.get("vision_config", cfg)
    return (int(cfg.get("image_size", 224)) // int(cfg.get("patch_size", 14))) ** 2 + 1


# ---------------------------------------------------------------------------------------------
# image-to-video: how a run takes its image, and the phases and parts of the image path
IMAGE_METHODS = ("direct", "freeloc", "fifo")   # longvideo.cli._image.I2V_METHODS


def _is_condition_pipeline(spec: ModelSpec) -> bool:
    """Wan 2.1 / 2.2 A14B image-to-video: a Wan transformer taking more input channels than it
    outputs (latents + mask + condition latents), without TI2V's per-token timesteps."""
    tr = spec.components.get("transformer") or spec.components.get("transformer_2")
    if spec.family != "wan" or tr is None or spec.expand_timesteps:
        return False
    cin = int(tr.config.get("in_channels", 16))
    return cin > int(tr.config.get("out_channels") or cin)


def _image_mode(spec: ModelSpec, image, method: str) -> Optional[str]:
    """How the planned run takes its image (``plan(image=...)``): "condition" (Wan 2.1 / 2.2 A14B
    I2V: the VAE encoding of [image, zero frames] and a mask concatenated to every transformer
    input, plus, on Wan 2.1, the CLIP image tokens), "first_frame" (Wan 2.2 TI2V-5B's image mode:
    the image's latent frame in place of frame 0), or None (text to video). image None: what the
    pipeline needs (an I2V pipeline always takes an image, others none). ValueError naming the
    argument when the request cannot be planned."""
    if image is not None and not isinstance(image, bool):
        raise ValueError(f"image must be True, False or None, got {image!r}")
    condition = _is_condition_pipeline(spec)
    if image is None:
        image = condition
    if not image:
        if condition:
            raise ValueError(f"image=False: {spec.name} is an image-to-video pipeline ({spec.pipeline_class} with "
                             "mask and condition-latent input channels); its runs always take an image")
        return None
    if method not in IMAGE_METHODS:
        raise ValueError(f"image: method {method!r} is not planned with an image (image-to-video runs: "
                         f"{', '.join(IMAGE_METHODS)})" + (f"; {spec.name} is an image-to-video pipeline"
                                                           if condition else ""))
    if condition:
        return "condition"
    if spec.family == "wan" and spec.expand_timesteps and len(spec.denoisers) == 1:
        return "first_frame"
    raise ValueError(f"image: {spec.name} is a text-to-video model ({spec.family}); images are planned on Wan 2.1 "
                     "I2V, Wan 2.2 A14B I2V and Wan 2.2 TI2V-5B pipelines")


def _image_embeds_parts(spec: ModelSpec, dtype) -> list:
    """The CLIP image features a Wan 2.1 I2V run keeps for every transformer call (the image
    encoder's penultimate hidden states, (1, I, image_dim) in the transformer's dtype)."""
    tr = spec.components.get("transformer") or spec.components.get("transformer_2")
    n = _image_tokens(spec)
    dim = int(tr.config.get("image_dim") or 0) if tr is not None else 0
    if not (n and dim):
        return []
    return [Part("image embeddings (CLIP features, all calls)", n * dim * _itemsize(dtype), "state")]


def _image_encoder_phase(spec: ModelSpec, dtype, st: Settings, state=(), keep: tuple = ()) -> Phase:
    """Wan 2.1 I2V's image encoder on the image (``encode_image``): its weights (float32, as the
    loaders place it), the pixel values, the CLIP vision call (:func:`activations.clip_vision_call`)."""
    comp = spec.components["image_encoder"]
    e = _itemsize(spec.load_dtype("image_encoder", dtype))
    cfg = comp.config.get("vision_config", comp.config)
    size = int(cfg.get("image_size", 224))
    sim = Sim()
    A.clip_vision_call(sim, comp.config, 1, e)
    parts = _resident_weights(spec, dtype, st.offload, ["image_encoder"], keep=keep) + list(state)
    parts.append(Part("image encoder input (pixel values, float32)", 3 * size * size * 4, "state"))
    parts += _sim_parts(sim, "image encoder (CLIP vision) call")
    return Phase("image encode (CLIP vision)", parts, sim.peak_where)


def _condition_phase(spec: ModelSpec, dtype, device, st: Settings, frames: int, height: int, width: int,
                     first_frame: bool, state=(), keep: tuple = (), name: Optional[str] = None) -> Phase:
    """``WanImageToVideoPipeline.prepare_latents``: the VAE encode of the condition video (the image
    and ``frames - 1`` zero frames; TI2V: the image alone), the condition latents and mask
    (:func:`activations.wan_i2v_prepare_latents`), with the VAE's weights and what the run holds."""
    vae = spec.module("vae")
    tile = (256, 256, 192, 192) if st.vae_tiling else None      # AutoencoderKLWan.enable_tiling's defaults
    sim = Sim()
    A.wan_i2v_prepare_latents(sim, vae, 1, frames, height, width, first_frame, device,
                              _itemsize(spec.load_dtype("vae", dtype)), tile)
    parts = _resident_weights(spec, dtype, st.offload, ["vae"], keep=keep) + list(state)
    parts.append(Part("preprocessed image (float32)", 3 * height * width * 4, "state"))
    what = "image" if first_frame else "condition video"
    parts += _sim_parts(sim, f"VAE encode of the {what}")
    return Phase(name or ("image latents encode (VAE)" if first_frame else "condition encode (VAE)"), parts,
                 sim.peak_where)


def _condition_parts(spec: ModelSpec, dtype, image: str, F: int, h: int, w: int, batch: int = 1) -> list:
    """What an image-conditioned denoising step holds for its image, for F latent frames of h x w
    (batch: the transformer call's): "condition" -- the mask + condition latents (float32, (4 + z) channels, kept
    for every step) and the transformer's input cat([latents, mask, condition]) (2 z + 4 channels)
    in the transformer's dtype; "first_frame" -- the image's latent frame and the first-frame mask
    (float32, kept for every step) and the transformer's input (1 - m) c + m x (z channels) in the
    transformer's dtype (in float32 a new tensor where the text-to-video pipeline passes its
    latents as they are)."""
    z = int(spec.components["vae"].config.get("z_dim", 16))
    e = _itemsize(dtype)
    if image == "first_frame":
        return [Part("image latents + first-frame mask (float32, all steps)", (z + F) * h * w * 4, "state"),
                Part("transformer input: latents with the image's frame 0", batch * z * F * h * w * e, "state",
                     "(1 - mask) * image latents + mask * latents, cast to the transformer's dtype")]
    return [Part("condition: mask + condition latents (float32, all steps)", (4 + z) * F * h * w * 4, "state"),
            Part("transformer input: latents + mask + condition latents", batch * (2 * z + 4) * F * h * w * e,
                 "state", "cat of the float32 latents and the condition, cast to the transformer's dtype")]


def _vae_decode_sim(spec: ModelSpec, dtype, st: Settings, batch: int, frames_lat: int, h: int, w: int,
                    streamed: bool = False) -> Sim:
    """The VAE decode's activations. streamed (Wan VAEs, batch 1): longvideo.decode.decode_to, as
    the CLI decodes direct / FreeLOC / enhance videos (one latent frame per decoder call, one
    cache per tile, each chunk to the writer); otherwise the VAE's whole ``decode`` (a pipeline's
    own decode, output_type="np" from Python)."""
    sim = Sim()
    vae = spec.module("vae")
    if spec.components["vae"].class_name == "AutoencoderKLWan":
        tile = None
        if st.vae_tiling:
            s = _vae_scale(spec)[0]
            tile = (256 // s, 256 // s, 192 // s, 192 // s)
        if streamed:
            A.wan_vae_decode_streamed(sim, vae, batch, frames_lat, h, w, 4, tile=tile)
        else:
            A.wan_vae_decode(sim, vae, batch, frames_lat, h, w, 4, tile=tile)
    else:
        upcast = bool(spec.components["vae"].config.get("force_upcast")) and dtype == torch.float16
        e = _itemsize(torch.float32 if upcast else dtype)
        tile = None
        if st.vae_tiling:
            tile = int(spec.components["vae"].config.get("sample_size", 512)) // _vae_scale(spec)[0]
        A.kl_vae_decode(sim, vae, batch, h, w, e, slicing=st.vae_slicing, tile=tile)
    return sim


# ---------------------------------------------------------------------------------------------
# methods
def _wan_sizes(spec, height, width, num_frames):
    s, t = _vae_scale(spec)
    if height % (s * 2) or width % (s * 2):
        raise ValueError(f"height and width must be multiples of {2 * s} for {spec.name} (VAE x{s}, patch 2), "
                         f"got {height}x{width}")
    return (num_frames - 1) // t + 1, height // s, width // s


def _direct_phases(spec, dtype, device, st, height, width, num_frames, method, freeloc_layers, trained,
                   decode=True, semantics="official", cp=1, image=None, decode_mode="streamed"):
    F, h, w = _wan_sizes(spec, height, width, num_frames)
    e = _itemsize(dtype)
    cfg = spec.components["transformer"].config
    C = cfg.get("out_channels") or cfg.get("in_channels", 16)   # the latents' channels (I2V inputs are wider)
    phases = [_text_phase(spec, dtype, st)]
    embeds = [Part("prompt embeddings", 2 * 512 * _text_dim(spec) * e, "state")]
    image_state = []
    if image:
        # WanImageToVideoPipeline: the CLIP features of the image (Wan 2.1), then prepare_latents'
        # VAE encode of the condition video (TI2V: of the image), before the denoising loop
        image_state = _image_embeds_parts(spec, dtype)
        if image_state:
            phases.append(_image_encoder_phase(spec, dtype, st, embeds))
        phases.append(_condition_phase(spec, dtype, device, st, num_frames, height, width, image == "first_frame",
                                       embeds + image_state))
        image_state = image_state + [Part("preprocessed image (float32)", 3 * height * width * 4, "state")]
        image_state += _condition_parts(spec, dtype, image, F, h, w)
    # Wan 2.2 TI2V expands the timestep to every token (the CLI embeds it per run: frame-wise
    # modulation, processors/wan_modulation.py); SkyReels-V2's diffusion-forcing pipelines pass
    # one timestep per latent frame
    timestep = ("runs" if _WAN_FORWARD.get() == "longvideo" else "token") if spec.expand_timesteps else (
        "frame" if spec.family == "skyreels" and "DiffusionForcing" in spec.pipeline_class else "scalar")
    modes = None
    self_attn = "sdpa"
    if method == "freeloc":
        from ..methods.freeloc import derive_params, published_layer_config

        n = _wan_arch(spec).num_layers
        active = derive_params(F, trained) is not None
        if active:
            modes = list(freeloc_layers) if freeloc_layers else (published_layer_config(n) if n == 30 else ["vrpr"] * n)
            self_attn = "freeloc"
    lat = C * F * h * w
    # WanPipeline (text-to-video, TI2V's text mode) keeps mask = torch.ones(latents.shape) in
    # float32 from before the loop to the end of __call__ (its expand_timesteps path reads it)
    held_mask = [Part("timestep mask (float32, like the latents)", lat * 4, "state",
                      "WanPipeline's ones(latents.shape), alive to the end of the call")] if (
        spec.pipeline_class == "WanPipeline" and not image) else []
    for name in spec.denoisers:
        sim = _wan_call_sim(spec, dtype, device, 1, F, h, w, timestep, self_attn, modes=modes, name=name,
                            freeloc_semantics=semantics, context_parallel=cp)
        parts = _resident_weights(spec, dtype, st.offload, [name])
        parts += [Part("latents, noise predictions", 4 * lat * 4 + lat * e, "state",
                       "latents float32, the cond prediction kept during the uncond call, CFG combination")]
        parts += embeds + image_state + held_mask
        parts += _sim_parts(sim, f"{name} call (batch 1)" + (f", one of {cp} context-parallel ranks" if cp > 1 else ""))
        phases.append(Phase("denoise" if name == "transformer" else f"denoise ({name})", parts, sim.peak_where))
    if decode:
        if decode_mode == "streamed":
            # the CLI calls the pipeline with output_type="latent" and decodes after it returns:
            # only the returned latents are left (the pipeline's condition and mask died with it)
            held = []
        else:
            # the pipeline's own decode, inside __call__: its condition latents and mask still alive
            held = [p for p in image_state if p.name.startswith(("condition:", "image latents"))] + held_mask
        phases.append(_decode_phase(spec, dtype, st, 1, F, h, w,
                                    extra_state=[Part("latents", lat * 4, "state")] + held,
                                    streamed=decode_mode == "streamed"))
    return phases, dict(latent_frames=F, latent_hw=(h, w), tokens=_wan_arch(spec).tokens(F, h, w))


def _decode_phase(spec, dtype, st, batch, F, h, w, extra_state=(), images=None, streamed=False):
    upcast = bool(spec.components["vae"].config.get("force_upcast")) and dtype == torch.float16
    parts = _resident_weights(spec, dtype, st.offload, ["vae"], extra_fp32="vae" if upcast else None)
    parts += list(extra_state)
    streamed = streamed and spec.components["vae"].class_name == "AutoencoderKLWan"
    sim = _vae_decode_sim(spec, dtype, st, batch, F, h, w, streamed=streamed)
    parts += _sim_parts(sim, "VAE decode, streamed (longvideo.decode: one latent frame per call)" if streamed
                        else "VAE decode")
    return Phase("decode", parts, sim.peak_where)


def _fifo_phases(spec, dtype, device, st, height, width, num_frames, method, parts_on, trained,
                 guidance_impl="prefix", cp=1, image=None):
    fam = spec.family
    f = st.frames_per_window or spec.trained_latent_frames or trained or 16
    n = st.num_partitions
    w_ = f // 2
    c = f - w_
    L = 2 * n * w_
    e = _itemsize(dtype)
    phases = [_text_phase(spec, dtype, st, text_len=226 if fam in ("wan", "skyreels") else None,
                          keep=("vae",) if fam in ("wan", "skyreels") else ())]
    ouro = method == "ouroboros"
    tail, sacfa, guidance = parts_on
    processors = ouro and (sacfa or guidance)
    if fam in ("wan", "skyreels"):
        s, _ = _vae_scale(spec)
        h, w = height // s, width // s
        arch = _wan_arch(spec)
        C = arch.out_channels       # the queue's latent channels (an I2V transformer's input is wider)
        # FIFO runs longvideo's Wan forward (processors/wan_modulation.py: a frame's timestep
        # embedded once); wan_forward="diffusers": the per-token path (e.g. the H200 records)
        timestep = "frame" if fam == "skyreels" else ("runs" if _WAN_FORWARD.get() == "longvideo" else "token")
        # initial clip: the pipeline on f latent frames, CFG as two batch-1 calls, scalar timesteps
        # (FIFO encodes prompts with encode_prompt's default of 226 tokens and passes the embeddings on)
        # Ouroboros installs its processors before the clip: under context parallelism their
        # attention (inactive: no maps, no features) differs from Ulysses' dense processor
        clip_attn = "ouroboros" if processors and cp > 1 else "sdpa"
        sim0 = _wan_call_sim(spec, dtype, device, 1, f, h, w, "frame" if fam == "skyreels" else "scalar", clip_attn,
                             text_len=226, context_parallel=cp)
        keep = ("vae",)
        clip_image, image_state = [], []
        if image:
            # the image path (longvideo.methods.families.wan_i2v / wan22_ti2v): set_image's CLIP
            # features (Wan 2.1), then the initial clip sampled by WanImageToVideoPipeline from the
            # image -- its prepare_latents encodes the clip's condition video (TI2V: the image)
            emb = [Part("prompt embeddings (226 tokens, cond + uncond)", 2 * 226 * _text_dim(spec) * e, "state")]
            image_state = _image_embeds_parts(spec, dtype)
            if image_state:
                phases.append(_image_encoder_phase(spec, dtype, st, emb, keep=keep))
            first = image == "first_frame"
            phases.append(_condition_phase(
                spec, dtype, device, st, _vae_scale(spec)[1] * (f - 1) + 1, height, width, first,
                emb + image_state, keep=keep,
                name="initial clip: " + ("image latents encode (VAE)" if first else "condition encode (VAE)")))
            if not first:           # the family keeps the preprocessed image (ImageCondition)
                image_state = image_state + [Part("preprocessed image (float32)", 3 * height * width * 4, "state")]
            clip_image = image_state + _condition_parts(spec, dtype, image, f, h, w)
        for name in spec.denoisers:     # Wan 2.2 A14B: WanPipeline samples the clip on both experts
            if name != "transformer":
                sim0 = _wan_call_sim(spec, dtype, device, 1, f, h, w, "scalar", clip_attn, text_len=226,
                                     context_parallel=cp, name=name)
            p0 = _resident_weights(spec, dtype, st.offload, [name], keep=keep) + clip_image + _sim_parts(
                sim0, f"{name} call (batch 1)")
            phases.append(Phase("initial clip" + ("" if name == "transformer" else f" ({name})"), p0,
                                sim0.peak_where))
        feature_layers = tuple(f"blocks.{i}.attn1.processor" for i in range(max(1, arch.num_layers // 4)))
        lat_frame = C * h * w
        state = [Part("FIFO queue + context (float32)", (L + c) * lat_frame * 4, "state"),
                 Part("iteration buffers", (2 * (L + c) + 8 * f) * lat_frame * 4 + 4 * 226 * _text_dim(spec) * e,
                      "state", "new queue, window cat, CFG inputs/outputs, text embeddings")]
        if processors:
            state.append(Part("Ouroboros subject maps", 2 * (L + c) * h * w * 4, "state"))
        # the causal VAE's cache of the stream, alive across iterations: decode two frames to reach
        # the steady state (two frames cached per causal conv), then measure the third
        dsim = Sim()
        vae = spec.module("vae")
        cache = A.WanDecoderCache()
        for _ in range(2):
            out, _ = A.wan_vae_decode_chunk(dsim, vae, 1, 1, h, w, 4, cache)
            dsim.free(out)
        base = dsim.current
        dsim.peak = base
        out, _ = A.wan_vae_decode_chunk(dsim, vae, 1, 1, h, w, 4, cache)
        decode_peak = dsim.peak - base
        cache_bytes = cache.nbytes
        vae_w = "vae"
        cache_part = Part("VAE decoder cache (stream state)", cache_bytes, "state",
                          "two frames of every causal conv's input, kept between iterations")
        # Wan 2.2 A14B: a window's frames go to the expert of their timestep, one expert call at a
        # time (longvideo.methods.families.wan22); the bound is a whole window on either expert
        # (expert_routing "select"; "split" calls each expert on a sub-window), with that expert's
        # weights on the device under model / group / sequential offload and its own widths. Each
        # expert carries Ouroboros' processors and its own part of the subject bank ((H, D) per
        # feature layer, negligible next to the maps).
        # two experts: each expert's guided output is its conditional call, then its unconditional
        # call (two batch-1 calls, as WanPipeline; families/wan22.py expert_output) with the
        # conditional output kept; one expert: FIFO's CFG-batched call (batch 2)
        experts = len(spec.denoisers) > 1
        cfg_batch, cfg_label = (1, "batch 1, CFG as two calls") if experts else (2, "batch 2, CFG")
        if experts:
            state.append(Part("conditional output (kept during the unconditional call)", C * f * h * w * 4, "state"))
        stream = None
        if image == "condition":
            # Wan 2.1 / 2.2 A14B I2V: every window's frames get their mask + condition latents
            # (families/wan_i2v.py ImageCondition), encoded as a stream -- the image, then 4 zero
            # frames per encoder call, the causal cache carried -- frame by frame as the windows
            # reach them, until a frame's encoding and cache repeat the previous ones: the encoder
            # cache lives across iterations until then (the receptive field of the encoder's causal
            # convs spans many latent frames, so a long while), with the frames computed and not yet
            # released (at most the queue's)
            ssim = Sim()
            ecache = A.WanDecoderCache()
            for frames in (1, 4):
                ssim.free(A.wan_vae_encode_stream_step(ssim, vae, 1, frames, height, width, 4, ecache))
            base = ssim.current
            ssim.peak = base
            ssim.free(A.wan_vae_encode_stream_step(ssim, vae, 1, 4, height, width, 4, ecache))
            state += image_state + [
                Part("VAE encoder cache (streamed condition)", ecache.nbytes, "state",
                     "the last frames of every causal conv's input, until the zero frames' encoding repeats"),
                Part("condition latent frames (streamed, float32)", (L + c) * C * h * w * 4, "state")]
            stream = Phase("condition encode (streamed)", _resident_weights(spec, dtype, st.offload, ["vae"], keep=keep)
                           + list(state) + [cache_part, Part(
                               "VAE encode of 4 zero frames (one streamed step)", ssim.peak - base, "activations",
                               "the cache entries it replaces kept until it returns")])
            win = cfg_batch * (2 * C + 4) * f * h * w
            state.append(Part("window input: latents + mask + condition latents (float32)", win * 4, "state",
                              "cat([x, condition]) of the window's frames"))
            if e != 4:
                state.append(Part("window input in the transformer's dtype", win * e, "state"))
        guided = []
        for name in spec.denoisers:
            sfx = "" if name == "transformer" else f" ({name})"
            earch = _wan_arch(spec, name)
            sim = _wan_call_sim(spec, dtype, device, cfg_batch, f, h, w, timestep,
                                "ouroboros" if processors else "sdpa",
                                feature_layers=feature_layers if (ouro and guidance) else (), record_maps=processors,
                                text_len=226, context_parallel=cp, name=name)
            it_parts = _resident_weights(spec, dtype, st.offload, [name], keep=keep) + state + [cache_part]
            it_parts += _sim_parts(sim, f"{name} call ({cfg_label})")
            phases.append(Phase("iteration" + sfx, it_parts, sim.peak_where))
            if not (ouro and guidance):
                continue
            g_parts = _resident_weights(spec, dtype, st.offload, [name], keep=keep) + state + [
                Part("VAE decoder cache (stream state)", cache_bytes, "state")]
            if guidance_impl == "whole_call":
                gsim = _wan_call_sim(spec, dtype, device, cfg_batch, f, h, w, timestep, "ouroboros", grad=True,
                                     feature_layers=feature_layers, record_maps=True, text_len=226, name=name,
                                     context_parallel=cp)
                X = 2 * earch.tokens(f, h, w) // cp * earch.dim
                g_parts += _sim_parts(gsim, f"guided {name} call with autograd (whole CFG call)")
                g_parts.append(Part("backward through the feature layers", 3 * X * 4, "activations",
                                    "coarse: three float32 (B, S, d) gradients"))
                guided.append(Phase("guided window" + sfx, g_parts, gsim.peak_where))
            else:
                k = len(feature_layers)
                gsim = Sim(grad=True, frozen=True)
                res = A.wan_guidance_pass(gsim, earch, A.WanCall(
                    batch=1, frames=f, height=h, width=w, text_len=226, itemsize=e, timestep=timestep,
                    self_attn="ouroboros", use_op=True, feature_layers=feature_layers, stop_after=k - 1,
                    context_parallel=cp), device)
                ph = _guided_window_phase(
                    g_parts, gsim, res, f"guidance pass through {name} (conditional half, blocks 0-{k - 1}, autograd)",
                    sim, f"window {name} call ({cfg_label}, no autograd)", C * f * h * w * 4,
                    f"blocks.{k - 1}.attn1 ({k} of {earch.num_layers} blocks)")
                ph.name += sfx
                guided.append(ph)
        dec_parts = _resident_weights(spec, dtype, st.offload, [vae_w], keep=keep) + state
        dec_parts.append(Part("VAE decoder cache (stream state)", cache_bytes, "state"))
        dec_parts.append(Part("VAE decode of one latent frame", max(0, decode_peak), "activations"))
        t = _vae_scale(spec)[1]
        dec_parts.append(Part("decoded frames to uint8", 4 * t * 3 * height * width * 4, "activations",
                              "clamp, (x + 1) / 2, clamp of the frames out (float32)"))
        phases.append(Phase("decode", dec_parts))
        if stream is not None:
            phases.append(stream)
        phases += guided
        sizes = dict(window=f, partitions=n, queue=L, latent_hw=(h, w), tokens_per_window=arch.tokens(f, h, w))
        return phases, sizes
    # AnimateDiff
    unet = spec.module("unet")
    s, _ = _vae_scale(spec)
    h, w = height // s, width // s
    C = unet.config.in_channels
    sim0 = Sim()
    A.unet_call(sim0, unet, A.UNetCall(2, h, w, spec.text_len, e, frames=f))
    phases.append(Phase("initial clip", _resident_weights(spec, dtype, st.offload, ["unet"]) +
                        _sim_parts(sim0, "UNet call (CFG batch 2)"), sim0.peak_where))
    procs, maps, feats = {}, frozenset(), {}
    if processors:
        for name, _ in _self_attn_layers(unet):
            procs[name] = {"kind": "ouroboros"}
        maps = frozenset(n.replace("attn1", "attn2") for n in procs)
    if ouro and guidance:
        # the feature layers (fifo_ouroboros.default_feature_layers): the down path's spatial
        # self-attention layers; the windows that record them (the bank's, the guided) hold their keys
        feats = {n: {"kind": "ouroboros", "feature": True} for n in procs if n.startswith("down_blocks")}
        if not feats and procs:
            first = next(iter(procs))
            feats = {first: {"kind": "ouroboros", "feature": True}}
    sim = Sim()
    A.unet_call(sim, unet, A.UNetCall(2, h, w, spec.text_len, e, frames=f, processors={**procs, **feats},
                                      cross_maps=maps))
    state = [Part("FIFO queue + context (float32)", (L + c) * C * h * w * 4, "state"),
             Part("iteration buffers", (2 * (L + c) + 8 * f) * C * h * w * 4, "state")]
    parts = _resident_weights(spec, dtype, st.offload, ["unet"]) + state + _sim_parts(sim, "UNet call (CFG batch 2)")
    phases.append(Phase("iteration", parts, sim.peak_where))
    phases.append(_decode_phase(spec, dtype, st, 1, 1, h, w, extra_state=state))
    if ouro and guidance:
        gp = _resident_weights(spec, dtype, st.offload, ["unet"]) + state
        if guidance_impl == "whole_call":
            g = Sim(grad=True)
            A.unet_call(g, unet, A.UNetCall(2, h, w, spec.text_len, e, frames=f, processors={**procs, **feats},
                                            cross_maps=maps))
            gp += _sim_parts(g, "guided call with autograd (whole CFG call)")
            phases.append(Phase("guided window", gp, g.peak_where))
        else:
            stop = list(feats)[-1]                      # the walk's (and the module tree's) order
            g = Sim(grad=True, frozen=True)
            res = A.unet_guidance_pass(g, unet, A.UNetCall(1, h, w, spec.text_len, e, frames=f,
                                                           processors={**procs, **feats}, stop_after=stop))
            phases.append(_guided_window_phase(
                gp, g, res, "guidance pass (conditional half, down path, autograd)", sim,
                "window call (CFG batch 2, no autograd)", C * f * h * w * 4, stop))
    return phases, dict(window=f, partitions=n, queue=L, latent_hw=(h, w))


def _guided_window_phase(base: list, gsim: Sim, res: dict, pass_label: str, wsim: Sim, call_label: str,
                         grad_bytes: int, stop: str) -> Phase:
    """Ouroboros' guided window (FIFODiffusion._ouroboros_window with _guidance_gradient): first the
    guidance pass (gsim: the conditional half with autograd, parameters frozen, stopped after the
    last feature layer `stop`, and its backward), then the window's CFG call without autograd
    (wsim, the iteration's call with the feature layers recorded) while the gradient (the window's
    latents, float32) is alive. The phase's breakdown is the larger of the two; ``detail`` has both."""
    call_peak = wsim.peak + grad_bytes
    if gsim.peak >= call_peak:
        parts = base + _sim_parts(gsim, pass_label)
        where = f"guidance pass: {gsim.peak_where}"
    else:
        parts = base + [Part("guidance gradient (the window's latents, float32)", grad_bytes, "activations",
                             "alive through the window's call")] + _sim_parts(wsim, call_label)
        where = f"the window's CFG call after the guidance pass: {wsim.peak_where}"
    detail = {"guidance pass": gsim.peak, "guidance pass forward": res["forward"],
              "guidance pass graph": res["graph"], "guidance pass backward": res["backward"],
              "window call": call_peak, "stop": stop}
    return Phase("guided window", parts, where, detail)


def _self_attn_layers(unet) -> list:
    from diffusers.models.attention_processor import Attention

    out = []
    for name, m in unet.named_modules():
        if isinstance(m, Attention) and name.endswith("attn1") and not any(t in name for t in ("motion", "temporal")):
            out.append((name, m))
    return out


def _bank_bytes(cfg, steps, id_length, height, width, sampling_rate, characters, dtype, s, start_step, schedule):
    """The method's own projection (longvideo.methods.storydiffusion.project_bank_bytes), called with
    the keyword arguments its installed version accepts."""
    import inspect

    from ..methods.storydiffusion import project_bank_bytes

    params = inspect.signature(project_bank_bytes).parameters
    kw = dict(num_inference_steps=steps, id_length=id_length, height=height, width=width,
              sampling_rate=sampling_rate, characters=characters, dtype=dtype, vae_scale_factor=s)
    if start_step is not None:
        kw["start_step"] = start_step
    if "schedule" in params and schedule is not None:
        kw["schedule"] = schedule
    return int(project_bank_bytes(cfg, **{k: v for k, v in kw.items() if k in params}))


def _story_phases(spec, dtype, device, st, height, width, id_length, steps, sampling_rate, start_step,
                  characters, read_images, gpu_memory, kernel, schedule, decode=True):
    import re

    unet = spec.module("unet")
    e = _itemsize(dtype)
    s, _ = _vae_scale(spec)
    h, w = height // s, width // s
    cfg = dict(spec.components["unet"].config)
    bank = lambda n: _bank_bytes(cfg, n, id_length, height, width, sampling_rate, characters, dtype, s,  # noqa: E731
                                 start_step, schedule) if n > 0 else 0
    bank_total = bank(steps)
    last_step = (bank_total - bank(steps - 1)) // max(1, characters)
    first_step = bank(1) // max(1, characters)
    full_early = schedule in (None, "official_app") and first_step > 0 and first_step >= last_step
    per_step_max = max(first_step, last_step)
    phases = [_text_phase(spec, dtype, st, batch=id_length)]
    budget = st.bank_budget if st.bank_budget is not None else (int(0.10 * gpu_memory) if gpu_memory else None)
    loc = st.bank_location
    if loc == "auto" and budget is None:
        loc = "device"

    def on_device(total):
        return total if loc == "device" else (min(total, budget) if loc == "auto" else 0)

    layers = [(n, m) for n, m in _self_attn_layers(unet) if n.startswith("up_blocks")]
    levels = len(unet.config.block_out_channels)

    def tokens_at(name):
        i = int(re.match(r"up_blocks\.(\d+)", name).group(1))
        hh, ww = h, w
        for _ in range(levels - 1 - i):
            hh, ww = (hh + 1) // 2, (ww + 1) // 2
        return hh * ww

    # write call: 2 groups (CFG) of id_length images; its last step, with every earlier entry stored
    procs = {}
    for name, _ in layers:
        E = int(round(sampling_rate * id_length * tokens_at(name)))
        procs[name] = {"kind": "dense_mask" if kernel == "dense_mask" else "consistent", "group": id_length,
                       "groups": 2, "write_tokens": E}
    sim = Sim()
    A.unet_call(sim, unet, A.UNetCall(2 * id_length, h, w, spec.text_len, e, processors=procs))
    earlier = bank_total - last_step
    wparts = _resident_weights(spec, dtype, st.offload, ["unet"])
    wparts.append(Part(f"id bank on the device ({loc})", on_device(earlier), "state",
                       f"{format_bytes(bank_total)} in all (storydiffusion.project_bank_bytes)"))
    xdim = int(unet.config.cross_attention_dim if isinstance(unet.config.cross_attention_dim, int)
               else max(unet.config.cross_attention_dim))
    wparts.append(Part("latents, embeddings", 3 * 2 * id_length * unet.config.in_channels * h * w * e
                       + 2 * id_length * 77 * xdim * e, "state"))
    tags = dict(sim.peak_tags)
    this_call = tags.pop("id bank", 0)
    if loc == "cpu":
        wparts.append(Part("bank entries of this step, before the copy to the host", this_call, "state"))
    elif on_device(earlier + this_call) > on_device(earlier):
        wparts.append(Part("id bank entries of this step", on_device(earlier + this_call) - on_device(earlier),
                           "state"))
    sim.peak_tags = tags
    wparts += _sim_parts(sim, f"UNet call (batch {2 * id_length})")
    phases.append(Phase("write", wparts, sim.peak_where))
    # read call: batch 2; every patched layer attends to its bank rows (all id tokens on the
    # official app's early "full" steps, the sampled ones after)
    rprocs = {}
    for name, _ in layers:
        N = tokens_at(name)
        E = id_length * N if full_early else int(round(sampling_rate * id_length * N))
        rprocs[name] = {"kind": "consistent", "groups": 2, "bank_tokens": E}
    rsim = Sim()
    A.unet_call(rsim, unet, A.UNetCall(2, h, w, spec.text_len, e, processors=rprocs))
    rparts = _resident_weights(spec, dtype, st.offload, ["unet"])
    rparts.append(Part(f"id bank on the device ({loc})", on_device(bank_total) if loc != "cpu" else 2 * per_step_max,
                       "state", "cpu: the step in use and the one prefetched" if loc == "cpu" else ""))
    rparts += _sim_parts(rsim, "UNet call (batch 2)")
    phases.append(Phase("read", rparts, rsim.peak_where))
    if decode:
        phases.append(_decode_phase(spec, dtype, st, id_length, 1, h, w, extra_state=[
            Part(f"id bank on the device ({loc})", on_device(bank_total), "state")]))
    return phases, dict(latent_hw=(h, w), bank_bytes=bank_total, id_length=id_length, read_images=read_images,
                        steps=steps, schedule=schedule or "official_app")


def _enhance_phases(spec, dtype, device, st, height, width, num_frames, chunk_frames, overlap_frames,
                    decode_mode="streamed"):
    from ..methods.blending import chunk_starts, latent_sizes

    s, t = _vae_scale(spec)
    h, w = height // s, width // s
    padded = num_frames if (num_frames - 1) % t == 0 else num_frames + (t - (num_frames - 1) % t)
    Lat = (padded - 1) // t + 1
    chunk, overlap = latent_sizes(chunk_frames, overlap_frames, t, True)
    chunk = min(chunk, Lat)
    starts = chunk_starts(Lat, chunk, overlap)
    n = len(starts)
    bs = st.chunk_batch or n
    e = _itemsize(dtype)
    C = spec.components["transformer"].config.get("in_channels", 16)
    lat = C * Lat * h * w
    phases = [_text_phase(spec, dtype, st)]
    # encode: approximated by one steady-state decode chunk at the same size plus the input video
    vae = spec.module("vae")
    esim = Sim()
    cache = A.WanDecoderCache()
    A.wan_vae_decode_chunk(esim, vae, 1, 1, h, w, 4, cache)
    A.wan_vae_decode_chunk(esim, vae, 1, 1, h, w, 4, cache)
    enc = esim.peak
    video = 3 * padded * height * width * 4
    phases.append(Phase("encode", _resident_weights(spec, dtype, st.offload, ["vae"]) + [
        Part("input video (float32)", video, "state"),
        Part("VAE encode (approximated by a decode step of the same size)", enc, "activations", "not mirrored")]))
    state = [Part("latents, noise, x0 (float32)", 3 * lat * 4, "state"),
             Part("chunk outputs (float32)", n * C * chunk * h * w * 4 * 2 + bs * C * chunk * h * w * (4 + e),
                  "state", "model outputs of the step's chunks, the cond output during the uncond call")]
    # Wan 2.2 A14B: each SDEdit step runs on the expert of its timestep (families/wan22.py), one
    # expert at a time; a denoise phase per expert, with its weights and widths
    for name in spec.denoisers:
        sim = _wan_call_sim(spec, dtype, device, bs, chunk, h, w, "scalar", name=name)
        parts = _resident_weights(spec, dtype, st.offload, [name]) + state + _sim_parts(
            sim, f"{name} call (batch {bs} chunks)")
        phases.append(Phase("denoise" if name == "transformer" else f"denoise ({name})", parts, sim.peak_where))
    phases.append(_decode_phase(spec, dtype, st, 1, Lat, h, w, extra_state=[Part("latents", lat * 4, "state")],
                                streamed=decode_mode == "streamed"))
    return phases, dict(latent_frames=Lat, chunk_latent=chunk, overlap_latent=overlap, chunks=n, chunk_batch=bs,
                        latent_hw=(h, w))


# ---------------------------------------------------------------------------------------------
# time from the benchmark records
_RECORD_SHAPES = {
    # the model shapes of the recorded suites (benchmarks/bench_*.py): Wan2.1-1.3B widths
    "fifo": dict(heads=12, head_dim=128, ffn=8960), "freeloc": dict(heads=12, head_dim=128, ffn=8960),
    "blending": dict(heads=12, head_dim=128, ffn=8960),
}


# the records' file stamp (UTC) from which a guided window runs the guidance pass (commit 43ed084,
# "Ouroboros self-recurrent guidance in a fraction of the memory"); earlier records ran the whole call
_GUIDANCE_PASS_SINCE = "20261130T000408"


def _records_dir() -> Path:
    env = os.environ.get("LONGVIDEO_RESULTS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _load_records(suite: str, directory: Optional[Path] = None) -> list:
    d = Path(directory) if directory is not None else _records_dir()
    rows = []
    if not d.is_dir():
        return rows
    for p in sorted(d.glob(f"{suite}_*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        for c in rec.get("cases", []):
            if c.get("median_ms") is not None:
                rows.append((p.name, rec.get("environment", {}).get("device", "?"), c))
    return rows


def _wan_shape_matches(spec, suite) -> bool:
    if spec.family not in ("wan",) or "transformer" not in spec.components:
        return False
    a = _wan_arch(spec)
    ref = _RECORD_SHAPES[suite]
    return a.heads == ref["heads"] and a.head_dim == ref["head_dim"] and a.ffn_dim == ref["ffn"]


def _time(method, spec, sizes, height, width, num_frames, dtype, parts_on, st, records=None, id_length=4,
          read_images=2, steps=None, chunk_frames=24, overlap_frames=8, guidance_impl="prefix"):
    """(TimeEstimate or None, note)."""
    if dtype != torch.bfloat16 and method != "story":
        return None, "the records ran bfloat16"
    if method in ("fifo", "ouroboros"):
        if not _wan_shape_matches(spec, "fifo"):
            return None, "FIFO records exist for the Wan2.1-1.3B shape only"
        if spec.family != "wan":
            return None, "FIFO records exist for Wan only"
        f, n = sizes["window"], sizes["partitions"]
        name = f"iteration_f{f}_n{n}_{width}x{height}"
        if method == "fifo":
            impl = "fifo"
        else:
            tail, sacfa, guidance = parts_on
            impl = "ouroboros:all" if (tail and sacfa and guidance) else (
                "ouroboros:guidance" if guidance and not tail and not sacfa else
                "ouroboros:sacfa" if sacfa and not tail and not guidance else
                "ouroboros:tail" if tail and not sacfa and not guidance else None)
            if impl is None:
                return None, "no record for this combination of Ouroboros parts"
        rows = [r for r in _load_records("fifo", records) if r[2]["name"] == name and r[2]["impl"] == impl]
        if not rows:
            return None, f"no fifo record for case {name} impl {impl}"
        rows.sort(key=lambda r: r[0])
        fname, dev, c = rows[-1]
        blocks = int(c["params"].get("transformer_blocks", 0) or 0)
        layers = _wan_arch(spec).num_layers
        sec = c["median_ms"] / 1000.0
        note = f"{dev}"
        scaled = bool(blocks and blocks != layers)
        if scaled:
            sec *= layers / blocks
            note += (f"; the record ran {blocks} of the model's {layers} blocks: scaled by {layers}/{blocks} "
                     "(the time per block is constant at fixed widths)")
        note += "; one iteration = one latent frame out = 4 video frames"
        if method == "ouroboros" and parts_on[2] and guidance_impl != "whole_call":
            stamp = fname.rsplit("_", 1)[-1].split(".")[0]
            if not (len(stamp) == 15 and stamp[8] == "T") or stamp < _GUIDANCE_PASS_SINCE:
                note += ("; the record's guided window ran the whole CFG call with autograd (the implementation "
                         "before the guidance pass, recorded before it): the current guided window (a partial "
                         "conditional-half pass with autograd, its backward, then the usual call without autograd) "
                         "is not timed by it")
        return TimeEstimate(sec, "FIFO iteration", fname, name, impl, note, scaled), ""
    if method in ("freeloc", "direct"):
        if not _wan_shape_matches(spec, "freeloc"):
            return None, "FreeLOC/direct records exist for the Wan2.1-1.3B shape only"
        name = f"{height}x{width}_{num_frames}f"
        impl = "freeloc[longvideo]" if method == "freeloc" else "dense_sdpa"
        rows = [r for r in _load_records("freeloc", records) if r[2]["name"] == name and r[2]["impl"] == impl
                and r[2]["params"].get("layers") == _wan_arch(spec).num_layers]
        if not rows:
            return None, f"no freeloc record for case {name} impl {impl}"
        fname, dev, c = sorted(rows, key=lambda r: r[0])[-1]
        fwd = c["median_ms"] / 1000.0
        return TimeEstimate(2 * fwd, "denoising step (2 transformer forwards: CFG)", fname, name, impl,
                            f"{dev}; the record times one forward ({fwd:.3f} s), the pipeline runs two per step"), ""
    if method == "story":
        if spec.family != "sdxl" or (height, width) != (1024, 1024):
            return None, "the story record is SDXL at 1024x1024"
        rows = [r for r in _load_records("storydiffusion", records) if r[2]["impl"] == "longvideo[auto]"]
        rows = [r for r in rows if r[2]["params"].get("id_images") == id_length
                and r[2]["params"].get("read_images") == read_images]
        if not rows or dtype != torch.float16:
            return None, f"no story record with {id_length} id and {read_images} read images in float16"
        fname, dev, c = sorted(rows, key=lambda r: r[0])[-1]
        rsteps = int(c["params"]["steps"])
        return TimeEstimate(c["median_ms"] / 1000.0 / rsteps, "denoising step of the whole story (all calls)",
                            fname, c["name"], c["impl"],
                            f"{dev}; the record's story of {id_length + read_images} images took "
                            f"{c['median_ms'] / 1000:.2f} s for {rsteps} steps, consistent attention on every call "
                            f"from step {c['params'].get('start_step')} (probability {c['params'].get('probability')}); "
                            "a schedule with plain-attention calls spends less per step"), ""
    if method == "enhance":
        if not _wan_shape_matches(spec, "blending"):
            return None, "blending records exist for the Wan2.1-1.3B shape only"
        rows = [r for r in _load_records("blending", records) if r[2]["name"] == "step" and r[2]["impl"] == "blend_x0"]
        rows = [r for r in rows if r[2]["params"].get("frames") == num_frames
                and r[2]["params"].get("size") == f"{width}x{height}"
                and r[2]["params"].get("chunk") == chunk_frames and r[2]["params"].get("overlap") == overlap_frames]
        if not rows:
            return None, (f"no blending record for {num_frames} frames at {width}x{height}, "
                          f"chunk {chunk_frames}/{overlap_frames}")
        fname, dev, c = sorted(rows, key=lambda r: r[0])[-1]
        return TimeEstimate(c["median_ms"] / 1000.0, "solver step over all chunks (2 calls per chunk: CFG)",
                            fname, c["name"], c["impl"], f"{dev}"), ""
    return None, ""


# ---------------------------------------------------------------------------------------------
def _phases(method, spec, dtype, device, st, height, width, num_frames, opts):
    if method in ("direct", "freeloc"):
        if spec.family not in ("wan", "skyreels"):
            raise ValueError(f"method {method!r} needs a Wan-family model, got {spec.family}")
        return _direct_phases(spec, dtype, device, st, height, width, num_frames, method, opts["freeloc_layers"],
                              opts["trained"] or spec.trained_latent_frames or 21, opts["decode"],
                              opts["freeloc_semantics"], opts["context_parallel"], image=opts["image"],
                              decode_mode=opts["decode_mode"])
    if method in ("fifo", "ouroboros"):
        if spec.family not in ("wan", "skyreels", "animatediff"):
            raise ValueError(f"method {method!r} needs a Wan, SkyReels-V2 or AnimateDiff model, got {spec.family}")
        if opts["context_parallel"] > 1:
            if spec.family not in ("wan",):
                raise ValueError(f"context_parallel is modelled for Wan transformers, got {spec.family}")
        return _fifo_phases(spec, dtype, device, st, height, width, num_frames, method, opts["parts"], opts["trained"],
                            opts["guidance_impl"], opts["context_parallel"], image=opts["image"])
    if opts["context_parallel"] > 1:
        raise ValueError(f"context_parallel is modelled for direct, freeloc, fifo and ouroboros on Wan, not {method!r}")
    if method == "story":
        if spec.family not in ("sd15", "sdxl"):
            raise ValueError(f"method 'story' needs an SD1.5 or SDXL model, got {spec.family}")
        return _story_phases(spec, dtype, device, st, height, width, opts["id_length"], opts["steps"],
                             opts["sampling_rate"], opts["start_step"], opts["characters"], opts["read_images"],
                             opts["gpu_memory"], opts["story_kernel"], opts["schedule"], opts["decode"])
    if method == "enhance":
        if spec.family not in ("wan",):
            raise ValueError(f"method 'enhance' is planned for Wan pipelines, got {spec.family}")
        return _enhance_phases(spec, dtype, device, st, height, width, num_frames, opts["chunk_frames"],
                               opts["overlap_frames"], opts["decode_mode"])
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _notes(method, spec, p: Plan, opts) -> list:
    notes = []
    if method in ("fifo", "ouroboros"):
        q = next((x.nbytes for ph in p.phases for x in ph.parts if x.name.startswith("FIFO queue")), 0)
        notes.append(f"num_partitions n only sizes the queue (2 n floor(f/2) latent frames: {format_bytes(q)} here); "
                     "the window f sets the per-call activations")
    if method == "ouroboros" and opts["parts"][2]:
        try:
            g = p.phase("guided window")
        except KeyError:
            g = None
        if g is not None:
            others = max(ph.nbytes for ph in p.phases if not ph.name.startswith("guided window"))
            if opts["guidance_impl"] == "whole_call":
                graph = sum(x.nbytes for x in g.parts if x.name.startswith("guided ") and "call with autograd" in x.name)
                notes.append(f"guidance_impl='whole_call' (the implementation before the guidance pass, as the "
                             f"benchmark records ran it): the whole CFG-batched guided window call with autograd "
                             f"({format_bytes(graph)} of activations); without guidance the peak would be "
                             f"{format_bytes(others)}")
            else:
                d = g.detail
                fb = format_bytes
                notes.append(
                    f"self-recurrent guidance: the guided window first runs the guidance pass -- the conditional "
                    f"half alone with autograd, parameters frozen, stopped right after the last feature layer "
                    f"({d['stop']}) -- {fb(d['guidance pass'])} of activations at its peak (forward "
                    f"{fb(d['guidance pass forward'])}, graph kept for the backward {fb(d['guidance pass graph'])}, "
                    f"backward {fb(d['guidance pass backward'])}, coarse); then the window's usual CFG call without "
                    f"autograd, {fb(d['window call'])} with the gradient; the phase's peak is the larger, the "
                    f"{'guidance pass' if d['guidance pass'] >= d['window call'] else 'window call'}. "
                    f"Without guidance the peak would be {fb(others)}")
    if method in ("direct", "freeloc", "enhance") and any(ph.name == "decode" for ph in p.phases) and \
            spec.components["vae"].class_name == "AutoencoderKLWan":
        notes.append("decode: streamed, as `longvideo generate` / `enhance` run it (longvideo.decode: one latent frame "
                     "per VAE decoder call with its causal cache, each chunk written before the next; flat in the "
                     "length)" if opts["decode_mode"] == "streamed" else
                     "decode: the VAE's whole decode (decode='whole': a pipeline's own output_type='np' decode); "
                     "the CLI streams it (decode='streamed')")
    notes.append("not modelled: the CUDA context, cuDNN/cuBLAS workspaces, allocator rounding and fragmentation "
                 "(see headroom), host memory (offloaded weights, pinned id banks)")
    return notes


def _candidates(method: str, spec: ModelSpec, base: Settings) -> list:
    """Settings to try, fastest first, each with the reason it costs time over the one before.
    The order is a ranking from what each option does (no offload timings are recorded)."""
    out = [(base, "everything resident: no transfers")]
    if method in ("fifo", "ouroboros"):
        vae = base                      # FIFO decodes one latent frame at a time: tiling and slicing do not apply
    elif spec.family in ("sd15", "sdxl", "animatediff"):
        vae = replace(base, vae_slicing=True, vae_tiling=True)
        out.append((replace(base, vae_slicing=True), "VAE slicing: one image at a time, decode slightly slower"))
        out.append((vae, "VAE slicing + tiling: the decode in tiles, a few % slower"))
    else:
        vae = replace(base, vae_tiling=True)
        out.append((vae, "VAE tiling: the decode in 256 px tiles (stride 192), a few % slower decode"))
    cur = vae
    if method == "story":
        cur = replace(cur, bank_location="cpu")
        out.append((cur, "id bank in pinned host memory, a step prefetched ahead (overlapped with compute)"))
    cur = replace(cur, offload="text")
    out.append((cur, "text encoder(s) on the device only while encoding (one transfer per run), the rest resident"))
    if method == "enhance":
        cur = replace(cur, chunk_batch=1)
        out.append((cur, "one chunk per transformer call: the same work in more, smaller calls"))
    fifo_wan = method in ("fifo", "ouroboros") and spec.family in ("wan", "skyreels")
    if not fifo_wan:
        out.append((replace(cur, offload="model"),
                    "model offload: each component moved to the device when it is used (one transfer per phase)"))
    out.append((replace(cur, offload="group"),
                "group offload (block-level, streamed): the denoiser's weights cross PCIe on every model call"
                + (" (FIFO on Wan: transformer and text encoder only; FIFO calls vae.decoder directly, which the "
                   "offload hooks on the VAE component do not see, so the VAE stays resident and model offload "
                   "is not offered)" if fifo_wan else "")))
    out.append((replace(cur, offload="sequential"), "sequential offload: one module's weights at a time, the slowest"))
    if method in ("fifo", "ouroboros"):
        f0 = base.frames_per_window or spec.trained_latent_frames or 16
        for f in sorted({max(2, f0 * 3 // 4), max(2, f0 // 2)}, reverse=True):
            if f < f0:
                out.append((replace(cur, offload="group", frames_per_window=f),
                            f"window {f} instead of {f0} latent frames: fewer tokens per call, but CHANGES THE OUTPUT "
                            f"(the model was trained on {f0})"))
    return out


def plan(method: str, model, height: Optional[int] = None, width: Optional[int] = None,
         num_frames: Optional[int] = None, dtype="bfloat16", *, gpu_memory=None, device: str = "cuda",
         offload: str = "none", vae_tiling: bool = False, vae_slicing: bool = False,
         frames_per_window: Optional[int] = None, num_partitions: int = 4, tail: bool = True, sacfa: bool = True,
         guidance: bool = True, freeloc_layers=None, trained_frames: Optional[int] = None,
         id_length: int = 4, num_inference_steps: int = 50, sampling_rate: float = 0.5,
         start_step: Optional[int] = None, schedule: Optional[str] = "official_app", characters: int = 1,
         read_images: int = 2, bank_location: str = "auto", bank_budget=None,
         story_kernel: str = "consistent", chunk_frames: int = 24, overlap_frames: int = 8,
         chunk_batch: Optional[int] = None, output_type: str = "np", headroom: float = 0.05,
         records=None, guidance_impl: str = "prefix", freeloc_semantics: str = "official",
         context_parallel: int = 1, image: Optional[bool] = None, wan_forward: str = "longvideo",
         decode: str = "streamed") -> Plan:
    """Predicted peak GPU memory of `method` on `model` (see the module docstring).

    method: "direct" (the plain pipeline), "freeloc", "fifo", "ouroboros" (with ``tail``, ``sacfa``,
    ``guidance`` switches; ``guidance_impl``: how the guided window computes its gradient --
    "prefix" (longvideo's, the default: a pass of the conditional half with autograd, parameters
    frozen, stopped after the last feature layer, then the window's CFG call without autograd;
    FIFODiffusion._guidance_gradient) or "whole_call" (the implementation before it, kept to
    check the benchmark records it ran: the whole CFG-batched call with autograd);
    ``wan_forward``: "longvideo" (default: the Wan transformers run longvideo's forward,
    processors/wan_modulation.py, as the CLI and FIFO install it: per-frame timesteps embedded
    once per frame, no float32 temporaries without autograd) or "diffusers" (diffusers' own
    forward: a plain pipeline from Python, or ``FIFODiffusion.lean_modulation = False``)), "story"
    (StoryDiffusion; ``num_frames`` unused, ``id_length`` id images written together,
    ``read_images`` read alone, ``num_inference_steps``, ``sampling_rate``, ``start_step``,
    ``characters``; ``story_kernel`` "consistent" (longvideo's op) or
    "dense_mask" (the official path's (B*N)^2 mask)), "enhance" (StreamingT2V randomized
    blending; ``chunk_frames``, ``overlap_frames``, ``chunk_batch``). output_type "latent": no VAE
    decode phase (direct, freeloc, story).
    decode: how direct, freeloc and enhance decode the latent video on a Wan VAE. "streamed"
    (default: what ``longvideo generate`` and ``longvideo enhance`` run, longvideo.decode.decode_to
    / RandomizedBlending.iter_decoded): one latent frame per decoder call with the causal
    convolutions' cache, each chunk handed to the writer before the next -- the peak is one
    chunk's plus the caches (one per tile with vae_tiling) and the latent video, flat in the
    length. "whole": the VAE's own ``decode`` of the whole video (a plain diffusers pipeline
    called from Python with output_type="np"), whose decoded video grows with the length (with
    vae_tiling every tile is kept to the end). FIFO and story are unaffected (docs/methods.md,
    "Fitting a GPU").
    model: a known config name (``longvideo.planner.known_model_names()``), a local diffusers
    checkpoint folder, or a ModelSpec. height/width/num_frames default to the model's size and
    trained clip. freeloc_semantics: FreeLOC's "official" (default) or "paper" layouts (the TSA
    layers' rotated copies: 3 vs 5). dtype: the denoiser's dtype. device: "cuda" (the kernels of a GPU run) or "cpu"
    (the CPU kernels: what a CPU run allocates). gpu_memory: bytes or "24GB": plan the fastest
    settings that fit (the other settings arguments are then the starting point); a setting fits
    when its peak is at most (1 - headroom) * gpu_memory (default 5% kept for the CUDA context,
    cuDNN/cuBLAS workspaces and allocator fragmentation, which are not modelled). "24GB" is
    24e9 bytes, "24GiB" 24 * 2**30 (the convention of the id bank's budget option).
    context_parallel: N ranks of Ulysses context parallelism (longvideo/parallel.py; direct,
    freeloc, fifo, ouroboros (SACFA and guidance included) on Wan): the plan is then per rank
    (each rank's peak; see the module docstring), and gpu_memory is one rank's GPU. The token
    count and the head count must be divisible by N. No time is quoted (no record of such a run).
    image: plan an image-to-video run (methods direct, freeloc, fifo; ``longvideo generate
    --image``). None (default): what the pipeline needs -- Wan 2.1 / 2.2 A14B I2V pipelines always
    take an image, the others none; True on Wan 2.2 TI2V-5B: its image mode. The image path is
    then phases and parts of the plan: "image encode (CLIP vision)" (Wan 2.1 I2V's image
    encoder), "condition encode (VAE)" (the VAE encode of the image followed by zero frames;
    TI2V: "image latents encode (VAE)", the image alone), the condition latents and mask held in
    every denoising step with the wider transformer input, and under FIFO the initial clip's
    encode and the windows' streamed condition ("condition encode (streamed)"). ValueError on a
    text-to-video model, with another method, or image=False on an I2V pipeline.
    """
    method = _METHOD_ALIASES.get(str(method).lower(), str(method).lower())
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if wan_forward not in ("longvideo", "diffusers"):
        raise ValueError(f"wan_forward must be 'longvideo' or 'diffusers', got {wan_forward!r}")
    if guidance_impl not in GUIDANCE_IMPLS:
        raise ValueError(f"guidance_impl must be one of {GUIDANCE_IMPLS}, got {guidance_impl!r}")
    if bank_location not in ("auto", "device", "cpu"):
        raise ValueError(f"bank_location must be 'auto', 'device' or 'cpu', got {bank_location!r}")
    if freeloc_semantics not in ("official", "paper"):
        raise ValueError(f"freeloc_semantics must be 'official' or 'paper', got {freeloc_semantics!r}")
    if isinstance(context_parallel, bool) or not isinstance(context_parallel, int) or context_parallel < 1:
        raise ValueError(f"context_parallel must be a positive number of ranks, got {context_parallel!r}")
    spec = load_model_spec(model)
    dt = _DTYPES.get(str(dtype).replace("torch.", "")) if not isinstance(dtype, torch.dtype) else dtype
    if dt is None:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    dev = {"cuda": A.CUDA, "cpu": A.CPU}.get(str(device))
    if dev is None:
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    dh, dw = spec.default_size or (512, 512)
    height, width = int(height or dh), int(width or dw)
    if num_frames is None:
        tl = trained_frames or spec.trained_latent_frames or 16
        num_frames = 4 * (tl - 1) + 1 if spec.family in ("wan", "skyreels") else tl
    image_mode = _image_mode(spec, image, method)
    gpu = parse_bytes(gpu_memory) if gpu_memory is not None else None
    budget = parse_bytes(bank_budget) if bank_budget is not None else None
    base = Settings(offload=offload, vae_tiling=vae_tiling, vae_slicing=vae_slicing, bank_location=bank_location,
                    bank_budget=budget, frames_per_window=frames_per_window, num_partitions=num_partitions,
                    chunk_batch=chunk_batch)
    opts = dict(freeloc_layers=freeloc_layers, trained=trained_frames, freeloc_semantics=freeloc_semantics,
                parts=(tail, sacfa, guidance),
                id_length=id_length, steps=num_inference_steps, sampling_rate=sampling_rate, start_step=start_step,
                characters=characters, read_images=read_images, gpu_memory=gpu, story_kernel=story_kernel,
                schedule=schedule, decode=output_type != "latent",
                chunk_frames=chunk_frames, overlap_frames=overlap_frames, guidance_impl=guidance_impl,
                context_parallel=context_parallel, image=image_mode, decode_mode=decode)

    def build(st: Settings) -> Plan:
        token = _WAN_FORWARD.set(wan_forward)
        try:
            phases, sizes = _phases(method, spec, dt, dev, st, height, width, num_frames, opts)
        finally:
            _WAN_FORWARD.reset(token)
        base_sizes = dict(height=height, width=width, dtype=str(dt).replace("torch.", ""))
        if method != "story":
            base_sizes["frames"] = num_frames
        if context_parallel > 1:
            base_sizes["context_parallel"] = context_parallel
        if image_mode:
            base_sizes["image"] = image_mode
        sizes = dict(**base_sizes, **sizes)
        p = Plan(method=method, model=spec.name, settings=st, phases=phases, sizes=sizes, gpu_memory=gpu)
        p.time, p.time_note = _time(method, spec, sizes, height, width, num_frames, dt, (tail, sacfa, guidance), st,
                                    records, id_length, read_images, num_inference_steps, chunk_frames,
                                    overlap_frames, guidance_impl)
        if context_parallel > 1:
            p.time, p.time_note = None, (f"no benchmark record of a run with context_parallel={context_parallel}: "
                                         "no time quoted")
        if p.time is not None and st.offload != "none":
            p.time = replace(p.time, note=p.time.note + f"; measured with everything resident: offload={st.offload} "
                                                        "adds weight transfers not in the record")
        p.notes = _notes(method, spec, p, opts)
        return p

    result = build(base)
    if gpu is None:
        return result
    tried = []
    chosen = None
    usable = int(gpu * (1.0 - headroom))
    for st, why in _candidates(method, spec, base):
        p = result if st == base else build(st)
        ok = p.peak_bytes <= usable
        reason = why if ok else (f"{why}; peak {format_bytes(p.peak_bytes)} in '{p.peak_phase.name}' > "
                                 f"{format_bytes(usable)} usable")
        tried.append(Candidate(st, p.peak_bytes, ok, reason))
        if ok:
            chosen = p
            break
    if chosen is None:
        chosen = result
        chosen.choice = (f"nothing tried fits in {format_bytes(usable)} ({format_bytes(gpu)} less {headroom:.0%} "
                         f"headroom): the smallest peak is {format_bytes(min(c.peak for c in tried))}")
    else:
        big = sorted(chosen.peak_phase.parts, key=lambda x: -x.nbytes)[:3]
        chosen.choice = (f"{chosen.settings.describe()} -- the first (fastest) option that fits: peak "
                         f"{format_bytes(chosen.peak_bytes)} in '{chosen.peak_phase.name}' "
                         f"(largest parts: " + ", ".join(f"{x.name} {format_bytes(x.nbytes)}" for x in big) + ")")
    chosen.candidates = tried
    chosen.usable = usable
    return chosen
