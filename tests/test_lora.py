"""LoRA composes with every processor and hook of ours (issue 19, item 4), offline.

A tiny random LoRA (rank 4, random A and a NONZERO random B) on the attention projections
(to_q / to_k / to_v / to_out.0 of self- and cross-attention) and the FFN linears of the tiny
models, loaded the way users load one: the pipeline's ``load_lora_weights`` (peft backend), then
``set_adapters`` with a weight other than 1. Three checks per method:

(a) method off (its no-op settings, with our processors installed where the method installs
    them) equals diffusers' own processors with the LoRA active;
(b) the LoRA changes the output, and changes ours exactly as it changes diffusers' (our
    with-minus-without equals diffusers' with-minus-without), so (a) can fail;
(c) method on: the output with the LoRA as separate low-rank layers equals the output with the
    LoRA fused into the base weights (``fuse_lora``). A processor that multiplied by a raw weight
    matrix (``attn.to_q.weight``) instead of calling the projection module would see the LoRA
    only when it is fused: :func:`test_fused_check_catches_a_processor_that_bypasses_the_lora`
    shows that the check catches exactly that.

Methods: FreeLOC and its probe (Wan), FIFO and Ouroboros (Wan, AnimateDiff), StoryDiffusion
(SD1.5, SDXL) and its video mode on a bare UNet (the model's own ``load_lora_adapter``),
randomized blending (Wan video-to-video).
"""
from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
import torch

import longvideo
from longvideo.methods import blending as B
from longvideo.methods import freeloc as FL
from longvideo.methods.families import ftfy_fallback
from longvideo.methods.fifo import FIFODiffusion, OuroborosDiffusion
from longvideo.methods.storydiffusion import StoryDiffusion, VideoSubjectConsistency
from longvideo.models import animatediff, sd, wan
from longvideo.processors import wan as P

pytest.importorskip("peft", minversion="0.17", reason="diffusers' LoRA loading needs peft (pip install -e .[test])")

ADAPTER = "tiny"
RANK = 4
ADAPTER_WEIGHT = 0.8   # set_adapters weight: the LoRA's scaling is not 1
# Linear layers the LoRA targets (suffixes of module names): attention projections + FFN.
WAN_TARGETS = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")) + (
    "ffn.net.0.proj", "ffn.net.2")
UNET_TARGETS = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")) + (
    "ff.net.0.proj", "ff.net.2")
# fp32 on CPU: (W + s B A) x (fused) vs W x + s B (A x) (separate) differ by float rounding only.
FUSED_TOL = 1e-5
# the LoRA must move the outputs by much more than any tolerance used here
MIN_LORA_EFFECT = 1e-2


# ----------------------------------------------------------------------------------------------
# helpers
def tiny_lora(model, prefix, targets, seed=0):
    """A diffusers-format LoRA state dict for every nn.Linear of `model` whose name ends with one
    of `targets` (motion modules excluded): A ~ N(0, 1/in), B ~ N(0, 1/(4 r)), B != 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(targets) and "motion_modules" not in name:
            key = f"{prefix}.{name}" if prefix else name
            out[f"{key}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) / m.in_features ** 0.5
            out[f"{key}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * 0.5 / RANK ** 0.5
    assert out, "no target layer found"
    return out


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def load_tiny_lora(pipe, model, prefix, targets, seed=0):
    """pipe.load_lora_weights + set_adapters, as a user does; checks every target carries it."""
    state = tiny_lora(model, prefix, targets, seed)
    pipe.load_lora_weights(state, adapter_name=ADAPTER)
    pipe.set_adapters([ADAPTER], [ADAPTER_WEIGHT])
    assert len(_lora_layers(model)) == len(state) // 2
    return pipe


@contextlib.contextmanager
def lora_off(owner):
    """The LoRA disabled (pipeline or model), enabled again afterwards."""
    owner.disable_lora()
    try:
        yield
    finally:
        owner.enable_lora()


@contextlib.contextmanager
def lora_fused(owner, model, components):
    """The LoRA fused into the base weights (every LoRA layer then calls only its base layer);
    afterwards unfused and the base weights restored bit for bit. `owner`: the pipeline (fusing
    `components`) or, with components None, the model itself (its own fuse_lora)."""
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    kw = {} if components is None else dict(components=components)
    owner.fuse_lora(**kw)
    try:
        layers = _lora_layers(model)
        assert layers and all(m.merged for m in layers)
        yield
    finally:
        owner.unfuse_lora(**kw)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in base:
                    p.copy_(base[n])


def _t(x):
    return (x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))).double()


def _err(a, b):
    """max |a - b| relative to 1 + max |b|."""
    a, b = _t(a), _t(b)
    return (a - b).abs().max().item() / (1.0 + b.abs().max().item())


def assert_close(a, b, tol):
    err = _err(a, b)
    assert err <= tol, f"relative max error {err:.3g} > {tol:.3g}"


def assert_lora_acts(with_lora, without):
    err = _err(with_lora, without)
    assert err > MIN_LORA_EFFECT, f"the LoRA barely changes the output ({err:.3g}): the test could not fail"


def check_off_and_delta(ours_on, ours_off, ref_on, ref_off, tol):
    """(a) ours == diffusers with the LoRA; (b) the LoRA acts, and moves ours as it moves diffusers'."""
    assert_lora_acts(ref_on, ref_off)
    assert_close(ours_on, ref_on, tol)
    assert_close(_t(ours_on) - _t(ours_off), _t(ref_on) - _t(ref_off), tol)


