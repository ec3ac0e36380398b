"""StoryDiffusion (Zhou et al. 2024): consistent characters across a story, on diffusers SD1.5 / SDXL.

Consistent self-attention: in the self-attention layers of the UNet's up blocks, each image
attends, with one softmax, to its own tokens plus a random subset (sampling rate 0.5) of the
tokens of the other images generated with it; the subset is redrawn every step. Where this
package and the official code differ, and by how much: docs/fidelity.md.
A story of any length is made in two phases:

* write: the first ``id_length`` prompts of each character (the prompts naming only that
  character) are generated together; their sampled self-attention inputs are cached per step and
  layer in the character's id bank;
* read: every other prompt is generated alone (batch 1 per CFG half) and attends to its own
  tokens plus the id banks of the characters it names (none for ``[NC]`` prompts).

The official per-call schedule: consistent attention from ``start_step`` on, with probability 0.7
while step < 20 and 0.9 afterwards (a call that draws "off" runs plain attention). Before
``start_step``, ``schedule`` says what happens; the official code has two:

* ``schedule="official_app"`` (default; app.py and predict.py): start_step 5; before it a write
  call runs plain self-attention while the id bank keeps the WHOLE self-attention inputs of the id
  images, and a read call attends to its own tokens plus that whole bank (every token of every id
  image of the characters it names). It is the default because it is what the main official app
  (and its predict.py) computes, and the paper does not say what the first steps do.
* ``schedule="low_vram"`` (gradio_app_sdxl_specific_id_low_vram.py): start_step 1; step 0 is plain
  self-attention for write and read alike, nothing is written for it.

An explicit ``start_step`` overrides the schedule's start (the early steps keep the schedule's
behaviour). Everything random (latents, token subsets, per-call draws) is a function of ``seed``
and of the prompt, so a story is reproducible and can be continued in a later run from a saved bank.

Quick start::

    from longvideo.models.sd import tiny_pipeline           # or any local SD1.5/SDXL pipeline
    from longvideo import StoryDiffusion
    story = StoryDiffusion(tiny_pipeline("sdxl"))            # id bank: bank_location="auto"
    result = story.generate_story(parse_story(open("story.txt").read()), id_length=4, seed=0)
    story.bank.memory_summary()                              # {"device": ..., "host": ..., "file": ...}
    story.save_bank("bob.safetensors")                       # continue later: story.load_bank(...)

Memory: the id bank holds, per character, step and patched layer, the sampled self-attention
inputs of the id images: for SDXL at 1024x1024 with 4 id images, 50 steps and the official
schedule, about 20 GB in float16 for the 45 sampled steps, plus the whole inputs of the 5 early
steps with ``schedule="official_app"`` (:func:`project_bank_bytes` computes it from the UNet's
structure). The default ``bank_location="auto"`` keeps the bank on the GPU up to a budget
(``bank_gpu_budget``, default 10% of the GPU's memory) and spills the rest to pinned host memory,
copied back on a side stream one step ahead of its use.

Story file format (``longvideo story FILE``)::

    # lines starting with '#' are comments; blank lines are ignored
    [Bob] = a man with short black hair, wearing a black suit      <- optional definition
    [Bob] at home, reading the newspaper # Bob reads the news      <- prompt # caption
    [Bob] on the road, near the forest
    [Bob] and [Alice] having dinner                                <- reads both id banks
    [NC] a quiet street at night                                   <- no character

One prompt per line. ``[Name]`` marks a character (letters, digits, space, ``_``, ``-``); in the
text sent to the model it is replaced by the character's definition (``[Name] = ...`` line), or by
``Name``. ``[NC]`` marks a prompt with no character (removed from the text). Text after a ``#``
inside a line is the panel's caption (the official format); without one the caption is the
prompt. The first ``id_length`` prompts that name exactly one character are that character's id
prompts; a character with fewer raises a ValueError (unless its bank is already loaded).

Video mode: :class:`VideoSubjectConsistency` lets the frames of a long video (FIFO windows,
chunks) attend to a shared subject bank with the same processor and op.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..hooks import PatchHandle
from ..processors.consistent import (
    SCHEDULE_START,
    ConsistentAttentionController,
    IdBank,
    _derive_seed,
    bernoulli_token_subset,
    check_schedule,
    official_probability,
    parse_gpu_budget,
    self_attention_layers,
    step_kind,
)
from .outputs import ProgressBarMixin, check_callback, check_output_type, check_positive_int, resolve_generator

NC_TAG = "NC"
_TAG = re.compile(r"\[([^\[\]]*)\]")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_ \-]*$")
_DEFINITION = re.compile(r"^\[([^\[\]]+)\]\s*=\s*(.*)$")


# ----------------------------------------------------------------------------------------------
# story parsing
@dataclass
class StoryPrompt:
    """One panel: `text` goes to the model, `characters` are the id banks it reads."""

    raw: str
    text: str
    characters: tuple
    caption: str
    line: Optional[int] = None


@dataclass
class Story:
    prompts: list
    definitions: dict = field(default_factory=dict)

    @property
    def characters(self) -> list:
        seen = []
        for p in self.prompts:
            for c in p.characters:
                if c not in seen:
                    seen.append(c)
        return seen


def _where(source, line):
    return f"{source}, line {line}" if line is not None else source


def parse_prompt(raw: str, definitions: Optional[dict] = None, line: Optional[int] = None,
                 source: str = "prompt") -> StoryPrompt:
    """Parse one story line (see the module docstring) into a StoryPrompt."""
    definitions = definitions or {}
    body, caption = raw, None
    if "#" in raw:
        body, caption = raw.split("#", 1)
        caption = caption.strip() or None
    if body.count("[") != body.count("]"):
        raise ValueError(f"{_where(source, line)}: unbalanced brackets in {raw!r}")
    names = []
    for m in _TAG.finditer(body):
        name = m.group(1).strip()
        if not name or not _NAME.match(name):
            raise ValueError(f"{_where(source, line)}: bad character tag [{m.group(1)}] in {raw!r} "
                             f"(names use letters, digits, space, '_' and '-')")
        if name not in names:
            names.append(name)
    if NC_TAG in names and len(names) > 1:
        raise ValueError(f"{_where(source, line)}: [NC] (no character) combined with characters in {raw!r}")

    def substitute(m):
        name = m.group(1).strip()
        return "" if name == NC_TAG else definitions.get(name, name)

    text = re.sub(r"\s+", " ", _TAG.sub(substitute, body)).strip(" ,")
    if not text:
        raise ValueError(f"{_where(source, line)}: empty prompt in {raw!r}")
    characters = tuple(n for n in names if n != NC_TAG)
    if caption is None:
        caption = re.sub(r"\s+", " ", _TAG.sub(lambda m: "" if m.group(1).strip() == NC_TAG else m.group(1).strip(),
                                               body)).strip(" ,")
    return StoryPrompt(raw=raw, text=text, characters=characters, caption=caption, line=line)


def parse_story(text: str, source: str = "story") -> Story:
    """Parse a story file's text. Raises ValueError naming the line for malformed input and for a
    story with no prompts."""
    definitions, lines = {}, []
    for i, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        m = _DEFINITION.match(s)
        if m:
            name, desc = m.group(1).strip(), m.group(2).strip()
            if not _NAME.match(name) or name == NC_TAG:
                raise ValueError(f"{source}, line {i}: bad character name [{name}] in definition")
            if not desc:
                raise ValueError(f"{source}, line {i}: empty definition of [{name}]")
            if name in definitions:
                raise ValueError(f"{source}, line {i}: character [{name}] defined twice")
            definitions[name] = desc
            continue
        lines.append((i, s))
    if not lines:
        raise ValueError(f"{source} has no prompts (one prompt per line; '#' starts a comment)")
    prompts = [parse_prompt(s, definitions, i, source) for i, s in lines]
    return Story(prompts=prompts, definitions=definitions)


def read_story_file(path: Union[str, os.PathLike]) -> Story:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"story file {str(path)!r} does not exist")
    return parse_story(path.read_text(encoding="utf-8"), source=str(path))


def _as_story(prompts, characters: Optional[dict]) -> Story:
    if isinstance(prompts, Story):
        story = prompts
        if characters:
            story = Story([parse_prompt(p.raw, {**story.definitions, **characters}, p.line) for p in story.prompts],
                          {**story.definitions, **characters})
        return story
    if isinstance(prompts, str):
        return parse_story(prompts) if not characters else parse_story(
            "\n".join([f"[{k}] = {v}" for k, v in characters.items()] + [prompts]))
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    defs = dict(characters or {})
    return Story([parse_prompt(p, defs, source=f"prompt {i}") for i, p in enumerate(prompts)], defs)


# ----------------------------------------------------------------------------------------------
# the method
@dataclass
class StoryResult:
    """images: one per prompt, in story order, in diffusers' image convention per output_type:
    a list of PIL images ("pil"), numpy float32 (N, H, W, 3) ("np"), torch (N, 3, H, W) ("pt"),
    the latents (N, C, h, w) ("latent"). roles: "id" (written), "read" (attended to banks) or "nc" (no character) per prompt."""

    images: list
    prompts: list
    roles: list
    seeds: list


def _stack_images(images: list, output_type: str):
    """diffusers' image convention: a list of PIL images, or one stacked array / tensor."""
    if output_type == "pil":
        return list(images)
    if output_type == "np":
        import numpy as np

        return np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.stack(list(images))


