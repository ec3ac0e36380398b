"""Wan 2.2 A14B (two experts switched at a boundary timestep) on the tiny two-expert pipeline:
the family against diffusers' WanPipeline, and FIFO's per-frame routing against a window written
frame by frame (docs/methods.md, "Wan 2.2: two experts in one window")."""
import pytest
import torch

from longvideo.methods.families import Wan22Family, WanFamily, family_for
from longvideo.methods.fifo import FIFODiffusion, OuroborosConfig
from longvideo.models import wan, wan22

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def pipe():
    return wan22.tiny_pipeline()


@pytest.fixture(scope="module")
def embeds(pipe):
    family = family_for(pipe, "fifo")
    with torch.no_grad():
        return family.encode_prompt("a cat", "blurry", True, torch.device("cpu"))


def test_detected_and_refused_where_unsupported(pipe):
    assert isinstance(family_for(pipe, "fifo"), Wan22Family)
    assert type(family_for(wan.tiny_pipeline(), "fifo")) is WanFamily  # Wan 2.1: no boundary_ratio
    assert isinstance(family_for(pipe, "blending"), Wan22Family)  # blending: SDEdit on the two experts
    # SACFA and self-recurrent guidance run on two experts (tests below)
    FIFODiffusion(pipe, num_partitions=2, frames_per_window=4,
                  ouroboros=OuroborosConfig(tail_sampling=True, sacfa=True, self_recurrent_guidance=True))
    with pytest.raises(ValueError, match="guidance_scale_2"):
        next(FIFODiffusion(wan.tiny_pipeline(), num_partitions=1, frames_per_window=2).generate(
            "a cat", 1, height=32, width=32, guidance_scale_2=2.0))


STEPS, GS, GS2, SEED = 4, 3.0, 1.5, 0


@pytest.fixture(scope="module")
def pipeline_latents(pipe, embeds):
    """WanPipeline's own two-expert sampling (latents) of one clip: the reference, run once."""
    pos, neg = embeds
    with torch.no_grad():
        return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=32, width=32, num_frames=9,
                    num_inference_steps=STEPS, guidance_scale=GS, guidance_scale_2=GS2,
                    generator=torch.Generator().manual_seed(SEED), output_type="latent").frames.float()


