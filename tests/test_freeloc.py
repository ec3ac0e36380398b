"""FreeLOC on tiny random-weight Wan pipelines (offline): parameters, processors vs an
independent per-band oracle built from diffusers' own RoPE tables, no-op equality with plain
diffusers, Triton vs reference, lengths outside the official table, removal, configuration
errors, probing and the CLI."""
import json
import math

import numpy as np
import pytest
import torch

import longvideo
from longvideo.methods import freeloc as FL
from longvideo.methods.probe import probe_layers, write_layer_config
from longvideo.models import wan
from longvideo.processors import wan as P

OP = "tiered_sparse_attention"
# float32 end to end through 4 layers and the VAE: the op's float32 tolerance (read from the
# registry) amplified by at most this factor. The no-op path differs from diffusers only by
# float rounding (temporal RoPE rotated in the op in float32 vs in diffusers' tables).
AMPLIFICATION = 10.0


@pytest.fixture(scope="module")
def pipe():
    return wan.tiny_pipeline("t2v")


def _run(pipe, frames, steps=1, guidance=1.0, output_type="latent"):
    out = pipe(prompt="a cat", num_frames=frames, height=32, width=32, num_inference_steps=steps,
               guidance_scale=guidance, generator=torch.Generator().manual_seed(0), output_type=output_type)
    return out.frames if output_type != "latent" else out.frames.float()


def _processors(pipe):
    return [b.attn1.processor for b in pipe.transformer.blocks] + [b.attn2.processor for b in pipe.transformer.blocks]


# ---------------------------------------------------------------------------------------------
# parameters
def test_official_table_reproduced():
    for F, (w1, w2, g1, g2) in FL.OFFICIAL_VRPR.items():
        p = FL.derive_params(F, 21)
        assert (p.w1, p.w2, p.g1, p.g2, p.clip) == (w1, w2, g1, g2, FL.OFFICIAL_CLIP)
        assert (p.local_frames, p.stripe_frames, p.sink_frames) == (8, 24, 1)
        assert p.stripe_tokens(1560) == 195  # 1/8 of a 832x480 frame
    assert FL.derive_params(21, 21) is None and FL.derive_params(5, 21) is None


def test_semantics_official_by_default_and_paper_on_request():
    """"official" (default) hands the op the released code's token layouts, "paper" the frame tiers
    and frame bands of before; an unknown name is refused."""
    off, pap = FL.derive_params(81, 21), FL.derive_params(81, 21, semantics="paper")
    assert off.semantics == "official" and pap.semantics == "paper"
    v_off, t_off = off.settings("vrpr", 1560).op_kwargs(), off.settings("tsa", 1560).op_kwargs()
    assert v_off["token_bands"] == [14040, 15616, 21888] and v_off["vrpr"] == [10.0, 14.0, 2.0, 8.0, 20.0, 5.0]
    assert t_off["token_tiers"] == [12544, 37504, 1664, 121728] and t_off["sink_rope"] == [8, 10]
    assert (t_off["local_frames"], t_off["stripe_frames"], t_off["sink_frames"], t_off["stripe_width"]) == (1, 0, 0, 195)
    v_pap, t_pap = pap.settings("vrpr", 1560).op_kwargs(), pap.settings("tsa", 1560).op_kwargs()
    assert "token_bands" not in v_pap and v_pap["vrpr"] == [10.0, 14.0, 2.0, 8.0, 20.0] and v_pap["local_frames"] == 81
    assert "token_tiers" not in t_pap and (t_pap["local_frames"], t_pap["stripe_frames"]) == (8, 24)
    with pytest.raises(ValueError, match="semantics must be one of"):
        FL.derive_params(81, 21, semantics="released")


def test_official_rules_scale_with_frame_tokens():
    """At another frame size the same token rules: rounded to 128 tokens, the gap follows T."""
    p = FL.derive_params(41, 21)
    assert p.official_token_bands(3600) == (11 * 3600, 43264, 72064)  # ceil128(12 * 3600), ceil128(20 * 3600)
    assert p.official_token_tiers(3600) == (28800, 86400, 3712, 41 * 3600 - 1)
    assert p.official_stripe_tokens(3600) == 450


