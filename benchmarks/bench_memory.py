"""Benchmark suite ``memory``: issue 18's memory targets, each planned by the memory planner and
then measured at full size (random weights) with the settings it chose.

Targets, in the order they run (by value: the first is the one the issue names first):

1. ``freeloc_wan1.3b_321f_480p`` -- FreeLOC on Wan2.1-T2V-1.3B, 321 frames (81 latent) at
   480x832, within 24 GB (``longvideo generate --method freeloc --fit 24GB``);
2. ``story_sdxl_1024_4ids`` -- StoryDiffusion on SDXL at 1024x1024 with 4 id images, within
   12 GB (``longvideo story --fit 12GB``);
3. ``fifo_wan14b_480p`` -- FIFO-Diffusion on Wan2.1-T2V-14B at 480x832, within 24 GB with
   offloading (``longvideo generate --method fifo --fit 24GB``).

Per target: ``longvideo.planner.plan(..., gpu_memory=SIZE)`` chooses the settings (the same call
``--fit`` makes, longvideo/cli/_fit.py); the pipeline is built from the model's known config with
random weights (on the GPU, then placed by ``_fit.apply_settings``: offload mode, VAE tiling /
slicing), and the part of the run that defines its peak is run with those settings:

* FreeLOC: the prompt encoding (prompt and negative prompt), one denoising step through the
  pipeline (CFG: two transformer calls over the 81 latent frames), the streamed decode of the 81
  latent frames as the CLI does it (``longvideo.decode.decode_to``, tiled when chosen). To save
  a 321-frame transformer call, the step's conditional call is answered by a tensor of its
  output's shape; its activations are freed before the unconditional call, which holds that
  output, so the step's peak is the unconditional call's. Time per step = 2 x that call.
* StoryDiffusion: the 4 id images written together and 1 image read (``generate_story``), 2
  denoising steps (both "full" steps of the official app's schedule: the largest id-bank
  entries), with the pipeline's decode. The settings come from the plan of the real run (50
  steps, 2 read images); the prediction compared is the plan of the run made (2 steps, 1 read
  image, the same settings), reported beside the target plan's.
* FIFO: frame-wise timestep modulation installed before the offloading (as the CLI does), the
  prompt encoding, two latent frames decoded to bring the causal VAE's stream cache
  to its steady state, one window call of an iteration (``FIFODiffusion.step`` restricted to its
  first window: the CFG-batched transformer call, the queue update) with the queue and that
  cache alive, then the next frame's decode. Time per iteration = the windows per iteration x
  the window's time.

Measured per phase (the planner's phase names): on CUDA ``torch.cuda.max_memory_allocated``
since the phase began, less what was allocated when the case began (so the weights the case
builds count, as in the planner's phase totals), and ``max_memory_reserved`` likewise (what the
allocator took from the device: ``fits`` compares this with the target; the CUDA context is not
counted, about 0.5 GB on a real card). On CPU (``--quick --device cpu``: the tiny models, the
same code) the measure is ``LiveTensorTracker`` from after the models were built, so weights are
excluded there and the prediction compared is the phases' bytes beyond the weights.

Each case's record row carries, under ``memory``: the target (bytes, the fit size), the chosen
settings, the predicted peak (the plan of the run made; and of the target run), the measured
peak, their ratio (predicted / measured) and whether it is within ``TOLERANCE`` (issue 18:
10%), ``fits``, the time per step, the phases (predicted and measured bytes, calls, seconds),
the build time, and a ``status``: "ok", "out of memory" (``torch.OutOfMemoryError`` in the run:
fits false; one while building the random-weight models on the device says so and leaves fits
unset), "interrupted" (the suite's time limit; no later case runs) or "error: ...". The row's
``peak_mem_bytes`` is the measured peak; ``median_ms`` is the whole case (build included).
See docs/architecture.md ("Benchmarks and records") and docs/methods.md ("Fitting a GPU").
"""
from __future__ import annotations