def check_uses_lora(run, owner, model, components):
    """(c) run() with the LoRA as separate layers == with the LoRA fused, != without the LoRA."""
    on = run()
    with lora_off(owner):
        off = run()
    with lora_fused(owner, model, components):
        fused = run()
    assert_lora_acts(on, off)
    assert_close(on, fused, FUSED_TOL)
    return on


def _op_tol(op, amplification=10.0):
    atol, _ = longvideo.ops.get_backend(op, "reference").tolerance(torch.float32)
    return atol * amplification


# ----------------------------------------------------------------------------------------------
# the tiny pipelines, each with the tiny LoRA loaded and weighted by set_adapters
@pytest.fixture(scope="module")
def wan_t2v():
    pipe = wan.tiny_pipeline("t2v")
    return load_tiny_lora(pipe, pipe.transformer, "transformer", WAN_TARGETS)


@pytest.fixture(scope="module")
def wan_v2v():
    pipe = wan.tiny_pipeline("v2v")
    ftfy_fallback(pipe)
    return load_tiny_lora(pipe, pipe.transformer, "transformer", WAN_TARGETS)


@pytest.fixture(scope="module")
def ad_t2v():
    pipe = animatediff.tiny_pipeline("t2v")
    return load_tiny_lora(pipe, pipe.unet, "unet", UNET_TARGETS)


@pytest.fixture(scope="module")
def sd_pipes():
    pipes = {}
    for kind in ("sd15", "sdxl"):
        pipe = sd.tiny_pipeline(kind)
        pipes[kind] = load_tiny_lora(pipe, pipe.unet, "unet", UNET_TARGETS)
    return pipes


# ----------------------------------------------------------------------------------------------
# FreeLOC and its probe (Wan)


def _wan_run(pipe, frames, **kw):
    return pipe(prompt="a cat", num_frames=frames, height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), output_type="latent", **kw).frames.float()


FREELOC_LAYERS = ["tsa", "vrpr", "tsa", "vrpr"]


def test_freeloc_off_equals_diffusers_with_lora(wan_t2v):
    pipe = wan_t2v
    ref_on = _wan_run(pipe, 17)
    with lora_off(pipe):
        ref_off = _wan_run(pipe, 17)
    # within the trained length our processors defer to diffusers' own: bit for bit
    with FL.FreeLOC(pipe, layer_config=FREELOC_LAYERS, trained_frames=5) as method:
        assert isinstance(pipe.transformer.blocks[0].attn1.processor, P.WanTieredAttnProcessor)
        assert torch.equal(_wan_run(pipe, 17), ref_on)
        assert method.last_params is None
    # our processors active (the op, our q/k/v/out projection code) but configured to change nothing
    with FL.FreeLOC(pipe, layer_config=FREELOC_LAYERS, trained_frames=1, w1=64, w2=64, local_frames=64) as method:
        ours_on = _wan_run(pipe, 17)
        with lora_off(pipe):
            ours_off = _wan_run(pipe, 17)
        assert method.last_params is not None
    check_off_and_delta(ours_on, ours_off, ref_on, ref_off, _op_tol("tiered_sparse_attention"))


def test_freeloc_on_uses_the_lora_projections(wan_t2v):
    pipe = wan_t2v
    with FL.FreeLOC(pipe, layer_config=FREELOC_LAYERS) as method:  # 5 latent frames > 3 trained: active
        on = check_uses_lora(lambda: _wan_run(pipe, 17), pipe, pipe.transformer, ["transformer"])
        assert method.last_params is not None and method.last_params.num_frames == 5
        # the pipeline's LoRA scale (attention_kwargs={"scale": s}) reaches our processors' projections
        half = _wan_run(pipe, 17, attention_kwargs={"scale": 0.5})
        pipe.set_adapters([ADAPTER], [ADAPTER_WEIGHT * 0.5])
        try:
            assert_close(half, _wan_run(pipe, 17), FUSED_TOL)
        finally:
            pipe.set_adapters([ADAPTER], [ADAPTER_WEIGHT])
        assert_lora_acts(on, half)


