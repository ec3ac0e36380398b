"""Streaming VAE decoding (longvideo.decode, issue 18 item 3): the chunks equal the whole decode bit
for bit on the tiny models' VAEs, and the working memory does not grow with the length."""
import numpy as np
import pytest
import torch

from longvideo.decode import decode_to, decode_whole, iter_decoded, vae_latents
from longvideo.models import animatediff, wan
from longvideo.planner.tracker import LiveTensorTracker


@pytest.fixture(scope="module")
def wan_pipe():
    return wan.tiny_pipeline()


def _latents(pipe, frames, h=8, w=12, seed=0):
    c = pipe.vae.config.z_dim if hasattr(pipe.vae.config, "z_dim") else pipe.vae.config.latent_channels
    return torch.randn(1, c, frames, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tiled", [False, True], ids=["whole-frame", "spatial-tiles"])
@torch.no_grad()
def test_wan_stream_equals_whole_decode_bitwise(wan_pipe, tiled):
    """Causal Wan VAE: the per-latent-frame chunks (1 video frame, then 4 per latent frame)
    concatenate to exactly vae.decode's output -- also with diffusers' spatial tiling on (tiles
    smaller than the frame, each with its own causal cache, blended per frame)."""
    vae = wan_pipe.vae
    if tiled:
        vae.enable_tiling(tile_sample_min_height=24, tile_sample_min_width=32, tile_sample_stride_height=16,
                          tile_sample_stride_width=24)
    try:
        z = vae_latents(wan_pipe, _latents(wan_pipe, 5))
        whole = vae.decode(z).sample
        chunks = list(iter_decoded(vae, z))
    finally:
        vae.use_tiling = False
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4, 4]
    assert torch.equal(torch.cat(chunks, dim=2), whole)  # tolerance: none (bit-equal)


def _stream_with_cache_reset(vae, z, reset_at):
    """A deliberately wrong streaming decode: the causal cache is dropped at latent frame
    `reset_at` (as if chunks were decoded independently)."""
    x = vae.post_quant_conv(z)
    slots = vae._cached_conv_counts["decoder"]
    cache, outs = [None] * slots, []
    for k in range(z.shape[2]):
        if k == reset_at:
            cache = [None] * slots
        outs.append(vae.decoder(x[:, :, k:k + 1], feat_cache=cache, feat_idx=[0], first_chunk=(k == 0)))
    return torch.cat(outs, dim=2).clamp(-1, 1)


@torch.no_grad()
def test_a_wrong_causal_cache_is_detected(wan_pipe):
    """The comparison can fail: dropping the causal cache between chunks does not give the whole
    decode (the frames differ, or even their number)."""
    vae = wan_pipe.vae
    z = vae_latents(wan_pipe, _latents(wan_pipe, 4))
    whole = vae.decode(z).sample
    wrong = _stream_with_cache_reset(vae, z, reset_at=2)
    assert wrong.shape != whole.shape or not torch.allclose(wrong, whole, atol=1e-3)
    assert torch.equal(_stream_with_cache_reset(vae, z, reset_at=None), whole)


@torch.no_grad()
def test_image_vae_stream_equals_decode_latents():
    """AnimateDiff's per-frame VAE: chunks of decode_chunk_size frames equal the pipeline's own
    decode_latents (which decodes the same chunks), bit for bit."""
    pipe = animatediff.tiny_pipeline()
    lat = _latents(pipe, 7, 4, 4)
    whole = pipe.decode_latents(lat, decode_chunk_size=3)
    chunks = list(iter_decoded(pipe.vae, vae_latents(pipe, lat), decode_chunk_size=3))
    assert [c.shape[2] for c in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat(chunks, dim=2), whole)


@torch.no_grad()
def test_postprocessed_frames_equal_the_pipeline_output(wan_pipe, tmp_path):
    """decode_whole / decode_to give the frames the Wan pipeline returns for output_type="np"
    (its decode + postprocess_video), cut to num_frames; decode_to writes them to a sink chunk by
    chunk."""
    lat = _latents(wan_pipe, 4)
    vae = wan_pipe.vae
    expected = wan_pipe.video_processor.postprocess_video(vae.decode(vae_latents(wan_pipe, lat)).sample,
                                                          output_type="np")[0]
    np.testing.assert_array_equal(decode_whole(wan_pipe, lat), expected)

    class Sink:
        sizes = []

        def write(self, frames):
            self.sizes.append(len(frames))

    sink = Sink()
    n, kept = decode_to(wan_pipe, lat, sink, num_frames=11, keep=True)
    assert n == 11 and sink.sizes == [1, 4, 4, 2]
    np.testing.assert_array_equal(kept, expected[:11])


def test_bad_inputs_name_the_argument(wan_pipe):
    with pytest.raises(ValueError, match="batch 1"):
        next(iter_decoded(wan_pipe.vae, torch.zeros(2, 4, 2, 4, 4)))
    with pytest.raises(ValueError, match="z: expected"):
        next(iter_decoded(wan_pipe.vae, torch.zeros(4, 2, 4, 4)))
    with pytest.raises(ValueError, match="decode_chunk_size"):
        next(iter_decoded(wan_pipe.vae, torch.zeros(1, 4, 2, 4, 4), decode_chunk_size=0))
    with pytest.raises(ValueError, match="vae: no streaming decode"):
        next(iter_decoded(torch.nn.Linear(1, 1), torch.zeros(1, 4, 2, 4, 4)))


@torch.no_grad()
def test_peak_memory_is_flat_in_the_length(wan_pipe):
    """Live tensor bytes (LiveTensorTracker) while the latent video is decoded and each chunk
    dropped after use: going from 4 to 16 latent frames, the streamed peak grows only by the
    latent-sized post_quant_conv output (12 latent frames x C x h x w x 4 bytes), the whole
    decode's by the 48 extra video frames and their activations."""
    vae = wan_pipe.vae
    peaks, whole_peaks, z_bytes = [], [], []
    for frames in (4, 16):
        z = vae_latents(wan_pipe, _latents(wan_pipe, frames, 8, 8))
        with LiveTensorTracker() as t:
            for chunk in iter_decoded(vae, z):
                del chunk
        with LiveTensorTracker() as w:
            vae.decode(z)
        peaks.append(t.peak)
        whole_peaks.append(w.peak)
        z_bytes.append(z.numel() * z.element_size())
    latent_growth = z_bytes[1] - z_bytes[0]
    frame_bytes = 3 * 32 * 32 * 4  # one decoded video frame (32x32, float32)
    assert peaks[1] - peaks[0] <= latent_growth
    assert whole_peaks[1] - whole_peaks[0] >= 48 * frame_bytes  # the whole decode holds every frame
