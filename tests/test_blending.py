"""StreamingT2V randomized blending (longvideo.methods.blending) and the seam metric, offline.

Tiny random-weight pipelines: Wan and AnimateDiff from ``longvideo.models``; a tiny CogVideoX
video-to-video pipeline is built here from config (no ``longvideo.models`` family for it).
Oracles: the plain diffusers video-to-video pipelines (one chunk must reproduce them), the
baselines of the same object (overlap 0), an analytic denoiser whose seams are known, and
synthetic videos with a planted seam / a known translation for the metric.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from longvideo.methods import blending as B
from longvideo.methods.families import ftfy_fallback
from longvideo.methods.seam_metric import lucas_kanade_flow, seam_metric

# float32 everywhere on CPU: the only differences left are summation order (chunk batching,
# per-chunk vs whole-video scheduler steps), a few ulps of the outputs in [0, 1].
ATOL = 1e-5


def smooth_video(frames: int, size: int = 32, speed: float = 1.5, jump_at: int | None = None, jump: float = 0.0):
    """A smooth pattern translating `speed` px/frame; from frame `jump_at` on it is displaced by `jump` px."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for f in range(frames):
        s = speed * f + (jump if jump_at is not None and f >= jump_at else 0.0)
        r = 0.5 + 0.4 * np.sin((xx - s) / 4.0)
        g = 0.5 + 0.4 * np.cos((yy + 0.5 * s) / 5.0)
        b = 0.5 + 0.3 * np.sin((xx + yy - 1.5 * s) / 6.0)
        out.append(np.stack([r, g, b], -1))
    return np.stack(out).astype(np.float32)


def _tiny_wan(euler: bool = False):
    wan = pytest.importorskip("longvideo.models.wan", reason="longvideo.models.wan (tiny Wan) not available")
    pipe = wan.tiny_pipeline(kind="v2v")
    if euler:  # first-order flow matching, where the x0 and x_{t-1} variants coincide exactly
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return pipe


@pytest.fixture(scope="module")
def wan():
    return _tiny_wan()


@pytest.fixture(scope="module")
def wan_euler():
    return _tiny_wan(euler=True)


@pytest.fixture(scope="module")
def animatediff():
    from longvideo.models import animatediff

    return animatediff.tiny_pipeline(kind="v2v")