def test_fused_check_catches_a_processor_that_bypasses_the_lora(wan_t2v, monkeypatch):
    """Negative control: FreeLOC with q/k/v computed from the raw weight matrices (the bug this
    file looks for) fails the fused-vs-separate check by about the LoRA's own effect."""
    pipe = wan_t2v

    def raw_weights_qkv(attn, x):
        lin = torch.nn.functional.linear
        q, k, v = (lin(x, m.weight, m.bias) for m in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        return tuple(t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))

    monkeypatch.setattr(P, "project_qkv", raw_weights_qkv)
    with FL.FreeLOC(pipe, layer_config=FREELOC_LAYERS):
        on = _wan_run(pipe, 17)
        with lora_fused(pipe, pipe.transformer, ["transformer"]):
            fused = _wan_run(pipe, 17)
    assert _err(on, fused) > 100 * FUSED_TOL


def test_freeloc_probe_uses_the_lora_projections(wan_t2v):
    from longvideo.methods.probe import probe_layers

    pipe = wan_t2v

    def run():
        r = probe_layers(pipe, num_frames=17, height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
                         shifts=(20, -20), window=2)
        return torch.tensor([r.position, r.context])

    check_uses_lora(run, pipe, pipe.transformer, ["transformer"])


# ----------------------------------------------------------------------------------------------
# FIFO and Ouroboros (Wan, AnimateDiff): queue states after a few iterations, read back from the
# method's own checkpoint
PROMPT = "a red cat runs in a garden"
_RUN_IDS = itertools.count()


def _queue_after(method, iterations, tmp_path, **kw):
    """The queue state after `iterations` iterations (checkpointed by the method itself)."""
    ckpt = tmp_path / f"run{next(_RUN_IDS)}"
    list(method.generate(PROMPT, 10 ** 6, guidance_scale=3.0, seed=11, checkpoint_dir=ckpt,
                         checkpoint_every=iterations, stop_after_iterations=iterations, **kw))
    state = torch.load(ckpt / "fifo_state.pt", weights_only=True)
    assert state["iteration"] == iterations
    return state


def _guidance_spy(method):
    """Record, per Ouroboros window call, whether self-recurrent guidance produced a gradient."""
    seen = []
    inner = method._ouroboros_window

    def window(*args, **kwargs):
        out = inner(*args, **kwargs)
        seen.append(out[1] is not None)
        return out

    method._ouroboros_window = window
    return seen


def test_fifo_wan_model_call_equals_diffusers_with_lora(wan_t2v):
    """FIFO installs no processor: its per-token-timestep model call (the whole queue update with
    one partition is the Euler step of plain sampling with this call, tests/test_fifo.py) is the
    transformer's own call, with the LoRA."""
    pipe = wan_t2v
    fifo = FIFODiffusion(pipe, num_partitions=1, frames_per_window=3, lookahead=False)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 3, 4, 4, generator=gen)
    emb = torch.randn(1, 16, pipe.transformer.config.text_dim, generator=gen)
    t = torch.full((3,), 700.0)

    def both():
        with torch.no_grad():
            return (fifo._model(x, t, emb, None, 1.0),
                    pipe.transformer(hidden_states=x, timestep=t[:1], encoder_hidden_states=emb, return_dict=False)[0])

    ours_on, ref_on = both()
    with lora_off(pipe):
        ours_off, ref_off = both()
    check_off_and_delta(ours_on, ours_off, ref_on, ref_off, 1e-5)


def test_ouroboros_wan_processors_off_equal_fifo_with_lora(wan_t2v, tmp_path):
    """SACFA without guidance or tail on Wan: our processors on every attention layer (full 3-D
    attention, so SACFA is the identity; they record subject maps) == FIFO on diffusers' own."""
    pipe = wan_t2v
    kw = dict(num_partitions=1, frames_per_window=4)
    ours = OuroborosDiffusion(pipe, tail_sampling=False, sacfa=True, self_recurrent_guidance=False, **kw)
    fifo = FIFODiffusion(pipe, **kw)
    runs = {}
    for lora in (True, False):
        with contextlib.nullcontext() if lora else lora_off(pipe):
            runs[lora] = [_queue_after(m, 2, tmp_path)["queue"] for m in (ours, fifo)]
    assert runs[True][0].shape == runs[True][1].shape
    check_off_and_delta(runs[True][0], runs[False][0], runs[True][1], runs[False][1], 1e-5)