def _family_run(pipe, family, embeds):
    """The same sampling with the family's model_output given one timestep per frame (FIFO's
    path), all frames at the scheduler's timestep, stepped by the pipeline's scheduler."""
    from diffusers.utils.torch_utils import randn_tensor

    pos, neg = embeds
    x = randn_tensor((1, 4, 3, 8, 8), generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    family.set_guidance_scale_2(GS2)
    for t in sched.timesteps:
        y = family.model_output(x, t.float().expand(3), pos, neg, GS)
        x = sched.step(y, t, x, return_dict=False)[0]
    return x


class _SwappedExperts(Wan22Family):
    """Broken on purpose: the low-noise expert above the boundary."""

    @property
    def experts(self):
        return self.pipe.transformer_2, self.pipe.transformer


class _OneGuidanceScale(Wan22Family):
    """Broken on purpose: guidance_scale for both experts."""

    def set_guidance_scale_2(self, value):
        self.guidance_scale_2 = None


@pytest.mark.parametrize("family_cls", [Wan22Family, _SwappedExperts, _OneGuidanceScale])
def test_options_off_equal_wan_pipeline_with_two_experts(pipe, embeds, pipeline_latents, family_cls):
    """4 steps: timesteps 999 and 900 at or above the boundary (875), 750 and 500 below, so both
    experts and both guidance scales act; the broken families must differ."""
    with torch.no_grad():
        ours = _family_run(pipe, family_cls(pipe), embeds)
    ref = pipeline_latents
    pipe.scheduler.set_timesteps(STEPS)
    assert (pipe.scheduler.timesteps >= 875).sum() == 2
    if family_cls is Wan22Family:
        torch.testing.assert_close(ours, ref, **TOL)
    else:
        assert (ours - ref).abs().max() > 1e-3


def _guided(tr, x, t_frames, pos, neg, gs):
    """The oracle's CFG call of one expert: per-token timesteps built here, not by the family."""
    tokens = (x.shape[3] // 2) * (x.shape[4] // 2)
    t = t_frames.repeat_interleave(tokens)[None]
    y_c = tr(hidden_states=x, timestep=t, encoder_hidden_states=pos, return_dict=False)[0]
    y_u = tr(hidden_states=x, timestep=t, encoder_hidden_states=neg, return_dict=False)[0]
    return y_u + gs * (y_c - y_u)


def _frame_by_frame(pipe, routing, x, t_frames, sigma_in, sigma_out, pos, neg, gs, gs2):
    """Each frame's Euler update from its own expert (t >= boundary: transformer), written one
    frame at a time: "select" calls the expert on the whole window, "split" on the frames of that
    expert only."""
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    out = torch.empty_like(x)
    for j in range(x.shape[2]):
        high = bool(t_frames[j] >= boundary)
        tr, scale = (pipe.transformer, gs) if high else (pipe.transformer_2, gs2)
        if routing == "select":
            y = _guided(tr, x, t_frames, pos, neg, scale)[:, :, j]
        else:
            same = [i for i in range(x.shape[2]) if bool(t_frames[i] >= boundary) == high]
            y = _guided(tr, x[:, :, same], t_frames[same], pos, neg, scale)[:, :, same.index(j)]
        out[:, :, j] = x[:, :, j] + (sigma_out[j] - sigma_in[j]) * y
    return out


@pytest.mark.parametrize("routing", ["split", "select", "broken_one_expert"])
def test_window_across_the_boundary_routes_each_frame_to_its_expert(pipe, embeds, routing):
    """A FIFO window (levels 3..8 of L = 8: timesteps 643..1000, three on each side of 875): the
    family's update of every frame equals the frame-by-frame oracle's; the Wan 2.1 family (one
    expert for all frames) must differ."""
    fifo = FIFODiffusion(pipe, num_partitions=2, frames_per_window=6, lookahead=True)
    lv = fifo.family.levels(8, torch.device("cpu"))
    k = torch.arange(3, 9)
    t_frames = lv.t_model[k]
    assert ((t_frames >= 875).sum(), (t_frames < 875).sum()) == (3, 3)
    x = torch.randn(1, 4, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    pos, neg = embeds
    family = WanFamily(pipe) if routing == "broken_one_expert" else Wan22Family(pipe)
    if routing != "broken_one_expert":
        family.expert_routing = routing
        family.set_guidance_scale_2(2.0)
    with torch.no_grad():
        ours = family.update(lv, x, family.model_output(x, t_frames, pos, neg, 4.0), k, k - 1)
        ref = _frame_by_frame(pipe, "select" if routing == "broken_one_expert" else routing, x, t_frames,
                              lv.sigma[k], lv.sigma[k - 1], pos, neg, 4.0, 2.0)
    if routing == "broken_one_expert":
        assert (ours - ref).abs().max() > 1e-3
    else:
        torch.testing.assert_close(ours, ref, **TOL)


def test_split_and_select_agree_off_the_boundary_and_differ_across_it(pipe, embeds):
    """On a window wholly on one side both routings make the same single call; across the
    boundary the split sub-windows' attention spans fewer frames, so outputs differ."""
    pos, neg = embeds
    x = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    outs = {}
    for routing in ("split", "select"):
        family = Wan22Family(pipe)
        family.expert_routing = routing
        with torch.no_grad():
            outs[routing] = (family.model_output(x, torch.tensor([900.0, 920.0, 950.0, 999.0]), pos, neg, 4.0),
                             family.model_output(x, torch.tensor([700.0, 800.0, 900.0, 999.0]), pos, neg, 4.0))
    torch.testing.assert_close(outs["split"][0], outs["select"][0], rtol=0, atol=0)
    assert (outs["split"][1] - outs["select"][1]).abs().max() > 1e-4


def test_fifo_runs_on_both_sides_with_guidance_scale_2(pipe):
    """End to end: FIFO on the tiny two-expert model; guidance_scale_2 changes the video."""
    fifo = FIFODiffusion(pipe, num_partitions=2, frames_per_window=4, coherent_tail=True)
    a = fifo("a cat", 5, height=32, width=32, guidance_scale=3.0, guidance_scale_2=3.0).frames[0]
    b = fifo("a cat", 5, height=32, width=32, guidance_scale=3.0, guidance_scale_2=1.5).frames[0]
    assert a.shape == (5, 32, 32, 3) and (a != b).any()


# ----------------------------------------------------------------------------------------------
# Randomized blending (StreamingT2V enhance) on the two experts
def _smooth_video(frames: int, size: int = 32):
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.stack([np.stack([0.5 + 0.4 * np.sin((xx - 1.5 * f) / 4.0), 0.5 + 0.4 * np.cos((yy + f) / 5.0),
                               0.5 + 0.3 * np.sin((xx + yy - 2 * f) / 6.0)], -1) for f in range(frames)])


BLEND = dict(prompt="a red panda", num_inference_steps=8, guidance_scale=5.0)
BLEND_STRENGTH = 0.8  # 8 steps from 0.8: timesteps 900 (high-noise expert), 833 .. 301 (low-noise)


def _v2v_switched_at_the_boundary(pipe, video, switch: bool = True):
    """The oracle: diffusers' own WanVideoToVideoPipeline on the two-expert pipeline's components,
    its `transformer` set before every step to the expert WanPipeline picks for that timestep (a
    step-end callback sets the next one); `switch=False` keeps the high-noise expert throughout."""
    import copy

    from diffusers import WanVideoToVideoPipeline

    v2v = WanVideoToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                  scheduler=copy.deepcopy(pipe.scheduler), transformer=pipe.transformer)
    v2v.set_progress_bar_config(disable=True)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(BLEND["num_inference_steps"])
    run = sched.timesteps[BLEND["num_inference_steps"] - int(BLEND["num_inference_steps"] * BLEND_STRENGTH):]
    assert (run >= boundary).sum() == 1 and (run < boundary).sum() == 5

    def expert(t):
        return pipe.transformer if (not switch or t >= boundary) else pipe.transformer_2

    def next_expert(p, i, t, kwargs):
        if i + 1 < len(run):
            p.transformer = expert(run[i + 1])
        return {}

    v2v.transformer = expert(run[0])
    return v2v(video=video[None], height=32, width=32, strength=BLEND_STRENGTH,
               generator=torch.Generator().manual_seed(3), output_type="np", callback_on_step_end=next_expert,
               **BLEND).frames[0]


def test_blending_one_chunk_equals_v2v_pipeline_with_the_expert_of_each_timestep(pipe):
    """One chunk (no blending): our SDEdit loop on the two-expert WanPipeline == diffusers'
    WanVideoToVideoPipeline with its transformer switched at the boundary (atol 1e-5 on [0, 1]
    frames); the same pipeline kept on the high-noise expert differs (so routing is tested)."""
    import numpy as np

    from longvideo.methods.blending import RandomizedBlending
    from longvideo.methods.families import ftfy_fallback

    ftfy_fallback(pipe)
    video = _smooth_video(9)
    method = RandomizedBlending(pipe, chunk_frames=64, overlap_frames=8, strength=BLEND_STRENGTH)
    assert isinstance(method.family, Wan22Family) and method.layout(9).num_chunks == 1
    ours = method(video, generator=torch.Generator().manual_seed(3), **BLEND).frames[0]
    ref = _v2v_switched_at_the_boundary(pipe, video)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    one_expert = _v2v_switched_at_the_boundary(pipe, video, switch=False)
    assert np.abs(one_expert - ref).max() > 1e-3


def test_blending_guidance_scale_2_acts_below_the_boundary_only_on_two_experts(pipe):
    """guidance_scale_2 changes the two-expert result (5 of the 6 steps are low-noise) and equals
    guidance_scale when left out; on a one-expert Wan pipeline it is refused, naming the argument."""
    import numpy as np

    from longvideo.methods.blending import RandomizedBlending

    video = _smooth_video(9)
    method = RandomizedBlending(pipe, chunk_frames=5, overlap_frames=4, strength=BLEND_STRENGTH)
    assert method.layout(9).num_chunks == 2
    kw = dict(BLEND, num_inference_steps=8, seed=1)
    base = method(video, **kw).frames[0]
    same = method(video, guidance_scale_2=5.0, **kw).frames[0]
    other = method(video, guidance_scale_2=1.5, **kw).frames[0]
    np.testing.assert_array_equal(base, same)
    assert np.abs(other - base).max() > 1e-3
    with pytest.raises(ValueError, match="guidance_scale_2 applies to two-expert"):
        RandomizedBlending(wan.tiny_pipeline(kind="v2v"), chunk_frames=9, overlap_frames=4)(
            video, guidance_scale_2=1.5, **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny two-expert pipeline saved as a local diffusers checkpoint folder."""
    folder = tmp_path_factory.mktemp("ckpt") / "Wan2.2-T2V-A14B-tiny"
    wan22.tiny_pipeline().save_pretrained(folder)
    return folder


def test_cli_enhance_on_a_wan22_checkpoint(checkpoint, tmp_path, capsys):
    """`longvideo enhance --model DIR` on a two-expert checkpoint: detected as wan22, both experts
    loaded, --guidance-scale-2 recorded; on the one-expert tiny Wan it is one line, exit 2."""
    import json

    from longvideo.cli import main
    from longvideo.video import write_video

    src = tmp_path / "in.mp4"
    write_video(src, (_smooth_video(9) * 255).round().astype("uint8"), fps=8)
    out = tmp_path / "out.mp4"
    argv = ["enhance", str(src), "--model", str(checkpoint), "--dtype", "float32", "--steps", "4",
            "--blend-chunk-frames", "5", "--blend-overlap-frames", "4", "--guidance-scale-2", "1.5",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".seams.json").read_text())
    assert report["family"] == "wan22" and report["guidance_scale_2"] == 1.5 and out.exists()
    assert main(["enhance", str(src), "--steps", "2", "--guidance-scale-2", "1.5", "--device", "cpu",
                 "--out", str(tmp_path / "o2.mp4")]) == 2
    assert "guidance_scale_2 applies to two-expert" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# FreeLOC on both experts
def _freeloc_run(pipe, frames=17, steps=4):
    """WanPipeline's own two-expert sampling (4 steps: 2 on each expert), latents."""
    with torch.no_grad():
        return pipe(prompt="a cat", num_frames=frames, height=32, width=32, num_inference_steps=steps,
                    guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent").frames.float()


def _self_attn_processors(tr):
    return [b.attn1.processor for b in tr.blocks]


def test_freeloc_installs_each_experts_own_layer_config_and_removes_both(pipe):
    from longvideo.methods.freeloc import FreeLOC, FreeLOCConfig, apply_freeloc
    from longvideo.processors.wan import WanTieredAttnProcessor

    before = [_self_attn_processors(pipe.transformer), _self_attn_processors(pipe.transformer_2)]
    first, second = ["tsa", "vrpr", "dense", "tsa"], ["dense", "tsa", "vrpr", "vrpr"]
    with apply_freeloc(pipe, FreeLOCConfig(layer_config=first, layer_config_2=second)) as method:
        assert method.layer_modes == first and method.layer_modes_2 == second
        for tr, modes, old in zip((pipe.transformer, pipe.transformer_2), (first, second), before):
            for proc, mode, orig in zip(_self_attn_processors(tr), modes, old):
                if mode == "dense":
                    assert proc is orig
                else:
                    assert isinstance(proc, WanTieredAttnProcessor) and proc.mode == mode
        assert "transformer_2: dense x1, vrpr x2, tsa x1" in method.describe(17)
    assert [_self_attn_processors(pipe.transformer), _self_attn_processors(pipe.transformer_2)] == before
    with FreeLOC(pipe, layer_config=first) as method:  # no layer_config_2: the first expert's modes
        assert method.layer_modes_2 == first
        assert [getattr(p, "mode", "dense") for p in _self_attn_processors(pipe.transformer_2)] == first
    with pytest.raises(ValueError, match="layer_config_2"):
        FreeLOCConfig(layer_config_2=["tsa", "fast", "vrpr", "vrpr"])
    with pytest.raises(ValueError, match="layer_config_2: WanPipeline has no transformer_2"):
        FreeLOC(wan.tiny_pipeline(), layer_config_2=second)


class _Recorder:
    """Forward hook keeping every call's inputs and output of a transformer."""

    def __init__(self, tr):
        self.calls = []
        self.handle = tr.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, out):
        self.calls.append(({k: v for k, v in kwargs.items() if torch.is_tensor(v)}, out[0].detach().clone()))


def test_freeloc_per_expert_config_acts_only_on_that_expert(pipe):
    """FreeLOC with TSA/VRPR layers on the high-noise expert and every layer of the low-noise expert
    dense: each call of transformer_2 returns exactly what the plain transformer_2 returns on the
    same inputs, while transformer's calls differ from the plain transformer's (17 video frames =
    5 latent frames > 3 trained, so FreeLOC acts). Swapping the two configurations swaps which
    expert changes."""
    from longvideo.methods.freeloc import FreeLOC

    active = ["tsa", "vrpr", "tsa", "vrpr"]
    for config, config_2, changed in ((active, ["dense"] * 4, 0), (["dense"] * 4, active, 1)):
        recorders = [_Recorder(pipe.transformer), _Recorder(pipe.transformer_2)]
        try:
            with FreeLOC(pipe, layer_config=config, layer_config_2=config_2):
                _freeloc_run(pipe)
        finally:
            for r in recorders:
                r.handle.remove()
        assert all(len(r.calls) == 2 for r in recorders)  # 4 steps, no CFG: two calls per expert
        for e, (tr, rec) in enumerate(zip((pipe.transformer, pipe.transformer_2), recorders)):
            with torch.no_grad():
                diffs = [(tr(**inputs, return_dict=False)[0] - out).abs().max() for inputs, out in rec.calls]
            if e == changed:
                assert min(diffs) > 1e-4, diffs
            else:
                assert max(diffs) == 0, diffs


def test_freeloc_off_equals_wan_pipeline_with_both_experts(pipe):
    """Method off == diffusers' WanPipeline (transformer, transformer_2, boundary_ratio 0.875):
    at the trained length the original processors run (bit-equal); active processors configured
    to do nothing on both experts (dense tiers, W1 beyond every distance) agree within the
    reference op's tolerance; an active configuration changes the result."""
    import longvideo
    from longvideo.methods.freeloc import FreeLOC

    ref = _freeloc_run(pipe)
    modes = ["tsa", "vrpr", "tsa", "vrpr"]
    with FreeLOC(pipe, layer_config=modes, layer_config_2=modes[::-1], trained_frames=5):
        assert torch.equal(_freeloc_run(pipe), ref)
    with FreeLOC(pipe, layer_config=modes, layer_config_2=modes[::-1], trained_frames=1, w1=64, w2=64,
                 local_frames=64):
        out = _freeloc_run(pipe)
    atol, rtol = longvideo.ops.get_backend("tiered_sparse_attention", "reference").tolerance(torch.float32)
    torch.testing.assert_close(out, ref, atol=atol * 100, rtol=rtol * 100)
    with FreeLOC(pipe, layer_config=modes, layer_config_2=modes[::-1]):
        assert (_freeloc_run(pipe) - ref).abs().max() > 1e-3


def test_probe_measures_each_expert_on_its_own_calls(pipe):
    """probe_layers(expert=...) measures the chosen expert on the calls WanPipeline makes to it:
    2 steps of 4 on each side of the boundary; the two experts' sensitivities differ (different
    weights); a one-expert pipeline refuses transformer_2."""
    from longvideo.methods.probe import probe_layers

    kw = dict(num_frames=17, height=32, width=32, num_inference_steps=4, guidance_scale=1.0, shifts=(20, -20),
              window=2)
    high, low = probe_layers(pipe, **kw), probe_layers(pipe, expert="transformer_2", **kw)
    assert high.calls == low.calls == 2 and low.settings["expert"] == "transformer_2"
    assert max(abs(a - b) for a, b in zip(high.context, low.context)) > 1e-4
    with pytest.raises(ValueError, match="expert: WanPipeline has no transformer_2"):
        probe_layers(wan.tiny_pipeline(), expert="transformer_2", **kw)
    with pytest.raises(RuntimeError, match="transformer_2 was never called in 1 steps"):
        probe_layers(pipe, expert="transformer_2", **dict(kw, num_inference_steps=1))


def test_cli_probe_each_expert_then_freeloc_with_both_configs(checkpoint, tmp_path, capsys):
    """`longvideo probe --probe-expert transformer_2` then `generate --method freeloc
    --freeloc-layers A --freeloc-layers-2 B` on a saved two-expert checkpoint."""
    import json

    from longvideo.cli import main

    common = ["--model", str(checkpoint), "--dtype", "float32", "--num-frames", "17", "--height", "32",
              "--width", "32", "--steps", "4", "--device", "cpu"]
    paths = {}
    for expert in ("transformer", "transformer_2"):
        paths[expert] = tmp_path / f"{expert}.json"
        assert main(["probe", *common, "--probe-expert", expert, "--probe-trained-frames", "3",
                     "--out", str(paths[expert])]) == 0, capsys.readouterr().err
        assert json.loads(paths[expert].read_text())["probe"]["settings"]["expert"] == expert
    assert "--freeloc-layers-2" in capsys.readouterr().out
    out = tmp_path / "freeloc.mp4"
    assert main(["generate", "--method", "freeloc", *common, "--freeloc-trained-frames", "3",
                 "--freeloc-layers", str(paths["transformer"]), "--freeloc-layers-2", str(paths["transformer_2"]),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert "transformer_2:" in capsys.readouterr().out and out.exists()


# ----------------------------------------------------------------------------------------------
# Ouroboros (SACFA, self-recurrent guidance) on the two experts
PROMPT = "a red cat runs in a garden"


def _state_after(method, iterations):
    """The queue state after `iterations` iterations (no warm-up skipped: frames from the start)."""
    g = method.generate(PROMPT, 10 ** 6, guidance_scale=3.0, guidance_scale_2=2.0, seed=11)
    try:
        while True:
            next(g)
            state = g.gi_frame.f_locals["state"]
            if state.iteration >= iterations:
                return state
    finally:
        g.close()


def test_subject_bank_keeps_one_part_per_expert():
    """experts=2: each expert's part is a one-expert bank of its own (pack, unpack, validity, the
    moving average), the other part untouched; experts=1 is the one-expert layout itself."""
    from longvideo.methods.fifo_ouroboros import SubjectBank

    one, two = SubjectBank(["l"], [(2, 3)]), SubjectBank(["l"], [(2, 3)], experts=2)
    a, b, c = (torch.randn(2, 3, generator=torch.Generator().manual_seed(k)) for k in range(3))
    assert (one.numel, two.numel) == (7, 14)
    flat = two.ema(None, two.pack({"l": a}, 1), 0.9)           # expert 1 first: expert 0 still empty
    assert not two.valid_for(flat, 0) and two.valid_for(flat, 1)
    torch.testing.assert_close(two.part(flat, 1), one.pack({"l": a}), rtol=0, atol=0)
    flat = two.ema(flat, two.pack({"l": b}, 0), 0.9)            # expert 0's first features: taken as they are
    torch.testing.assert_close(two.unpack(flat, 0)["l"], b, rtol=0, atol=0)
    flat = two.ema(flat, two.pack({"l": c}, 1), 0.9)            # expert 1 averaged, expert 0 kept
    expected = one.ema(one.pack({"l": a}), one.pack({"l": c}), 0.9)
    torch.testing.assert_close(two.part(flat, 1), expected, rtol=0, atol=0)
    torch.testing.assert_close(two.unpack(flat, 0)["l"], b, rtol=0, atol=0)
    assert two.ema(flat, torch.zeros(14), 0.9) is flat        # nothing new: the bank as it was


QUEUE = dict(num_partitions=2, frames_per_window=4, skip_warmup=False)  # L = 8, 4 windows of 4


@pytest.mark.parametrize("routing", ["split", "select"])
def test_ouroboros_guidance_off_equals_fifo_and_on_moves_the_low_noise_frames(pipe, routing):
    """Both experts' processors installed, SACFA on, self-recurrent guidance on every window with
    scale 0: the queue after 3 iterations equals FIFO's (the same routing) within 1e-5 (the
    processors' attention vs diffusers'); the subject maps cover the high-noise expert's slots
    too; the bank holds the low-noise expert's features only (the bank's frame is nearly clean).
    Scale 1 moves the queue (split)."""
    from longvideo.methods.fifo import OuroborosDiffusion

    def make(cls, **kw):
        method = cls(pipe, **QUEUE, **kw)
        method.family.expert_routing = routing
        return method

    plain = _state_after(make(FIFODiffusion), 3)
    options = dict(tail_sampling=False, guided_windows=(0, 1, 2, 3))
    off = make(OuroborosDiffusion, guidance_scale=0.0, **options)
    state = _state_after(off, 3)
    torch.testing.assert_close(state.queue, plain.queue, rtol=1e-4, atol=1e-5)
    high = (off.levels("cpu").t_model[1:] >= 875).nonzero().squeeze(1)  # slots of the high-noise expert
    assert high.numel() == 3 and (state.maps[off.context_len + high[:-1]].flatten(1).amax(1) > 0).all()
    assert not off._bank.valid_for(state.bank, 0) and off._bank.valid_for(state.bank, 1)
    if routing == "split":
        on = _state_after(make(OuroborosDiffusion, guidance_scale=1.0, **options), 3)
        assert (on.queue - plain.queue).abs().max() > 1e-4


def _oracle_expert_window(pipe, expert, x, t_frames, masks, written, bank, layers, subject_ids, pos, neg, scale):
    """One expert's Ouroboros call on its own frames, written here from the one-model pieces: the
    processors on that expert alone with a fresh context; output = its CFG call (cond, uncond);
    maps as recorded; gradient of the bank loss over the `written` rows through the WHOLE
    conditional call (no early stop)."""
    from longvideo.methods.fifo_ouroboros import frame_features
    from longvideo.processors.ouroboros import OuroborosContext, apply_ouroboros_processors

    tr = (pipe.transformer, pipe.transformer_2)[expert]
    ctx = OuroborosContext(tuple(x.shape[-2:]))
    with apply_ouroboros_processors(tr, ctx):
        ctx.begin(frames=x.shape[2], masks=masks, sacfa=True, use_op=True, record_maps=True)
        ctx.subject_ids = subject_ids
        with torch.no_grad():
            out = _guided(tr, x, t_frames, pos, neg, scale)
        maps = ctx.maps()
        ctx.begin(frames=x.shape[2], masks=masks, sacfa=True, use_op=True, record_maps=False, feature_layers=layers)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            tokens = (x.shape[3] // 2) * (x.shape[4] // 2)
            tr(hidden_states=xg, timestep=t_frames.repeat_interleave(tokens)[None], encoder_hidden_states=pos,
               return_dict=False)
            loss = 0
            for name in layers:
                keys, tm = ctx.features[name][written], ctx.layer_masks(ctx.features[name].shape[2])[written]
                ok = tm.any(1)
                loss = loss + ((frame_features(keys, tm)[ok] - bank[name]) ** 2).mean()
            grad = torch.autograd.grad(loss, xg)[0]
        ctx.end()
    return out, maps, grad


@pytest.fixture(scope="module")
def window_across_the_boundary(pipe):
    """Ouroboros' window 2 (levels 3..6) after 2 iterations, guided, both experts' banks set to
    random features: what the method computes (run once for the tests below)."""
    from longvideo.methods.fifo import OuroborosDiffusion
    from longvideo.methods.fifo_ouroboros import subject_token_positions, subject_words_from_prompt

    o = OuroborosDiffusion(pipe, **QUEUE, tail_sampling=False, guided_windows=(2,), guidance_scale=1.0)
    state = _state_after(o, 2)
    assert state.maps is not None
    restore = o._install(tuple(state.queue.shape[-2:]))
    try:
        o.family.set_guidance_scale_2(2.0)
        gen = torch.Generator().manual_seed(5)
        banks = [{n: torch.randn(h, d, generator=gen) for n, (h, d) in zip(o._bank.layers, o._bank.shapes)}
                 for _ in range(2)]
        state.bank = o._bank.pack(banks[0], 0) + o._bank.pack(banks[1], 1)
        lv = o.levels("cpu")
        i, f, w, c = 2, o.f, o.stride, o.context_len
        s = i * w
        full = torch.cat([state.context, state.queue], dim=2)
        k_full = torch.cat([torch.full((c,), o.context_level, dtype=torch.long), torch.arange(1, o.L + 1)])
        xw, kw = full[:, :, s: s + f], k_full[s: s + f]
        pos, neg = (e.float() for e in pipe.encode_prompt(PROMPT, "", True, 1, device="cpu")[:2])
        ids = subject_token_positions(pipe.tokenizer, PROMPT, subject_words_from_prompt(PROMPT))
        with torch.no_grad():
            out, grad, maps, _ = o._ouroboros_window(i, s, xw, kw, lv, pos, neg, 3.0, state, ids)
    finally:
        restore()
    return dict(xw=xw, t=lv.t_model[kw], a=f - w, masks=state.maps[s: s + f] > o.ouro.mask_threshold, banks=banks,
                layers=o._feature_layers, ids=ids, pos=pos, neg=neg, out=out, grad=grad, maps=maps)


@pytest.mark.parametrize("oracle_experts", ["right", "swapped"])
def test_ouroboros_window_across_the_boundary_each_expert_as_its_own_window(pipe, window_across_the_boundary,
                                                                           oracle_experts):
    """Window 2 (levels 3..6: three frames below the boundary, one above; it writes levels 5 and
    6, one per expert), guided, both experts' banks set: every frame's output, subject map and
    guidance gradient equal the one-expert oracle run on the frames of that frame's expert with
    that expert (rtol 1e-4, atol 1e-5); the oracle with the experts swapped must differ."""
    r = window_across_the_boundary
    expert_of = (r["t"] < 875).long()
    assert expert_of.tolist() == [1, 1, 1, 0] and r["a"] == 2 and r["masks"].any()
    for e in (0, 1):
        frames = (expert_of == e).nonzero().squeeze(1)
        written = (frames >= r["a"]).nonzero().squeeze(1)
        model = e if oracle_experts == "right" else 1 - e
        ref_out, ref_maps, ref_grad = _oracle_expert_window(
            pipe, model, r["xw"][:, :, frames], r["t"][frames], r["masks"][frames], written, r["banks"][e],
            r["layers"], r["ids"], r["pos"], r["neg"], 3.0 if e == 0 else 2.0)
        got = (r["out"][:, :, frames], r["maps"][frames], r["grad"][:, :, frames])
        assert got[2][:, :, written].abs().max() > 0  # guidance acts on the frames each expert writes
        if oracle_experts == "right":
            for g, ref in zip(got, (ref_out, ref_maps, ref_grad)):
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)
        else:
            assert (got[0] - ref_out).abs().max() > 1e-3


def test_cli_ouroboros_on_a_wan22_checkpoint(checkpoint, tmp_path, capsys):
    """`longvideo generate --method ouroboros` on a saved two-expert checkpoint: every part on
    (tail, SACFA, self-recurrent guidance on windows 1 and 2), --guidance-scale-2, writes the video."""
    from longvideo.cli import main
    from longvideo.video import read_video

    out = tmp_path / "ouroboros.mp4"
    argv = ["generate", "--method", "ouroboros", "--model", str(checkpoint), "--dtype", "float32",
            "--prompt", PROMPT, "--num-frames", "5", "--height", "32", "--width", "32", "--fifo-partitions", "2",
            "--fifo-window", "4", "--fifo-emit-warmup", "--fifo-init-steps", "2", "--guidance-scale-2", "1.5",
            "--ouroboros-guided-windows", "1,2", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert read_video(out).shape == (5, 32, 32, 3)


def test_ouroboros_resume_on_two_experts_equals_uninterrupted(tmp_path):
    """Every Ouroboros part on both experts: the two-part bank and the maps travel in the
    checkpoint, and a resumed run yields the uninterrupted run's frames exactly."""
    import numpy as np

    from longvideo.methods.fifo import OuroborosDiffusion

    pipe = wan22.tiny_pipeline()
    o = OuroborosDiffusion(pipe, **QUEUE, guided_windows=(1, 2), guidance_scale=2.0)
    kw = dict(guidance_scale=3.0, guidance_scale_2=2.0, seed=3)
    full = o(PROMPT, 13, **kw).frames[0]
    first = list(o.generate(PROMPT, 13, checkpoint_dir=tmp_path, checkpoint_every=2, stop_after_iterations=3, **kw))
    saved = torch.load(tmp_path / "fifo_state.pt", weights_only=True)
    assert saved["bank"].numel() == o._bank.numel == 2 * o._bank.part_numel and saved["maps"] is not None
    rest = list(o.generate(PROMPT, 13, checkpoint_dir=tmp_path, resume=True, **kw))
    np.testing.assert_array_equal(np.stack(first[: saved["frames_out"]] + rest) / np.float32(255), full)
