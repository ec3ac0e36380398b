"""Image-to-video on the tiny Wan 2.1 I2V (CLIP features, image projections on attn2) and Wan 2.2
A14B I2V (two experts) pipelines, offline: the models and their detection, the pipeline's
conditioning streamed frame by frame (ImageCondition) against WanImageToVideoPipeline's own
prepare_latents, FIFO's first window against the pipeline's computation and later windows
against the documented rule computed frame by frame, FreeLOC no-op equality with the plain
pipeline, and the refusals."""
import numpy as np
import pytest
import torch
from PIL import Image

import longvideo
from longvideo.methods import freeloc as FL
from longvideo.methods.families import WanI2VFamily, family_of
from longvideo.methods.families.wan_i2v import ImageCondition
from longvideo.methods.fifo import FIFODiffusion, OuroborosDiffusion
from longvideo.models import load_pipeline, wan, wan22, wan22_i2v, wan_i2v
from longvideo.processors import wan as P

SIZE = 32


@pytest.fixture(scope="module")
def pipe21():
    return wan_i2v.tiny_pipeline()


@pytest.fixture(scope="module")
def pipe22():
    return wan22_i2v.tiny_pipeline()


@pytest.fixture(scope="module")
def image():
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(40, 48, 3) * 255).astype("uint8"))  # resized by the pipeline to 32x32


def _pipeline_condition(pipe, image, latent_frames):
    """(1, 4 + z, F, h, w): the mask and condition latents WanImageToVideoPipeline.prepare_latents
    builds for a clip of `latent_frames` latent frames."""
    processed = pipe.video_processor.preprocess(image, height=SIZE, width=SIZE).to(torch.float32)
    with torch.no_grad():
        _, cond = pipe.prepare_latents(processed, 1, pipe.vae.config.z_dim, SIZE, SIZE, 4 * (latent_frames - 1) + 1,
                                       torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    return cond


# ---------------------------------------------------------------------------------------------
# the models and their detection
def test_tiny_models_and_detection(pipe21, pipe22):
    z = pipe21.vae.config.z_dim
    tr = pipe21.transformer
    assert tr.config.in_channels == 2 * z + 4 and tr.config.image_dim == pipe21.image_encoder.config.hidden_size
    assert tr.blocks[0].attn2.add_k_proj is not None and tr.blocks[0].attn1.add_k_proj is None
    assert pipe22.image_encoder is None and pipe22.transformer.config.image_dim is None
    assert pipe22.config.boundary_ratio == wan22_i2v.TINY_BOUNDARY_RATIO
    assert not torch.equal(pipe22.transformer.proj_out.weight, pipe22.transformer_2.proj_out.weight)
    assert family_of(pipe21) == "wan_i2v" and family_of(pipe22) == "wan22_i2v"
    assert family_of(wan.tiny_pipeline()) == "wan" and family_of(wan22.tiny_pipeline()) == "wan22"
    assert type(load_pipeline("wan22_i2v")).__name__ == "WanImageToVideoPipeline"  # kind "t2v" read as "i2v"


# ---------------------------------------------------------------------------------------------
# the conditioning: streamed frame by frame == the pipeline's whole-clip encoding
def test_condition_equals_pipeline_prepare_latents(pipe21, image):
    want = _pipeline_condition(pipe21, image, 5)
    processed = pipe21.video_processor.preprocess(image, height=SIZE, width=SIZE).to(torch.float32)
    with torch.no_grad():
        got = ImageCondition(pipe21, processed, "cpu").frames(range(5))
    assert got.shape == want.shape
    assert torch.equal(got[:, :4, 0], torch.ones_like(got[:, :4, 0])) and not got[:, :4, 1:].any()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


class _NoCarry(ImageCondition):
    """A deliberately wrong condition: every latent frame encoded without the causal cache of the
    frames before it (a fresh encoder per frame), as a per-window encoding would do."""

    def _encode_next(self):
        self._cache = None
        k = self._next
        lat = super()._encode_next() if k == 0 else None
        if k > 0:
            self._next = 0
            saved = self.image
            self.image = torch.zeros_like(saved)
            lat = super()._encode_next()
            self.image, self._next = saved, k + 1
        return lat


def test_broken_condition_is_caught(pipe21, image):
    want = _pipeline_condition(pipe21, image, 3)
    processed = pipe21.video_processor.preprocess(image, height=SIZE, width=SIZE).to(torch.float32)
    with torch.no_grad():
        got = _NoCarry(pipe21, processed, "cpu").frames(range(3))
    assert (got[:, 4:, 1:] - want[:, 4:, 1:]).abs().max() > 1e-3


def test_condition_reaches_its_fixed_point_exactly(pipe21, image):
    """Past ``steady_from`` the streamed frames are the one kept frame; they equal the pipeline's
    whole-clip encoding at those indices (the encoder's receptive field has left the image)."""
    processed = pipe21.video_processor.preprocess(image, height=SIZE, width=SIZE).to(torch.float32)
    cond = ImageCondition(pipe21, processed, "cpu")
    with torch.no_grad():
        streamed = cond.frames(range(40))
    assert cond.steady_from is not None and cond.steady_from < 40
    n = cond.steady_from + 3
    want = _pipeline_condition(pipe21, image, n)
    torch.testing.assert_close(streamed[:, :, :n], want, atol=1e-6, rtol=1e-6)
    assert torch.equal(streamed[:, :, -1], streamed[:, :, cond.steady_from])


# ---------------------------------------------------------------------------------------------
# FIFO: the first window is the pipeline's computation
def _capture(transformers):
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})

    handles = [tr.register_forward_pre_hook(hook, with_kwargs=True) for tr in transformers]
    return calls, handles


