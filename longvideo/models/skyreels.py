"""SkyReels-V2 pipelines: a built-in tiny random-weight model and local checkpoints.

SkyReels-V2 is a Wan 2.1 architecture (same transformer layout, same VAE, UMT5 text encoder)
trained with diffusion forcing: its transformer, `SkyReelsV2Transformer3DModel`, takes one
timestep per latent frame (``timestep`` (B, F) with ``enable_diffusion_forcing=True``).

``tiny_pipeline(kind)`` builds diffusers' `SkyReelsV2DiffusionForcingPipeline` ("t2v") or
`SkyReelsV2DiffusionForcingVideoToVideoPipeline` ("v2v") from config with random weights, offline:

- `SkyReelsV2Transformer3DModel` with the tiny Wan transformer's sizes (4 layers, 2 heads of 32
  channels, patch (1, 2, 2), text width 32) and, like SkyReels-V2-DF-1.3B,
  ``inject_sample_info=True`` (an fps embedding added to the modulation) and
  ``num_frame_per_block=1`` (full attention; the DF pipelines switch to block-causal attention
  only when asked for a causal block size);
- the tiny Wan VAE, UMT5 text encoder and character tokenizer of ``longvideo.models.wan``;
- `UniPCMultistepScheduler` with Wan's flow-prediction settings and SkyReels-V2's text-to-video
  flow shift 8.0.

The pipelines record ``pipe.longvideo_trained_latent_frames``, the clip length the model is
treated as trained on (FIFO's default window): 3 latent frames (9 video frames) for the tiny
model; 25 (97 video frames, the DF pipelines' ``base_num_frames``) for SkyReels-V2 540P checkpoints.

``from_pretrained(path, kind)`` loads a local diffusers SkyReels-V2 checkpoint folder.
"""
from __future__ import annotations

import json
import os

import torch

from . import wan

KINDS = ("t2v", "v2v")

# SkyReels-V2 540P DF checkpoints generate 97-frame base clips = 25 latent frames.
SKYREELS_TRAINED_LATENT_FRAMES = 25
# The flow shift of SkyReels-V2's text-to-video examples (5.0 for image-to-video).
FLOW_SHIFT = 8.0
# Text-to-video pipeline classes of a checkpoint folder that FIFO can use as they are.
_T2V_CLASSES = ("SkyReelsV2DiffusionForcingPipeline", "SkyReelsV2Pipeline")


def _tiny_transformer():
    from diffusers import SkyReelsV2Transformer3DModel

    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=wan._HEADS, attention_head_dim=wan._HEAD_DIM,
        in_channels=wan._Z_DIM, out_channels=wan._Z_DIM, text_dim=wan._TEXT_WIDTH, freq_dim=32, ffn_dim=128,
        num_layers=wan._LAYERS, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=1024, inject_sample_info=True, num_frame_per_block=1)


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(wan._scheduler().config, flow_shift=FLOW_SHIFT)


def _check_kind(kind: str) -> str:
    kind = str(kind).lower()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def _pipeline_class(kind: str, name: str = ""):
    import diffusers

    if kind == "v2v":
        return diffusers.SkyReelsV2DiffusionForcingVideoToVideoPipeline
    return getattr(diffusers, name if name in _T2V_CLASSES else _T2V_CLASSES[0])


def tiny_pipeline(kind: str = "t2v", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight SkyReels-V2 diffusion-forcing pipeline, text-to-video (``"t2v"``) or
    video-to-video (``"v2v"``).

    The weights are a deterministic function of `seed` (the same for both kinds); the global RNG
    state is restored afterwards. Heights and widths must be multiples of 16; frame counts 4k+1.
    """
    return wan.build_tiny_pipeline(_pipeline_class(_check_kind(kind)), _tiny_transformer, _scheduler, seed, dtype)


def from_pretrained(path, kind: str = "t2v", dtype: torch.dtype = torch.bfloat16):
    """Load a local diffusers SkyReels-V2 checkpoint folder (``model_index.json``; e.g.
    SkyReels-V2-DF-1.3B-540P-Diffusers).

    ``kind="t2v"`` uses the folder's own pipeline class when it is a text-to-video one
    (`SkyReelsV2DiffusionForcingPipeline` or `SkyReelsV2Pipeline`), else the diffusion-forcing
    pipeline; ``"v2v"`` uses `SkyReelsV2DiffusionForcingVideoToVideoPipeline`. The VAE is loaded in
    float32 (as for Wan), the rest in `dtype`. Nothing is downloaded (``local_files_only=True``).
    """
    kind = _check_kind(kind)
    path = wan._checkpoint_dir(path)
    try:
        with open(os.path.join(path, "model_index.json")) as fh:
            name = json.load(fh).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise ValueError(f"model path {path!r}: no readable model_index.json ({exc})") from exc
    if not name.startswith("SkyReelsV2"):
        raise ValueError(f"model path {path!r} holds a {name!r} pipeline, not a SkyReels-V2 one")
    pipe = wan._load_with_float32_vae(_pipeline_class(kind, name), path, dtype,
                                      f"SkyReels-V2 checkpoint {path!r} as {kind}")
    pipe.longvideo_trained_latent_frames = SKYREELS_TRAINED_LATENT_FRAMES
    return pipe
