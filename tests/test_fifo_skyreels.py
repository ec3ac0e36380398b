"""FIFO-Diffusion on the tiny SkyReels-V2 pipeline: the per-frame (diffusion-forcing) timestep path
against the model's own call and against Wan's per-token call with the same weights, per-frame
updates against the scheduler, the initial clip against the DF pipeline, streaming, causal blocks."""
import inspect
import types

import numpy as np
import pytest
import torch

from longvideo.methods.fifo import FIFODiffusion, QueueState
from longvideo.methods.families import SkyReelsFamily, family_of
from longvideo.models import skyreels

FPS24 = [1]  # the pipelines' fps index: 16 fps -> 0, anything else -> 1


@pytest.fixture(scope="module")
def sky_pipe():
    return skyreels.tiny_pipeline()


def _inputs(seed, frames=3, hw=(4, 4)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, frames, *hw, generator=gen)
    emb = torch.randn(1, 16, 32, generator=gen)
    neg = torch.randn(1, 16, 32, generator=gen)
    return x, emb, neg


def _fifo(pipe, **kwargs):
    return FIFODiffusion(pipe, **kwargs)


def test_family_and_equal_timesteps_are_the_models_own_call(sky_pipe):
    """All frames at one level: the (B, F) diffusion-forcing call is the transformer's ordinary
    (B,) call; CFG in one batched call equals the DF pipeline's two B = 1 calls; fps is passed."""
    assert family_of(sky_pipe) == "skyreels"
    fam = SkyReelsFamily(sky_pipe)
    tr = sky_pipe.transformer
    assert tr.config.inject_sample_info and fam.default_window() == 3
    x, emb, neg = _inputs(0)
    t = torch.full((3,), 700.0)
    with torch.no_grad():
        mine = fam.model_output(x, t, emb, None, 1.0)
        ref = tr(hidden_states=x, timestep=t[:1], encoder_hidden_states=emb, fps=FPS24, return_dict=False)[0]
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)

        calls = []
        h = tr.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[0]), with_kwargs=True)
        try:
            t_mixed = torch.tensor([150.0, 500.0, 850.0])
            cfg = fam.model_output(x, t_mixed, emb, neg, 4.0)
        finally:
            h.remove()
        assert calls == [2]  # both CFG halves in one call

        def df(e):  # the DF pipeline's call: one row, (1, F) timestep, fps list of one
            return tr(hidden_states=x, timestep=t_mixed[None], encoder_hidden_states=e, enable_diffusion_forcing=True,
                      fps=FPS24, return_dict=False)[0]

        c, u = df(emb), df(neg)
        torch.testing.assert_close(cfg, u + 4.0 * (c - u), atol=1e-4, rtol=1e-4)

        fam.fps = 16  # the other fps embedding
        at16 = fam.model_output(x, t, emb, None, 1.0)
        ref16 = tr(hidden_states=x, timestep=t[:1], encoder_hidden_states=emb, fps=[0], return_dict=False)[0]
        torch.testing.assert_close(at16, ref16, atol=1e-5, rtol=1e-5)
        assert (at16 - mine).abs().max() > 1e-4