@pytest.mark.parametrize("video_frames", [121, 201, 481, 1001])
def test_derived_params_any_length(video_frames):
    F = (video_frames - 1) // 4 + 1
    p = FL.derive_params(F, 21)
    assert 1 <= p.w1 <= p.w2 and p.g1 >= 1 and p.g2 >= 8 and p.clip == 20
    # the largest far-band distance stays close to the trained range (clip + one group)
    far = (F - 1) // p.g2 + p.w2 - p.w2 // p.g2 - (p.w2 - p.w1) // p.g1
    assert far <= p.clip + 2


def test_overrides_and_bad_values():
    p = FL.derive_params(81, 21, w1=6, g2=4, local_frames=3, stripe_width=7)
    assert (p.w1, p.w2, p.g2, p.local_frames, p.stripe_tokens(1560)) == (6, 14, 4, 3, 7)
    with pytest.raises(ValueError, match="unknown parameter"):
        FL.derive_params(81, 21, window=3)
    with pytest.raises(ValueError, match="W1=20 must be <= W2=14"):
        FL.derive_params(81, 21, w1=20, w2=14)
    with pytest.raises(ValueError, match="g1"):
        FL.derive_params(81, 21, g1=0)
    with pytest.raises(ValueError, match="stripe_fraction"):
        FL.derive_params(81, 21, stripe_fraction=0.0)


