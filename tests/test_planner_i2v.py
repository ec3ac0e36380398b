"""The memory planner's image-to-video path (``plan(..., image=...)``, docs/methods.md "Fitting a
GPU") against the live-tensor tracker, on the tiny I2V models on CPU.

The terms, each checked on its own and then in whole runs:

* (a) the CLIP image encoder's call (Wan 2.1 I2V's ``encode_image``): ``clip_vision_call``;
* (b) the VAE encode of the condition video (Wan 2.1 / 2.2 A14B I2V: the image and zero frames)
  or of the image alone (Wan 2.2 TI2V-5B's image mode), with the pipeline's condition latents and
  mask (``wan_i2v_prepare_latents``), plain and tiled;
* (c) what a denoising step holds for the image (the mask + condition latents, the wider
  transformer input, the CLIP features, the preprocessed image; TI2V: the image's latent frame
  and the first-frame mask), measured as the bytes alive when a transformer call starts in an
  I2V run minus those of the same text-to-video run;
* under FIFO: the initial clip's condition encode, the windows' streamed condition encode
  (``ImageCondition``: one encoder call per latent frame, the causal cache carried) and its
  cache.

Tolerances: one call or one term within CALL_TOL (5%) of the tracker; whole runs within
METHOD_TOL (15%). Each term's test has a wrong variant (the plan without that term) that misses
by more than the tolerance, so the tests can fail.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from longvideo.planner import LiveTensorTracker, plan, spec_from_pipeline
from longvideo.planner import activations as A
from longvideo.planner.sim import Sim

CALL_TOL = 0.05
STEPS = 2   # the second step holds what every later one does (the scheduler's history)
METHOD_TOL = 0.15


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _err(pred, measured):
    return (pred - measured) / measured


def _image(height, width):
    return Image.fromarray((np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# the walks, one call each
@pytest.mark.parametrize("case", ["tiny", "vit_h_tokens"])
def test_clip_vision_call_matches_tracker(case):
    """(a) CLIPVisionModel(pixel_values, output_hidden_states=True): the tiny model's encoder (17
    tokens, quick_gelu) and a narrow one with ViT-H/14's 257 tokens (224 px, 14 px patches; gelu);
    the handle it returns is hidden_states[-2], what the pipeline keeps. The walk without the kept
    hidden states (every layer's output dropped when the next one is made) misses the ViT-H case."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    kw = (dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8) if case == "tiny" else
          dict(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4, image_size=224,
               patch_size=14, hidden_act="gelu"))
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**kw)).eval()
    pixels = torch.randn(1, 3, kw["image_size"], kw["image_size"])
    with torch.no_grad(), LiveTensorTracker() as tk:
        kept = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        alive = tk.current
    sim = Sim()
    handle = A.clip_vision_call(sim, model.config.to_dict(), 1, 4)
    assert abs(_err(sim.peak, tk.peak)) < CALL_TOL, (sim.peak, tk.peak, sim.peak_where)
    assert handle.nbytes == kept.numel() * 4 == sim.current == alive
    if case == "vit_h_tokens":
        one_layer = Sim()                 # the same walk of a 1-layer model: nothing kept across layers
        A.clip_vision_call(one_layer, dict(model.config.to_dict(), num_hidden_layers=1), 1, 4)
        assert abs(_err(one_layer.peak, tk.peak)) > CALL_TOL


