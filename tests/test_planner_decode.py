"""The planner's model of the streamed VAE decode (longvideo.decode.decode_to, what `longvideo
generate --method freeloc|direct` and `longvideo enhance` run) against the live-tensor tracker.

* activations.wan_vae_decode_streamed vs the tracker's peak of ``decode_to`` on tiny Wan 2.1 and
  Wan 2.2 VAEs, untiled and tiled (one cache per tile), at two lengths: within CALL_TOL (5%), and
  flat in the length (the two lengths' predictions and measurements within CALL_TOL of each
  other; only the latent video itself grows);
* the whole-decode model (activations.wan_vae_decode, diffusers' vae.decode) misses the same
  streamed measurement at the longer length by more than CALL_TOL: the comparison can fail;
* plan(..., decode="streamed") puts the streamed model in the decode phase of direct / freeloc /
  enhance (its VAE parts are the walk's peak, within CALL_TOL of the tracker on a tiny pipeline),
  decode="whole" the whole one; FIFO and story do not depend on it;
* on a GPU (marked `gpu`, not run without one): the real Wan2.1 VAE streamed at 480x832 against
  torch.cuda.max_memory_allocated within GPU_TOL (15%).
"""
import types

import pytest
import torch

from longvideo.planner import LiveTensorTracker, plan, spec_from_pipeline
from longvideo.planner import activations as A
from longvideo.planner.sim import Sim

CALL_TOL = 0.05
GPU_TOL = 0.15
SHORT, LONG = 3, 9          # latent frames


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Sink:
    def __init__(self):
        self.frames = 0

    def write(self, frames):
        self.frames += len(frames)


def _err(pred, measured):
    return (pred - measured) / measured


# (VAE, latent height/width, tile (h, w, stride h, stride w) in latent pixels or None)
CASES = {
    "wan2.1": ("wan2.1", 8, None),
    "wan2.1_tiled": ("wan2.1", 24, (16, 16, 12, 12)),     # 2 x 2 tiles
    "wan2.2": ("wan2.2", 4, None),
    "wan2.2_tiled": ("wan2.2", 8, (4, 4, 3, 3)),          # 3 x 3 tiles
}


def _vae(kind, tile):
    from longvideo.models import wan, wan22_ti2v

    vae = wan22_ti2v.tiny_vae().eval() if kind == "wan2.2" else wan.tiny_pipeline().vae
    if tile:
        s = vae.config.scale_factor_spatial      # tiles are given in latent pixels, diffusers takes pixels
        vae.enable_tiling(tile_sample_min_height=tile[0] * s, tile_sample_min_width=tile[1] * s,
                          tile_sample_stride_height=tile[2] * s, tile_sample_stride_width=tile[3] * s)
    return vae


def _measure_decode_to(vae, T, hw):
    """The tracker's peak of decode_to (the pipeline's float32 latents exist before it starts, as
    the CLI holds them) and the frames written."""
    from diffusers.video_processor import VideoProcessor

    from longvideo.decode import decode_to

    pipe = types.SimpleNamespace(vae=vae, video_processor=VideoProcessor(
        vae_scale_factor=vae.config.scale_factor_spatial))
    latents = torch.randn(1, vae.config.z_dim, T, hw, hw, generator=torch.Generator().manual_seed(0))
    sink = _Sink()
    with LiveTensorTracker() as tk:
        decode_to(pipe, latents, sink)
    assert sink.frames == 4 * (T - 1) + 1
    return tk.peak


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_decode_matches_tracker_and_is_flat_in_length(case):
    kind, hw, tile = CASES[case]
    vae = _vae(kind, tile)
    got = {}
    for T in (SHORT, LONG):
        sim = Sim()
        walked = A.wan_vae_decode_streamed(sim, vae, 1, T, hw, hw, 4, tile=tile)
        assert walked == min(T, A.STREAM_FRAMES_WALKED)
        got[T] = (sim.peak, _measure_decode_to(vae, T, hw))
    bad = [(T, p, m) for T, (p, m) in got.items() if abs(_err(p, m)) > CALL_TOL]
    assert not bad, bad
    (p1, m1), (p2, m2) = got[SHORT], got[LONG]
    assert abs(_err(p2, p1)) < CALL_TOL and abs(_err(m2, m1)) < CALL_TOL, got   # flat in the length
    # the whole-decode model (diffusers' vae.decode: the video concatenated, tiles kept to the
    # end) of the same video misses the streamed measurement
    whole = Sim()
    A.wan_vae_decode(whole, vae, 1, LONG, hw, hw, 4, tile=tile)
    assert _err(whole.peak, m2) > CALL_TOL, (whole.peak, m2)


