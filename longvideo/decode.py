"""Streaming VAE decoding: a long video decoded a few frames at a time and handed to a writer.

A whole-video ``vae.decode`` keeps every decoded frame (and the VAE's activations for them) in
memory until the last one is done: its peak grows with the length. The methods that decode a
whole latent video at the end (FreeLOC / direct generation on Wan, StreamingT2V's randomized
blending) use this module instead: :func:`iter_decoded` yields the decoded frames chunk by chunk
and :func:`decode_to` writes each chunk to a sink (``longvideo.video.VideoWriter`` or anything with
``write(frames)``) before the next one is decoded, so the peak is that of one chunk plus the
latent video itself, whatever the length (docs/outputs.md).

What a chunk is, per VAE (every one equal to the whole decode, bit for bit, because it runs the
same calls in the same order as the VAE's own ``decode`` and only stops concatenating):

* ``AutoencoderKLWan`` (Wan 2.1/2.2, SkyReels-V2): a causal 3-D VAE. Its own ``_decode`` already
  runs the decoder one latent frame per call, the causal convolutions' inputs carried from call
  to call in a feature cache (the last two frames each causal 3-D convolution saw, a "Rep" marker
  for the first chunk's temporal up-sampling), the first call marked ``first_chunk``, and
  concatenates the outputs. Here the same loop runs with a cache list of our own and yields each
  call's output: 1 video frame for latent frame 0, 4 for every later one. With spatial tiling
  enabled on the VAE (``vae.enable_tiling()``) and a frame larger than a tile, every tile keeps
  its own cache (as ``tiled_decode`` does, where each tile is decoded through all frames before the
  next tile) and the tiles of one latent frame are blended and cropped as ``tiled_decode`` blends
  them -- per frame, since the blend is spatial.
* ``AutoencoderKLCogVideoX``: causal too; its ``_decode`` decodes ``num_latent_frames_batch_size``
  latent frames per call with a convolution cache: the same loop, one yield per call (tiled
  CogVideoX decoding is not streamed: one chunk, the whole decode).
* image VAEs (``AutoencoderKL``: AnimateDiff): frames are independent; the pipeline's
  ``decode_latents`` decodes ``decode_chunk_size`` frames per call: the same chunks here.

``vae.use_slicing`` (a batch decoded one sample at a time) is kept: streaming handles a batch of
one video (the methods' case); a larger batch raises ValueError.

Offloading: the VAE's ``decode`` is wrapped by diffusers so that a CPU-offload hook moves the VAE
to the execution device first; the causal paths call ``vae.decoder`` themselves and run that hook
the same way.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

__all__ = ["vae_kind", "vae_latents", "iter_decoded", "iter_frames", "decode_to", "decode_whole"]

KINDS = ("wan", "cogvideox", "image")


def vae_kind(vae) -> str:
    """Which streaming path a VAE takes: "wan" (AutoencoderKLWan), "cogvideox"
    (AutoencoderKLCogVideoX) or "image" (a per-frame VAE such as AutoencoderKL)."""
    name = type(vae).__name__
    if name.startswith("AutoencoderKLWan"):
        return "wan"
    if name.startswith("AutoencoderKLCogVideoX"):
        return "cogvideox"
    if name in ("AutoencoderKL", "AutoencoderTiny", "AsymmetricAutoencoderKL", "ConsistencyDecoderVAE"):
        return "image"
    raise ValueError(f"vae: no streaming decode for {name}; supported: AutoencoderKLWan, AutoencoderKLCogVideoX and "
                     "image VAEs (AutoencoderKL)")


def _execution_device(module) -> torch.device:
    try:
        from diffusers.utils.torch_utils import get_module_execution_device

        return get_module_execution_device(module)
    except ImportError:  # pragma: no cover - older diffusers
        return next(module.parameters()).device


def vae_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's latents (what ``output_type="latent"`` returns, (B, C, F, h, w)) mapped to
    what its VAE decodes, exactly as the pipeline does before ``vae.decode``: Wan ``latents /
    (1 / std) + mean`` in the VAE's dtype on its execution device; CogVideoX and AnimateDiff
    ``latents / scaling_factor`` in the VAE's dtype (CogVideoX's latents are (B, F, C, h, w) in the pipeline and are
    permuted to (B, C, F, h, w) here, as its ``decode_latents`` does)."""
    vae = pipe.vae
    kind = vae_kind(vae)
    if kind == "wan":
        latents = latents.to(_execution_device(vae), dtype=vae.dtype)
        cfg = vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        return latents / inv_std + mean
    latents = latents.to(vae.dtype)
    if kind == "cogvideox":
        return 1 / pipe.vae_scaling_factor_image * latents.permute(0, 2, 1, 3, 4)
    return 1 / vae.config.scaling_factor * latents