# ----------------------------------------------------------------------------------------------
# id bank size, projected from the UNet's structure
_BLOCK = re.compile(r"^(?:(down_blocks|up_blocks)\.(\d+)|mid_block)\.")


def _layer_level(name: str, levels: int) -> int:
    """Resolution level of a UNet2DConditionModel layer (0 = the latent resolution): down block i
    runs at level i (each down block but the last halves the side), the mid block at the deepest
    level, up block i at level levels - 1 - i (each up block but the last doubles the side)."""
    m = _BLOCK.match(name)
    if m is None:
        raise ValueError(f"cannot tell the resolution of layer {name!r}: expected a layer of down_blocks.i, "
                         f"mid_block or up_blocks.i of a UNet2DConditionModel-style UNet")
    if m.group(1) is None:
        return levels - 1
    i = int(m.group(2))
    return i if m.group(1) == "down_blocks" else levels - 1 - i


def _as_unet(model):
    """(UNet module, the pipeline's vae_scale_factor or None, whether it was built from a config)."""
    if hasattr(model, "unet"):
        return model.unet, getattr(model, "vae_scale_factor", None), False
    if isinstance(model, torch.nn.Module):
        return model, None, False
    if isinstance(model, dict):
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):  # structure only: no memory, no initialisation work
            return UNet2DConditionModel.from_config(dict(model)), None, True
    raise ValueError(f"model must be a diffusers SD/SDXL pipeline, a UNet2DConditionModel or its config dict, "
                     f"got {type(model).__name__}")