# ---------------------------------------------------------------------------------------------
# processor vs an independent oracle: per-combo logits from diffusers' RoPE tables
def _rotate_with_tables(x, cos, sin):
    """diffusers' Wan apply_rotary_emb: interleaved pairs rotated by the given tables."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2).float()


def _oracle(attn, hidden, rope, grid, vrpr, tiers):
    """Self-attention with FreeLOC's per-band positions as diffusers would rotate them: the
    temporal table rows taken at the re-encoded positions, the spatial rows as usual."""
    Fr, Hh, Ww = grid
    T = Hh * Ww
    q, k, v = P.project_qkv(attn, hidden)
    f = torch.arange(Fr * T) // T
    hh, ww = (torch.arange(Fr * T) % T) // Ww, torch.arange(Fr * T) % Ww
    dims = [rope.t_dim, rope.h_dim, rope.w_dim]
    cos_parts, sin_parts = rope.freqs_cos.split(dims, 1), rope.freqs_sin.split(dims, 1)

    def tables(pos):
        cos = torch.cat([cos_parts[0][pos], cos_parts[1][hh], cos_parts[2][ww]], -1)[None, :, None]
        sin = torch.cat([sin_parts[0][pos], sin_parts[1][hh], sin_parts[2][ww]], -1)[None, :, None]
        return cos, sin

    w1, w2, g1, g2, clip = vrpr
    c1, c2 = w1 - w1 // g1, w2 - w2 // g2 - (w2 - w1) // g1
    # positions of the five combos (exact, mid q-later, mid k-later, far q-later, far k-later)
    combos = [(f, f), (f // g1 + c1, f // g1), (f // g1, f // g1 + c1),
              ((f // g2 + c2).clamp(max=clip), f // g2), (f // g2, (f // g2 + c2).clamp(max=clip))]
    logits = []
    for pq, pk in combos:
        qr = _rotate_with_tables(q, *tables(pq)).transpose(1, 2)
        kr = _rotate_with_tables(k, *tables(pk)).transpose(1, 2)
        logits.append(qr @ kr.transpose(-1, -2) / math.sqrt(q.shape[-1]))
    d = f[:, None] - f[None, :]
    a = d.abs()
    which = torch.where(a < w1, 0, torch.where(a < w2, torch.where(d > 0, 1, 2), torch.where(d > 0, 3, 4)))
    lg = torch.gather(torch.stack(logits, -1), -1, which[None, None, :, :, None].expand(*logits[0].shape, 1))[..., 0]
    local, stripe, width, sink = tiers
    p = torch.arange(Fr * T) % T
    keep = (a < local) | ((a < stripe) & ((p[:, None] - p[None, :]).abs() < width)) | (f[None, :] < sink)
    out = torch.softmax(lg.masked_fill(~keep, float("-inf")), -1) @ v.transpose(1, 2).float()
    out = out.transpose(1, 2).flatten(2, 3)
    return attn.to_out[0](out)


@pytest.mark.parametrize("mode", ["vrpr", "tsa"])
def test_processor_matches_per_band_oracle(pipe, mode):
    tr = pipe.transformer
    grid = (9, 4, 4)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 9, 8, 8, generator=gen)
    hidden = torch.randn(1, 9 * 16, 64, generator=gen)
    vrpr = (2, 5, 2, 3, 4)
    tiers = (2, 5, 3, 1) if mode == "tsa" else (9, 0, 0, 0)
    settings = P.TieredAttentionSettings(local_frames=tiers[0], stripe_frames=tiers[1], stripe_width=tiers[2],
                                         sink_frames=tiers[3], vrpr=vrpr)
    attn = tr.blocks[1].attn1
    grid_state, restore = P.install(tr, [None, mode, None, None], lambda m, F, T: settings)
    try:
        rotary = tr.rope(latents)  # the pre-hook captures the grid, as in a transformer forward
        assert (grid_state.frames, grid_state.height, grid_state.width) == grid
        with torch.no_grad():
            got = attn(hidden, None, None, rotary)
            want = _oracle(attn, hidden, tr.rope, grid, vrpr, tiers)
    finally:
        restore()
    atol, rtol = longvideo.ops.get_backend(OP, "reference").tolerance(torch.float32)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_rope_layout_is_the_ops_contract(pipe):
    tr = pipe.transformer
    assert P.rope_split(tr) == (12, 10, 10)
    freqs = P.temporal_frequencies(tr, torch.float64)
    t = tr.rope.t_dim
    torch.testing.assert_close(freqs, 1.0 / 10000.0 ** (torch.arange(0, t, 2, dtype=torch.float64) / t))


# ---------------------------------------------------------------------------------------------
# end to end on the tiny pipeline
def test_noop_configurations_equal_plain_diffusers(pipe):
    ref = _run(pipe, 17)
    # 1) at or below the trained length (5 latent frames <= 5): the original processors run, exactly
    with FL.FreeLOC(pipe, layer_config=["tsa", "vrpr", "tsa", "vrpr"], trained_frames=5):
        assert torch.equal(_run(pipe, 17), ref)
    # 2) active processors configured to do nothing: dense tiers, W1 beyond every distance
    with FL.FreeLOC(pipe, layer_config=["tsa", "vrpr", "tsa", "vrpr"], trained_frames=1, w1=64, w2=64,
                    local_frames=64) as method:
        out = _run(pipe, 17)
        assert method.last_params is not None and method.last_params.num_frames == 5
    atol, rtol = longvideo.ops.get_backend(OP, "reference").tolerance(torch.float32)
    torch.testing.assert_close(out, ref, atol=atol * AMPLIFICATION, rtol=rtol * AMPLIFICATION)


def test_freeloc_changes_the_output_and_remove_restores(pipe):
    before = _processors(pipe)
    ref = _run(pipe, 17)
    method = FL.apply_freeloc(pipe, layer_config=["tsa", "vrpr", "dense", "tsa"])
    assert method.semantics == "official"
    installed = _processors(pipe)
    assert isinstance(installed[0], P.WanTieredAttnProcessor) and installed[0].mode == "tsa"
    assert installed[2] is before[2]  # "dense" layers keep the original processor
    assert installed[4:] == before[4:]  # cross-attention untouched
    out = _run(pipe, 17)
    assert (out - ref).abs().max() > 1e-3  # 5 latent frames > 3 trained: FreeLOC acts
    method.remove()
    method.remove()  # idempotent
    assert _processors(pipe) == before
    assert not pipe.transformer.rope._forward_pre_hooks
    assert torch.equal(_run(pipe, 17), ref)


@pytest.mark.parametrize("semantics", ["official", "paper"])
def test_triton_matches_reference(pipe, semantics):
    tol = longvideo.ops.get_backend(OP, "triton").tolerance(torch.float32)
    with FL.FreeLOC(pipe, layer_config=["tsa", "vrpr", "tsa", "vrpr"], semantics=semantics):
        ref = _run(pipe, 17)
        with longvideo.ops.use_backend("triton", op=OP):
            got = _run(pipe, 17)
    torch.testing.assert_close(got, ref, atol=tol[0] * AMPLIFICATION, rtol=tol[1] * AMPLIFICATION)


@pytest.mark.parametrize("frames", [13, 29, 121])
def test_lengths_outside_the_official_table(pipe, frames):
    with FL.FreeLOC(pipe, layer_config=["tsa", "vrpr", "tsa", "vrpr"]) as method:
        out = _run(pipe, frames)
        p = method.last_params
    latent = (frames - 1) // 4 + 1
    assert out.shape[2] == latent and torch.isfinite(out).all()
    assert p.num_frames == latent and p.trained_frames == 3 and p.w1 <= p.w2


def test_wan21_default_layer_config():
    cfg = FL.load_layer_config("wan2.1-1.3b", 30)
    assert [i for i, m in enumerate(cfg) if m == "tsa"] == list(FL.WAN21_1_3B_TSA_LAYERS)
    assert set(cfg) == {"tsa", "vrpr"}


def test_bad_layer_configs(pipe, tmp_path):
    n = 4
    with pytest.raises(ValueError, match="layer index 7 .* out of range"):
        FL.load_layer_config({"layers": {"7": "tsa"}}, n)
    with pytest.raises(ValueError, match="layer index 4 .* out of range"):
        FL.load_layer_config({"tsa_layers": [0, 4]}, n)
    with pytest.raises(ValueError, match="unknown key.*'tsa_layer'"):
        FL.load_layer_config({"tsa_layer": [0]}, n)
    with pytest.raises(ValueError, match="must be one of"):
        FL.load_layer_config(["tsa", "sparse", "vrpr", "vrpr"], n)
    with pytest.raises(ValueError, match="lists 3 modes"):
        FL.load_layer_config(["tsa", "vrpr", "vrpr"], n)
    with pytest.raises(ValueError, match="given twice"):
        FL.load_layer_config({"tsa_layers": [1], "dense_layers": [1]}, n)
    with pytest.raises(ValueError, match="30 layers"):
        FL.load_layer_config({"num_layers": 30, "layers": {}}, n)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FL.load_layer_config(bad, n)
    with pytest.raises(ValueError, match="not found"):
        FL.load_layer_config(tmp_path / "missing.json", n)
    before = _processors(pipe)
    with pytest.raises(ValueError, match="out of range"):
        FL.FreeLOC(pipe, layer_config={"tsa_layers": [9]})
    with pytest.raises(ValueError, match="unknown parameter"):
        FL.FreeLOC(pipe, layer_config=["vrpr"] * n, stripe=3)
    assert _processors(pipe) == before  # a failed install leaves the pipeline as it was
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"format": FL.LAYER_CONFIG_FORMAT, "tsa_layers": [0, 2], "default": "dense"}))
    assert FL.load_layer_config(good, n) == ["tsa", "dense", "tsa", "dense"]


# ---------------------------------------------------------------------------------------------
# probing
def test_probe_writes_a_loadable_config(pipe, tmp_path):
    result = probe_layers(pipe, num_frames=17, height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
                          shifts=(20, -20, 40, -40, 0), window=2)
    assert result.num_layers == 4 and result.calls == 1 and result.num_frames == 5
    assert all(x > 0 for x in result.position) and all(x > 0 for x in result.context)
    path = write_layer_config(tmp_path / "layers.json", result)
    modes = FL.load_layer_config(path, 4)
    assert modes.count("tsa") == round(17 / 30 * 4)
    top = sorted(range(4), key=lambda i: -result.context[i])[:2]
    assert {i for i, m in enumerate(modes) if m == "tsa"} == set(top)
    with FL.FreeLOC(pipe, layer_config=path):
        assert torch.isfinite(_run(pipe, 17)).all()


def test_probe_measures_what_it_claims(pipe):
    # zero shift and a window covering every frame change nothing: both sensitivities vanish
    result = probe_layers(pipe, num_frames=17, height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
                          shifts=(0,), window=5)
    assert max(result.position) < 1e-6 and max(result.context) < 1e-6


# ---------------------------------------------------------------------------------------------
# CLI
@pytest.mark.parametrize("method", ["freeloc", "direct"])
def test_cli_generate_writes_mp4(tmp_path, method, capsys):
    from longvideo.cli import main
    from longvideo.video import read_video

    out = tmp_path / f"{method}.mp4"
    argv = ["generate", "--method", method, "--num-frames", "17", "--steps", "2", "--device", "cpu", "--out", str(out)]
    if method == "freeloc":
        argv += ["--freeloc-sink-frames", "1", "--freeloc-semantics", "paper"]
    rc = main(argv)
    assert rc == 0
    frames = read_video(out)
    assert frames.shape == (17, 32, 32, 3)
    text = capsys.readouterr().out
    assert "time per step" in text
    if method == "freeloc":
        assert "FreeLOC: 5 latent frames" in text and "paper semantics" in text  # --freeloc-semantics reached it


def test_cli_probe_writes_config(tmp_path, capsys):
    from longvideo.cli import main

    out = tmp_path / "layers.json"
    rc = main(["probe", "--num-frames", "9", "--steps", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    assert FL.load_layer_config(out, 4).count("tsa") == 2
    assert "wrote" in capsys.readouterr().out


def test_bench_quick_cases_run():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_freeloc.py"
    spec = importlib.util.spec_from_file_location("bench_freeloc_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cases = bench.cases(torch.device("cpu"), quick=True)
    assert {c.impl for c in cases} >= {"dense_sdpa", "freeloc[longvideo]", "freeloc[official_flex]"}
    outs = {c.impl: c.fn() for c in cases}
    ours, official = outs["freeloc[longvideo]"], outs["freeloc[official_flex]"]
    atol, rtol = longvideo.ops.get_backend(OP, "reference").tolerance(torch.float32)
    torch.testing.assert_close(ours, official, atol=atol * AMPLIFICATION, rtol=rtol * AMPLIFICATION)
    assert np.isfinite(outs["dense_sdpa"].numpy()).all()
    assert (outs["dense_sdpa"] - ours).abs().max() > 1e-3  # FreeLOC is active at this length


# ---------------------------------------------------------------------------------------------
# GPU tier: a Wan2.1-1.3B-shaped transformer (1 layer of 12 heads x 128) in bf16, FreeLOC on,
# every kernel backend vs the reference op through the whole forward
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mode", ["tsa", "vrpr"])
def test_gpu_wan_shaped_backends_match_reference(require_backend, backend, mode):
    import types

    from diffusers import WanTransformer3DModel

    be = require_backend(OP, backend)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    with torch.device(dev):
        tr = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                                   text_dim=4096, ffn_dim=8960, num_layers=1)
    wan._cast_transformer(tr, dtype)
    latents = torch.randn(1, 16, 13, 30, 52, device=dev, dtype=dtype)  # 13 latent frames of 15x26 tokens
    text = torch.randn(1, 64, 4096, device=dev, dtype=dtype)
    t = torch.tensor([500.0], device=dev)
    pipe = types.SimpleNamespace(transformer=tr)
    with torch.no_grad(), FL.FreeLOC(pipe, layer_config=[mode], trained_frames=5):
        with longvideo.ops.use_backend("reference", op=OP):
            ref = tr(latents, t, text, return_dict=False)[0].float()
        with longvideo.ops.use_backend(backend, op=OP):
            got = tr(latents, t, text, return_dict=False)[0].float()
    atol, rtol = be.tolerance(dtype)
    torch.testing.assert_close(got, ref, atol=atol * AMPLIFICATION, rtol=rtol * AMPLIFICATION)
