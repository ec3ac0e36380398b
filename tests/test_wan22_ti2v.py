"""Wan 2.2 TI2V-5B (one transformer, a timestep per latent token, the 4x16x16 VAE with 48
channels) on the tiny TI2V pipelines built offline: the VAE's shape against the real config,
the family's per-token timesteps against what diffusers' pipelines hand the transformer, the
method-off sampling against WanPipeline / WanImageToVideoPipeline with expand_timesteps, a FIFO
window against one written frame by frame, FIFO's image mode, FreeLOC, and the CLI on a saved
checkpoint (docs/methods.md, "Wan 2.2 TI2V-5B")."""
import json

import pytest
import torch

from longvideo.methods.families import Wan22TI2VFamily, WanFamily, family_for
from longvideo.methods.fifo import FIFODiffusion
from longvideo.models import wan, wan22_ti2v

TOL = dict(rtol=1e-4, atol=1e-5)
H = W = 64          # 4 x 4 latents, 2 x 2 = 4 tokens per latent frame
STEPS, GS, SEED = 3, 3.0, 0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster than two contending ones (results unchanged)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe():
    return wan22_ti2v.tiny_pipeline("t2v")


@pytest.fixture(scope="module")
def pipe_i2v():
    return wan22_ti2v.tiny_pipeline("i2v")


@pytest.fixture(scope="module")
def embeds(pipe):
    with torch.no_grad():
        return family_for(pipe, "fifo").encode_prompt("a cat", "blurry", True, torch.device("cpu"))


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(7))


class _TokensOutOfOrder(Wan22TI2VFamily):
    """Broken on purpose: the per-frame timesteps tiled over the tokens (frame 0, 1, 2, 0, 1, 2,
    ...) instead of each frame's value repeated over that frame's tokens."""

    @staticmethod
    def token_timesteps(tr, x, timestep):
        _, ph, pw = tr.config.patch_size
        tokens = (x.shape[3] // ph) * (x.shape[4] // pw)
        per_frame = timestep if timestep.ndim else timestep.expand(x.shape[2])
        return per_frame.float().repeat(tokens)[None].expand(x.shape[0], -1)

    @staticmethod
    def call_transformer(tr, x, timestep, embeds):
        t = _TokensOutOfOrder.token_timesteps(tr, x, timestep)
        return tr(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0].float()


# ---------------------------------------------------------------------------------------------
# the model
def test_tiny_vae_is_4x16x16_like_the_real_one(pipe, pipe_i2v):
    """The tiny VAE has the structural config of Wan2.2-TI2V-5B's (the planner's known config,
    from the public repository), and compresses 9 x 64 x 64 frames to 48 x 3 x 4 x 4 latents."""
    from longvideo.planner import load_model_spec
    from longvideo.planner.estimate import _vae_scale

    spec = load_model_spec("wan2.2-ti2v-5b")
    real = spec.components["vae"].config
    tiny = dict(pipe.vae.config)
    for key in ("is_residual", "z_dim", "patch_size", "in_channels", "out_channels", "scale_factor_spatial",
                "scale_factor_temporal", "temperal_downsample"):
        assert tiny[key] == real[key], key
    assert len(tiny["dim_mult"]) == len(real["dim_mult"])
    assert _vae_scale(spec) == (16, 4) and spec.expand_timesteps
    assert spec.components["transformer"].config["in_channels"] == 48 == pipe.transformer.config.in_channels
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (16, 4)
    with torch.no_grad():
        z = pipe.vae.encode(torch.rand(1, 3, 9, H, W) * 2 - 1).latent_dist.mode()
        assert z.shape == (1, 48, 3, 4, 4)
        assert pipe.vae.decode(z).sample.shape == (1, 3, 9, H, W)
    assert pipe.config.expand_timesteps and pipe_i2v.config.expand_timesteps
    a, b = pipe.transformer.state_dict(), pipe_i2v.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # one model, two pipelines
    with pytest.raises(ValueError, match="kind"):
        wan22_ti2v.tiny_pipeline("v2v")


def test_detection(pipe, pipe_i2v):
    assert type(family_for(pipe, "fifo")) is Wan22TI2VFamily
    assert type(family_for(pipe_i2v, "fifo")) is Wan22TI2VFamily
    assert type(family_for(wan.tiny_pipeline(), "fifo")) is WanFamily  # Wan 2.1: no expand_timesteps
    with pytest.raises(ValueError, match="pipe: randomized blending supports"):
        family_for(pipe, "blending")
    assert wan22_ti2v.is_ti2v_index({"_class_name": "WanPipeline", "expand_timesteps": True})
    assert not wan22_ti2v.is_ti2v_index({"_class_name": "WanPipeline", "expand_timesteps": False})
    assert not wan22_ti2v.is_ti2v_index({"_class_name": "WanPipeline"})
    family = family_for(pipe, "fifo")
    assert family.size_multiple() == 32 and family.default_size() == (H, W)


def _captured_timesteps(p, **kwargs):
    """The timestep argument of every transformer call of one pipeline run."""
    seen = []
    hook = p.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()),
                                                   with_kwargs=True)
    try:
        with torch.no_grad():
            p(prompt="a cat", height=H, width=W, num_frames=9, num_inference_steps=1, guidance_scale=1.0,
              generator=torch.Generator().manual_seed(SEED), output_type="latent", **kwargs)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("family_cls", [Wan22TI2VFamily, _TokensOutOfOrder])
