"""Wan 2.2 TI2V-5B-shaped pipelines: the 4x16x16 VAE and per-token timesteps.

Wan2.2-TI2V-5B is one transformer (no second expert) that does both text-to-video and
image-to-video. What sets it apart from Wan 2.1 (numbers from its diffusers-format configs,
Wan-AI/Wan2.2-TI2V-5B-Diffusers, and the official ``wan_ti2v_5B`` config):

- The VAE (`AutoencoderKLWan` with ``is_residual=True``, ``z_dim=48``, ``patch_size=2``,
  ``in_channels = out_channels = 12``, ``scale_factor_spatial=16``, ``scale_factor_temporal=4``):
  the video is first patchified 2x2 in space (3 channels -> 12), then a residual encoder with
  three spatial down-samplings (8x) and two temporal ones (4x, causal: 4k+1 frames -> k+1 latent
  frames) gives 48 latent channels. In all 4x16x16 (time x height x width), against Wan 2.1's
  4x8x8 with 16 channels. With the transformer's (1, 2, 2) patches one token covers 32x32
  pixels, so heights and widths are multiples of 32.
- The pipeline config's ``expand_timesteps=True``: diffusers' `WanPipeline` hands the
  transformer a timestep per latent token, shape (B, F * h/2 * w/2), from a mask over the
  latents; for text-to-video every token carries the step's t. `WanImageToVideoPipeline` with
  ``expand_timesteps`` (the TI2V model's image mode, no image encoder, no extra input channels)
  encodes the image alone as latent frame 0, puts it in place of the noisy frame 0 at every step
  and gives frame 0's tokens t = 0 (the mask is 0 there, 1 elsewhere); the result's frame 0 is
  the image's latents.
- 121 frames at 24 fps, 704 x 1280, flow shift 5.0 (the official sample config): trained on 31
  latent frames.

``tiny_pipeline(kind)`` builds that pipeline with random weights from config, offline: "t2v"
gives `WanPipeline(expand_timesteps=True)`, "i2v" `WanImageToVideoPipeline(expand_timesteps=True)`
with the same weights. Sizes: the tiny Wan 2.1 transformer (4 layers, 2 heads of 32 channels,
patch (1, 2, 2)) with 48 input / output channels; a VAE of the real one's shape (residual
blocks, patch 2, 48 latent channels, three spatial and two temporal down-samplings: 4x16x16)
with base width 8 and one residual block per stage; the tiny UMT5 encoder and character
tokenizer. 9 frames at 64 x 64 give 3 latent frames of 4 x 4 = 2 x 2 = 4 tokens each.

``from_pretrained(path, kind)`` loads a local diffusers Wan2.2-TI2V-5B checkpoint folder
(``model_index.json`` with ``expand_timesteps`` true); both kinds load the same folder.
"""
from __future__ import annotations

import torch

from . import wan

KINDS = ("t2v", "i2v")
Z_DIM = 48                      # the Wan 2.2 VAE's latent channels (the tiny model keeps them)
TRAINED_LATENT_FRAMES = 31      # 121 frames: the official sample length
FPS = 24                        # the official sample_fps
FLOW_SHIFT = 5.0                # the official sample_shift
FULL_SIZE = (704, 1280)         # (height, width): the model's 720p size
TINY_SIZE = (64, 64)            # the tiny model's default: 4 x 4 latents, 2 x 2 tokens per frame


def _check_kind(kind: str) -> str:
    kind = str(kind).lower()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} for Wan 2.2 TI2V pipelines, got {kind!r}")
    return kind