def test_streamed_decode_refuses_a_batch():
    from longvideo.models import wan

    with pytest.raises(ValueError, match="B: the streamed decode"):
        A.wan_vae_decode_streamed(Sim(), wan.tiny_pipeline().vae, 2, 3, 8, 8, 4)


def _decode_vae_parts(p, label):
    ph = p.phase("decode")
    return sum(x.nbytes for x in ph.parts if x.name.startswith(label))


def test_plan_decode_phase_is_the_streamed_walk_by_default():
    """plan's decode phase for freeloc / direct / enhance: by default the streamed decode (its VAE
    parts within CALL_TOL of the tracker's decode_to peak of the same tiny pipeline at this size),
    with decode="whole" diffusers' whole decode (which the measurement refutes at this length);
    the latents held during the decode stay in the phase either way."""
    from longvideo.models import wan

    pipe = wan.tiny_pipeline("t2v")
    spec = spec_from_pipeline(pipe, name="tiny")
    H = W = 64
    frames = 4 * (LONG - 1) + 1
    kw = dict(device="cpu", trained_frames=3)
    measured = _measure_decode_to(pipe.vae, LONG, H // pipe.vae.config.scale_factor_spatial)
    streamed_label = "VAE decode, streamed"
    for method in ("freeloc", "direct", "enhance"):
        default = plan(method, spec, H, W, frames, "float32", **kw)
        whole = plan(method, spec, H, W, frames, "float32", decode="whole", **kw)
        pred = _decode_vae_parts(default, streamed_label)
        assert abs(_err(pred, measured)) < CALL_TOL, (method, pred, measured)
        assert _decode_vae_parts(whole, streamed_label) == 0
        assert _err(_decode_vae_parts(whole, "VAE decode"), measured) > CALL_TOL, method
        for p, said in ((default, "decode: streamed"), (whole, "decode: the VAE's whole decode")):
            assert any(x.name == "latents" for x in p.phase("decode").parts)
            assert any(n.startswith(said) for n in p.notes), p.notes
    for method in ("fifo", "ouroboros"):     # FIFO streams its own decode; the option does not apply
        a = plan(method, spec, H, W, frames, "float32", device="cpu")
        b = plan(method, spec, H, W, frames, "float32", device="cpu", decode="whole")
        assert a.peak_bytes == b.peak_bytes
    with pytest.raises(ValueError, match="decode must be one of"):
        plan("freeloc", spec, H, W, frames, "float32", decode="chunked")


def test_plan_cli_decode_flag(capsys):
    from longvideo.cli import main

    args = ["plan", "--method", "freeloc", "--model", "wan2.1-t2v-1.3b", "--height", "480", "--width", "832",
            "--num-frames", "161", "--json"]
    import json

    main(args)
    streamed = json.loads(capsys.readouterr().out)
    main(args + ["--decode", "whole"])
    whole = json.loads(capsys.readouterr().out)

    def decode_peak(d):
        return next(ph for ph in d["phases"] if ph["name"] == "decode")["bytes"]

    assert decode_peak(streamed) < decode_peak(whole)


@pytest.mark.gpu
@pytest.mark.parametrize("tiled", [False, True])
def test_cuda_streamed_decode_matches_max_memory_allocated(tiled):
    """The real Wan2.1 VAE widths (diffusers' default config, random weights) at 480x832, 5 latent
    frames, streamed by decode_to on the GPU (tiled: diffusers' default 256 px tiles, stride 192,
    as vae_tiling plans them): the planner's streamed walk within GPU_TOL (15%, as
    tests/test_planner.py's CUDA VAE check: cuDNN workspaces and allocator rounding are not
    modelled) of torch.cuda.max_memory_allocated beyond what was allocated before."""
    from diffusers import AutoencoderKLWan

    from diffusers.video_processor import VideoProcessor

    from longvideo.decode import decode_to

    vae = AutoencoderKLWan().to("cuda").eval()
    if tiled:
        vae.enable_tiling()
    pipe = types.SimpleNamespace(vae=vae, video_processor=VideoProcessor(vae_scale_factor=8))
    latents = torch.randn(1, 16, 5, 60, 104, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    decode_to(pipe, latents, _Sink())
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    sim = Sim()
    A.wan_vae_decode_streamed(sim, vae, 1, 5, 60, 104, 4, tile=(32, 32, 24, 24) if tiled else None)
    assert abs(_err(sim.peak, measured)) < GPU_TOL, (sim.peak, measured, sim.peak_tags)