def _tiny_cogvideox(dpm: bool):
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
                           CogVideoXTransformer3DModel, CogVideoXVideoToVideoPipeline)
    from transformers import T5Config, T5EncoderModel

    from longvideo.models.tokenizers import char_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tr = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
                                         time_embed_dim=2, text_embed_dim=32, num_layers=1, sample_width=8,
                                         sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                         max_text_seq_length=16)
        vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4,
                                     up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8,) * 4,
                                     latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                     temporal_compression_ratio=4)
        te = T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    for m in (tr, vae, te):
        m.eval()
    pipe = CogVideoXVideoToVideoPipeline(tokenizer=char_tokenizer(16), text_encoder=te, vae=vae, transformer=tr,
                                         scheduler=CogVideoXDPMScheduler() if dpm else CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipe(request, name):
    pipe = request.getfixturevalue(name)
    # diffusers' Wan pipelines need ftfy for prompt cleaning, which may not be installed; the
    # method installs the same pass-through for them (see families.wan.ftfy_fallback).
    ftfy_fallback(pipe)
    return pipe


# --------------------------------------------------------------------------------------------
# Layout (pure)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t,causal", [(1, False), (4, True)])
def test_layout_covers_every_frame_of_any_length(t, causal):
    for chunk_frames, overlap_frames in [(24, 8), (9, 4), (5, 0)]:
        chunk, overlap = B.latent_sizes(chunk_frames, overlap_frames, t, causal)
        for latent_frames in range(1, 40):
            starts = B.chunk_starts(latent_frames, chunk, overlap)
            c = min(chunk, latent_frames)
            covered = np.zeros(latent_frames, bool)
            for s in starts:
                assert 0 <= s and s + c <= latent_frames  # no chunk runs past the end
                covered[s:s + c] = True
            assert covered.all(), (latent_frames, starts)
            assert starts[-1] + c == latent_frames  # last chunk aligned to the end
            assert all(b > a for a, b in zip(starts, starts[1:]))
            # nominal overlap everywhere but (possibly) at the last boundary, where it can only grow
            overlaps = [a + c - b for a, b in zip(starts, starts[1:])]
            assert all(o == overlap for o in overlaps[:-1]) and all(o >= overlap for o in overlaps[-1:])
            # stitching any cuts the blend can draw takes every frame from a chunk that covers it
            gen = torch.Generator().manual_seed(latent_frames)
            cuts = B.draw_cuts(starts, c, "blend", gen)
            chunks = torch.arange(len(starts), dtype=torch.float32).view(-1, 1, 1, 1, 1).expand(-1, 1, c, 1, 1)
            owner = B.stitch(chunks, starts, cuts, latent_frames).flatten().long()
            for j in range(latent_frames):
                assert starts[owner[j]] <= j < starts[owner[j]] + c


def test_wan_chunk_sizes_follow_temporal_compression(wan):
    m = B.RandomizedBlending(wan, chunk_frames=24, overlap_frames=8)
    assert (m.chunk_latent, m.overlap_latent) == (6, 2)
    lay = m.layout(81)  # Wan's 81 frames = 21 latent frames
    assert (lay.latent_frames, lay.padded_frames) == (21, 81)
    lay = m.layout(83)  # not 1 + 4k: padded to 85 (22 latent frames), nothing dropped
    assert (lay.latent_frames, lay.padded_frames, lay.num_frames) == (22, 85, 83)


# --------------------------------------------------------------------------------------------
# Against the plain pipelines
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,frames,blend", [("wan", 9, "x0"), ("wan", 9, "xt"), ("animatediff", 8, "x0")])
def test_one_chunk_equals_pipeline(request, name, frames, blend):
    pipe = _pipe(request, name)
    video = smooth_video(frames)
    kw = dict(prompt="a red panda", num_inference_steps=5, guidance_scale=5.0)
    ref = pipe(video=video[None], height=32, width=32, strength=0.6, generator=torch.Generator().manual_seed(3),
               output_type="np", **kw).frames[0]
    method = B.RandomizedBlending(pipe, chunk_frames=64, overlap_frames=8, strength=0.6, blend=blend)
    assert method.layout(frames).num_chunks == 1
    out = method(video, generator=torch.Generator().manual_seed(3), **kw).frames[0]
    assert out.shape == ref.shape == (frames, 32, 32, 3)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


def test_one_chunk_equals_pipeline_with_a_multistep_scheduler():
    # Wan2.1's own scheduler (UniPC, flow prediction): the solver history lives in the scheduler.
    from diffusers import UniPCMultistepScheduler

    pipe = _tiny_wan()
    ftfy_fallback(pipe)
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             num_train_timesteps=1000, flow_shift=3.0)
    video = smooth_video(9)
    kw = dict(prompt="a red panda", num_inference_steps=6, guidance_scale=5.0)
    ref = pipe(video=video[None], height=32, width=32, strength=0.6, generator=torch.Generator().manual_seed(3),
               output_type="np", **kw).frames[0]
    for blend in B.VARIANTS:
        out = B.RandomizedBlending(pipe, chunk_frames=64, overlap_frames=8, blend=blend)(
            video, generator=torch.Generator().manual_seed(3), **kw).frames[0]
        np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dpm", [False, True], ids=["ddim", "dpm"])