def _tiny_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=wan._HEADS, attention_head_dim=wan._HEAD_DIM, in_channels=Z_DIM,
        out_channels=Z_DIM, text_dim=wan._TEXT_WIDTH, freq_dim=32, ffn_dim=128, num_layers=wan._LAYERS,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def tiny_vae():
    """A random-weight `AutoencoderKLWan` shaped like Wan 2.2's (module docstring): 4x16x16."""
    from diffusers import AutoencoderKLWan

    # dim_mult of length 4: three spatial down-samplings (8x); temperal_downsample as the real VAE
    # (the last two stages halve time: 4x); patch_size 2 folds 2x2 pixels into 12 channels first.
    return AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, is_residual=True,
                            in_channels=12, out_channels=12, patch_size=2, latents_mean=[0.0] * Z_DIM,
                            latents_std=[1.0] * Z_DIM, scale_factor_spatial=16, scale_factor_temporal=4)


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                   use_flow_sigmas=True, flow_shift=FLOW_SHIFT, solver_order=2, solver_type="bh2",
                                   predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
                                   timestep_spacing="linspace")


def _pipeline_class(kind: str):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    return WanPipeline if kind == "t2v" else WanImageToVideoPipeline


def tiny_pipeline(kind: str = "t2v", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight Wan 2.2 TI2V pipeline: ``"t2v"`` (`WanPipeline`) or ``"i2v"``
    (`WanImageToVideoPipeline`), both with ``expand_timesteps=True`` and the same weights for one
    `seed` (the global RNG state is restored afterwards). Heights and widths: multiples of 32;
    frame counts 4k+1. ``pipe.longvideo_trained_latent_frames`` is 3 (9 frames), as the other
    tiny models."""
    from .tokenizers import char_tokenizer

    kind = _check_kind(kind)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _tiny_transformer()
        vae = tiny_vae()
        text_encoder = wan._text_encoder()
    pipe = _pipeline_class(kind)(tokenizer=char_tokenizer(wan._TEXT_MAX_LENGTH), text_encoder=text_encoder, vae=vae,
                                 transformer=transformer, scheduler=_scheduler(), expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        wan._cast_transformer(pipe.transformer, dtype)
        pipe.text_encoder.to(dtype=dtype)
    pipe.longvideo_trained_latent_frames = wan.TINY_TRAINED_LATENT_FRAMES
    pipe.longvideo_freeloc_layers = list(wan.TINY_FREELOC_LAYERS)
    return pipe


def is_ti2v_index(index: dict) -> bool:
    """Whether a parsed model_index.json describes a Wan 2.2 TI2V pipeline: a Wan pipeline class
    with ``expand_timesteps`` true (one timestep per token)."""
    return str(index.get("_class_name") or "").startswith("Wan") and bool(index.get("expand_timesteps"))


def is_ti2v_pipeline(pipe) -> bool:
    """Whether a loaded pipeline runs the TI2V way (its config's ``expand_timesteps`` is true)."""
    config = getattr(pipe, "config", None)
    return bool(getattr(config, "expand_timesteps", False)) if config is not None else False


def from_pretrained(path, kind: str = "t2v", dtype: torch.dtype = torch.bfloat16):
    """Load a local diffusers Wan 2.2 TI2V checkpoint folder (e.g. Wan2.2-TI2V-5B-Diffusers) as
    `WanPipeline` ("t2v") or `WanImageToVideoPipeline` ("i2v"), both with the folder's
    ``expand_timesteps``; the VAE in float32, the rest in `dtype`; nothing is downloaded.
    ValueError if the folder's model_index.json does not have ``expand_timesteps`` true."""
    kind = _check_kind(kind)
    path = wan._checkpoint_dir(path)
    index = wan._read_model_index(path)
    if not isinstance(index, dict) or not is_ti2v_index(index):
        raise ValueError(f"model path {path!r} is not a Wan 2.2 TI2V checkpoint (model_index.json needs a Wan "
                         "pipeline with expand_timesteps true)")
    cls = _pipeline_class(kind)
    pipe = wan._load_with_float32_vae(cls, path, dtype, f"Wan 2.2 TI2V checkpoint {path!r} as {kind}")
    if not is_ti2v_pipeline(pipe):  # an i2v load of a folder saved by WanPipeline keeps the index's value
        pipe.register_to_config(expand_timesteps=True)
    pipe.longvideo_trained_latent_frames = TRAINED_LATENT_FRAMES
    return pipe