def _run_offload_hook(vae) -> None:
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)


def _wan_tiles(vae, height: int, width: int):
    """The latent tiles of ``AutoencoderKLWan.tiled_decode`` (row starts, column starts, tile size)
    and its blend and crop sizes in output pixels; None when the VAE does not tile this size."""
    s = vae.spatial_compression_ratio
    min_h, min_w = vae.tile_sample_min_height // s, vae.tile_sample_min_width // s
    if not (vae.use_tiling and (width > min_w or height > min_h)):
        return None
    stride_h, stride_w = vae.tile_sample_stride_height // s, vae.tile_sample_stride_width // s
    out_stride_h, out_stride_w = vae.tile_sample_stride_height, vae.tile_sample_stride_width
    p = vae.config.patch_size
    if p is not None:
        out_stride_h, out_stride_w = out_stride_h // p, out_stride_w // p
        blend_h = vae.tile_sample_min_height // p - out_stride_h
        blend_w = vae.tile_sample_min_width // p - out_stride_w
    else:
        blend_h = vae.tile_sample_min_height - out_stride_h
        blend_w = vae.tile_sample_min_width - out_stride_w
    return dict(rows=list(range(0, height, stride_h)), cols=list(range(0, width, stride_w)), min_h=min_h, min_w=min_w,
                out_stride_h=out_stride_h, out_stride_w=out_stride_w, blend_h=blend_h, blend_w=blend_w)


def _finish_wan(vae, out: torch.Tensor) -> torch.Tensor:
    if vae.config.patch_size is not None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        out = unpatchify(out, patch_size=vae.config.patch_size)
    return torch.clamp(out, min=-1.0, max=1.0)


def _decoder_cache_slots(vae) -> int:
    """One cache entry per causal convolution of the Wan decoder."""
    counts = getattr(vae, "_cached_conv_counts", None)
    if counts is not None:
        return counts["decoder"]
    vae.clear_cache()  # older diffusers: clear_cache sizes _feat_map
    return len(vae._feat_map)


def _iter_wan(vae, z: torch.Tensor) -> Iterator[torch.Tensor]:
    _run_offload_hook(vae)
    num_frames, height, width = z.shape[2:]
    slots = _decoder_cache_slots(vae)
    tiles = _wan_tiles(vae, height, width)
    if tiles is None:
        x = vae.post_quant_conv(z)  # kernel 1: per frame; latent-sized, computed once as _decode does
        cache = [None] * slots
        for k in range(num_frames):
            out = vae.decoder(x[:, :, k:k + 1], feat_cache=cache, feat_idx=[0], first_chunk=(k == 0))
            yield _finish_wan(vae, out)
        return
    t = tiles
    caches = {(i, j): [None] * slots for i in t["rows"] for j in t["cols"]}
    s = vae.spatial_compression_ratio
    p = vae.config.patch_size or 1
    sample_h, sample_w = height * s // p, width * s // p
    for k in range(num_frames):
        rows = []
        for i in t["rows"]:
            row = []
            for j in t["cols"]:
                tile = vae.post_quant_conv(z[:, :, k:k + 1, i:i + t["min_h"], j:j + t["min_w"]])
                row.append(vae.decoder(tile, feat_cache=caches[(i, j)], feat_idx=[0], first_chunk=(k == 0)))
            rows.append(row)
        result_rows = []
        for a, row in enumerate(rows):  # tiled_decode's blend (in place, in the same order)
            result_row = []
            for b, tile in enumerate(row):
                if a > 0:
                    tile = vae.blend_v(rows[a - 1][b], tile, t["blend_h"])
                if b > 0:
                    tile = vae.blend_h(row[b - 1], tile, t["blend_w"])
                result_row.append(tile[:, :, :, :t["out_stride_h"], :t["out_stride_w"]])
            result_rows.append(torch.cat(result_row, dim=-1))
        del rows
        out = torch.cat(result_rows, dim=3)[:, :, :, :sample_h, :sample_w]
        del result_rows
        yield _finish_wan(vae, out)