def project_bank_bytes(model, num_inference_steps: int = 50, id_length: int = 4, height: Optional[int] = None,
                       width: Optional[int] = None, sampling_rate: Union[float, dict] = 0.5, layers="up",
                       start_step: Optional[int] = None, prob_early: float = 0.7, prob_late: float = 0.9,
                       late_step: int = 20, probability: Optional[Callable[[int], float]] = None,
                       guidance_scale: float = 5.0, characters=1, seed: Optional[int] = None,
                       dtype: Optional[torch.dtype] = None, vae_scale_factor: Optional[int] = None,
                       schedule: str = "official_app") -> int:
    """Bytes of the id banks :meth:`StoryDiffusion.generate_story` writes, from the UNet's
    structure alone (no forward pass; a config dict is built on the meta device).

    model: a pipeline, a UNet2DConditionModel, or a UNet config dict. The other arguments are the
    story's settings (as in StoryDiffusion / generate_story); `characters` is the number of
    characters written, or their names; `dtype` defaults to the UNet's (float16 for a config);
    `vae_scale_factor` to the pipeline's (8 otherwise).

    Derivation. The write call of a character generates its `id_length` id images as one batch
    (2 groups with classifier-free guidance: guidance_scale > 1, else 1). On each step s that is
    a "full" step (s < start_step with ``schedule="official_app"``) or whose scheduled
    probability is > 0, and at each selected self-attention layer l, the bank stores a
    (groups, E, C_l) tensor:

        C_l = the layer's input width (to_q.in_features),
        N_l = tokens per image at the layer's resolution: the latent side (height // f) halved
              (rounding up, as the stride-2 convolutions do) once per level below the top,
        E   = id_length * N_l on a full step (the whole inputs), else
              #{t < id_length * N_l : u_t < rate(N_l)}, u = the write call's uniform draws for
              (seed, ("write", character), s, N_l)  (shared by the layers of one resolution).

    bytes = sum over characters, steps, layers of groups * E * C_l * itemsize. With `seed` (the
    generate_story seed) and the character names, E is replayed from the same generator as the
    method's, so the result equals the bank's size exactly; without `seed`, E is its expectation
    rate * id_length * N_l and the result is rounded to whole bytes.
    """
    unet, f, from_config = _as_unet(model)
    f = vae_scale_factor or f or 8
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if not isinstance(id_length, int) or id_length < 1:
        raise ValueError(f"id_length must be a positive int, got {id_length!r}")
    if isinstance(characters, int):
        if characters < 0:
            raise ValueError(f"characters must be a count >= 0 or a list of names, got {characters!r}")
        names = None
        count = characters
    else:
        names = [str(c) for c in characters]
        count = len(names)
    if seed is not None and names is None:
        raise ValueError("an exact projection (seed given) needs the character names: characters=['Bob', ...]")
    if dtype is None:
        dtype = torch.float16 if from_config else next(unet.parameters()).dtype
    sample = unet.config.sample_size
    sample_h, sample_w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    height, width = height or sample_h * f, width or sample_w * f
    if height % f or width % f:
        raise ValueError(f"height/width must be multiples of {f}, got {height}x{width}")
    levels = len(unet.config.block_out_channels)
    groups = 2 if guidance_scale > 1.0 and unet.config.get("time_cond_proj_dim") is None else 1
    check_schedule(schedule)
    if start_step is None:
        start_step = SCHEDULE_START[schedule]
    prob = probability or (lambda s: official_probability(s, start_step, prob_early, prob_late, late_step))
    kinds = {s: step_kind(s, prob(s), start_step, schedule == "official_app") for s in range(num_inference_steps)}
    steps = [s for s, k in kinds.items() if k == "sampled"]
    full_steps = [s for s, k in kinds.items() if k == "full"]
    width_sum: dict = {}  # tokens per image -> sum of C_l over the layers at that resolution
    for name, attn in self_attention_layers(unet, layers):
        h, w = height // f, width // f
        for _ in range(_layer_level(name, levels)):
            h, w = (h + 1) // 2, (w + 1) // 2
        width_sum[h * w] = width_sum.get(h * w, 0) + attn.to_q.in_features

    def rate(tokens):
        return float(sampling_rate.get(tokens, 0.0)) if isinstance(sampling_rate, dict) else float(sampling_rate)

    item = torch.empty((), dtype=dtype).element_size()
    full = count * len(full_steps) * groups * item * sum(id_length * n * c for n, c in width_sum.items())
    if seed is None:
        per_step = sum(rate(n) * id_length * n * c for n, c in width_sum.items())
        return full + int(round(count * len(steps) * groups * item * per_step))
    total = full
    for name in names:
        for s in steps:
            for n, c in width_sum.items():
                if rate(n) > 0.0:
                    e = bernoulli_token_subset(seed, ("write", name), s, n, id_length * n, rate(n)).numel()
                    total += groups * e * c * item
    return total


def format_bytes(n: Optional[float]) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return f"{n:.2f} GiB"


def bank_memory_line(summary: dict) -> str:
    """One line describing IdBank.memory_summary() (printed by `longvideo story`)."""
    budget = summary.get("device_budget")
    return (f"id bank: {format_bytes(summary['device'])} on the device, {format_bytes(summary['host'])} in host "
            f"memory, {format_bytes(summary['file'])} in file ({summary['entries']} entries"
            + (f"; device budget {format_bytes(budget)})" if budget is not None else ")"))