def test_one_chunk_equals_cogvideox_pipeline(dpm):
    pipe = _tiny_cogvideox(dpm)
    video = smooth_video(9)
    kw = dict(prompt="a red panda", num_inference_steps=5, guidance_scale=5.0, max_sequence_length=16)
    ref = pipe(video=video[None], height=32, width=32, strength=0.6, generator=torch.Generator().manual_seed(3),
               output_type="np", **kw).frames[0]
    out = B.RandomizedBlending(pipe, chunk_frames=64, overlap_frames=8)(
        video, generator=torch.Generator().manual_seed(3), **kw).frames[0]
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,frames,chunk", [("wan", 21, 9), ("animatediff", 16, 8)])
def test_overlap_zero_equals_independent_chunks(request, name, frames, chunk):
    pipe = _pipe(request, name)
    video = smooth_video(frames)
    kw = dict(prompt="a red panda", num_inference_steps=3, guidance_scale=5.0, seed=7)
    blend = B.RandomizedBlending(pipe, chunk_frames=chunk, overlap_frames=0, mode="blend")
    lay = blend.layout(frames)
    assert lay.num_chunks == 2 and lay.boundary_overlaps() == [0]
    out = blend(video, **kw).frames[0]
    indep = B.RandomizedBlending(pipe, chunk_frames=chunk, overlap_frames=0, mode="independent")(video, **kw).frames[0]
    np.testing.assert_allclose(out, indep, atol=ATOL, rtol=0)
    shared = B.RandomizedBlending(pipe, chunk_frames=chunk, overlap_frames=0, mode="shared_noise")(video, **kw).frames[0]
    np.testing.assert_allclose(out, shared, atol=ATOL, rtol=0)


def test_blending_reproducible_with_seed(wan):
    video = smooth_video(29)
    method = B.RandomizedBlending(wan, chunk_frames=13, overlap_frames=8)  # 4 latent frames, overlap 2
    kw = dict(prompt="a red panda", num_inference_steps=4, guidance_scale=5.0)
    a = method(video, seed=11, **kw).frames[0]
    b = method(video, generator=torch.Generator().manual_seed(11), **kw).frames[0]
    np.testing.assert_array_equal(a, b)
    c = method(video, seed=12, **kw).frames[0]
    assert np.abs(a - c).max() > 1e-3


def test_x0_and_xt_variants_coincide_for_flow_matching_euler(wan_euler):
    # x_{t-1} = x_t + (sigma' - sigma) v is affine in the output with chunk-independent
    # coefficients, so blending x0 (one global step) = blending x_{t-1} (per-chunk steps).
    video = smooth_video(29)
    kw = dict(prompt="a red panda", num_inference_steps=6, guidance_scale=5.0, seed=3)
    x0 = B.RandomizedBlending(wan_euler, chunk_frames=13, overlap_frames=8, blend="x0")(video, **kw).frames[0]
    xt = B.RandomizedBlending(wan_euler, chunk_frames=13, overlap_frames=8, blend="xt")(video, **kw).frames[0]
    np.testing.assert_allclose(x0, xt, atol=ATOL, rtol=0)


def test_chunk_batch_does_not_change_the_result(animatediff):
    video = smooth_video(12)
    kw = dict(prompt="a red panda", num_inference_steps=4, guidance_scale=5.0, seed=1)
    a = B.RandomizedBlending(animatediff, chunk_frames=6, overlap_frames=3)(video, **kw).frames[0]
    b = B.RandomizedBlending(animatediff, chunk_frames=6, overlap_frames=3, chunk_batch=1)(video, **kw).frames[0]
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_any_length_keeps_every_frame(wan):
    video = smooth_video(23)  # 23 = not 1 + 4k: padded to 25 inside, cut back
    out = B.RandomizedBlending(wan, chunk_frames=9, overlap_frames=4)(video, num_inference_steps=3, seed=0).frames[0]
    assert out.shape == (23, 32, 32, 3) and np.isfinite(out).all()
    up = B.RandomizedBlending(wan, chunk_frames=9, overlap_frames=4)(video[:9], num_inference_steps=3, seed=0,
                                                                     height=48, width=64).frames[0]
    assert up.shape == (9, 48, 64, 3)  # the enhancer's upscale


# --------------------------------------------------------------------------------------------
# Seams with a denoiser whose behaviour is known
# --------------------------------------------------------------------------------------------


def _chunk_mean_velocity(hidden_states, timestep, encoder_hidden_states=None, return_dict=False, **kwargs):
    """Flow-matching velocity of a model whose x0 prediction is the temporal mean of its chunk:
    v = (x_t - mean_f x_t) / sigma, sigma = t / 1000. Chunks denoised alone converge to their own
    constant, so independent chunks meet in a step; coupling through shared frames shrinks it."""
    sigma = (timestep.float() / 1000.0).view(-1, 1, 1, 1, 1)
    return ((hidden_states - hidden_states.mean(dim=2, keepdim=True)) / sigma,)