def _iter_cogvideox(vae, z: torch.Tensor) -> Iterator[torch.Tensor]:
    num_frames, height, width = z.shape[2:]
    if vae.use_tiling and (width > vae.tile_latent_min_width or height > vae.tile_latent_min_height):
        yield vae.decode(z).sample  # spatially tiled CogVideoX decoding: one chunk (not streamed)
        return
    _run_offload_hook(vae)
    batch = vae.num_latent_frames_batch_size
    remaining = num_frames % batch
    conv_cache = None
    for i in range(max(num_frames // batch, 1)):  # AutoencoderKLCogVideoX._decode's chunks
        start = batch * i + (0 if i == 0 else remaining)
        part = z[:, :, start:batch * (i + 1) + remaining]
        if vae.post_quant_conv is not None:
            part = vae.post_quant_conv(part)
        out, conv_cache = vae.decoder(part, conv_cache=conv_cache)
        yield out


def _iter_image(vae, z: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    frames = z[0].permute(1, 0, 2, 3)  # (F, C, h, w), as decode_latents flattens a batch of one
    for i in range(0, frames.shape[0], chunk):
        out = vae.decode(frames[i:i + chunk]).sample  # (n, 3, H, W)
        yield out.permute(1, 0, 2, 3).unsqueeze(0).float()  # decode_latents casts to float32


@torch.no_grad()
def iter_decoded(vae, z: torch.Tensor, decode_chunk_size: int = 16) -> Iterator[torch.Tensor]:
    """Decode the VAE-space latent video `z` (B=1, C, F, h, w) chunk by chunk.

    Yields tensors (1, 3, n, H, W) in the VAE's output range ([-1, 1]), whose concatenation along
    dim 2 equals ``vae.decode(z).sample`` (Wan, CogVideoX) or the pipeline's ``decode_latents``
    (image VAEs, `decode_chunk_size` frames per call), bit for bit. n: Wan 1 for the first latent
    frame and 4 (the temporal compression) for each later one; CogVideoX one decoder call's frames;
    image VAEs `decode_chunk_size`. See the module docstring for the chunking of each VAE."""
    if z.ndim != 5:
        raise ValueError(f"z: expected a latent video (B, C, F, h, w), got shape {tuple(z.shape)}")
    if z.shape[0] != 1:
        raise ValueError(f"z: streaming decodes one video at a time (batch 1), got a batch of {z.shape[0]}")
    if not isinstance(decode_chunk_size, int) or decode_chunk_size < 1:
        raise ValueError(f"decode_chunk_size must be a positive int, got {decode_chunk_size!r}")
    kind = vae_kind(vae)
    if kind == "wan":
        yield from _iter_wan(vae, z)
    elif kind == "cogvideox":
        yield from _iter_cogvideox(vae, z)
    else:
        yield from _iter_image(vae, z, decode_chunk_size)


def iter_frames(pipe, latents: torch.Tensor, num_frames: Optional[int] = None, decode_chunk_size: int = 16,
                output_type: str = "np") -> Iterator:
    """The pipeline's latents decoded and post-processed chunk by chunk, as the pipeline's
    ``video_processor.postprocess_video`` would return the whole video: per chunk, "np" float32
    (n, H, W, 3) in [0, 1] or "pt" (n, 3, H, W). `num_frames`: stop after that many frames (the
    padding frames of a causal VAE's 1 + t*k are dropped)."""
    if output_type not in ("np", "pt"):
        raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")
    left = None if num_frames is None else int(num_frames)
    for chunk in iter_decoded(pipe.vae, vae_latents(pipe, latents), decode_chunk_size):
        frames = pipe.video_processor.postprocess_video(chunk, output_type=output_type)[0]
        del chunk
        if left is not None:
            frames = frames[:left]
            left -= len(frames)
        if len(frames):
            yield frames
        if left is not None and left <= 0:
            return


def decode_to(pipe, latents: torch.Tensor, sink, num_frames: Optional[int] = None, decode_chunk_size: int = 16,
              keep: bool = False):
    """Decode the pipeline's `latents` chunk by chunk into `sink` (``write(frames)`` with float32
    (n, H, W, 3) frames in [0, 1], e.g. longvideo.video.VideoWriter), each chunk written before
    the next is decoded. Returns the number of frames written, or with ``keep=True`` also every
    frame as one float32 array (F, H, W, 3) (the caller then holds the whole video)."""
    written, kept = 0, []
    for frames in iter_frames(pipe, latents, num_frames, decode_chunk_size):
        if sink is not None:
            sink.write(frames)
        written += len(frames)
        if keep:
            kept.append(np.asarray(frames, dtype=np.float32))
        del frames
    if keep:
        return written, (np.concatenate(kept) if kept else np.zeros((0, 0, 0, 3), np.float32))
    return written


def decode_whole(pipe, latents: torch.Tensor, num_frames: Optional[int] = None, decode_chunk_size: int = 16,
                 output_type: str = "np"):
    """The whole video at once, through the streaming path: "np" float32 (F, H, W, 3) or "pt"
    (F, 3, H, W) -- what the pipeline's own decode and ``postprocess_video`` return for a batch
    of one, with the VAE's working memory of one chunk."""
    parts = list(iter_frames(pipe, latents, num_frames, decode_chunk_size, output_type))
    if output_type == "pt":
        return torch.cat(parts)
    return np.concatenate(parts).astype(np.float32)