@dataclass(frozen=True)
class StoryDiffusionConfig:
    """StoryDiffusion's settings (the keyword arguments of :class:`StoryDiffusion`, documented
    there), validated at construction: a ValueError names the field."""

    sampling_rate: Union[float, dict] = 0.5
    start_step: Optional[int] = None
    prob_early: float = 0.7
    prob_late: float = 0.9
    late_step: int = 20
    probability: Optional[Callable[[int], float]] = None
    layers: object = "up"
    bank_location: object = "auto"
    bank_gpu_budget: object = None
    schedule: str = "official_app"

    def __post_init__(self):
        rates = self.sampling_rate.values() if isinstance(self.sampling_rate, dict) else [self.sampling_rate]
        for r in rates:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
                raise ValueError(f"sampling_rate must lie in [0, 1] (or be a dict of such rates), got "
                                 f"{self.sampling_rate!r}")
        for name in ("prob_early", "prob_late"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p!r}")
        for name, value in (("start_step", self.start_step), ("late_step", self.late_step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.probability is not None and not callable(self.probability):
            raise ValueError(f"probability must be a callable(step) -> float or None, got "
                             f"{type(self.probability).__name__}")
        if isinstance(self.layers, str):
            from ..processors.consistent import _layer_selector

            _layer_selector(self.layers)  # ValueError naming `layers` for an unknown name
        elif not callable(self.layers) and not (isinstance(self.layers, (list, tuple)) and self.layers):
            raise ValueError(f"layers must be 'up', 'up+mid', 'all', 'spatial', a list of names or a predicate, "
                             f"got {self.layers!r}")
        check_schedule(self.schedule)
        if self.bank_gpu_budget is not None:
            parse_gpu_budget(self.bank_gpu_budget, "bank_gpu_budget")  # the error names this argument
            if self.bank_location != "auto":
                raise ValueError(f"bank_gpu_budget applies only to bank_location='auto', got {self.bank_location!r}")


def _check_story_pipeline(pipe) -> None:
    """Refuse, at construction, a pipeline of another family (ValueError naming `pipe`)."""
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(pipe, "vae_scale_factor", None) is None:
        raise ValueError(f"pipe must be a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline, got "
                         f"{type(pipe).__name__} (no .unet / .vae_scale_factor)")
    if type(unet).__name__ == "UNetMotionModel" or getattr(pipe, "motion_adapter", None) is not None:
        raise ValueError(f"pipe: {type(pipe).__name__} is a video pipeline; StoryDiffusion takes an image "
                         "pipeline (SD1.5 / SDXL); for the frames of a video use VideoSubjectConsistency")


class StoryDiffusion(PatchHandle, ProgressBarMixin):
    """Consistent self-attention on a diffusers StableDiffusion(XL)Pipeline (see module docstring).

    ``StoryDiffusion(pipe, StoryDiffusionConfig(...))``, or the config's fields as keywords
    (``StoryDiffusion(pipe, sampling_rate=0.5, ...)``); :func:`apply_storydiffusion` is the same.
    The object is a :class:`longvideo.hooks.PatchHandle`: the processors are installed at
    construction; ``remove()`` (or leaving a ``with`` block) restores the UNet's own.

    pipe            a StableDiffusionPipeline / StableDiffusionXLPipeline (or fine-tune); another
                    family is refused here (ValueError naming `pipe`).
    sampling_rate   fraction of tokens each id image shares (official 0.5); float or
                    {tokens_per_image: rate}.
    schedule        "official_app" (default: app.py / predict.py; start_step 5, and before it a
                    read image attends to its own tokens plus the WHOLE id bank) or "low_vram"
                    (the low-VRAM app: start_step 1, step 0 plain attention); see the module
                    docstring and docs/fidelity.md.
    start_step, prob_early, prob_late, late_step
                    the official per-call schedule (start_step from `schedule` when None: 5 or
                    1; 0.7, 0.9, 20); prob 1.0 = always on. `probability` (callable(step) ->
                    float) replaces the per-call probability (with "official_app" not on the
                    steps before start_step, which always read the whole bank).
    layers          which self-attention layers: "up" (official), "up+mid", "all", names, predicate.
    bank_location   where id banks live: "auto" (default: on the pipeline's device while the bank's
                    bytes there stay within `bank_gpu_budget`, the rest in pinned host memory,
                    prefetched on a side stream; on a CPU-only run simply where they are made),
                    None (the pipeline's device, no budget), "cpu" (pinned host memory, copied
                    asynchronously: keeps GPU memory flat in the story length), a device, or a
                    ".safetensors" path (written after each character, read lazily).
    bank_gpu_budget the "auto" bank's device budget: bytes, "2GiB"-style sizes or "10%" of the
                    GPU's total memory; default (None) 10% of it, at most half of the free memory
                    (see ``longvideo.processors.consistent.parse_gpu_budget``).

    After a story, ``self.bank.memory_summary()`` gives the bank's bytes per location, and
    :meth:`project_bank_bytes` predicts them before running anything.
    """

    def __init__(self, pipe, config: Optional[StoryDiffusionConfig] = None, **settings):
        PatchHandle.__init__(self, "StoryDiffusion")
        if config is None:
            names = {f.name for f in dataclasses.fields(StoryDiffusionConfig)}
            unknown = sorted(set(settings) - names)
            if unknown:
                raise ValueError(f"StoryDiffusion: unknown setting(s) {unknown}; known: {sorted(names)}")
            config = StoryDiffusionConfig(**settings)
        elif settings:
            raise ValueError("StoryDiffusion: give either a StoryDiffusionConfig or keyword settings, not both")
        elif not isinstance(config, StoryDiffusionConfig):
            raise ValueError(f"config must be a StoryDiffusionConfig, got {type(config).__name__}")
        _check_story_pipeline(pipe)
        self.config = config
        self.schedule = config.schedule
        start_step = config.start_step if config.start_step is not None else SCHEDULE_START[config.schedule]
        self.pipe = pipe
        self.bank = IdBank(config.bank_location, gpu_budget=config.bank_gpu_budget)
        self.controller = ConsistentAttentionController(
            sampling_rate=config.sampling_rate, start_step=start_step, prob_early=config.prob_early,
            prob_late=config.prob_late, late_step=config.late_step, probability=config.probability, bank=self.bank,
            full_bank_early=config.schedule == "official_app")
        try:
            self.layers = self.controller.install(pipe.unet, config.layers, handle=self)
        except BaseException:
            self.remove()
            raise
        self._interrupt = False

    # -- bank ----------------------------------------------------------------------------------------
    def save_bank(self, path) -> str:
        """Save every character's id bank (and the settings it was recorded with) to `path`."""
        return self.bank.save(path)

    def load_bank(self, path, characters: Optional[Sequence[str]] = None) -> list:
        """Load id banks saved by :meth:`save_bank`; returns the characters now available."""
        self.bank.load(path, characters, device=self.pipe._execution_device)
        return self.bank.keys()

    @property
    def characters(self) -> list:
        return self.bank.keys()

    def project_bank_bytes(self, num_inference_steps: int = 50, id_length: int = 4, height: Optional[int] = None,
                           width: Optional[int] = None, guidance_scale: float = 5.0, characters=1,
                           seed: Optional[int] = None) -> int:
        """Bytes of the id banks a :meth:`generate_story` call with these settings writes, with
        this method's layers, sampling rate and schedule (see :func:`project_bank_bytes`)."""
        return project_bank_bytes(self.pipe, num_inference_steps=num_inference_steps, id_length=id_length,
                                  height=height, width=width, sampling_rate=self.controller.sampling_rate,
                                  layers=self.layers, probability=self.controller.probability_at,
                                  start_step=self.controller.start_step, schedule=self.schedule,
                                  guidance_scale=guidance_scale, characters=characters, seed=seed)

    # -- generation ------------------------------------------------------------------------------------
    def _latents(self, n: int, seed: int, height: int, width: int, generators=None) -> torch.Tensor:
        """(n, C, h, w) initial latents: from a CPU generator seeded with `seed`, or with
        `generators` (one per image) image i's from generators[i]."""
        pipe = self.pipe
        f = pipe.vae_scale_factor
        shape = (n, pipe.unet.config.in_channels, height // f, width // f)
        if generators is None:
            lat = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        else:
            lat = torch.cat([torch.randn((1,) + shape[1:], generator=g, dtype=torch.float32, device=g.device).cpu()
                             for g in generators])
        return lat.to(device=pipe._execution_device, dtype=pipe.unet.dtype)

    def _call(self, texts, seed, mode, call_key, write_key=None, read_keys=(), negative_prompt=None,
              progress=None, generators=None, callback=None, callback_inputs=("latents",), **kw):
        pipe = self.pipe
        steps = kw["num_inference_steps"]

        def cb(_pipe, i, t, cb_kwargs):
            if progress is not None:
                progress.update(1)
            if callback is None:
                return {}
            return callback(self, i, t, cb_kwargs) or {}

        self.controller.seed = kw.pop("story_seed")
        self.controller.begin_call(mode, call_key=call_key, group_size=len(texts), write_key=write_key,
                                   read_keys=read_keys)
        try:
            out = pipe(prompt=list(texts), negative_prompt=None if negative_prompt is None else [negative_prompt] * len(texts),
                       latents=self._latents(len(texts), seed, kw.pop("height"), kw.pop("width"), generators),
                       callback_on_step_end=cb, callback_on_step_end_tensor_inputs=list(callback_inputs), **kw)
        finally:
            self.controller.end_call()
        if self.controller.step + 1 != steps:
            raise RuntimeError(f"the UNet ran {self.controller.step + 1} times for {steps} steps: StoryDiffusion "
                               f"needs one batched (CFG) UNet call per step")
        return list(out.images)

    def check_inputs(self, prompts, id_length, num_inference_steps, guidance_scale, height, width, seed, generator,
                     output_type, style, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """ValueError naming the first bad argument of :meth:`generate_story` (before any work)."""
        if prompts is None or (isinstance(prompts, str) and not prompts.strip()):
            raise ValueError(f"prompts must be story lines, a story text or a Story, got {prompts!r}")
        check_positive_int(id_length, "id_length")
        check_positive_int(num_inference_steps, "num_inference_steps")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
        f = self.pipe.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                check_positive_int(value, name)
                if value % f:
                    raise ValueError(f"{name} must be a multiple of {f}, got {value}")
        if generator is None:
            resolve_generator(None, seed)
        check_output_type(output_type)
        if not isinstance(style, str) or "{prompt}" not in style:
            raise ValueError(f"style must contain '{{prompt}}', got {style!r}")
        check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, ("latents", "prompt_embeds"))

    def generate_story(self, prompts, characters: Optional[dict] = None, id_length: int = 4,
                       num_inference_steps: int = 50, guidance_scale: float = 5.0, height: Optional[int] = None,
                       width: Optional[int] = None, seed: int = 0, negative_prompt: Optional[str] = None,
                       style: str = "{prompt}", output_type: str = "pil", progress: Optional[bool] = True,
                       rewrite: bool = False, generator=None, callback_on_step_end=None,
                       callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                       **pipe_kwargs) -> StoryResult:
        """Generate a story: each character's id images together (write), the rest alone (read).

        prompts: story lines (``[Name]`` tags, ``[NC]``; see the module docstring), a story text,
        or a parsed :class:`Story`. characters: optional {name: description} replacing ``[Name]``.
        A character whose bank is already present (loaded, or written by an earlier call) is not
        written again unless `rewrite`; all its prompts are then read prompts. style: template
        with ``{prompt}`` applied to every prompt.

        seed / generator: everything random is a function of the story seed (`seed`, or one draw
        from `generator`) and of the prompt, so a story continued later reproduces; with a list
        of generators (one per prompt, in story order) prompt i's initial latents come from
        generator i instead. output_type: "pil" (default), "np", "pt" or "latent".
        callback_on_step_end: ``callback(story, step, timestep, callback_kwargs) -> dict`` at every
        step of every pipeline call (the pipeline's own callback: returned "latents" replace the
        call's latents). Stopping mid-story is not offered: the id banks must be complete.
        progress: True (default) one bar over all steps, False none, None follows
        ``set_progress_bar_config`` (the pipeline's setting until it is called).

        Returns a :class:`StoryResult` in story order; ``images`` in diffusers' image convention:
        a list of PIL images ("pil"), numpy float32 (N, H, W, 3) in [0, 1] ("np"), torch (N, 3, H,
        W) ("pt") or the latents (N, C, h, w) ("latent").
        """
        self.check_inputs(prompts, id_length, num_inference_steps, guidance_scale, height, width, seed, generator,
                          output_type, style, callback_on_step_end, callback_on_step_end_tensor_inputs)
        story = _as_story(prompts, characters)
        per_prompt = None
        if generator is not None:
            gens = resolve_generator(generator, None, batch=len(story.prompts) if isinstance(generator, (list, tuple))
                                     else 1)
            # the story seed: one draw from the (first) generator, so its state decides the story
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=gens[0], device=gens[0].device))
            per_prompt = gens if isinstance(generator, (list, tuple)) else None
        pipe = self.pipe
        default = pipe.unet.config.sample_size * pipe.vae_scale_factor
        height, width = height or default, width or default
        if height % pipe.vae_scale_factor or width % pipe.vae_scale_factor:
            raise ValueError(f"height/width must be multiples of {pipe.vae_scale_factor}, got {height}x{width}")

        # which prompts write which character's bank
        id_prompts: dict = {}
        for i, p in enumerate(story.prompts):
            if len(p.characters) == 1:
                id_prompts.setdefault(p.characters[0], []).append(i)
        to_write = [c for c in story.characters if rewrite or c not in self.bank]
        for c in to_write:
            have = len(id_prompts.get(c, []))
            if have < id_length:
                raise ValueError(f"character [{c}] has {have} id prompt(s) (prompts naming only [{c}]) but "
                                 f"id_length={id_length} needs {id_length}")
        roles = ["read"] * len(story.prompts)
        for i, p in enumerate(story.prompts):
            if not p.characters:
                roles[i] = "nc"
        writes = {c: id_prompts[c][:id_length] for c in to_write}
        for idx in writes.values():
            for i in idx:
                roles[i] = "id"
        self._check_bank_meta(num_inference_steps, guidance_scale, to_write, story.characters)

        common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                      width=width, output_type=output_type, story_seed=seed, **pipe_kwargs)
        bar = None
        n_calls = len(writes) + sum(r != "id" for r in roles)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_calls * num_inference_steps, desc="story", unit="step")
        elif progress is None and not self._bar_config().get("disable", False):
            bar = self.progress_bar(total=n_calls * num_inference_steps, desc="story", unit="step")
        callback = dict(callback=callback_on_step_end, callback_inputs=tuple(callback_on_step_end_tensor_inputs))
        saved_cfg = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=True)
        images: list = [None] * len(story.prompts)
        seeds: list = [None] * len(story.prompts)
        occurrences: dict = {}
        try:
            for c, idx in writes.items():
                self.bank.clear(c)
                s = _derive_seed(seed, "latents", "write", c)
                texts = [style.format(prompt=story.prompts[i].text) for i in idx]
                outs = self._call(texts, s, "write", ("write", c), write_key=c, negative_prompt=negative_prompt,
                                  progress=bar, generators=None if per_prompt is None else [per_prompt[i] for i in idx],
                                  **callback, **common)
                self.bank.flush()
                for i, img in zip(idx, outs):
                    images[i], seeds[i] = img, s
            self.bank.meta = self._bank_meta(num_inference_steps, guidance_scale, story, writes)
            for i, p in enumerate(story.prompts):
                if roles[i] == "id":
                    continue
                # the call key (latents, draws) depends on the prompt and its occurrence only, so a
                # story continued later from a saved bank reproduces the same images
                n = occurrences[p.text] = occurrences.get(p.text, -1) + 1
                key = ("read", p.text, tuple(p.characters), n)
                s = _derive_seed(seed, "latents", *key)
                out = self._call([style.format(prompt=p.text)], s, "read", key, read_keys=p.characters,
                                 negative_prompt=negative_prompt, progress=bar,
                                 generators=None if per_prompt is None else [per_prompt[i]], **callback, **common)
                images[i], seeds[i] = out[0], s
        finally:
            pipe._progress_bar_config = saved_cfg
            if bar is not None:
                bar.close()
        return StoryResult(images=_stack_images(images, output_type), prompts=story.prompts, roles=roles,
                           seeds=seeds)

    def _bank_meta(self, steps, guidance_scale, story, writes) -> dict:
        meta = dict(self.bank.meta)
        meta.update(steps=steps, cfg=bool(guidance_scale > 1.0), layers=self.layers,
                    sampling_rate=self.controller.sampling_rate if not isinstance(self.controller.sampling_rate, dict)
                    else {str(k): v for k, v in self.controller.sampling_rate.items()},
                    unet=type(self.pipe.unet).__name__, block_out_channels=list(self.pipe.unet.config.block_out_channels),
                    # the steps with entries: the full steps (whole id inputs) and those whose
                    # scheduled probability is > 0 (sampled subsets)
                    bank_steps=[s for s in range(steps) if self.controller.step_kind(s) != "none"],
                    full_steps=[s for s in range(steps) if self.controller.step_kind(s) == "full"],
                    schedule=self.schedule)
        ids = dict(meta.get("id_prompts", {}))
        for c, idx in writes.items():
            ids[c] = [story.prompts[i].text for i in idx]
        meta["id_prompts"] = ids
        return meta

    def _check_bank_meta(self, steps, guidance_scale, to_write, characters) -> None:
        reading_old = [c for c in characters if c not in to_write and c in self.bank]
        meta = self.bank.meta
        if not reading_old or not meta:
            return
        if meta.get("steps") not in (None, steps):
            raise ValueError(f"the loaded id bank of {reading_old} was recorded with {meta['steps']} steps; "
                             f"num_inference_steps={steps} must match")
        if meta.get("cfg") is not None and meta["cfg"] != (guidance_scale > 1.0):
            raise ValueError("the loaded id bank was recorded with%s classifier-free guidance; use a guidance_scale "
                             "%s 1" % (("", ">") if meta["cfg"] else (" no", "<=")))
        if meta.get("layers") not in (None, self.layers):
            raise ValueError("the loaded id bank was recorded on other layers "
                             f"({len(meta['layers'])} layers); use the same `layers` and model")
        if meta.get("bank_steps") is not None:
            # A read asks, per step, for the whole id inputs (full steps) or for sampled subsets;
            # the bank holds what its write recorded (banks saved before the official app's full
            # steps existed hold sampled entries only). Another start_step, schedule or probability
            # would read entries the bank does not hold, or the wrong kind of entry.
            have_full = set(meta.get("full_steps", []))
            have_sampled = set(meta["bank_steps"]) - have_full
            kinds = {s: self.controller.step_kind(s) for s in range(steps)}
            missing = sorted({s for s, k in kinds.items() if k == "sampled"} - have_sampled)
            missing_full = sorted({s for s, k in kinds.items() if k == "full"} - have_full)
            if missing:
                raise ValueError(f"the loaded id bank has no entries for steps {missing} of sampled consistent "
                                 f"attention (it holds sampled entries for {len(have_sampled)} and whole id inputs "
                                 f"for {len(have_full)} of {steps} steps); use the same schedule / start_step / "
                                 f"probability as the write")
            if missing_full:
                raise ValueError(f"the loaded id bank has no whole id inputs for steps {missing_full}, which "
                                 f"schedule={self.schedule!r} reads in full before start_step "
                                 f"{self.controller.start_step} (it was written with schedule "
                                 f"{meta.get('schedule', 'none: saved before schedules existed')!r}); use the "
                                 f"same schedule / start_step as the write (a bank saved before schedules "
                                 f"existed: schedule='low_vram' with the start_step it was written with, 5 by "
                                 f"default)")