@pytest.mark.parametrize("case", ["wan2.1_widths", "tiny_tiled", "wan2.2_tiny", "wan2.2_tiny_tiled"])
def test_wan_vae_encode_matches_tracker(case):
    """(b) AutoencoderKLWan.encode of a video: the real Wan 2.1 VAE's widths (diffusers' default
    config) on 5 small frames, the tiny VAE tiled (tiled_encode: every tile over all frames, all
    tiles kept), Wan 2.2's residual VAE (patchify, residual down blocks with AvgDown3D) plain and
    tiled. The posterior's mode taken as the pipeline does. A model of the encode as one decode
    step of the same size (how the planner approximates blending's encode) misses the Wan 2.1 case."""
    from diffusers import AutoencoderKLWan

    from longvideo.models import wan, wan22_ti2v

    if case == "wan2.1_widths":
        with torch.device("meta"):            # built without initialisation (seconds saved): the bytes
            vae = AutoencoderKLWan()          # do not depend on the values, zeros do
        vae = vae.to_empty(device="cpu").eval()
        for t in vae.parameters():
            t.data.zero_()
        (N, H, W), tile = (5, 16, 32), None
    elif case.startswith("wan2.2"):
        vae, (N, H, W) = wan22_ti2v.tiny_vae().eval(), (9, 64, 64)
        tile = (48, 48, 32, 32) if case.endswith("tiled") else None
    else:
        vae, (N, H, W), tile = wan.tiny_pipeline().vae, (9, 64, 64), (32, 32, 24, 24)
    if tile:
        vae.enable_tiling(tile_sample_min_height=tile[0], tile_sample_min_width=tile[1],
                          tile_sample_stride_height=tile[2], tile_sample_stride_width=tile[3])
    x = torch.randn(1, 3, N, H, W)
    with torch.no_grad(), LiveTensorTracker() as tk:
        mode = vae.encode(x).latent_dist.mode()
    sim = Sim()
    moments = A.wan_vae_encode(sim, vae, 1, N, H, W, 4, tile)
    assert abs(_err(sim.peak, tk.peak)) < CALL_TOL, (sim.peak, tk.peak)
    assert moments.nbytes == 2 * mode.numel() * 4
    if case == "wan2.1_widths":
        s = vae.config.scale_factor_spatial
        dsim, cache = Sim(), A.WanDecoderCache()
        for _ in range(2):
            A.wan_vae_decode_chunk(dsim, vae, 1, 1, H // s, W // s, 4, cache)
        assert abs(_err(dsim.peak, tk.peak)) > CALL_TOL


# ---------------------------------------------------------------------------------------------
# whole pipeline runs: every term in its place, and the run's peak
def _segmenter(tk, rec):
    """segment(key, fn): fn wrapped so that rec[key] is the most bytes it allocated beyond what
    was alive when it started (over all its calls), the tracker's overall peak kept."""
    def segment(key, fn):
        def wrapped(*a, **k):
            start, outer = tk.current, tk.peak
            tk.reset_peak()
            try:
                return fn(*a, **k)
            finally:
                rec[key] = max(rec.get(key, 0), tk.peak - start)
                tk.peak = max(outer, tk.peak)
        return wrapped
    return segment


def _measure(pipe, height, width, frames, image=True):
    """Run `pipe` (one step, latents out) under the tracker; returns {"image encode": the peak of
    encode_image above the bytes alive when it started, "condition encode": the same for
    prepare_latents, "call start": the most bytes alive when a transformer call starts,
    "overall": the run's peak}."""
    tk, rec = LiveTensorTracker(), {"call start": 0}

    segment = _segmenter(tk, rec)

    def at_call(module, args, kwargs):
        rec["call start"] = max(rec["call start"], tk.current)

    if image:
        if hasattr(pipe, "encode_image"):
            pipe.encode_image = segment("image encode", pipe.encode_image)
        pipe.prepare_latents = segment("condition encode", pipe.prepare_latents)
    hooks = [getattr(pipe, n).register_forward_pre_hook(at_call, with_kwargs=True)
             for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None]
    kwargs = {"image": _image(height, width)} if image else {}
    try:
        with tk:
            pipe(**kwargs, prompt="a cat", num_frames=frames, height=height, width=width, num_inference_steps=STEPS,
                 generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        for h in hooks:
            h.remove()
        pipe.__dict__.pop("encode_image", None)
        pipe.__dict__.pop("prepare_latents", None)
    rec["overall"] = tk.peak
    return rec


def _pipes(name):
    """(the I2V pipeline, a text-to-video pipeline with the same VAE and text encoder, plan options,
    (height, width, frames)): sizes where the condition encode is the run's peak."""
    from longvideo.models import wan, wan22_i2v, wan22_ti2v, wan_i2v

    if name == "ti2v":
        return wan22_ti2v.tiny_pipeline("i2v"), wan22_ti2v.tiny_pipeline("t2v"), {"image": True}, (512, 512, 17)
    mod = wan_i2v if name == "wan_i2v" else wan22_i2v
    return mod.tiny_pipeline(), wan.tiny_pipeline(), {}, (112, 112, 25)


def _parts(phase, *prefixes):
    return sum(x.nbytes for x in phase.parts if x.name.startswith(prefixes))


IMAGE_STATE = ("image embeddings", "preprocessed image", "condition:", "transformer input:", "image latents")


@pytest.mark.parametrize("name", ["wan_i2v", "wan22_i2v", "ti2v"])
def test_image_to_video_pipeline_terms_and_peak_match_tracker(name):
    """A whole image-to-video pipeline run (Wan 2.1 I2V with its CLIP encoder, Wan 2.2 A14B I2V with
    two experts, Wan 2.2 TI2V-5B's image mode), two steps, latents out:

    * (a) encode_image's peak = the plan's image encoder call (the processor's pixel values are
      made from numpy, which the tracker does not see; the plan lists them as their own part);
    * (b) prepare_latents' peak = the plan's VAE encode of the condition (video / image);
    * (c) the bytes alive when a transformer call of the second step starts (the scheduler's
      history is there from then on) = the plan's state of the denoising step;
    * the run's peak (the condition encode at these sizes) = the plan's peak phase.

    Each within CALL_TOL, and each missed by more than that when the plan leaves that term out
    (the image encoder call; the encode; the image path's state -- condition latents and mask or
    the image's latent frame, the wider input, the CLIP features, the preprocessed image; the
    whole image path, i.e. the text-to-video plan of the same VAE and text encoder)."""
    pipe, t2v, opts, (H, W, N) = _pipes(name)
    rec = _measure(pipe, H, W, N)
    p = plan("direct", spec_from_pipeline(pipe), H, W, N, torch.float32, device="cpu", output_type="latent",
             num_inference_steps=STEPS, **opts)
    checks = []
    if name == "wan_i2v":
        pred = _parts(p.phase("image encode (CLIP vision)"), "image encoder (CLIP vision) call")
        checks.append(("image encode", pred, rec["image encode"], 0))
    enc = p.phase("image latents encode (VAE)" if name == "ti2v" else "condition encode (VAE)")
    pred = _parts(enc, "VAE encode of the")
    checks.append(("condition encode", pred, rec["condition encode"], 0))
    held = sum(x.nbytes for x in p.phase("denoise").parts if x.kind == "state")
    checks.append(("state at a call", held, rec["call start"], held - _parts(p.phase("denoise"), *IMAGE_STATE)))
    no_image = plan("direct", spec_from_pipeline(t2v), H, W, N, torch.float32, device="cpu", output_type="latent",
                    num_inference_steps=STEPS).peak_phase.beyond_weights
    checks.append(("run peak", p.peak_phase.beyond_weights, rec["overall"], no_image))
    bad = [(what, pred, measured) for what, pred, measured, _ in checks if abs(_err(pred, measured)) >= CALL_TOL]
    assert not bad, (bad, p.summary())
    missed = [(what, wrong, measured) for what, _, measured, wrong in checks if abs(_err(wrong, measured)) <= CALL_TOL]
    assert not missed, missed
    assert p.peak_phase.name == enc.name


# ---------------------------------------------------------------------------------------------
# FIFO from an image
@pytest.mark.parametrize("name", ["wan_i2v", "wan22_i2v", "ti2v"])
def test_fifo_image_to_video_terms_and_peak_match_tracker(monkeypatch, name):
    """FIFO from an image on the tiny Wan 2.1 I2V, Wan 2.2 A14B I2V (frames routed to their expert
    after conditioning) and Wan 2.2 TI2V (its image mode) models: the initial clip's
    prepare_latents (the I2V pipeline's encode of the clip's condition video; TI2V: of the image)
    against the plan's "initial clip: ... encode (VAE)"; on the I2V models each streamed condition
    step (``ImageCondition._encode_next``: one encoder call, the replaced cache kept until it
    returns) against the plan's step, and the encoder cache it carries (after a 4-frame step)
    against the plan's -- each within CALL_TOL; the run's peak (a frame's decode, the encoder's
    cache still alive: the stream has not repeated itself yet) within METHOD_TOL. On Wan 2.1 I2V,
    without the image path (the plan of the text-to-video tiny model with the same VAE and text
    encoder) or without the encoder cache held across the iterations, the peak is missed by more
    than METHOD_TOL."""
    from diffusers import WanImageToVideoPipeline

    from longvideo.methods.families import wan_i2v as fam
    from longvideo.methods.fifo import FIFODiffusion
    from longvideo.models import wan, wan22_i2v, wan22_ti2v, wan_i2v

    pipe = {"wan_i2v": wan_i2v.tiny_pipeline, "wan22_i2v": wan22_i2v.tiny_pipeline,
            "ti2v": lambda: wan22_ti2v.tiny_pipeline("t2v")}[name]()
    H = W = 64
    tk, rec = LiveTensorTracker(), {}

    segment = _segmenter(tk, rec)

    real_step = fam.ImageCondition._encode_next

    def step(self):
        out = segment("streamed step", lambda: real_step(self))()
        if self._cache is not None and self._next > 1:
            rec["encoder cache"] = max(rec.get("encoder cache", 0), sum(
                t.untyped_storage().nbytes() for t in self._cache if isinstance(t, torch.Tensor)))
        return out

    monkeypatch.setattr(fam.ImageCondition, "_encode_next", step)
    monkeypatch.setattr(WanImageToVideoPipeline, "prepare_latents",
                        segment("clip encode", WanImageToVideoPipeline.prepare_latents))
    fifo = FIFODiffusion(pipe, num_partitions=1)
    kwargs, opts = {"image": _image(H, W)}, {}
    if name == "ti2v":                     # TI2V's image mode is set on its family (generate --image does)
        fifo.family.set_image(kwargs.pop("image"))
        opts = {"image": True}
    with tk:
        for _ in fifo.generate("a red cat walking", num_frames=16, height=H, width=W, stop_after_iterations=3,
                               **kwargs):
            pass
    p = plan("fifo", spec_from_pipeline(pipe), H, W, 16, torch.float32, device="cpu", num_partitions=1, **opts)
    clip = "initial clip: image latents encode (VAE)" if name == "ti2v" else "initial clip: condition encode (VAE)"
    checks = [("clip encode", _parts(p.phase(clip), "VAE encode of the"), rec["clip encode"])]
    if name != "ti2v":
        stream = p.phase("condition encode (streamed)")
        checks += [("streamed step", _parts(stream, "VAE encode of 4 zero frames"), rec["streamed step"]),
                   ("encoder cache", _parts(stream, "VAE encoder cache"), rec["encoder cache"])]
    bad = [c for c in checks if abs(_err(c[1], c[2])) >= CALL_TOL]
    assert not bad, (bad, p.summary())
    assert abs(_err(p.peak_phase.beyond_weights, tk.peak)) < METHOD_TOL, (p.peak_phase.beyond_weights, tk.peak,
                                                                          p.summary())
    if name == "wan_i2v":
        t2v = plan("fifo", spec_from_pipeline(wan.tiny_pipeline()), H, W, 16, torch.float32, device="cpu",
                   num_partitions=1)
        no_cache = p.peak_phase.beyond_weights - _parts(p.peak_phase, "VAE encoder cache")
        for wrong in (t2v.peak_phase.beyond_weights, no_cache):
            assert abs(_err(wrong, tk.peak)) > METHOD_TOL, (wrong, tk.peak)


# ---------------------------------------------------------------------------------------------
# the option
def test_image_option_chooses_the_image_path_and_refuses_what_it_does_not_plan():
    """image=None plans what the pipeline needs (I2V: always its image; TI2V: text only), True
    TI2V's image mode; refused with a ValueError naming the argument: an image on a text-to-video
    model, image=False on an I2V pipeline, another method than direct / freeloc / fifo. The known
    I2V configs plan their image path (Wan 2.1 I2V with its CLIP ViT-H/14: 257 image tokens)."""
    p = plan("direct", "wan2.1-i2v-14b-480p", num_frames=81)
    names = [ph.name for ph in p.phases]
    assert p.sizes["image"] == "condition" and "image encode (CLIP vision)" in names and "condition encode (VAE)" in names
    assert p.phase("text").by_kind("weights") > 0 and not any("image" in n for n in p.notes)
    assert "image" not in plan("direct", "wan2.2-ti2v-5b", num_frames=121).sizes
    assert plan("fifo", "wan2.2-ti2v-5b", image=True).sizes["image"] == "first_frame"
    assert plan("fifo", "wan2.2-i2v-a14b").phase("condition encode (streamed)").nbytes > 0
    # offload="text": longvideo.offload moves the image encoder to the device only for its call, as
    # it does the text encoders
    from longvideo.offload import _TEXT_ENCODERS

    text = plan("direct", "wan2.1-i2v-14b-480p", num_frames=81, offload="text")
    holds = {ph.name: any(x.name.startswith("image_encoder") for x in ph.parts) for ph in text.phases}
    assert "image_encoder" in _TEXT_ENCODERS and holds["image encode (CLIP vision)"], holds
    assert not any(v for k, v in holds.items() if k != "image encode (CLIP vision)"), holds
    for args, kw, message in [(("direct", "wan2.1-t2v-1.3b"), {"image": True}, "is a text-to-video model"),
                              (("direct", "wan2.1-i2v-14b-480p"), {"image": False}, "image=False"),
                              (("ouroboros", "wan2.1-i2v-14b-480p"), {}, "not planned with an image"),
                              (("direct", "wan2.2-ti2v-5b"), {"image": "yes"}, "image must be")]:
        with pytest.raises(ValueError, match=message):
            plan(*args, **kw)


def test_plan_command_takes_an_image(tmp_path, capsys):
    """`longvideo plan --image [IMG]`: the image path's phases in the printed table; with IMG the
    video keeps its aspect ratio at the model's area, as `generate --image`; on a text-to-video
    model one error line."""
    from longvideo.cli import main

    path = tmp_path / "wide.png"
    _image(30, 60).save(path)
    assert main(["plan", "--method", "direct", "--model", "wan2.1-i2v-14b-480p", "--num-frames", "81",
                 "--image", str(path), "--fit", "24GB"]) == 0
    out = capsys.readouterr().out
    from longvideo.cli._image import video_size

    h, w = video_size(_image(30, 60), 480 * 832, 16)          # generate --image's rule (tests/test_cli_image.py)
    assert f"height={h}, width={w}" in out and "phase condition encode (VAE)" in out, out
    assert "phase image encode (CLIP vision)" in out and "choice: " in out
    assert main(["plan", "--method", "fifo", "--model", "wan2.2-ti2v-5b", "--image"]) == 0
    assert "initial clip: image latents encode (VAE)" in capsys.readouterr().out
    assert main(["plan", "--method", "direct", "--model", "wan2.1-t2v-1.3b", "--image"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longvideo: error: ") and "text-to-video model" in err and "\n" not in err


# ---------------------------------------------------------------------------------------------
# the GPU tier: the same walks against torch.cuda.max_memory_allocated (cuDNN / cuBLAS workspaces
# included there, hence METHOD_TOL)
def _cuda_peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["vae_encode_480p", "clip_vit_h", "prepare_latents_tiny"])
def test_cuda_image_path_matches_max_memory_allocated(case):
    """The real Wan 2.1 VAE encoding a 9-frame 480x832 condition video, the CLIP ViT-H/14 vision
    tower (the known config's), and the tiny Wan 2.1 I2V pipeline's prepare_latents on CUDA (the
    mask built on the host, then copied: the walk's "cuda" device), each within METHOD_TOL."""
    dev = torch.device("cuda")
    sim = Sim()
    if case == "vae_encode_480p":
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan().to(dev).eval()
        x = torch.randn(1, 3, 9, 480, 832, device=dev)
        with torch.no_grad():
            measured = _cuda_peak(lambda: vae.encode(x).latent_dist.mode())
        A.wan_vae_encode(sim, vae, 1, 9, 480, 832, 4)
    elif case == "clip_vit_h":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        from longvideo.planner.models import _CLIP_VIT_H

        cfg = {k: v for k, v in _CLIP_VIT_H.items() if k != "model_type"}
        model = CLIPVisionModel(CLIPVisionConfig(**cfg)).to(dev).eval()
        px = torch.randn(1, 3, 224, 224, device=dev)
        with torch.no_grad():
            measured = _cuda_peak(lambda: model(pixel_values=px, output_hidden_states=True).hidden_states[-2])
        A.clip_vision_call(sim, cfg, 1, 4)
    else:
        from longvideo.models import wan_i2v

        pipe = wan_i2v.tiny_pipeline().to(dev)
        img = torch.rand(1, 3, 64, 64, device=dev) * 2 - 1
        with torch.no_grad():
            measured = _cuda_peak(lambda: pipe.prepare_latents(img, 1, 4, 64, 64, 17, torch.float32, dev,
                                                               torch.Generator(dev).manual_seed(0)))
        A.wan_i2v_prepare_latents(sim, pipe.vae, 1, 17, 64, 64, False, A.CUDA)
    assert abs(_err(sim.peak, measured)) < METHOD_TOL, (sim.peak, measured, sim.peak_where)
