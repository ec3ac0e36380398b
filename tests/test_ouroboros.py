"""Ouroboros-Diffusion on the tiny AnimateDiff and Wan pipelines: every part off equals FIFO, the
coherent tail, SACFA against explicit concatenation, subject maps against an explicit softmax,
self-recurrent guidance, resume, kernels vs reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longvideo.methods.fifo import FIFODiffusion, OuroborosDiffusion
from longvideo.methods.fifo_ouroboros import subject_token_positions, subject_words_from_prompt
from longvideo.models import animatediff, wan

PROMPT = "a red cat runs in a garden"


@pytest.fixture(scope="module")
def ad_pipe():
    return animatediff.tiny_pipeline()


@pytest.fixture(scope="module")
def wan_pipe():
    return wan.tiny_pipeline()


def _run(pipe, iterations, method, prompt=PROMPT, **gen_kwargs):
    """Queue state after `iterations` iterations."""
    g = method.generate(prompt, 10 ** 6, guidance_scale=3.0, seed=11, **gen_kwargs)
    frames = [next(g) for _ in range(iterations * method.family.temporal_compression - 3 * (method.family.name == "wan"))]
    st = g.gi_frame.f_locals["state"]
    g.close()
    return st, frames


@pytest.mark.parametrize("family", ["animatediff", "wan"])
def test_every_part_off_equals_fifo(family, ad_pipe, wan_pipe):
    pipe = ad_pipe if family == "animatediff" else wan_pipe
    fifo = FIFODiffusion(pipe, num_partitions=1, frames_per_window=4)
    off = OuroborosDiffusion(pipe, num_partitions=1, frames_per_window=4, tail_sampling=False, sacfa=False,
                             self_recurrent_guidance=False)
    a, b = fifo("a cat", 5, guidance_scale=3.0, seed=1).frames[0], off("a cat", 5, guidance_scale=3.0, seed=1).frames[0]
    np.testing.assert_array_equal(a, b)
    on = OuroborosDiffusion(pipe, num_partitions=1, frames_per_window=4)
    st_on, _ = _run(pipe, 5, on)
    st_off, _ = _run(pipe, 5, off)
    assert (st_on.queue - st_off.queue).abs().max() > 1e-4  # and the parts do change the queue


def test_subject_words_and_tokens(ad_pipe):
    assert subject_words_from_prompt("A red cat runs in a garden") == ["red", "cat", "runs"]
    assert subject_words_from_prompt("the dog walking on the beach") == ["dog"]
    pos = subject_token_positions(ad_pipe.tokenizer, PROMPT, ["cat"])
    ids = ad_pipe.tokenizer(PROMPT)["input_ids"]
    assert ad_pipe.tokenizer.decode([ids[p] for p in pos]).replace(" ", "") == "cat"
    with pytest.raises(ValueError, match="subject words"):
        subject_token_positions(ad_pipe.tokenizer, PROMPT, ["dog"])


def test_ddim_tail_is_lowfreq_mix_of_renoised_second_to_last(ad_pipe):
    """Tail = lowfreq_mix(sqrt(abar_L/abar_{L-1}) z + sqrt(1 - abar_L/abar_{L-1}) eps, eta) with
    eta drawn first (FIFO's own tail draw), then eps."""
    from longvideo.reference.lowfreq_mix import lowfreq_mix_reference

    o = OuroborosDiffusion(ad_pipe, num_partitions=1, frames_per_window=4, sacfa=False,
                           self_recurrent_guidance=False, tail_d_t=0.5)
    lv = o.levels("cpu")
    new = torch.randn(1, 4, o.L, 8, 8, generator=torch.Generator().manual_seed(0))
    tail = o._new_tail(lv, new, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    eta = torch.randn(1, 4, 1, 8, 8, generator=g)
    eps = torch.randn(1, 4, 1, 8, 8, generator=g)
    r = lv.abar[o.L] / lv.abar[o.L - 1]
    z = r.sqrt() * new[:, :, -1:] + (1 - r).sqrt() * eps
    torch.testing.assert_close(tail, lowfreq_mix_reference(z, eta, "gaussian", 0.25, 0.5, 4), atol=1e-5, rtol=1e-5)


def _attn1(pipe):
    name = next(n for n in pipe.unet.attn_processors if "motion" not in n and n.endswith("attn1.processor"))
    return name, pipe.unet.get_submodule(name[: -len(".processor")])


def test_sacfa_processor_equals_explicit_concatenation(ad_pipe):
    """Frame b of a window attends to its own tokens plus the subject tokens of the other frames of
    its CFG half: SDPA over the explicitly concatenated keys; with no mask it is diffusers' own."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from longvideo.processors.ouroboros import OuroborosContext, OuroborosSelfAttnProcessor

    name, attn = _attn1(ad_pipe)
    Fr, h, w = 3, 4, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * Fr, h * w, attn.to_q.in_features, generator=gen)
    masks = torch.rand(Fr, h, w, generator=gen) > 0.6
    ctx = OuroborosContext((h, w))
    proc = OuroborosSelfAttnProcessor(ctx, name)
    with torch.no_grad():
        ctx.begin(frames=Fr, masks=None, sacfa=True, use_op=False, record_maps=False)
        torch.testing.assert_close(proc(attn, x), AttnProcessor2_0()(attn, x), atol=1e-6, rtol=1e-6)
        ctx.begin(frames=Fr, masks=masks, sacfa=True, use_op=False, record_maps=False)
        got = proc(attn, x)
        H = attn.heads
        q, k, v = (m(x).view(2 * Fr, h * w, H, -1).transpose(1, 2) for m in (attn.to_q, attn.to_k, attn.to_v))
        flat = masks.view(Fr, -1)
        rows = []
        for b in range(2 * Fr):
            half, fb = divmod(b, Fr)
            ks, vs = [k[b]], [v[b]]
            for o in range(Fr):
                if o != fb:
                    ks.append(k[half * Fr + o][:, flat[o]])
                    vs.append(v[half * Fr + o][:, flat[o]])
            rows.append(F.scaled_dot_product_attention(q[b], torch.cat(ks, 1), torch.cat(vs, 1)))
        ref = attn.to_out[0](torch.stack(rows).transpose(1, 2).reshape(2 * Fr, h * w, -1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _sacfa_oracle(attn, x, masks, Fr, own_twice):
    """SACFA by explicit concatenation, per frame b of a CFG half: keys/values = [frame b's tokens]
    ++ the subject tokens of the other frames (the paper, Eq. 4) or of every frame, b's own included
    (the authors' demo_sacfa.py: all_k[mask] concatenated to every frame's k); SDPA; to_out."""
    H = attn.heads
    B, N = x.shape[0], x.shape[1]
    q, k, v = (m(x).view(B, N, H, -1).transpose(1, 2) for m in (attn.to_q, attn.to_k, attn.to_v))
    flat = masks.view(Fr, -1)
    rows = []
    for b in range(B):
        half, fb = divmod(b, Fr)
        ks, vs = [k[b]], [v[b]]
        for o in range(Fr):
            if o != fb or own_twice:
                ks.append(k[half * Fr + o][:, flat[o]])
                vs.append(v[half * Fr + o][:, flat[o]])
        rows.append(F.scaled_dot_product_attention(q[b], torch.cat(ks, 1), torch.cat(vs, 1)))
    return attn.to_out[0](torch.stack(rows).transpose(1, 2).reshape(B, N, -1))


def test_sacfa_official_demo_tokens_equal_explicit_concatenation(ad_pipe):
    """sacfa_tokens="official_demo": every frame attends to its own tokens plus the subject tokens of
    ALL frames of its CFG half (its own a second time), forward and gradient (self-recurrent
    guidance's path); the paper's variant (default) differs from it."""
    from longvideo.processors.ouroboros import OuroborosContext, OuroborosSelfAttnProcessor

    name, attn = _attn1(ad_pipe)
    Fr, h, w = 5, 2, 6  # 5 frames of 2 x 6 tokens
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(2 * Fr, h * w, attn.to_q.in_features, generator=gen)
    masks = torch.rand(Fr, h, w, generator=gen) > 0.55
    masks[2] = False  # a frame without subject tokens still shares nothing and sees the others'
    ctx = OuroborosContext((h, w))
    proc = OuroborosSelfAttnProcessor(ctx, name)
    got = {}
    for tokens in ("paper", "official_demo"):
        x = x0.clone().requires_grad_(True)
        ctx.begin(frames=Fr, masks=masks, sacfa=True, use_op=True, record_maps=False, sacfa_tokens=tokens)
        out = proc(attn, x)
        ctx.end()
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        got[tokens] = (out.detach(), grad)
    for tokens, own_twice in (("paper", False), ("official_demo", True)):
        x = x0.clone().requires_grad_(True)
        ref = _sacfa_oracle(attn, x, masks, Fr, own_twice)
        (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
        torch.testing.assert_close(got[tokens][0], ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[tokens][1], ref_grad, atol=1e-4, rtol=1e-4)
    a, b = got["official_demo"][0], got["paper"][0]
    assert ((a - b).norm() / b.norm()).item() > 1e-3
    with pytest.raises(ValueError, match="sacfa_tokens"):
        OuroborosDiffusion(ad_pipe, sacfa_tokens="both")


def test_sacfa_tokens_option_reaches_the_processors(ad_pipe):
    """End to end: the paper's concatenation is the default; the demo's changes the queue once
    subject masks exist (the second iteration)."""
    base = dict(num_partitions=1, frames_per_window=4, tail_sampling=False, self_recurrent_guidance=False)
    paper, _ = _run(ad_pipe, 2, OuroborosDiffusion(ad_pipe, **base))
    demo, _ = _run(ad_pipe, 2, OuroborosDiffusion(ad_pipe, sacfa_tokens="official_demo", **base))
    assert OuroborosDiffusion(ad_pipe, **base).ouro.sacfa_tokens == "paper"
    assert (demo.queue - paper.queue).abs().max() > 1e-5


def test_subject_map_is_cross_attention_mass_on_subject_tokens(ad_pipe):
    from longvideo.processors.ouroboros import OuroborosContext, OuroborosCrossAttnProcessor

    name = next(n for n in ad_pipe.unet.attn_processors if "motion" not in n and n.endswith("attn2.processor"))
    attn = ad_pipe.unet.get_submodule(name[: -len(".processor")])
    Fr, h, w = 2, 4, 4
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * Fr, h * w, attn.to_q.in_features, generator=gen)
    text = torch.randn(2 * Fr, 77, 32, generator=gen)
    ctx = OuroborosContext((h, w))
    ctx.begin(frames=Fr, masks=None, sacfa=True, use_op=False, record_maps=True)
    ctx.subject_ids = [5, 6]
    with torch.no_grad():
        proc = OuroborosCrossAttnProcessor(ctx, name)
        proc(attn, x, text)
        H = attn.heads
        q = attn.to_q(x[Fr:]).view(Fr, h * w, H, -1).transpose(1, 2)
        k = attn.to_k(text[Fr:]).view(Fr, 77, H, -1).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)[..., [5, 6]].mean((1, 3))
        p = p.view(Fr, h, w)
        lo, hi = p.flatten(1).min(1)[0].view(-1, 1, 1), p.flatten(1).max(1)[0].view(-1, 1, 1)
    torch.testing.assert_close(ctx.maps(), (p - lo) / (hi - lo), atol=1e-5, rtol=1e-5)


def test_self_recurrent_guidance_moves_only_guided_windows(ad_pipe):
    """Guidance changes only the slots of the guided window, linearly in its scale; the bank is a
    moving average that becomes valid once masks exist."""
    base = dict(num_partitions=2, frames_per_window=4, tail_sampling=False, sacfa=False, guided_windows=(2,))
    outs = {}
    st, _ = _run(ad_pipe, 3, OuroborosDiffusion(ad_pipe, guidance_scale=1.0, **base))
    assert st.bank is not None and float(st.bank[-1]) == 1.0
    for s in (0.0, 1.0, 2.0):
        o = OuroborosDiffusion(ad_pipe, guidance_scale=s, **base)
        # one more iteration's denoising, from the same state
        lv = o.levels("cpu")
        restore = o._install((16, 16))
        sched = _schedule(o, ad_pipe)
        try:
            with torch.no_grad():
                outs[s] = o.step(st, lv, sched, _neg(ad_pipe), 3.0).queue
        finally:
            restore()
    d1, d2 = outs[1.0] - outs[0.0], outs[2.0] - outs[0.0]
    w = 2  # stride: window 2 writes slots [4, 6)
    assert d1[:, :, 2 * w: 3 * w].abs().max() > 0
    d1_rest = torch.cat([d1[:, :, : 2 * w], d1[:, :, 3 * w:]], dim=2)
    assert d1_rest.abs().max() == 0
    torch.testing.assert_close(d2, 2 * d1, atol=1e-5, rtol=1e-3)


def _schedule(o, pipe):
    from longvideo.methods.fifo import PromptSchedule

    sched = PromptSchedule([PROMPT], [0])
    pe, _ = o.family.encode_prompt(PROMPT, "", True, "cpu")
    sched.embeds = [pe]
    sched.subject_ids = [subject_token_positions(pipe.tokenizer, PROMPT, subject_words_from_prompt(PROMPT))]
    return sched


def _neg(pipe):
    return pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")[1]


@pytest.mark.parametrize("family", ["animatediff", "wan"])
def test_resume_equals_uninterrupted(family, ad_pipe, wan_pipe, tmp_path):
    """Every part on: masks and the bank travel in the checkpoint."""
    pipe = ad_pipe if family == "animatediff" else wan_pipe
    o = OuroborosDiffusion(pipe, num_partitions=1, frames_per_window=4, guided_windows=(0, 1), guidance_scale=2.0)
    n = 7 if family == "animatediff" else 13
    full = o(PROMPT, n, guidance_scale=3.0, seed=3).frames[0]  # "np": the uint8 frames / 255
    first = list(o.generate(PROMPT, n, guidance_scale=3.0, seed=3, checkpoint_dir=tmp_path, checkpoint_every=2,
                            stop_after_iterations=3))
    saved = torch.load(tmp_path / "fifo_state.pt", weights_only=True)
    assert saved["maps"] is not None and saved["bank"] is not None
    rest = list(o.generate(PROMPT, n, guidance_scale=3.0, seed=3, checkpoint_dir=tmp_path, resume=True))
    np.testing.assert_array_equal(np.stack(first[: saved["frames_out"]] + rest) / np.float32(255), full)


def test_triton_kernels_agree_with_reference(ad_pipe):
    """The ops Ouroboros calls, through its own code paths, with the Triton kernels (interpreter on
    CPU) vs the reference: a SACFA self-attention layer forward and its gradient (self-recurrent
    guidance's backward), and the coherent tail's lowfreq_mix."""
    import longvideo.ops as ops
    from longvideo.ops import _registry as R
    from longvideo.processors.ouroboros import OuroborosContext, OuroborosSelfAttnProcessor

    if not R.triton_available()[0]:
        pytest.skip("triton unavailable")
    name, attn = _attn1(ad_pipe)
    Fr, h, w = 2, 4, 4
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(2 * Fr, h * w, attn.to_q.in_features, generator=gen)
    masks = torch.rand(Fr, h, w, generator=gen) > 0.5
    ctx = OuroborosContext((h, w))
    proc = OuroborosSelfAttnProcessor(ctx, name)
    results = {}
    for backend in ("reference", "triton"):
        with ops.use_backend(backend, "consistent_attention"):
            x = x0.clone().requires_grad_(True)
            ctx.begin(frames=Fr, masks=masks, sacfa=True, use_op=True, record_maps=False)
            out = proc(attn, x)
            (grad,) = torch.autograd.grad(out.square().sum(), x)
            ctx.end()
            results[backend] = (out.detach(), grad)
    atol, rtol = R.get_backend("consistent_attention", "triton").tolerance(torch.float32)
    for a, b in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)

    o = OuroborosDiffusion(ad_pipe, num_partitions=1, frames_per_window=4, sacfa=False, self_recurrent_guidance=False)
    lv = o.levels("cpu")
    new = torch.randn(1, 4, o.L, 8, 8, generator=gen)
    tails = {}
    for backend in ("reference", "triton"):
        with ops.use_backend(backend, "lowfreq_mix"):
            tails[backend] = o._new_tail(lv, new, torch.Generator().manual_seed(9))
    atol, rtol = R.get_backend("lowfreq_mix", "triton").tolerance(torch.float32)
    torch.testing.assert_close(tails["triton"], tails["reference"], atol=atol, rtol=rtol)


def test_guided_windows_must_exist(ad_pipe):
    """A guided window index the queue does not have would switch guidance off silently: refused."""
    one = OuroborosDiffusion(ad_pipe, num_partitions=1, frames_per_window=4, lookahead=False)
    assert one.num_windows == 1 and one.guided_windows == (0,)  # the default adapts: window 0
    two = OuroborosDiffusion(ad_pipe, num_partitions=2, frames_per_window=4, lookahead=False)
    assert two.guided_windows == (1,)
    for bad in ((2,), (-1,), ()):
        with pytest.raises(ValueError, match="guided_windows"):
            OuroborosDiffusion(ad_pipe, num_partitions=2, frames_per_window=4, lookahead=False, guided_windows=bad)
    # without guidance the option is not used, so it is not checked
    OuroborosDiffusion(ad_pipe, num_partitions=1, frames_per_window=4, self_recurrent_guidance=False,
                       guided_windows=(5,))


@pytest.mark.parametrize("family", ["animatediff", "wan"])
def test_guidance_gradient_equals_the_whole_batched_call_in_less_memory(family, ad_pipe, wan_pipe):
    """Self-recurrent guidance's gradient comes from the conditional half alone, stopped after the
    last feature layer, parameters frozen: the guided step equals the previous computation (the
    whole CFG-batched model call with autograd, oracle below), and autograd keeps less."""
    from longvideo.methods.fifo_ouroboros import frame_features
    from longvideo.planner import LiveTensorTracker

    pipe = {"animatediff": ad_pipe, "wan": wan_pipe}[family]
    base = dict(num_partitions=2, frames_per_window=4, tail_sampling=False, sacfa=False, guided_windows=(1,))
    st, _ = _run(pipe, 3, OuroborosDiffusion(pipe, guidance_scale=1.0, **base))
    assert st.bank is not None and float(st.bank[-1]) == 1.0
    neg = _neg(pipe) if family == "animatediff" else pipe.encode_prompt(PROMPT, "", True, 1, device="cpu")[1]

    def whole_call_gradient(self, xw, kw, lv, emb, state, a):
        ctx, bank = self._ctx, self._bank.unpack(state.bank)
        with torch.enable_grad():
            xg = xw.detach().requires_grad_(True)
            self._model(xg, lv.t_model[kw], emb, neg, 3.0)
            loss = None
            for name in self._feature_layers:
                keys = ctx.features[name][a:]
                tm = ctx.layer_masks(keys.shape[2])[a:]
                ok = tm.any(1)
                if bool(ok.any()):
                    d = ((frame_features(keys, tm)[ok] - bank[name]) ** 2).mean()
                    loss = d if loss is None else loss + d
            return torch.autograd.grad(loss, xg)[0].detach()

    def guided_step(scale, oracle):
        o = OuroborosDiffusion(pipe, guidance_scale=scale, **base)
        if oracle:
            o._guidance_gradient = whole_call_gradient.__get__(o)
        lv = o.levels("cpu")
        restore = o._install(tuple(st.queue.shape[-2:]))
        sched = _schedule(o, pipe) if family == "animatediff" else _wan_schedule(o, pipe)
        try:
            with torch.no_grad(), LiveTensorTracker() as tracker:
                q = o.step(st, lv, sched, neg, 3.0).queue
        finally:
            restore()
        return q, tracker.peak

    new, new_peak = guided_step(1.0, False)
    old, old_peak = guided_step(1.0, True)
    plain, _ = guided_step(0.0, False)
    assert (new - plain).abs().max() > 0  # guidance acts on this step
    torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-4)
    print(f"{family}: guided step peak {old_peak} -> {new_peak} bytes")
    assert new_peak < old_peak, (new_peak, old_peak)


def _wan_schedule(o, pipe):
    from longvideo.methods.fifo import PromptSchedule

    sched = PromptSchedule([PROMPT], [0])
    sched.embeds = [pipe.encode_prompt(PROMPT, "", True, 1, device="cpu")[0]]
    sched.subject_ids = [subject_token_positions(pipe.tokenizer, PROMPT, subject_words_from_prompt(PROMPT))]
    return sched


@pytest.mark.parametrize("field,value", [("tail_d_s", True), ("tail_d_t", "1.0"), ("momentum", None),
                                         ("tail_order", 4.0), ("bank_frames", True), ("sacfa", 1),
                                         ("guidance_scale", False)])
def test_config_refuses_wrong_types(field, value):
    """A bool where a number goes (True ran as 1.0 before), a float where an int goes, a non-bool
    switch: one ValueError naming the field; the same values of the right type are accepted."""
    from longvideo.methods.fifo_ouroboros import OuroborosConfig

    with pytest.raises(ValueError, match=field):
        OuroborosConfig(**{field: value})
    OuroborosConfig(tail_d_s=1, tail_d_t=1.0, momentum=0.5, tail_order=4, bank_frames=1, sacfa=True, guidance_scale=0)