def apply_storydiffusion(pipe, config: Optional[StoryDiffusionConfig] = None) -> StoryDiffusion:
    """Apply StoryDiffusion's consistent self-attention to `pipe` (an SD1.5 / SDXL pipeline):
    returns the :class:`StoryDiffusion` handle (``generate_story``, ``remove()``, ``with``)."""
    return StoryDiffusion(pipe, config if config is not None else StoryDiffusionConfig())


# ----------------------------------------------------------------------------------------------
# video mode
class VideoSubjectConsistency(PatchHandle):
    """Frames of a long video attend to a shared subject bank with the consistent-attention op.

    A :class:`longvideo.hooks.PatchHandle`: the processors are installed at construction and
    ``remove()`` (or leaving a ``with`` block) restores the model's own.

    Where it applies: video models whose spatial self-attention runs frames as the batch axis,
    hidden states (batch * frames, tokens, C) in a diffusers ``Attention``: AnimateDiff
    (UNetMotionModel: ``down/up_blocks.*.attentions.*.attn1``), Stable Video Diffusion, the
    ``UNet3DConditionModel`` family. Each frame attends to its own tokens, to a random subset
    (`sampling_rate`) of the tokens of the other frames of its window (``|f - f'| <= window``,
    within one CFG half), and to the subject bank. Full 3D-attention transformers (Wan,
    CogVideoX) already attend across all frames and use their own processors; this helper does
    not patch them. ``layers="spatial"`` (default) selects every ``attn1`` outside temporal /
    motion modules (whose batch axis is tokens, not frames). ``bank_location`` /
    ``bank_gpu_budget`` as in :class:`StoryDiffusion` (default None: the model's device).

    Two ways to drive it:

    * chunked generation (each chunk a full pipeline call with the same schedule): ``capture`` the
      first chunk (bank entries per step), then ``attend`` while generating the others;
      ``bank_step_key=True`` (default);
    * FIFO-Diffusion / Ouroboros queues (one model call per shifted window, frames at different
      noise levels): ``bank_step_key=False`` keeps one entry per layer, captured from one window
      (e.g. the first full queue) and attended to by every later window.

    Example (AnimateDiff, 16-frame chunks, CFG)::

        vc = VideoSubjectConsistency(pipe.unet, frames_per_group=16, sampling_rate=0.25, window=4)
        with vc.capture("hero"):
            first = pipe(prompt, num_frames=16, ...)
        with vc.attend(["hero"]):
            nxt = pipe(prompt, num_frames=16, latents=..., ...)
    """

    def __init__(self, model: torch.nn.Module, frames_per_group: Optional[int] = None, sampling_rate: float = 0.0,
                 window: int = -1, layers="spatial", bank_location=None, bank_step_key: bool = True, seed: int = 0,
                 start_step: int = 0, probability: Optional[Callable[[int], float]] = None, cfg: bool = True,
                 bank_gpu_budget=None):
        PatchHandle.__init__(self, "VideoSubjectConsistency")
        if bank_gpu_budget is not None:
            parse_gpu_budget(bank_gpu_budget, "bank_gpu_budget")
        self.bank = IdBank(bank_location, gpu_budget=bank_gpu_budget)
        self.controller = ConsistentAttentionController(
            sampling_rate=sampling_rate, start_step=start_step, prob_early=1.0, prob_late=1.0,
            probability=probability, window=window, bank=self.bank, seed=seed, bank_step_key=bank_step_key)
        self.controller.num_groups = 2 if cfg else 1
        self.frames_per_group = frames_per_group
        try:
            self.layers = self.controller.install(model, layers, handle=self)
        except BaseException:
            self.remove()
            raise
        self._calls = 0

    @contextlib.contextmanager
    def capture(self, subject: str = "subject", attend_to: Sequence[str] = ()):
        """Inside: model calls write `subject`'s bank (entries replaced)."""
        self.bank.clear(subject)
        self._calls += 1
        self.controller.begin_call("write", call_key=("video", self._calls), group_size=self.frames_per_group,
                                   write_key=subject)
        try:
            yield self
        finally:
            self.controller.end_call()
            self.bank.flush()

    @contextlib.contextmanager
    def attend(self, subjects: Sequence[str] = ("subject",)):
        """Inside: model calls attend to the banks of `subjects` (and to sampled tokens of the
        other frames of their window)."""
        self._calls += 1
        self.controller.begin_call("read", call_key=("video", self._calls), group_size=self.frames_per_group,
                                   read_keys=list(subjects))
        try:
            yield self
        finally:
            self.controller.end_call()

    def reset_step(self, step: int = -1) -> None:
        """Set the step counter (bank_step_key=True: entry `step + 1` is used by the next model call)."""
        self.controller.step = step



