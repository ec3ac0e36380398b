"""The diffusers conventions of every method entry point (longvideo.methods.outputs), on the tiny models.

For FIFO/Ouroboros, StoryDiffusion, RandomizedBlending and FreeLOC: one return type per
output_type (shapes, dtypes, ranges), generator determinism (same seed -> same frames, a
generator equals the seed it was seeded with, a list of generators), callback_on_step_end called
once per step and able to modify (and where the loop allows, to stop), the progress bar's switch,
check_inputs naming the bad argument, and a pipeline of the wrong family refused at construction.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from longvideo.methods.blending import RandomizedBlending
from longvideo.methods.fifo import FIFODiffusion, OuroborosDiffusion
from longvideo.methods.freeloc import FreeLOC
from longvideo.methods.outputs import VideoOutput
from longvideo.methods.storydiffusion import StoryDiffusion
from longvideo.models import animatediff, sd, wan


@pytest.fixture(scope="module")
def wan_pipe():
    return wan.tiny_pipeline("t2v")


@pytest.fixture(scope="module")
def wan_v2v():
    return wan.tiny_pipeline("v2v")


@pytest.fixture(scope="module")
def sd_pipe():
    return sd.tiny_pipeline("sd15", seed=0)


@pytest.fixture(scope="module")
def fifo(wan_pipe):
    method = FIFODiffusion(wan_pipe, num_partitions=1, frames_per_window=4)
    method.set_progress_bar_config(disable=True)
    return method


FIFO_KW = dict(guidance_scale=3.0)


def _video(frames=9, size=32):
    rng = np.random.default_rng(0)
    return rng.random((frames, size, size, 3)).astype(np.float32)


def _check_video_output(out, output_type, frames, size=32):
    assert isinstance(out, VideoOutput)
    f = out.frames
    if output_type == "np":
        assert isinstance(f, np.ndarray) and f.dtype == np.float32 and f.shape == (1, frames, size, size, 3)
        assert 0.0 <= f.min() and f.max() <= 1.0
    elif output_type == "pt":
        assert isinstance(f, torch.Tensor) and f.dtype == torch.float32 and f.shape == (1, frames, 3, size, size)
    elif output_type == "pil":
        assert len(f) == 1 and len(f[0]) == frames and isinstance(f[0][0], Image.Image)
        assert f[0][0].size == (size, size)
    else:
        assert isinstance(f, torch.Tensor) and f.dim() == 5 and f.shape[0] == 1


# ---------------------------------------------------------------------------------------------
# FIFO / Ouroboros
def test_fifo_output_types_agree(fifo):
    outs = {t: fifo("a cat", 3, output_type=t, seed=1, **FIFO_KW) for t in ("np", "pt", "pil", "latent")}
    for t, out in outs.items():
        _check_video_output(out, t, 3)
    np_frames = outs["np"].frames[0]
    np.testing.assert_array_equal(outs["pt"].frames[0].permute(0, 2, 3, 1).numpy(), np_frames)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in outs["pil"].frames[0]]),
                                  (np_frames * 255).round().astype(np.uint8))
    # "latent": the clean heads as they left the queue (Wan: 1 latent frame -> 1 frame, then 4 each)
    assert outs["latent"].frames.shape[2] == 1 + 1
    assert outs["latent"].frames.shape[1] == fifo.pipe.transformer.config.in_channels


def test_fifo_generators(fifo):
    a = fifo("a cat", 2, seed=5, **FIFO_KW).frames
    assert np.array_equal(a, fifo("a cat", 2, seed=5, **FIFO_KW).frames)  # same seed, same frames
    assert np.array_equal(a, fifo("a cat", 2, generator=torch.Generator().manual_seed(5), **FIFO_KW).frames)
    assert np.array_equal(a, fifo("a cat", 2, generator=[torch.Generator().manual_seed(5)], **FIFO_KW).frames)
    assert not np.array_equal(a, fifo("a cat", 2, seed=6, **FIFO_KW).frames)
    with pytest.raises(ValueError, match="generator: a list of 2"):
        fifo("a cat", 2, generator=[torch.Generator(), torch.Generator()])


def test_fifo_callback_per_iteration_modifies_and_stops(fifo):
    calls = []

    def count(method, i, timesteps, kw):
        calls.append((i, tuple(kw["latents"].shape), timesteps.shape[0]))
        return {}

    frames = list(fifo.generate("a cat", 6, seed=2, callback_on_step_end=count, **FIFO_KW))
    assert len(frames) == 6
    # every iteration once, in order; the queue is (1, C, L, h, w) with L levels
    assert [c[0] for c in calls] == list(range(len(calls))) and len(calls) >= 3
    assert all(c[1][2] == fifo.L and c[2] == fifo.L for c in calls)
    plain = list(fifo.generate("a cat", 6, seed=2, **FIFO_KW))
    assert all(np.array_equal(a, b) for a, b in zip(frames, plain))  # a callback returning {} changes nothing

    def zero_queue(method, i, timesteps, kw):
        return {"latents": torch.zeros_like(kw["latents"])} if i == 0 else {}

    changed = list(fifo.generate("a cat", 6, seed=2, callback_on_step_end=zero_queue, **FIFO_KW))
    assert not all(np.array_equal(a, b) for a, b in zip(changed, plain))

    def stop(method, i, timesteps, kw):
        if i == 0:
            method._interrupt = True
        return {}

    stopped = list(fifo.generate("a cat", 6, seed=2, callback_on_step_end=stop, **FIFO_KW))
    assert len(stopped) < 6 and all(np.array_equal(a, b) for a, b in zip(stopped, plain))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        next(fifo.generate("a cat", 6, callback_on_step_end=count, callback_on_step_end_tensor_inputs=["noise"]))


def test_fifo_progress_bar_switch(wan_pipe, capsys):
    method = FIFODiffusion(wan_pipe, num_partitions=1, frames_per_window=4)
    saved = dict(getattr(wan_pipe, "_progress_bar_config", {}))
    try:
        for disable in (False, True):  # by default the method follows the pipeline's setting
            wan_pipe.set_progress_bar_config(disable=disable)
            method("a cat", 1, seed=0, **FIFO_KW)
            assert ("frame" in capsys.readouterr().err) is not disable
    finally:
        wan_pipe._progress_bar_config = saved
    method.set_progress_bar_config(disable=False)
    method("a cat", 1, seed=0, **FIFO_KW)
    assert "frame" in capsys.readouterr().err
    method.set_progress_bar_config(disable=True)
    method("a cat", 1, seed=0, **FIFO_KW)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kwargs,name", [
    (dict(prompt=None), "prompt"), (dict(prompt=""), "prompt"), (dict(num_frames=2.5), "num_frames"),
    (dict(num_frames=0), "num_frames"), (dict(seed=None), "seed"), (dict(height=20), "height"),
    (dict(width=-16), "width"), (dict(guidance_scale="3"), "guidance_scale"), (dict(output_type="jpg"), "output_type"),
    (dict(generator="cpu"), "generator"), (dict(init_steps=0), "init_steps"),
    (dict(negative_prompt=None), "negative_prompt"),
])
def test_fifo_bad_inputs_name_the_argument(fifo, kwargs, name):
    args = {"prompt": "a cat", "num_frames": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        fifo(args.pop("prompt"), args.pop("num_frames"), **args)


def test_fifo_refuses_an_image_pipeline_at_construction(sd_pipe):
    with pytest.raises(ValueError, match="pipe: StableDiffusionPipeline has an image UNet"):
        FIFODiffusion(sd_pipe)
    with pytest.raises(ValueError, match="pipe"):
        OuroborosDiffusion(sd_pipe)


# ---------------------------------------------------------------------------------------------
# StoryDiffusion
STORY = ["[Bob] at home", "[Bob] in a park", "[Bob] with a dog"]
STORY_KW = dict(id_length=2, num_inference_steps=2, guidance_scale=1.0, progress=False, rewrite=True)


@pytest.fixture
def story(sd_pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    sd_pipe.unet.set_attn_processor(AttnProcessor2_0())
    method = StoryDiffusion(sd_pipe, start_step=0, prob_early=1.0, prob_late=1.0)
    yield method
    method.remove()


def test_story_output_types(story):
    outs = {t: story.generate_story(STORY, output_type=t, seed=0, **STORY_KW) for t in ("np", "pt", "pil", "latent")}
    size = outs["pil"].images[0].size[0]
    assert len(outs["pil"].images) == 3 and all(isinstance(im, Image.Image) for im in outs["pil"].images)
    assert outs["np"].images.dtype == np.float32 and outs["np"].images.shape == (3, size, size, 3)
    assert outs["pt"].images.shape == (3, 3, size, size)
    assert outs["latent"].images.dim() == 4 and outs["latent"].images.shape[0] == 3
    np.testing.assert_allclose(outs["pt"].images.permute(0, 2, 3, 1).numpy(), outs["np"].images, atol=1e-6)


def test_story_generators(story):
    a = story.generate_story(STORY, output_type="latent", generator=torch.Generator().manual_seed(3), **STORY_KW)
    b = story.generate_story(STORY, output_type="latent", generator=torch.Generator().manual_seed(3), **STORY_KW)
    assert torch.equal(a.images, b.images)
    c = story.generate_story(STORY, output_type="latent", generator=torch.Generator().manual_seed(4), **STORY_KW)
    assert not torch.equal(a.images, c.images)
    # one generator per prompt: the read prompt's (the third) drawn from its own generator
    gens = lambda s: [torch.Generator().manual_seed(s0) for s0 in (1, 2, s)]  # noqa: E731
    d = story.generate_story(STORY, output_type="latent", generator=gens(9), **STORY_KW)
    e = story.generate_story(STORY, output_type="latent", generator=gens(9), **STORY_KW)
    assert torch.equal(d.images, e.images)
    with pytest.raises(ValueError, match="generator: a list of 2"):
        story.generate_story(STORY, generator=[torch.Generator(), torch.Generator()], **STORY_KW)


def test_story_callback_per_step_and_modifies(story):
    steps = []

    def cb(method, i, t, kw):
        steps.append(i)
        return {}

    a = story.generate_story(STORY, output_type="latent", seed=0, callback_on_step_end=cb, **STORY_KW)
    assert steps == [0, 1] * 2  # one write call (2 id images) and one read call, 2 steps each

    def zero(method, i, t, kw):
        return {"latents": torch.zeros_like(kw["latents"])} if i == 0 else {}

    b = story.generate_story(STORY, output_type="latent", seed=0, callback_on_step_end=zero, **STORY_KW)
    assert not torch.equal(a.images, b.images)


@pytest.mark.parametrize("kwargs,name", [
    (dict(prompts=None), "prompts"), (dict(id_length=0), "id_length"), (dict(num_inference_steps=2.5),
                                                                       "num_inference_steps"),
    (dict(height=30), "height"), (dict(output_type="jpg"), "output_type"), (dict(seed=None), "seed"),
    (dict(style="no placeholder"), "style"), (dict(guidance_scale=None), "guidance_scale"),
])
def test_story_bad_inputs_name_the_argument(story, kwargs, name):
    args = {"prompts": STORY, **STORY_KW, **kwargs}
    with pytest.raises(ValueError, match=name):
        story.generate_story(args.pop("prompts"), **args)


def test_story_refuses_other_families(wan_pipe):
    with pytest.raises(ValueError, match="pipe"):
        StoryDiffusion(wan_pipe)
    with pytest.raises(ValueError, match="pipe: AnimateDiffPipeline is a video pipeline"):
        StoryDiffusion(animatediff.tiny_pipeline())


# ---------------------------------------------------------------------------------------------
# RandomizedBlending
BLEND_KW = dict(prompt="a red panda", num_inference_steps=4, guidance_scale=1.0, progress=False)


@pytest.fixture(scope="module")
def blend(wan_v2v):
    return RandomizedBlending(wan_v2v, chunk_frames=9, overlap_frames=4)


def test_blending_output_types(blend):
    video = _video(13)
    for t in ("np", "pt", "pil", "latent"):
        _check_video_output(blend(video, output_type=t, seed=0, **BLEND_KW), t, 13)


def test_blending_generators_callback_and_interrupt(blend):
    video = _video(13)
    a = blend(video, seed=2, **BLEND_KW).frames
    assert np.array_equal(a, blend(video, generator=[torch.Generator().manual_seed(2)], **BLEND_KW).frames)
    with pytest.raises(ValueError, match="generator: a list of 2"):
        blend(video, generator=[torch.Generator(), torch.Generator()], **BLEND_KW)
    steps = []

    def cb(method, i, t, kw):
        steps.append(i)
        assert kw["latents"].dim() == 5
        return {}

    assert np.array_equal(a, blend(video, seed=2, callback_on_step_end=cb, **BLEND_KW).frames)
    assert steps == list(range(len(steps))) and len(steps) >= 2  # every solver step once

    def zero(method, i, t, kw):
        return {"latents": torch.zeros_like(kw["latents"])} if i == 0 else {}

    assert not np.array_equal(a, blend(video, seed=2, callback_on_step_end=zero, **BLEND_KW).frames)

    def stop(method, i, t, kw):
        method._interrupt = True
        return {}

    stopped = []
    blend(video, seed=2, callback_on_step_end=lambda m, i, t, kw: (stopped.append(i), stop(m, i, t, kw))[1],
          **BLEND_KW)
    assert stopped == [0]


@pytest.mark.parametrize("kwargs,name", [
    (dict(prompt=None), "prompt"), (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(height=40), "height"), (dict(output_type="mp4"), "output_type"), (dict(eta=2.0), "eta"),
    (dict(seed=1.5), "seed"), (dict(callback_on_step_end=3), "callback_on_step_end"),
])
def test_blending_bad_inputs_name_the_argument(blend, kwargs, name):
    with pytest.raises(ValueError, match=name):
        blend(_video(5), **{**BLEND_KW, **kwargs})


def test_blending_refuses_an_image_pipeline(sd_pipe):
    with pytest.raises(ValueError, match="pipe"):
        RandomizedBlending(sd_pipe)


# ---------------------------------------------------------------------------------------------
# FreeLOC (generation is the pipeline's own loop: its conventions, our return type)
def test_freeloc_call_conventions(wan_pipe):
    kw = dict(height=32, width=32, num_inference_steps=1, guidance_scale=1.0)
    with FreeLOC(wan_pipe, layer_config=["tsa", "vrpr", "tsa", "vrpr"]) as method:
        a = method("a cat", 17, generator=torch.Generator().manual_seed(0), output_type="np", **kw)
        _check_video_output(a, "np", 17)
        b = method("a cat", 17, generator=[torch.Generator().manual_seed(0)], output_type="np", **kw)
        assert np.array_equal(a.frames, b.frames)
        steps = []
        method("a cat", 17, output_type="latent", callback_on_step_end=lambda p, i, t, k: steps.append(i) or {}, **kw)
        assert steps == [0]
        for bad, name in ((dict(prompt=None), "prompt"), (dict(num_frames=2.5), "num_frames")):
            args = {"prompt": "a cat", "num_frames": 17, **bad}
            with pytest.raises(ValueError, match=name):
                method(**args, **kw)
    with pytest.raises(RuntimeError, match="removed"):
        method("a cat", 17, **kw)


def test_freeloc_refuses_other_families(sd_pipe):
    with pytest.raises(ValueError, match="transformer"):
        FreeLOC(sd_pipe)


@pytest.mark.parametrize("dtype", ["fp8", "int8", torch.int32, 3])
def test_load_pipeline_names_a_bad_dtype(dtype):
    from longvideo.models import load_pipeline

    with pytest.raises(ValueError, match="dtype must be one of"):
        load_pipeline("wan", "t2v", dtype=dtype)