def test_randomized_blending_shrinks_seams_of_a_context_dependent_denoiser():
    pipe = _tiny_wan(euler=True)  # sigma = t / 1000
    pipe.transformer.forward = _chunk_mean_velocity
    video = np.random.default_rng(0).random((61, 32, 32, 3)).astype(np.float32)
    jumps = {}
    for mode in B.MODES:
        method = B.RandomizedBlending(pipe, chunk_frames=21, overlap_frames=8, strength=1.0, mode=mode)
        lay = method.layout(61)
        x = method(video, num_inference_steps=20, guidance_scale=1.0, seed=0, output_type="latent").frames
        step = (x[0, :, 1:] - x[0, :, :-1]).abs().mean(dim=(0, 2, 3))  # latent transition j-1 -> j at [j-1]
        # the largest step within each boundary's overlap (where either method may cut)
        per_boundary = [float(step[s - 1:s + o].max()) for s, o in zip(lay.starts[1:], lay.boundary_overlaps())]
        jumps[mode] = np.mean(per_boundary)
        inside = [j for j in range(1, lay.latent_frames)
                  if not any(s <= j <= s + o for s, o in zip(lay.starts[1:], lay.boundary_overlaps()))]
        assert float(step[[j - 1 for j in inside]].max()) < 1e-4  # no change inside chunks
    # the paper's ordering (temporal smoothness: independent > shared noise > randomized blending)
    assert jumps["blend"] < 0.7 * jumps["shared_noise"] < 0.7 * jumps["independent"], jumps


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def test_family_layer_refuses_what_a_method_does_not_serve():
    """One family layer serves FIFO and blending: CogVideoX is a blending-only family, so FIFO
    refuses it naming `pipe` and the families it supports; unknown objects and methods are refused."""
    from longvideo.methods.families import CogVideoXFamily, family_for, family_of
    from longvideo.methods.fifo import FIFODiffusion

    cog = _tiny_cogvideox(False)
    assert family_of(cog) == "cogvideox" and isinstance(family_for(cog, "blending"), CogVideoXFamily)
    with pytest.raises(ValueError, match=r"pipe: FIFO supports .*SkyReels-V2.*Wan.*AnimateDiff.*; "
                                         r"got CogVideoXVideoToVideoPipeline"):
        FIFODiffusion(cog)
    with pytest.raises(ValueError, match=r"pipe: randomized blending supports .*; got object"):
        family_for(object(), "blending")
    with pytest.raises(ValueError, match="method"):
        family_for(cog, "story")


def test_bad_inputs_raise_clear_errors(wan):
    with pytest.raises(ValueError, match="overlap_frames"):
        B.RandomizedBlending(wan, chunk_frames=8, overlap_frames=8)
    with pytest.raises(ValueError, match="overlap_frames"):
        B.RandomizedBlending(wan, chunk_frames=8, overlap_frames=12)
    with pytest.raises(ValueError, match="overlap_frames"):  # 1 latent frame each after compression
        B.RandomizedBlending(wan, chunk_frames=4, overlap_frames=2)
    with pytest.raises(ValueError, match="chunk_frames"):
        B.RandomizedBlending(wan, chunk_frames=0, overlap_frames=0)
    with pytest.raises(ValueError, match="strength"):
        B.RandomizedBlending(wan, strength=0.0)
    with pytest.raises(ValueError, match="blend"):
        B.RandomizedBlending(wan, blend="x1")
    with pytest.raises(ValueError, match="mode"):
        B.RandomizedBlending(wan, mode="fancy")
    with pytest.raises(ValueError, match="chunk_batch"):
        B.RandomizedBlending(wan, chunk_batch=0)
    with pytest.raises(ValueError, match="pipe"):
        B.RandomizedBlending(object())
    method = B.RandomizedBlending(wan, chunk_frames=9, overlap_frames=4)
    for empty in (np.zeros((0, 32, 32, 3), np.float32), [], torch.zeros(0, 3, 32, 32)):
        with pytest.raises(ValueError, match="empty"):
            method(empty, num_inference_steps=2)
    with pytest.raises(ValueError, match="video"):
        method(np.zeros((4, 32, 32), np.float32), num_inference_steps=2)
    with pytest.raises(ValueError, match="not found"):
        method("/nonexistent/video.mp4")
    with pytest.raises(ValueError, match="height/width"):
        method(smooth_video(5), num_inference_steps=2, height=40, width=32)  # Wan: multiples of 16
    with pytest.raises(ValueError, match="no step"):
        B.RandomizedBlending(wan, strength=0.1)(smooth_video(5), num_inference_steps=3)