import gc
import math
import time
import types
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from longvideo.benchmarking import Case

SUITE = "memory"
TOLERANCE = 0.10          # issue 18: planner predictions within 10% of the measured peak
HEADROOM = 0.05           # the planner's default headroom (plan(headroom=...))


@dataclass
class Target:
    """One memory target: what the planner is asked (``plan_kwargs``), the card size, and the
    run that measures it (``run(ctx)``)."""

    key: str
    label: str
    method: str
    size: str                       # "24GB"
    plan_kwargs: dict
    run: Callable
    quick_marker: str = ""          # quick mode: the setting the tiny target size is chosen to need
    run_plan_kwargs: dict = field(default_factory=dict)   # the run made, where it differs from the target's


class _Interrupted(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# measuring
class Meter:
    """Peak bytes and time per phase (module docstring: CUDA allocator statistics, or on CPU a
    LiveTensorTracker started by :meth:`start`). Phases are entered with :meth:`phase` (a context
    manager) or :meth:`hook` (a module's calls); a phase entered several times keeps its largest
    peak, its call count and its total seconds."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.phases: dict = {}
        self.overall = 0
        self.overall_reserved = 0
        self.base = self.base_reserved = 0
        self.tracker = None
        self.started = False
        self._open: Optional[tuple] = None
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated(device)
            self.base_reserved = torch.cuda.memory_reserved(device)

    def start(self) -> None:
        """After the models are built and placed: measuring starts (CUDA: the build's transient
        peak is forgotten; CPU: the tracker starts, the weights are not counted)."""
        self.started = True
        if self.cuda:   # the build's transient peak (float32 before the cast) is not the run's
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from longvideo.planner import LiveTensorTracker

            self.tracker = LiveTensorTracker(device="cpu")
            self.tracker.__enter__()

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._fold()
        elif self.tracker is not None:
            self.overall = max(self.overall, self.tracker.peak)
            self.tracker.__exit__(None, None, None)
            self.tracker = None

    def resident(self) -> int:
        """Bytes allocated now, beyond the case's start (CUDA) or the tracker's (CPU)."""
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) - self.base
        return self.tracker.current if self.tracker is not None else 0

    def _peak(self) -> tuple:
        if self.cuda:
            return (torch.cuda.max_memory_allocated(self.device) - self.base,
                    torch.cuda.max_memory_reserved(self.device) - self.base_reserved)
        return (self.tracker.peak, None) if self.tracker is not None else (0, None)

    def _fold(self) -> None:
        peak, reserved = self._peak()
        self.overall = max(self.overall, peak)
        if reserved is not None:
            self.overall_reserved = max(self.overall_reserved, reserved)

    def begin(self, name: str) -> None:
        if self._open is not None:      # nested (a hooked module inside a phase): the outer one counts
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._fold()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.tracker is not None:
            self.overall = max(self.overall, self.tracker.peak)
            self.tracker.reset_peak()
        self._open = (name, time.perf_counter())

    def end(self, name: str) -> None:
        if self._open is None or self._open[0] != name:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._open[1]
        self._open = None
        peak, reserved = self._peak()
        self.overall = max(self.overall, peak)
        if reserved is not None:
            self.overall_reserved = max(self.overall_reserved, reserved)
        ph = self.phases.setdefault(name, {"measured_bytes": 0, "calls": 0, "seconds": 0.0, "call_seconds": []})
        ph["measured_bytes"] = max(ph["measured_bytes"], peak)
        if reserved is not None:
            ph["measured_reserved_bytes"] = max(ph.get("measured_reserved_bytes", 0), reserved)
        ph["calls"] += 1
        ph["seconds"] += seconds
        ph["call_seconds"].append(round(seconds, 4))

    class _Phase:
        def __init__(self, meter, name):
            self.meter, self.name = meter, name

        def __enter__(self):
            self.meter.begin(self.name)

        def __exit__(self, *exc):
            self.meter.end(self.name)

    def phase(self, name: str):
        return Meter._Phase(self, name)

    def hook(self, module: torch.nn.Module, name_of: Callable) -> list:
        """Forward pre/post hooks making each call of `module` a phase ``name_of(args, kwargs)``
        (None: not measured). Returns the hook handles."""
        current = []

        def pre(mod, args, kwargs):
            name = name_of(args, kwargs)
            current.append(name)
            if name is not None:
                self.begin(name)

        def post(mod, args, kwargs, out):
            name = current.pop() if current else None
            if name is not None:
                self.end(name)

        return [module.register_forward_pre_hook(pre, with_kwargs=True),
                module.register_forward_hook(post, with_kwargs=True)]


# ---------------------------------------------------------------------------------------------
# building full-size pipelines from the planner's known configs (random weights)
def _weights_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _build_component(spec, name: str, device: torch.device, dtype: torch.dtype, text_kw: Optional[dict] = None):
    """The component `name` of `spec` built from its config directly on `device` (random init
    there: fast on a GPU) and cast as the loaders place it (longvideo.planner.models.weight_bytes)."""
    import json
    import warnings

    comp = spec.components[name]
    config = json.loads(json.dumps(comp.config, default=list))
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        with torch.device(device):
            if comp.library == "diffusers":
                import diffusers

                module = getattr(diffusers, comp.class_name).from_config(config)
            else:
                import transformers

                cls = getattr(transformers, comp.class_name)
                config = {k: v for k, v in config.items() if k != "architectures"}
                config.update(text_kw or {})
                module = cls(cls.config_class.from_dict(config))
    module.eval().requires_grad_(False)
    load = spec.load_dtype(name, dtype)
    if comp.class_name in ("WanTransformer3DModel", "SkyReelsV2Transformer3DModel"):
        from longvideo.models.wan import _cast_transformer

        if load != torch.float32:
            _cast_transformer(module, load)
    elif load != torch.float32:
        module.to(dtype=load)
    return module


def _wan_pipeline(spec, device, dtype):
    from diffusers import WanPipeline

    from longvideo.methods.families.wan import ftfy_fallback
    from longvideo.models.tokenizers import char_tokenizer
    from longvideo.models.wan import _scheduler

    times = {}
    parts = {}
    for name in ("transformer", "vae", "text_encoder"):
        t0 = time.perf_counter()
        parts[name] = _build_component(spec, name, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times[name] = time.perf_counter() - t0
    pipe = WanPipeline(tokenizer=char_tokenizer(spec.text_len), scheduler=_scheduler(), **parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.longvideo_trained_latent_frames = spec.trained_latent_frames
    ftfy_fallback(pipe)
    return pipe, times


def _sdxl_pipeline(spec, device, dtype):
    from diffusers import StableDiffusionXLPipeline

    from longvideo.models.sd import _scheduler
    from longvideo.models.tokenizers import EOS_ID, char_tokenizer

    ids = dict(bos_token_id=2, eos_token_id=EOS_ID, pad_token_id=0)  # the character tokenizer's ids
    times, parts = {}, {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        t0 = time.perf_counter()
        parts[name] = _build_component(spec, name, device, dtype, text_kw=ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times[name] = time.perf_counter() - t0
    pipe = StableDiffusionXLPipeline(tokenizer=char_tokenizer(77), tokenizer_2=char_tokenizer(77),
                                     scheduler=_scheduler(), add_watermarker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, times


def _tiny_pipeline(family: str, device):
    if family == "sdxl":
        from longvideo.models import sd

        pipe = sd.tiny_pipeline("sdxl")
    else:
        from longvideo.models import wan

        pipe = wan.tiny_pipeline("t2v")
    return pipe, {}


# ---------------------------------------------------------------------------------------------
# the runs (each measures the phases of the plan it was given; returns the time per step)
class _Sink:
    def __init__(self):
        self.frames = 0

    def write(self, frames):
        self.frames += len(frames)


def _run_freeloc(ctx) -> dict:
    from longvideo.decode import decode_to
    from longvideo.methods.freeloc import FreeLOC

    pipe, meter, kw = ctx.pipe, ctx.meter, ctx.run_kwargs
    method = FreeLOC(pipe, trained_frames=kw.get("trained_frames"))
    tr = pipe.transformer
    real_forward = tr.forward
    calls = {"n": 0}

    def forward(hidden_states, *args, return_dict=True, **kwargs):
        calls["n"] += 1
        if calls["n"] % 2 == 1:   # the step's conditional call: a stand-in of its output (module doc)
            out = torch.randn_like(hidden_states)
            return (out,) if not return_dict else types.SimpleNamespace(sample=out)
        with meter.phase("denoise"):
            return real_forward(hidden_states, *args, return_dict=return_dict, **kwargs)

    tr.forward = forward
    hooks = meter.hook(pipe.text_encoder, lambda a, k: "text")
    try:
        meter.start()
        latents = pipe(prompt="a red panda walking through a snowy forest", negative_prompt="",
                       num_frames=kw["num_frames"], height=kw["height"], width=kw["width"], num_inference_steps=1,
                       guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(0),
                       output_type="latent").frames
        sink = _Sink()
        with meter.phase("decode"):
            decode_to(pipe, latents, sink)
        meter.stop()
    finally:
        for h in hooks:
            h.remove()
        del tr.forward
        method.remove()
    per_call = meter.phases.get("denoise", {}).get("seconds")
    return {"seconds_per_step": None if per_call is None else 2 * per_call,
            "step": "denoising step = 2 transformer calls (CFG); 2 x the measured unconditional call",
            "decoded_frames": sink.frames, "decode_seconds": meter.phases["decode"]["seconds"],
            "compared_phases": ["text", "denoise", "decode"],
            "notes": ["decode: the CLI's streamed decode (longvideo.decode.decode_to, tiled when chosen), which "
                      "the planner's decode phase models (plan's decode='streamed')",
                      "the timed call is the run's first: it includes any kernel compile and FreeLOC's one-off "
                      "schedule build for this length"]}


def _run_story(ctx) -> dict:
    from longvideo.methods.storydiffusion import StoryDiffusion

    pipe, meter, kw, st = ctx.pipe, ctx.meter, ctx.run_kwargs, ctx.settings
    ids = kw["id_length"]
    bank = {"device": str(ctx.device), "cpu": "cpu"}.get(st.bank_location, st.bank_location)
    budget = st.bank_budget
    if bank == "auto" and budget is None:   # the CLI's (and the planner's) default: 10% of --fit
        budget = int(0.1 * ctx.target_bytes)
    method = StoryDiffusion(pipe, bank_location=bank, bank_gpu_budget=budget if bank == "auto" else None)
    prompts = ["[Hero] reading a book at home", "[Hero] walking in a park", "[Hero] cooking dinner",
               "[Hero] riding a bicycle", "[Hero] on a boat at sunset", "[Hero] sleeping under a tree"]
    prompts = prompts[:ids] + prompts[ids: ids + kw["read_images"]]

    def unet_phase(args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        return "write" if sample.shape[0] == 2 * ids else "read" if sample.shape[0] == 2 else None

    hooks = meter.hook(pipe.unet, unet_phase)
    for name in ("text_encoder", "text_encoder_2"):
        hooks += meter.hook(getattr(pipe, name), lambda a, k: "text")
    real_decode = pipe.vae.decode

    def decode(*args, **kwargs):
        with meter.phase("decode"):
            return real_decode(*args, **kwargs)

    pipe.vae.decode = decode
    try:
        meter.start()
        method.generate_story(prompts, id_length=ids, num_inference_steps=kw["num_inference_steps"],
                              height=kw["height"], width=kw["width"], seed=0, output_type="pil", progress=False)
        meter.stop()
    finally:
        for h in hooks:
            h.remove()
        del pipe.vae.decode
        method.remove()
    steps = kw["num_inference_steps"]
    unet_s = sum(meter.phases.get(p, {}).get("seconds", 0.0) for p in ("write", "read"))
    return {"seconds_per_step": unet_s / steps,
            "step": f"denoising step of the {len(prompts)}-image story: its write call ({ids} id images, CFG) and "
                    f"its {kw['read_images']} read call(s)",
            "compared_phases": ["text", "write", "read", "decode"]}


def _prepare_wan(pipe) -> None:
    """The CLI's order (longvideo/cli/_fit.py: lean_wan_forward, right after loading): longvideo's
    Wan forward on the Wan transformers before --fit's offloading wraps their forwards; the
    planner's default (wan_forward="longvideo") assumes it. Nothing on other pipelines."""
    from longvideo.cli._fit import lean_wan_forward

    lean_wan_forward(pipe)


def _run_fifo(ctx) -> dict:
    from longvideo.methods.fifo import FIFODiffusion, QueueState

    pipe, meter, st, kw = ctx.pipe, ctx.meter, ctx.settings, ctx.run_kwargs
    fifo = FIFODiffusion(pipe, num_partitions=st.num_partitions, frames_per_window=st.frames_per_window)
    windows = fifo.num_windows

    class OneWindow(type(fifo)):       # FIFODiffusion.step over its first window only
        num_windows = property(lambda self: 1)

    fifo.__class__ = OneWindow
    family = fifo.family
    device = ctx.device
    hooks = meter.hook(pipe.text_encoder, lambda a, k: "text")
    gen = torch.Generator("cpu").manual_seed(0)
    vs = pipe.vae_scale_factor_spatial
    h, w = kw["height"] // vs, kw["width"] // vs
    C = pipe.transformer.config.in_channels
    try:
        meter.start()
        with torch.no_grad():
            emb, neg = family.encode_prompt("a red panda walking through a snowy forest", "", True, device)
            lv = fifo.levels(device)
            state = QueueState(queue=torch.randn(1, C, fifo.L, h, w, generator=gen).to(device),
                               context=torch.randn(1, C, fifo.context_len, h, w, generator=gen).to(device),
                               decoder_state=None, iteration=fifo.warmup + fifo.context_len, frames_out=0,
                               rng_state=gen.get_state(), maps=None, bank=None)
            cache = None
            with meter.phase("decode warm-up (2 latent frames)"):
                for _ in range(2):
                    frames, cache = family.decode(state.queue[:, :, :1], cache)
                    del frames
            state.decoder_state = cache
            with meter.phase("iteration"):
                out = fifo.step(state, lv, emb, neg, 5.0)
                tail = fifo._new_tail(lv, out.queue, gen)
                queue = torch.cat([out.queue[:, :, 1:], tail], dim=2)
                del out, tail
            with meter.phase("decode"):
                frames, cache = family.decode(queue[:, :, :1], cache)
                del frames
        meter.stop()
    finally:
        for h_ in hooks:
            h_.remove()
        fifo.__class__ = OneWindow.__mro__[1]
    window_s = meter.phases["iteration"]["seconds"]
    return {"seconds_per_step": windows * window_s,
            "step": f"FIFO iteration = {windows} window calls; {windows} x the measured window (one latent frame "
                    "out = 4 video frames)",
            "window_seconds": window_s, "windows_per_iteration": windows,
            "compared_phases": ["text", "iteration", "decode"],
            "notes": ["the initial clip (its own phase in the plan, below the iteration's peak) is not run"]}


# ---------------------------------------------------------------------------------------------
def targets(quick: bool) -> list:
    """The three targets (module docstring), full size or (quick) on the tiny models."""
    if quick:
        return [
            Target("freeloc_tiny_17f", "FreeLOC, tiny Wan, 32x32, 17 frames", "freeloc", "",
                   dict(model="tiny-wan", height=32, width=32, num_frames=17, dtype="float32", trained_frames=3,
                        num_inference_steps=1),
                   _run_freeloc, quick_marker="vae_tiling"),
            Target("story_tiny_sdxl_32_4ids", "StoryDiffusion, tiny SDXL, 32x32, 4 id images", "story", "",
                   dict(model="tiny-sdxl", height=32, width=32, num_frames=None, dtype="float32", id_length=4,
                        num_inference_steps=50, read_images=2),
                   _run_story, quick_marker="bank=cpu",
                   run_plan_kwargs=dict(num_inference_steps=2, read_images=1)),
            Target("fifo_tiny_wan_32", "FIFO, tiny Wan, 32x32", "fifo", "",
                   dict(model="tiny-wan", height=32, width=32, num_frames=33, dtype="float32"),
                   _run_fifo, quick_marker="offload=group"),
        ]
    return [
        Target("freeloc_wan1.3b_321f_480p", "FreeLOC, Wan2.1-T2V-1.3B, 480x832, 321 frames, within 24 GB", "freeloc",
               "24GB", dict(model="wan2.1-t2v-1.3b", height=480, width=832, num_frames=321, dtype="bfloat16",
                            num_inference_steps=1),
               _run_freeloc),
        Target("story_sdxl_1024_4ids", "StoryDiffusion, SDXL, 1024x1024, 4 id images, within 12 GB", "story", "12GB",
               dict(model="sdxl", height=1024, width=1024, num_frames=None, dtype="float16", id_length=4,
                    num_inference_steps=50, read_images=2),
               _run_story, run_plan_kwargs=dict(num_inference_steps=2, read_images=1)),
        Target("fifo_wan14b_480p", "FIFO, Wan2.1-T2V-14B, 480x832, within 24 GB with offloading", "fifo", "24GB",
               dict(model="wan2.1-t2v-14b", height=480, width=832, num_frames=241, dtype="bfloat16"),
               _run_fifo),
    ]


def _plan(target: Target, spec, device_kind: str, size=None, settings=None, extra=None):
    from longvideo.planner import plan

    kw = dict(target.plan_kwargs)
    kw.pop("model")
    kw.update(extra or {})
    height, width, frames, dtype = kw.pop("height"), kw.pop("width"), kw.pop("num_frames"), kw.pop("dtype")
    if settings is not None:
        kw.update(offload=settings.offload, vae_tiling=settings.vae_tiling, vae_slicing=settings.vae_slicing,
                  bank_location=settings.bank_location, bank_budget=settings.bank_budget,
                  frames_per_window=settings.frames_per_window, num_partitions=settings.num_partitions)
    return plan(target.method, spec, height, width, frames, dtype, gpu_memory=size, device=device_kind, **kw)


def _quick_size(target: Target, spec) -> tuple:
    """(card size, settings) for the tiny model: the planner's first candidate carrying
    `quick_marker` and a size at which it fits (1 byte to spare over the headroom)."""
    p = _plan(target, spec, "cpu", size=1)     # nothing fits: every candidate is tried and listed
    for c in p.candidates:
        if target.quick_marker in c.settings.describe():
            return int(math.ceil(c.peak / (1.0 - HEADROOM))) + 1, c.settings
    raise ValueError(f"{target.key}: no candidate with {target.quick_marker!r}")


def _phase_rows(plan_run, measured: dict, cuda: bool) -> list:
    rows = []
    for ph in plan_run.phases:
        pred = ph.nbytes if cuda else ph.beyond_weights
        m = measured.get(ph.name)
        row = {"name": ph.name, "predicted_bytes": pred, "predicted_weights_bytes": ph.by_kind("weights"),
               "measured_bytes": None if m is None else m["measured_bytes"]}
        if m is not None:
            row.update({k: v for k, v in m.items() if k != "measured_bytes"})
            row["ratio"] = pred / m["measured_bytes"] if m["measured_bytes"] else None
        rows.append(row)
    names = {ph.name for ph in plan_run.phases}
    rows += [dict(name=n, predicted_bytes=None, **m) for n, m in measured.items() if n not in names]
    return rows


def _measure(target: Target, device: torch.device, quick: bool, result: dict, flags: dict) -> None:
    """Plan, build, place, run and measure one target; fills `result` (never raises, except for
    a second interrupt)."""
    from longvideo.cli._fit import apply_settings
    from longvideo.planner import format_bytes, load_model_spec, parse_bytes, spec_from_pipeline

    cuda = device.type == "cuda"
    result.update(target=target.key, label=target.label, method=target.method, status="started",
                  target_plan={"method": target.method, **target.plan_kwargs, "fit": target.size or None})
    pipe = ctx = meter = None
    stage = "plan"
    t_case = time.perf_counter()
    try:
        if quick:
            pipe, build = _tiny_pipeline("sdxl" if target.method == "story" else "wan", device)
            pipe.to(device)
            spec = spec_from_pipeline(pipe, name=target.plan_kwargs["model"])
            size, quick_settings = _quick_size(target, spec)
        else:
            spec = load_model_spec(target.plan_kwargs["model"])
            size = parse_bytes(target.size)
        device_kind = "cuda" if cuda else "cpu"
        t0 = time.perf_counter()
        chosen = _plan(target, spec, device_kind, size=size)
        result.update(target_bytes=size, fit=target.size or f"{size}B", plan_seconds=time.perf_counter() - t0,
                      planned_fits=chosen.fits, choice=chosen.choice,
                      predicted_target_peak_bytes=chosen.peak_bytes if cuda else chosen.peak_phase.beyond_weights,
                      predicted_target_peak_phase=chosen.peak_phase.name)
        st = chosen.settings
        if quick and st != quick_settings:
            # on the tiny models an earlier (faster) candidate may fit as well: the quick run takes
            # the candidate carrying the marker, so that its code path (offload, bank) runs on CPU
            result["quick_settings_instead_of_choice"] = st.describe()
            st = quick_settings
        result["settings"] = asdict(st)
        result["settings_described"] = st.describe()
        if not chosen.fits:
            result["status"] = "planner: nothing fits"
            return
        plan_run = _plan(target, spec, device_kind, settings=st, extra=target.run_plan_kwargs)
        run_kwargs = {**target.plan_kwargs, **target.run_plan_kwargs}
        result["run"] = {k: v for k, v in run_kwargs.items() if k != "model"}
        meter = Meter(device)
        stage = "build"
        if not quick:
            builder = _sdxl_pipeline if spec.family == "sdxl" else _wan_pipeline
            dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}[target.plan_kwargs["dtype"]]
            pipe, build = builder(spec, device, dt)
            result["weights_bytes"] = {n: _weights_bytes(getattr(pipe, n)) for n in spec.components}
            result["planner_weights_bytes"] = {n: spec.weight_bytes(n, dt) for n in spec.components}
            # what `--fit` itself does: plan for the pipeline loaded (its modules' configs); the
            # same choice and peak as the known config's, unless the two descriptions differ
            loaded = _plan(target, spec_from_pipeline(pipe, name=spec.name), device_kind, size=size)
            result["loaded_pipeline_choice"] = {"settings": loaded.settings.describe(),
                                                "predicted_peak_bytes": loaded.peak_bytes,
                                                "same_as_known_config": loaded.settings == st
                                                and loaded.peak_bytes == chosen.peak_bytes}
        stage = "place"
        t0 = time.perf_counter()
        _prepare_wan(pipe)
        apply_settings(pipe, st, device)
        build["place (apply_settings)"] = time.perf_counter() - t0
        result["build_seconds"] = {k: round(v, 3) for k, v in build.items()}
        ctx = types.SimpleNamespace(pipe=pipe, meter=meter, settings=st, device=device, run_kwargs=run_kwargs,
                                    target_bytes=size)
        stage = "run"
        result.update(target.run(ctx))
        result["status"] = "ok"
    except torch.OutOfMemoryError as exc:
        # only the run says whether the target fits: the benchmark builds its random-weight
        # models on the device first (in float32 before the cast), which a small card may refuse
        result["status"] = "out of memory" if stage == "run" else f"out of memory in the {stage} step, before the run"
        result["error"] = str(exc)[:400]
    except KeyboardInterrupt:
        result["status"] = "interrupted"
        flags["interrupted"] = True
    except Exception as exc:  # noqa: BLE001 - recorded in the row; the next target still runs
        result["status"] = f"error: {type(exc).__name__}: {str(exc)[:400]}"
    finally:
        if meter is not None:
            if meter.tracker is not None:
                meter.stop()
            meter._open = None
            if cuda and meter.started:
                meter._fold()
            phases = meter.phases
            measured = meter.started and (phases or result["status"] == "ok")
            result["measured_peak_bytes"] = meter.overall if measured else None
            result["measured_peak_reserved_bytes"] = meter.overall_reserved if (cuda and measured) else None
            if "plan_run" in locals():
                result["phases"] = _phase_rows(plan_run, phases, cuda)
                compared = [r for r in result["phases"] if r["name"] in result.get("compared_phases", ())]
                if compared and all(r["measured_bytes"] is not None for r in compared):
                    pred = max(r["predicted_bytes"] for r in compared)
                    result["predicted_peak_bytes"] = pred
                    result["predicted_peak_phase"] = max(compared, key=lambda r: r["predicted_bytes"])["name"]
                    meas = result["measured_peak_bytes"]
                    result["ratio"] = pred / meas if meas else None
                    result["within_tolerance"] = (result["ratio"] is not None
                                                  and abs(result["ratio"] - 1.0) <= TOLERANCE)
        limit = result.get("target_bytes")
        if result["status"] == "out of memory":
            result["fits"] = False
        elif result["status"] == "ok" and limit is not None:
            used = result.get("measured_peak_reserved_bytes") if cuda else result.get("measured_peak_bytes")
            result["fits"] = used is not None and used <= limit
        else:
            result["fits"] = None
        if result.get("measured_peak_bytes") is not None:
            result["measured_peak"] = format_bytes(result["measured_peak_bytes"])
        result["measure"] = ("cuda: max_memory_allocated since the case began (weights included); fits: "
                             "max_memory_reserved <= target bytes (the CUDA context not counted)" if cuda else
                             "cpu: LiveTensorTracker from after the models were built (weights excluded); "
                             "predictions compared beyond the weights")
        result["case_seconds"] = time.perf_counter() - t_case
        del ctx, pipe
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def cases(device: torch.device, quick: bool, profile: str = "full"):
    """The targets as cases, lazily (a case plans, builds, measures and frees its models when the
    harness reaches it; after an interrupted case no other starts). Every profile runs the same
    three targets once (they are one step each)."""
    device = torch.device(device)
    flags = {"interrupted": False}
    for target in targets(quick):
        if flags["interrupted"]:
            return
        result: dict = {}

        def fn(target=target, result=result):
            result.clear()
            _measure(target, device, quick, result, flags)

        def report(result=result):
            short = {k: result.get(k) for k in ("status", "fit", "settings_described", "measured_peak",
                                                  "ratio", "within_tolerance", "fits", "seconds_per_step")}
            return {"memory": dict(result), "extra": short, "peak_mem_bytes": result.get("measured_peak_bytes")}

        yield Case(SUITE, target.key, f"fit {target.size or 'tiny'}", fn, params={"label": target.label},
                   timing={"warmup": 0, "repeats": 1, "min_time_s": 0.0}, report=report)