# ----------------------------------------------------------------------------------------------
# comic grid
def comic_grid(images, captions: Sequence[str], columns: int = 3, panel_pad: int = 8, caption_lines: int = 3):
    """A comic-style page: panels with a border in a grid, each with its caption underneath."""
    from PIL import Image, ImageDraw, ImageFont

    panels = [img if isinstance(img, Image.Image) else Image.fromarray(_to_uint8(img)) for img in images]
    if not panels:
        raise ValueError("comic_grid needs at least one image")
    w = max(p.width for p in panels)
    h = max(p.height for p in panels)
    font = ImageFont.load_default()
    char_w = max(6, int(font.getlength("M"))) if hasattr(font, "getlength") else 6
    line_h = 12
    per_line = max(8, w // char_w)
    cap_h = caption_lines * line_h + 6
    columns = max(1, min(columns, len(panels)))
    rows = (len(panels) + columns - 1) // columns
    cell_w, cell_h = w + 2 * panel_pad, h + cap_h + 2 * panel_pad
    page = Image.new("RGB", (columns * cell_w + panel_pad, rows * cell_h + panel_pad), "white")
    draw = ImageDraw.Draw(page)
    for i, (panel, cap) in enumerate(zip(panels, captions)):
        r, c = divmod(i, columns)
        x, y = panel_pad + c * cell_w, panel_pad + r * cell_h
        page.paste(panel.convert("RGB"), (x, y))
        draw.rectangle([x - 2, y - 2, x + panel.width + 1, y + panel.height + 1], outline="black", width=2)
        words, lines, cur = str(cap).split(), [], ""
        for word in words:
            if len(cur) + len(word) + 1 > per_line and cur:
                lines.append(cur)
                cur = word
            else:
                cur = f"{cur} {word}".strip()
        if cur:
            lines.append(cur)
        if len(lines) > caption_lines:
            lines = lines[:caption_lines]
            lines[-1] = lines[-1][: max(0, per_line - 3)] + "..."
        for j, text in enumerate(lines):
            draw.text((x, y + panel.height + 4 + j * line_h), text, fill="black", font=font)
    return page


def _to_uint8(img):
    import numpy as np

    arr = img.detach().float().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = arr.repeat(3, axis=-1)
    return arr