def test_per_frame_timesteps_equal_wan_per_token_call(sky_pipe):
    """Distinct per-frame levels: the SkyReels call equals an independent implementation, diffusers'
    WanTransformer3DModel loaded with the same weights and given Wan's per-token 2-D timestep (each
    frame's timestep on its patch tokens), with SkyReels' fps term added to Wan's modulation.
    Frames attend to each other, so changing the levels changes every frame's output."""
    from diffusers import WanTransformer3DModel

    tr = sky_pipe.transformer
    fam = SkyReelsFamily(sky_pipe)
    accepted = inspect.signature(WanTransformer3DModel.__init__).parameters
    w = WanTransformer3DModel(**{k: v for k, v in tr.config.items() if k in accepted})
    w.load_state_dict({k: v for k, v in tr.state_dict().items() if not k.startswith("fps_")}, strict=True)
    assert family_of(types.SimpleNamespace(transformer=w)) == "wan"

    with torch.no_grad():
        fps_term = tr.fps_projection(tr.fps_embedding(torch.tensor(FPS24)))  # (1, 6 * inner)
    add_fps = w.condition_embedder.register_forward_hook(
        lambda m, args, out: (out[0], out[1] + fps_term[:, None], *out[2:]))
    x, emb, neg = _inputs(1, frames=3, hw=(4, 6))
    t = torch.tensor([50.0, 420.0, 980.0])
    tokens = (4 // 2) * (6 // 2)
    try:
        with torch.no_grad():
            mine = fam.model_output(x, t, emb, neg, 3.0)
            per_token = t.repeat_interleave(tokens)[None].repeat(2, 1)
            v = w(hidden_states=torch.cat([x, x]), timestep=per_token, encoder_hidden_states=torch.cat([neg, emb]),
                  return_dict=False)[0]
            u, c = v.chunk(2)
            torch.testing.assert_close(mine, u + 3.0 * (c - u), atol=1e-4, rtol=1e-4)
            same = fam.model_output(x, torch.full((3,), 420.0), emb, neg, 3.0)
    finally:
        add_fps.remove()
    assert (mine - same).abs().amax(dim=(0, 1, 3, 4)).min() > 0  # every frame's output moved


def test_per_frame_update_matches_plain_sampling(sky_pipe, assert_fifo_euler_update):
    """n = 1, no lookahead, a clip of exactly f frames: each frame's update is the Euler step that
    plain flow-matching sampling (FlowMatchEulerDiscreteScheduler) makes from its level to the
    next, with the velocity of the per-frame-timestep model call."""
    fifo = FIFODiffusion(sky_pipe, num_partitions=1, frames_per_window=4, lookahead=False)
    gen = torch.Generator().manual_seed(2)
    st = QueueState(queue=torch.randn(1, 4, fifo.L, 4, 4, generator=gen), context=torch.zeros(1, 4, 0, 4, 4),
                    decoder_state=None, iteration=0, frames_out=0, rng_state=gen.get_state())
    emb = torch.randn(1, 16, 32, generator=gen)
    lv = fifo.levels("cpu")
    sig = lv.sigma
    assert sig[0] == 0 and torch.all(sig[1:] > sig[:-1]) and sig.numel() == fifo.L + 1
    assert_fifo_euler_update(fifo, st, lv, emb)


def test_initial_clip_euler_loop_equals_scheduler_sampling(sky_pipe):
    """The fallback initial-clip sampler (for pipelines that cannot sample from text embeddings)
    is plain flow-matching sampling: noise drawn as the DF pipeline draws it (diffusers'
    randn_tensor), the pipeline scheduler's sigmas, the model called as the DF pipeline calls it
    (all frames at one timestep, one CFG half per call), FlowMatchEulerDiscreteScheduler.step."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.utils.torch_utils import randn_tensor

    fam = SkyReelsFamily(sky_pipe)
    assert fam.pipeline_can_sample()
    assert not SkyReelsFamily(skyreels.tiny_pipeline("v2v")).pipeline_can_sample()  # needs a video
    tr = sky_pipe.transformer
    _, emb, neg = _inputs(3)
    f, steps, g = 3, 3, 4.0
    with torch.no_grad():
        mine = fam.sample_clip_euler(emb, neg, 32, 16, f, steps, g, torch.Generator().manual_seed(5))
        sky_pipe.scheduler.set_timesteps(steps)
        sched = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the sigmas below already carry the shift
        sched.set_timesteps(sigmas=sky_pipe.scheduler.sigmas[:steps].tolist())
        x = randn_tensor((1, 4, f, 8, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float32)
        for t in sched.timesteps:
            c, u = (tr(hidden_states=x, timestep=t.expand(1, f), encoder_hidden_states=e, enable_diffusion_forcing=True,
                       fps=FPS24, return_dict=False)[0] for e in (emb, neg))
            x = sched.step(u + g * (c - u), t, x, return_dict=False)[0]
    assert mine.shape == x.shape
    torch.testing.assert_close(mine, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["t2v", "v2v"])
def test_generate_streams_requested_frames(sky_pipe, kind):
    """t2v: initial clip from the DF pipeline; v2v (pipeline needs a video): from the Euler loop."""
    pipe = sky_pipe if kind == "t2v" else skyreels.tiny_pipeline("v2v")
    fifo = _fifo(pipe, num_partitions=1, frames_per_window=4)
    assert fifo.family.name == "skyreels" and fifo.family.pipeline_can_sample() == (kind == "t2v")
    seen = []

    class Writer:
        def write(self, frame):
            seen.append(frame)

    frames = list(fifo.generate("a cat", 6, guidance_scale=3.0, seed=0, writer=Writer()))
    assert len(frames) == 6 and all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames)
    assert len(seen) == 6 and all(a is b for a, b in zip(seen, frames))
    if kind == "t2v":
        np.testing.assert_array_equal(np.stack(frames) / np.float32(255),
                                      fifo("a cat", 6, guidance_scale=3.0, seed=0).frames[0])


def test_causal_blocks_and_unsupported_configs(sky_pipe):
    """num_frame_per_block = b > 1: block-causal attention, cleanest (head) block first. FIFO runs
    it when the window is whole blocks (a frame's output then ignores every later block, and
    depends on earlier ones); any other window is a ValueError naming frames_per_window.
    Image-conditioned transformers are rejected naming pipe."""
    from diffusers import SkyReelsV2Transformer3DModel

    tr = sky_pipe.transformer
    tr._set_ar_attention(2)  # what the DF pipelines do for causal_block_size=2
    try:
        fam = SkyReelsFamily(sky_pipe)
        assert fam.default_window() == 2  # the trained 3 latent frames, rounded down to whole blocks
        x, emb, _ = _inputs(4, frames=4)
        t = torch.tensor([100.0, 300.0, 500.0, 700.0])
        later = x.clone()
        later[:, :, 2:] = torch.randn(1, 4, 2, 4, 4)
        earlier = x.clone()
        earlier[:, :, :1] = 0
        with torch.no_grad():
            base, v_later, v_earlier = (fam.model_output(z, t, emb, None, 1.0) for z in (x, later, earlier))
        torch.testing.assert_close(v_later[:, :, :2], base[:, :, :2], atol=1e-6, rtol=0)
        assert (v_earlier[:, :, 2:] - base[:, :, 2:]).abs().max() > 1e-4
        with pytest.raises(ValueError, match="frames_per_window"):
            fam.model_output(x[:, :, :3], t[:3], emb, None, 1.0)
        with pytest.raises(ValueError, match="frames_per_window"):  # refused when the method is built
            _fifo(sky_pipe, num_partitions=1, frames_per_window=3, lookahead=False)
    finally:
        tr._set_ar_attention(1)
    i2v = SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                       in_channels=4, out_channels=4, text_dim=16, freq_dim=8, ffn_dim=16,
                                       num_layers=1, image_dim=16, added_kv_proj_dim=16)
    with pytest.raises(ValueError, match="pipe"):
        FIFODiffusion(types.SimpleNamespace(transformer=i2v))


def test_blending_refuses_skyreels(sky_pipe):
    """SkyReels-V2 is a FIFO-only family of the shared family layer: randomized blending refuses it."""
    from longvideo.methods.blending import RandomizedBlending

    with pytest.raises(ValueError, match=r"pipe: randomized blending supports .*; got SkyReelsV2"):
        RandomizedBlending(sky_pipe)


def test_from_pretrained_errors(tmp_path):
    import json

    with pytest.raises(ValueError, match="kind"):
        skyreels.tiny_pipeline("t2i")
    with pytest.raises(ValueError, match="model path"):
        skyreels.from_pretrained(tmp_path / "missing")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match="not a SkyReels-V2"):
        skyreels.from_pretrained(tmp_path)