@pytest.mark.parametrize("family", ["wan", "animatediff"])
def test_ouroboros_on_uses_the_lora_projections(family, request, tmp_path):
    """Every part on (SACFA, subject maps from the cross-attention, subject keys, self-recurrent
    guidance through the op's backward, coherent tail): separate LoRA == fused LoRA."""
    pipe = request.getfixturevalue("wan_t2v" if family == "wan" else "ad_t2v")
    model = pipe.transformer if family == "wan" else pipe.unet
    component = "transformer" if family == "wan" else "unet"
    method = OuroborosDiffusion(pipe, num_partitions=1, frames_per_window=4, guided_windows=(0, 1),
                                guidance_scale=2.0)
    guided = _guidance_spy(method)
    size = {} if family == "wan" else dict(height=16, width=16)  # AnimateDiff: 8x8 latents
    # iterations 1-2 record the subject maps and the bank, 3 is guided (window 0 and 1)
    check_uses_lora(lambda: _queue_after(method, 3, tmp_path, **size)["queue"], pipe, model, [component])
    assert any(guided), "self-recurrent guidance never ran: the check did not cover its backward"


def test_ouroboros_animatediff_sacfa_layer_off_equals_diffusers_with_lora(ad_t2v):
    """OuroborosSelfAttnProcessor without subject masks is diffusers' AttnProcessor2_0, LoRA on."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from longvideo.processors.ouroboros import OuroborosContext, OuroborosSelfAttnProcessor

    pipe = ad_t2v
    name = next(n for n in pipe.unet.attn_processors if "motion" not in n and n.endswith("attn1.processor"))
    attn = pipe.unet.get_submodule(name[: -len(".processor")])
    x = torch.randn(6, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    ctx = OuroborosContext((4, 4))
    ctx.begin(frames=3, masks=None, sacfa=True, use_op=True, record_maps=False)
    proc = OuroborosSelfAttnProcessor(ctx, name)

    def both():
        with torch.no_grad():
            return proc(attn, x), AttnProcessor2_0()(attn, x)

    ours_on, ref_on = both()
    with lora_off(pipe):
        ours_off, ref_off = both()
    check_off_and_delta(ours_on, ours_off, ref_on, ref_off, _op_tol("consistent_attention"))


# ----------------------------------------------------------------------------------------------
# StoryDiffusion (SD1.5, SDXL) and its video mode
STORY = ["[Bob] at home", "[Bob] in a park", "[Bob] with a dog"]
STORY_STEPS = 3


def _story(pipe, pipe_kwargs=None, **method_kw):
    """A story through StoryDiffusion (processors removed afterwards): latents per panel."""
    method = StoryDiffusion(pipe, prob_early=1.0, prob_late=1.0, **method_kw)
    try:
        res = method.generate_story(STORY, id_length=2, num_inference_steps=STORY_STEPS, output_type="latent",
                                    progress=False, seed=3, **(pipe_kwargs or {}))
        return res, method
    finally:
        method.remove()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_storydiffusion_off_equals_diffusers_with_lora(sd_pipes, kind):
    """Sampling rate 0 from step 0 on (so no id-bank tokens): every patched call runs our processor
    through the op, and the story equals the plain pipeline (id images as one batch, the read
    image alone)."""
    pipe = sd_pipes[kind]
    out = {}
    for lora in (True, False):
        with contextlib.nullcontext() if lora else lora_off(pipe):
            res, method = _story(pipe, sampling_rate=0.0, start_step=0)
            ours = torch.stack([torch.as_tensor(i) for i in res.images])
            ref = []
            for idx in ([0, 1], [2]):
                lat = method._latents(len(idx), res.seeds[idx[0]], 64, 64)
                ref += list(pipe([res.prompts[i].text for i in idx], latents=lat, num_inference_steps=STORY_STEPS,
                                 guidance_scale=5.0, output_type="latent").images)
            out[lora] = ours, torch.stack(ref)
    check_off_and_delta(out[True][0], out[False][0], out[True][1], out[False][1], _op_tol("consistent_attention"))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_storydiffusion_on_uses_the_lora_projections(sd_pipes, kind):
    """Consistency on (write phase: the id images' sampled tokens; read phase: the id bank, whose
    cached layer inputs are projected by the layer's to_k / to_v): separate LoRA == fused. Step 0
    is before start_step: the default schedule's whole-bank step; steps 1-2 sample tokens."""
    pipe = sd_pipes[kind]
    banks = []

    def run(**pipe_kwargs):
        res, method = _story(pipe, pipe_kwargs, sampling_rate=0.5, start_step=1)
        banks.append(method.bank.num_entries())
        return torch.stack([torch.as_tensor(i) for i in res.images])

    on = check_uses_lora(run, pipe, pipe.unet, ["unet"])
    assert banks[0] > 0
    # the pipeline's LoRA scale (cross_attention_kwargs={"scale": s}) reaches our processors
    half = run(cross_attention_kwargs={"scale": 0.5})
    pipe.set_adapters([ADAPTER], [ADAPTER_WEIGHT * 0.5])
    try:
        assert_close(half, run(), FUSED_TOL)
    finally:
        pipe.set_adapters([ADAPTER], [ADAPTER_WEIGHT])
    assert_lora_acts(on, half)


def test_video_subject_consistency_bare_unet_load_lora_adapter():
    """VideoSubjectConsistency takes a bare model: the LoRA through the model's own
    load_lora_adapter / set_adapters / fuse_lora (no pipeline loader). (a)/(b): rate 0 with
    nothing to attend to == the plain UNet; (c) capture, then attend: separate == fused."""
    unet = sd.tiny_pipeline("sd15").unet
    unet.load_lora_adapter(tiny_lora(unet, None, UNET_TARGETS), adapter_name=ADAPTER, prefix=None)
    unet.set_adapters([ADAPTER], [ADAPTER_WEIGHT])
    assert len(_lora_layers(unet)) > 0
    frames = 3
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * frames, 4, 8, 8, generator=gen)
    text = torch.randn(2 * frames, 5, 32, generator=gen)
    t = torch.tensor(500)

    def plain():
        return unet(x, t, encoder_hidden_states=text).sample

    def off_setting():
        vc = VideoSubjectConsistency(unet, frames_per_group=frames, sampling_rate=0.0, layers="up")
        try:
            with vc.attend([]):
                return unet(x, t, encoder_hidden_states=text).sample
        finally:
            vc.remove()

    def on_setting():
        vc = VideoSubjectConsistency(unet, frames_per_group=frames, sampling_rate=0.5, window=1, layers="up",
                                     bank_step_key=False)
        try:
            with vc.capture("hero"):
                unet(x, t, encoder_hidden_states=text)
            with vc.attend(["hero"]):
                return unet(x.flip(0), t, encoder_hidden_states=text).sample
        finally:
            vc.remove()

    with torch.no_grad():
        ours_on, ref_on = off_setting(), plain()
        with lora_off(unet):
            ours_off, ref_off = off_setting(), plain()
        check_off_and_delta(ours_on, ours_off, ref_on, ref_off, _op_tol("consistent_attention"))
        on = check_uses_lora(on_setting, unet, unet, None)
    assert_lora_acts(on, ref_on.flip(0))  # and the consistency itself acts