def test_token_timesteps_are_what_the_pipelines_pass(pipe, pipe_i2v, image, family_cls):
    """Text-to-video: every token at t; image-to-video: frame 0's tokens at 0, the others at t --
    the family's per-token timesteps from (F,) per-frame values equal diffusers' exactly; the
    tokens in the wrong order do not."""
    x = torch.zeros(1, 48, 3, 4, 4)
    tr = pipe.transformer
    (t2v,) = _captured_timesteps(pipe)
    (i2v,) = _captured_timesteps(pipe_i2v, image=image)
    t = t2v[0, 0]
    assert t2v.shape == i2v.shape == (1, 3 * 4)
    ours_t2v = family_cls.token_timesteps(tr, x, t)
    ours_i2v = family_cls.token_timesteps(tr, x, torch.stack([torch.zeros_like(t), t, t]))
    assert torch.equal(ours_t2v, t2v.float())  # all equal: the order cannot matter
    if family_cls is Wan22TI2VFamily:
        assert torch.equal(ours_i2v, i2v.float())
    else:
        assert not torch.equal(ours_i2v, i2v.float())


def _sample(pipe, family, embeds, frame0=None, frame0_t=0.0):
    """WanPipeline's loop with the family's model_output given one timestep per latent frame;
    with `frame0` (image latents) frame 0 is replaced by it before every call and at the end and
    told `frame0_t` (0: WanImageToVideoPipeline with expand_timesteps)."""
    from diffusers.utils.torch_utils import randn_tensor

    pos, neg = embeds
    x = randn_tensor((1, 48, 3, 4, 4), generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    for t in sched.timesteps:
        t_frames = t.float().expand(3).clone()
        x_in = x
        if frame0 is not None:
            x_in = torch.cat([frame0, x[:, :, 1:]], dim=2)
            t_frames[0] = frame0_t
        y = family.model_output(x_in, t_frames, pos, neg, GS)
        x = sched.step(y, t, x, return_dict=False)[0]
    if frame0 is not None:
        x = torch.cat([frame0, x[:, :, 1:]], dim=2)
    return x


def test_options_off_equal_the_diffusers_pipelines(pipe, pipe_i2v, embeds, image):
    """Method off: the family's per-frame calls reproduce WanPipeline (expand_timesteps) and, with
    the image's latent frame told t = 0, WanImageToVideoPipeline (expand_timesteps); telling the
    image frame t instead must differ."""
    pos, neg = embeds
    common = dict(prompt_embeds=pos, negative_prompt_embeds=neg, height=H, width=W, num_frames=9,
                  num_inference_steps=STEPS, guidance_scale=GS, output_type="latent")
    family = family_for(pipe, "fifo")
    with torch.no_grad():
        ref_t2v = pipe(generator=torch.Generator().manual_seed(SEED), **common).frames.float()
        ref_i2v = pipe_i2v(image=image, generator=torch.Generator().manual_seed(SEED), **common).frames.float()
        family.set_image(image)
        frame0 = family.image_latents(H, W)
        ours_t2v = _sample(pipe, family, embeds)
        ours_i2v = _sample(pipe, family, embeds, frame0=frame0)
        broken = _sample(pipe, family, embeds, frame0=frame0, frame0_t=float(pipe.scheduler.timesteps[0]))
    torch.testing.assert_close(ours_t2v, ref_t2v, **TOL)
    torch.testing.assert_close(ours_i2v, ref_i2v, **TOL)
    assert torch.equal(ref_i2v[:, :, :1], frame0)  # the pipeline's frame 0 is the image's latents
    assert (broken - ref_i2v).abs().max() > 1e-3


def _frame_by_frame(tr, x, t_frames, sigma_in, sigma_out, pos, neg, gs):
    """Each frame's Euler update, written one frame at a time; the per-token timesteps built here
    token by token (token i of the window belongs to latent frame i // tokens_per_frame)."""
    per_frame = (x.shape[3] // 2) * (x.shape[4] // 2)
    t = torch.tensor([[float(t_frames[i // per_frame]) for i in range(x.shape[2] * per_frame)]])
    y_c = tr(hidden_states=x, timestep=t, encoder_hidden_states=pos, return_dict=False)[0]
    y_u = tr(hidden_states=x, timestep=t, encoder_hidden_states=neg, return_dict=False)[0]
    out = torch.empty_like(x)
    for j in range(x.shape[2]):
        y = y_u[:, :, j] + gs * (y_c[:, :, j] - y_u[:, :, j])
        out[:, :, j] = x[:, :, j] + (sigma_out[j] - sigma_in[j]) * y
    return out


@pytest.mark.parametrize("family_cls", [Wan22TI2VFamily, _TokensOutOfOrder])
def test_fifo_window_equals_frame_by_frame(pipe, embeds, family_cls):
    """A FIFO window of 6 frames at levels 3..8 of L = 8: each frame's tokens carry its own
    level's timestep; the family's update of every frame equals the oracle's."""
    fifo = FIFODiffusion(pipe, num_partitions=2, frames_per_window=6)
    lv = fifo.family.levels(8, torch.device("cpu"))
    k = torch.arange(3, 9)
    t_frames = lv.t_model[k]
    assert len(set(t_frames.tolist())) == 6
    x = torch.randn(1, 48, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    pos, neg = embeds
    family = family_cls(pipe)
    with torch.no_grad():
        ours = family.update(lv, x, family.model_output(x, t_frames, pos, neg, 4.0), k, k - 1)
        ref = _frame_by_frame(pipe.transformer, x, t_frames, lv.sigma[k], lv.sigma[k - 1], pos, neg, 4.0)
    if family_cls is Wan22TI2VFamily:
        torch.testing.assert_close(ours, ref, **TOL)
    else:
        assert (ours - ref).abs().max() > 1e-3


def test_fifo_text_and_image_modes(pipe, pipe_i2v, image):
    """FIFO end to end on the tiny TI2V model, text only and with an image (the initial clip from
    the image-to-video sampling: its frame 0 is the image's latents; the same clip whichever of the
    two pipelines holds the weights); the image changes the video and is part of the run's
    settings; bad images are refused naming the argument."""
    fifo = FIFODiffusion(pipe, num_partitions=1, frames_per_window=2, lookahead_context="clean")
    family = fifo.family
    text = fifo("a cat", 6, height=H, width=W, guidance_scale=GS).frames[0]
    assert text.shape == (6, H, W, 3) and family.run_settings() == {"image": None}
    family.set_image(image)
    with torch.no_grad():
        clip = family.sample_clip(*family.encode_prompt("a cat", "", True, torch.device("cpu")), H, W, 3, 2, GS,
                                  torch.Generator().manual_seed(SEED))
        clip_i2v = Wan22TI2VFamily(pipe_i2v)
        clip_i2v.set_image(image)
        clip_b = clip_i2v.sample_clip(*family.encode_prompt("a cat", "", True, torch.device("cpu")), H, W, 3, 2, GS,
                                      torch.Generator().manual_seed(SEED))
    assert torch.equal(clip[:, :, :1], family.image_latents(H, W))
    torch.testing.assert_close(clip, clip_b, rtol=0, atol=0)
    with_image = fifo("a cat", 6, height=H, width=W, guidance_scale=GS).frames[0]
    assert with_image.shape == text.shape and (with_image != text).any()
    with_key = family.run_settings()["image"]
    assert with_key is not None
    family.set_image(None)
    again = fifo("a cat", 6, height=H, width=W, guidance_scale=GS).frames[0]
    assert (again == text).all()
    import PIL.Image

    pil = PIL.Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())
    family.set_image(pil)  # a PIL image: the same picture up to its 8-bit rounding
    assert (family.image_latents(H, W) - clip[:, :, :1]).abs().max() < 0.1
    assert family.run_settings()["image"] not in (None, with_key)
    family.set_image(None)
    with pytest.raises(ValueError, match="image"):
        family.set_image(torch.rand(4, H, W))
    with pytest.raises(ValueError, match="image"):
        family.set_image("first.png")


# ---------------------------------------------------------------------------------------------
# FreeLOC on the TI2V transformer
def _run(p, frames):
    return p(prompt="a cat", num_frames=frames, height=H, width=W, num_inference_steps=1, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(0), output_type="latent").frames.float()


def test_freeloc_on_the_ti2v_transformer(pipe):
    """At the trained length FreeLOC is the plain pipeline bit for bit; beyond it, its processors
    run on the TI2V transformer (per-token timesteps, 48 channels) and change the output; removal
    restores the pipeline."""
    from longvideo.methods.freeloc import FreeLOC
    from longvideo.processors import wan as P

    ref9, ref17 = _run(pipe, 9), _run(pipe, 17)
    # (lean_wan_forward=False: diffusers' forward, so "bit for bit" is about FreeLOC's processors;
    # longvideo's forward embeds TI2V's one-run timestep over 1 row instead of S, whose matmul may
    # round differently: within 1e-5, checked below)
    with FreeLOC(pipe, lean_wan_forward=False) as method:
        assert isinstance(pipe.transformer.blocks[0].attn1.processor, P.WanTieredAttnProcessor)
        assert torch.equal(_run(pipe, 9), ref9)
        out = _run(pipe, 17)
        assert method.last_params is not None and method.last_params.num_frames == 5
    assert (out - ref17).abs().max() > 1e-3
    assert torch.equal(_run(pipe, 17), ref17)
    with FreeLOC(pipe):
        torch.testing.assert_close(_run(pipe, 9), ref9, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_run(pipe, 17), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["vrpr", "tsa"])
def test_freeloc_processor_matches_per_band_oracle_on_ti2v(pipe, mode):
    """FreeLOC's processor on a TI2V attention layer (2 x 2 tokens per frame, the grid read from
    the 48-channel latents) against test_freeloc's per-band oracle."""
    import longvideo
    from longvideo.processors import wan as P
    from test_freeloc import OP, _oracle

    tr = pipe.transformer
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 48, 9, 4, 4, generator=gen)
    hidden = torch.randn(1, 9 * 4, 64, generator=gen)
    vrpr, tiers = (2, 5, 2, 3, 4), ((2, 5, 1, 1) if mode == "tsa" else (9, 0, 0, 0))
    settings = P.TieredAttentionSettings(local_frames=tiers[0], stripe_frames=tiers[1], stripe_width=tiers[2],
                                         sink_frames=tiers[3], vrpr=vrpr)
    attn = tr.blocks[1].attn1
    grid_state, restore = P.install(tr, [None, mode, None, None], lambda m, F, T: settings)
    try:
        rotary = tr.rope(latents)
        assert (grid_state.frames, grid_state.height, grid_state.width) == (9, 2, 2)
        with torch.no_grad():
            got = attn(hidden, None, None, rotary)
            want = _oracle(attn, hidden, tr.rope, (9, 2, 2), vrpr, tiers)
    finally:
        restore()
    atol, rtol = longvideo.ops.get_backend(OP, "reference").tolerance(torch.float32)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# the CLI on a saved checkpoint
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, pipe):
    folder = tmp_path_factory.mktemp("ti2v") / "Wan2.2-TI2V-tiny"
    pipe.save_pretrained(folder)
    return folder


def test_checkpoint_is_detected_and_loaded_as_ti2v(checkpoint):
    from longvideo.cli._common import UsageError, check_sizes_before_loading, checkpoint_family
    from longvideo.models import load_pipeline

    assert json.loads((checkpoint / "model_index.json").read_text())["expand_timesteps"] is True
    assert checkpoint_family(checkpoint, ("wan", "wan22_ti2v"), "test") == "wan22_ti2v"
    with pytest.raises(UsageError, match="TI2V"):
        checkpoint_family(checkpoint, ("wan",), "`longvideo enhance`")
    for kind, cls in (("t2v", "WanPipeline"), ("i2v", "WanImageToVideoPipeline")):
        p = load_pipeline("wan22_ti2v", kind, model=checkpoint, dtype="float32")
        assert type(p).__name__ == cls and p.config.expand_timesteps
        assert p.longvideo_trained_latent_frames == 31
    from longvideo.planner import load_model_spec  # the planner reads the folder's configs alike
    from longvideo.planner.estimate import _vae_scale

    spec = load_model_spec(checkpoint)
    assert spec.expand_timesteps and spec.trained_latent_frames == 31 and spec.default_size == (704, 1280)
    assert _vae_scale(spec) == (16, 4)
    plain = checkpoint.parent / "plain"  # a Wan 2.1 index (no expand_timesteps) is refused before loading
    plain.mkdir(exist_ok=True)
    index = json.loads((checkpoint / "model_index.json").read_text())
    (plain / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": False}))
    with pytest.raises(ValueError, match="not a Wan 2.2 TI2V checkpoint"):
        wan22_ti2v.from_pretrained(plain, "t2v")
    # sizes are checked against the config files before loading: 16 (VAE) x 2 (patch) = 32
    args = type("Args", (), {"model": str(checkpoint), "height": 48, "width": 64})()
    with pytest.raises(UsageError, match="VAE scale 16 x patch size 2"):
        check_sizes_before_loading(args, "wan22_ti2v")


@pytest.mark.parametrize("method", ["freeloc", "fifo"])
def test_cli_generate_on_a_ti2v_checkpoint(checkpoint, tmp_path, capsys, method):
    from longvideo.cli import main
    from longvideo.video import read_video

    out = tmp_path / f"{method}.mp4"
    argv = ["generate", "--method", method, "--model", str(checkpoint), "--height", str(H), "--width", str(W),
            "--device", "cpu", "--out", str(out)]
    if method == "freeloc":
        argv += ["--num-frames", "13", "--steps", "2", "--freeloc-trained-frames", "3"]
    else:
        argv += ["--num-frames", "4", "--fifo-window", "2", "--fifo-partitions", "1"]
    assert main(argv) == 0
    frames = read_video(out)
    assert frames.shape == ((13 if method == "freeloc" else 4), H, W, 3)
    text = capsys.readouterr().out
    if method == "freeloc":
        assert "FreeLOC: 4 latent frames (trained 3)" in text


def test_ouroboros_runs_on_ti2v(pipe):
    """Ouroboros (tail, SACFA, self-recurrent guidance) end to end on the TI2V model: its
    processors act (the video differs from FIFO's with the coherent tail alone, same seed)."""
    from longvideo.methods.fifo import OuroborosDiffusion

    plain = FIFODiffusion(pipe, num_partitions=2, frames_per_window=2, coherent_tail=True)(
        "a red cat", 6, height=H, width=W).frames[0]
    ouro = OuroborosDiffusion(pipe, num_partitions=2, frames_per_window=2)("a red cat", 6, height=H, width=W).frames[0]
    assert ouro.shape == plain.shape and abs(ouro - plain).max() > 1e-3


@pytest.mark.parametrize("tiled", [False, True], ids=["whole-frame", "spatial-tiles"])
@torch.no_grad()
def test_streamed_decode_equals_whole_decode(pipe, tiled):
    """The Wan 2.2 VAE (patched, residual) streamed one latent frame at a time equals vae.decode
    bit for bit: longvideo.decode (what --method direct|freeloc write; with spatial tiles blended
    before unpatchify, as tiled_decode) and FIFO's family.decode (uint8 frames)."""
    import numpy as np

    from longvideo.decode import iter_decoded, vae_latents
    from longvideo.methods.families.base import to_uint8

    vae = pipe.vae
    latents = torch.randn(1, 48, 3, 6, 8, generator=torch.Generator().manual_seed(3))
    z = vae_latents(pipe, latents)
    if tiled:
        vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48,
                          tile_sample_stride_width=48)
    try:
        whole = vae.decode(z).sample
        chunks = list(iter_decoded(vae, z))
    finally:
        vae.use_tiling = False
    assert whole.shape == (1, 3, 9, 96, 128)
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert torch.equal(torch.cat(chunks, dim=2), whole)
    if not tiled:
        family, frames, cache = family_for(pipe, "fifo"), [], None
        for k in range(3):
            out, cache = family.decode(latents[:, :, k:k + 1], cache)
            frames.append(out)
        assert np.array_equal(np.concatenate(frames), to_uint8(whole[0].permute(1, 0, 2, 3)))


def test_lora_composes_on_ti2v():
    """A tiny LoRA loaded the usual way (load_lora_weights + set_adapters) on the TI2V pipeline
    (test_lora's helpers): the family's per-token call equals the transformer's own call with
    the LoRA and moves with it as diffusers' does; FreeLOC's active processors project through
    the LoRA (separate layers == fused, != off)."""
    pytest.importorskip("peft", minversion="0.17", reason="diffusers' LoRA loading needs peft")
    from test_lora import WAN_TARGETS, check_off_and_delta, check_uses_lora, load_tiny_lora, lora_off

    from longvideo.methods.freeloc import FreeLOC

    p = wan22_ti2v.tiny_pipeline("t2v")  # its own copy: the LoRA stays loaded
    load_tiny_lora(p, p.transformer, "transformer", WAN_TARGETS)
    family = family_for(p, "fifo")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 48, 3, 4, 4, generator=gen)
    emb = torch.randn(1, 16, p.transformer.config.text_dim, generator=gen)
    t_frames = torch.tensor([0.0, 500.0, 700.0])
    t_tokens = t_frames.repeat_interleave(4)[None]

    def both():
        with torch.no_grad():
            return (family.forward(x, t_frames, emb),
                    p.transformer(hidden_states=x, timestep=t_tokens, encoder_hidden_states=emb, return_dict=False)[0])

    ours_on, ref_on = both()
    with lora_off(p):
        ours_off, ref_off = both()
    check_off_and_delta(ours_on, ours_off, ref_on, ref_off, 1e-5)
    with FreeLOC(p, layer_config=["tsa", "vrpr", "tsa", "vrpr"]) as method:
        check_uses_lora(lambda: _run(p, 17), p, p.transformer, ["transformer"])
        assert method.last_params is not None