def test_family_call_equals_pipeline_step(pipe21, image):
    """One guided denoiser call of the family on frames 0..F-1 at the pipeline's first timestep is
    the pipeline's own first step: the same transformer input (latents, mask, condition latents),
    the same CLIP features, and the same guided output."""
    gs = 5.0
    calls, handles = _capture([pipe21.transformer])
    try:
        pipe21(image=image, prompt="a cat", height=SIZE, width=SIZE, num_frames=9, num_inference_steps=1,
               guidance_scale=gs, generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        for h in handles:
            h.remove()
    cond, uncond = calls[0], calls[1]  # the pipeline: conditional call first
    with torch.no_grad():
        out_c = pipe21.transformer(hidden_states=cond["hidden_states"], timestep=cond["timestep"],
                                   encoder_hidden_states=cond["encoder_hidden_states"],
                                   encoder_hidden_states_image=cond["encoder_hidden_states_image"],
                                   return_dict=False)[0]
        out_u = pipe21.transformer(hidden_states=uncond["hidden_states"], timestep=uncond["timestep"],
                                   encoder_hidden_states=uncond["encoder_hidden_states"],
                                   encoder_hidden_states_image=uncond["encoder_hidden_states_image"],
                                   return_dict=False)[0]
        want = out_u + gs * (out_c - out_u)
        fam = WanI2VFamily(pipe21)
        fam.set_image(image, SIZE, SIZE, "cpu")
        fam.set_window_start(0)
        z = pipe21.vae.config.z_dim
        x = cond["hidden_states"][:, :z]
        assert torch.equal(fam.conditioned(x), cond["hidden_states"])
        assert torch.equal(fam.image_embeds, cond["encoder_hidden_states_image"])
        got = fam.model_output(x, cond["timestep"][0], cond["encoder_hidden_states"], uncond["encoder_hidden_states"],
                               gs)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def _fifo_windows(pipe, image, **options):
    """Run FIFO on `pipe` (n = 2, no lookahead unless given) and return the method and the window
    calls' transformer inputs (the initial clip's calls left out)."""
    fifo = FIFODiffusion(pipe, **{"num_partitions": 2, "lookahead": False, **options})
    transformers = [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]
    calls, handles = _capture(transformers)
    starts = []
    record = fifo.family.set_window_start

    def spy(index):
        starts.append(index)
        record(index)

    fifo.family.set_window_start = spy
    try:
        clip_calls = []
        sample = fifo.family.sample_clip

        def counted(*args, **kwargs):
            out = sample(*args, **kwargs)
            clip_calls.append(len(calls))
            return out

        fifo.family.sample_clip = counted
        fifo(prompt="a cat", num_frames=5, image=image, guidance_scale=1.0, output_type="latent")
    finally:
        for h in handles:
            h.remove()
    return fifo, calls[clip_calls[0]:], starts


def test_fifo_first_window_is_the_pipeline_condition(pipe21, image):
    """n = 1, f = L = 3, no lookahead: the first iteration's one window holds output frames 0..2
    (the initial clip re-noised to levels 1..3); its transformer input carries exactly the
    pipeline's mask and condition latents of a 3-frame clip and the pipeline's CLIP features."""
    fifo, calls, starts = _fifo_windows(pipe21, image, num_partitions=1)
    assert fifo.warmup == 0 and starts[0] == 0
    want = _pipeline_condition(pipe21, image, 3)
    z = pipe21.vae.config.z_dim
    first = calls[0]
    torch.testing.assert_close(first["hidden_states"][:, z:], want, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        clip_embeds = pipe21.encode_image(image, torch.device("cpu"))
    assert torch.equal(first["encoder_hidden_states_image"], clip_embeds)
    # per-frame timesteps, one per token, as on the text-to-video Wan family
    levels = fifo.levels(torch.device("cpu")).t_model[1:4]
    assert torch.equal(first["timestep"][0], levels.repeat_interleave(16))


@pytest.mark.parametrize("which, lookahead", [("wan21", False), ("wan21", True), ("wan22", False)])
def test_fifo_later_windows_follow_the_rule_frame_by_frame(pipe21, pipe22, image, which, lookahead):
    """Every window call of a run whose queue moves past frame 0: its first frame's index is
    iteration - warmup - c + s (the positions of [context | queue]), and its mask / condition
    channels are, frame by frame, those the pipeline gives latent frame k in a clip of k + 1 frames
    (k < 0, the warm-up copies and the initial context: frame 0's). Wan 2.2: the frames are split
    between the experts, each keeping its own condition."""
    pipe = pipe21 if which == "wan21" else pipe22
    fifo, calls, starts = _fifo_windows(pipe, image, lookahead=lookahead)
    f, w, L, c = fifo.f, fifo.stride, fifo.L, fifo.context_len
    windows = L // w
    expected = [it - fifo.warmup - c + i * w for it in range(len(starts) // windows) for i in range(windows)]
    assert starts == expected and max(starts) > 0 and min(starts) < 0
    z = pipe.vae.config.z_dim
    oracle = {}

    def frame(k):
        k = max(k, 0)
        if k not in oracle:
            oracle[k] = _pipeline_condition(pipe, image, k + 1)[:, :, -1:]
        return oracle[k]

    if which == "wan21":
        assert len(calls) == len(starts)
        for start, call in zip(starts, calls):
            want = torch.cat([frame(start + j) for j in range(f)], dim=2)
            torch.testing.assert_close(call["hidden_states"][:, z:], want, atol=1e-6, rtol=1e-6)
    else:
        # the calls of a window: one per expert present, each on the frames of its expert
        fam = fifo.family
        lv = fifo.levels(torch.device("cpu"))
        k_full = torch.cat([torch.full((c,), fifo.context_level), torch.arange(1, L + 1)])
        checked = 0
        for n, start in enumerate(starts):
            s = (n % windows) * w
            experts = fam.expert_of(lv.t_model[k_full[s: s + f]])
            for e in (0, 1):
                idx = (experts == e).nonzero().squeeze(1).tolist()
                if not idx:
                    continue
                call = calls.pop(0)
                want = torch.cat([frame(start + j) for j in idx], dim=2)
                torch.testing.assert_close(call["hidden_states"][:, z:], want, atol=1e-6, rtol=1e-6)
                checked += 1
        assert not calls and checked > len(starts)  # some window straddled the boundary


def test_fifo_refuses_missing_or_unneeded_image(pipe21, image):
    fifo = FIFODiffusion(pipe21, num_partitions=1, lookahead=False)
    with pytest.raises(ValueError, match="image: .* image-to-video pipeline"):
        next(fifo.generate("a cat", 4))
    with pytest.raises(ValueError, match="image must be a PIL image"):
        next(fifo.generate("a cat", 4, image="cat.png"))
    t2v = FIFODiffusion(wan.tiny_pipeline(), num_partitions=1, lookahead=False)
    with pytest.raises(ValueError, match="image: .* not an image-to-video"):
        next(t2v.generate("a cat", 4, image=image))
    with pytest.raises(ValueError, match="SACFA and self-recurrent guidance are not supported on image-to-video"):
        OuroborosDiffusion(pipe21, num_partitions=1)
    assert isinstance(FIFODiffusion(pipe21, num_partitions=1, coherent_tail=True).family, WanI2VFamily)


def test_fifo_resume_checks_the_image(pipe21, image, tmp_path):
    fifo = FIFODiffusion(pipe21, num_partitions=1, lookahead=False)
    frames = list(fifo.generate("a cat", 9, image=image, checkpoint_dir=tmp_path, checkpoint_every=1))
    other = image.transpose(Image.FLIP_LEFT_RIGHT)
    with pytest.raises(ValueError, match="image"):
        list(fifo.generate("a cat", 13, image=other, checkpoint_dir=tmp_path, resume=True))
    more = list(fifo.generate("a cat", 13, image=image, checkpoint_dir=tmp_path, resume=True))
    assert len(frames) == 9 and len(more) == 4


# ---------------------------------------------------------------------------------------------
# FreeLOC on the I2V transformers
def _run(pipe, image, frames):
    # two steps: on the two-expert pipeline the first is the high-noise expert's, the second the low-noise one's
    return pipe(image=image, prompt="a cat", num_frames=frames, height=SIZE, width=SIZE, num_inference_steps=2,
                guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent").frames.float()


@pytest.mark.parametrize("which", ["wan21", "wan22"])
def test_freeloc_noop_equals_plain_pipeline_and_acts_beyond(pipe21, pipe22, image, which):
    pipe = pipe21 if which == "wan21" else pipe22
    experts = [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]
    calls, handles = _capture(experts)
    try:
        ref = _run(pipe, image, 17)
    finally:
        for h in handles:
            h.remove()
    if which == "wan22":  # both experts ran (the high-noise one first)
        timesteps = [float(c["timestep"].flatten()[0]) for c in calls]
        boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
        assert timesteps[0] >= boundary > timesteps[-1]
    cross = [b.attn2.processor for b in pipe.transformer.blocks]
    # at or below the trained length (5 latent frames <= 5): the original processors run, exactly
    with FL.FreeLOC(pipe, layer_config=["tsa", "vrpr", "tsa", "vrpr"], trained_frames=5):
        assert torch.equal(_run(pipe, image, 17), ref)
    # active, configured to do nothing (dense tiers, W1 beyond every distance): float rounding only
    with FL.FreeLOC(pipe, layer_config=["tsa", "vrpr", "tsa", "vrpr"], trained_frames=1, w1=64, w2=64,
                    local_frames=64) as method:
        assert [b.attn2.processor for b in pipe.transformer.blocks] == cross  # image branch untouched
        out = _run(pipe, image, 17)
        assert method.last_params is not None and method.last_params.num_frames == 5
    atol, rtol = longvideo.ops.get_backend("tiered_sparse_attention", "reference").tolerance(torch.float32)
    torch.testing.assert_close(out, ref, atol=atol * 10, rtol=rtol * 10)
    with FL.FreeLOC(pipe, layer_config=["tsa", "vrpr", "tsa", "vrpr"]):  # tiny default: trained 3 < 5
        assert (_run(pipe, image, 17) - ref).abs().max() > 1e-3


def test_freeloc_refuses_image_projections_on_self_attention(pipe21):
    attn = pipe21.transformer.blocks[0].attn1
    attn.add_k_proj = torch.nn.Linear(4, 4)
    try:
        with pytest.raises(ValueError, match="image key/value projections"):
            FL.FreeLOC(pipe21, layer_config=["tsa", "vrpr", "tsa", "vrpr"])
        assert isinstance(attn.processor, type(pipe21.transformer.blocks[1].attn1.processor))
        assert not isinstance(attn.processor, P.WanTieredAttnProcessor)
    finally:
        attn.add_k_proj = None