# ----------------------------------------------------------------------------------------------
# randomized blending (Wan video-to-video)
def _video(frames, size=32):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.stack([np.stack([0.5 + 0.4 * np.sin((xx - 1.5 * f) / 4.0), 0.5 + 0.4 * np.cos((yy + f) / 5.0),
                               0.5 + 0.3 * np.sin((xx + yy - 2 * f) / 6.0)], -1) for f in range(frames)])


def test_blending_one_chunk_equals_diffusers_with_lora(wan_v2v):
    pipe = wan_v2v
    video = _video(9)
    kw = dict(prompt="a red panda", num_inference_steps=3, guidance_scale=5.0)
    method = B.RandomizedBlending(pipe, chunk_frames=64, overlap_frames=8, strength=0.6)
    assert method.layout(9).num_chunks == 1
    out = {}
    for lora in (True, False):
        with contextlib.nullcontext() if lora else lora_off(pipe):
            ref = pipe(video=video[None], height=32, width=32, strength=0.6, output_type="np",
                       generator=torch.Generator().manual_seed(3), **kw).frames[0]
            ours = method(video, generator=torch.Generator().manual_seed(3), **kw).frames[0]
            out[lora] = torch.from_numpy(np.asarray(ours)), torch.from_numpy(np.asarray(ref))
    check_off_and_delta(out[True][0], out[False][0], out[True][1], out[False][1], 1e-5)


def test_blending_on_uses_the_lora(wan_v2v):
    pipe = wan_v2v
    video = _video(17)
    method = B.RandomizedBlending(pipe, chunk_frames=9, overlap_frames=4)
    assert method.layout(17).num_chunks > 1

    def run():
        return method(video, prompt="a red panda", num_inference_steps=3, guidance_scale=5.0, seed=0,
                      output_type="latent").frames

    check_uses_lora(run, pipe, pipe.transformer, ["transformer"])