# --------------------------------------------------------------------------------------------
# Seam metric
# --------------------------------------------------------------------------------------------


def test_lucas_kanade_recovers_a_known_translation():
    yy, xx = np.mgrid[0:48, 0:48].astype(np.float32)

    def pattern(dx, dy):
        x, y = xx - dx, yy - dy
        return 0.5 + 0.25 * np.sin(x / 3.0) * np.cos(y / 4.0) + 0.2 * np.sin((x + 2 * y) / 5.0)

    prev = torch.from_numpy(pattern(0, 0))[None, None]
    nxt = torch.from_numpy(pattern(1.3, -0.7))[None, None]
    flow = lucas_kanade_flow(prev, nxt)[0, :, 8:-8, 8:-8]  # away from the borders
    assert abs(float(flow[0].median()) - 1.3) < 0.1 and abs(float(flow[1].median()) + 0.7) < 0.1


@pytest.mark.parametrize("flow", ["lucas_kanade", "farneback"])
def test_seam_metric_finds_a_planted_seam(flow):
    if flow == "farneback":
        pytest.importorskip("cv2")
    seamless = seam_metric(smooth_video(24), [12], flow=flow)
    planted = seam_metric(smooth_video(24, jump_at=12, jump=6.0), [12], flow=flow)
    assert planted["flow_method"] == flow
    assert planted["boundary"] > 1.5 * planted["interior"]
    assert planted["peak_boundary"] > 1.5 * planted["peak_interior"]
    assert planted["flow_boundary"] > 1.5 * planted["flow_interior"]
    for key in ("ratio", "peak_ratio", "flow_ratio"):
        assert planted[key] > 1.5 * seamless[key], key
    assert 0.75 < seamless["ratio"] < 1.33 and 0.75 < seamless["peak_ratio"] < 1.33
    # the jump is found wherever it is planted, and not where it is not
    elsewhere = seam_metric(smooth_video(24, jump_at=12, jump=6.0), [6], flow=flow)
    assert elsewhere["ratio"] < 1.0


def test_seam_metric_bad_inputs():
    with pytest.raises(ValueError, match="frames"):
        seam_metric(smooth_video(1), [])
    with pytest.raises(ValueError, match="boundaries"):
        seam_metric(smooth_video(5), [5])
    out = seam_metric(smooth_video(5), [])
    assert out["boundary"] is None and out["ratio"] is None and out["interior"] is not None


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_run_enhance_writes_video_and_seam_metric(tmp_path):
    pytest.importorskip("longvideo.models.wan", reason="the default tiny model is Wan")
    from longvideo.cli import enhance
    from longvideo.video import read_video, write_video

    src = tmp_path / "in.mp4"
    write_video(src, (smooth_video(21) * 255).round().astype(np.uint8), fps=8)
    out = tmp_path / "out.mp4"
    # `longvideo enhance` alone (built here so that another command cannot break this test;
    # test_harness_cli covers the whole parser)
    parser = argparse.ArgumentParser(prog="longvideo enhance")
    enhance.add_arguments(parser)
    args = parser.parse_args([str(src), "--out", str(out), "--steps", "4", "--device", "cpu", "--blend-compare"])
    assert enhance.run(args) == 0
    frames = read_video(out)
    assert frames.shape == (21, 32, 32, 3)
    report = json.loads(out.with_suffix(".seams.json").read_text())
    assert set(report["seam_metric_by_mode"]) == set(B.MODES)
    for key in ("boundary", "interior", "ratio", "flow_ratio"):
        assert report["seam_metric"][key] is not None
    assert (tmp_path / "out.independent.mp4").exists()
