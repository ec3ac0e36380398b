"""AnimateDiff pipelines: a built-in tiny random-weight model and local checkpoints.

``tiny_pipeline(kind)`` builds diffusers' `AnimateDiffPipeline` ("t2v") or
`AnimateDiffVideoToVideoPipeline` ("v2v") from config with random weights, offline: a small
UNet2DConditionModel plus a MotionAdapter (the pipeline turns the pair into a `UNetMotionModel`,
exactly as it does with real SD1.5 + motion-module weights), a small AutoencoderKL, a CLIP text
encoder from a tiny CLIPTextConfig over the character tokenizer of ``longvideo.models.tokenizers``
(vocab 100), and a DDIM scheduler with AnimateDiff's usual settings (linear betas, steps_offset 1,
no clipping). Two steps of 8 frames at 32x32 take about a second on a CPU. The videos are noise
(random weights), but every code path of the real pipelines runs, FreeInit included.

``from_pretrained(path, kind)`` loads a local diffusers AnimateDiff checkpoint folder.
"""
from __future__ import annotations

import os

import torch

KINDS = ("t2v", "v2v")
TINY_TRAINED_FRAMES = 4
TINY_MOTION_MAX_SEQ_LENGTH = 32  # rows of the motion modules' positional embedding: the longest clip

# Tiny sizes. Text width 32 = cross_attention_dim. UNet channels (32, 64) with 2 / 4 heads of 16
# channels (diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads; the
# motion UNet built from it keeps that). Motion modules: 2 heads (16 / 32 channels per head).
# Two VAE blocks: latents at 1/2 of the image side (32x32 frames -> 16x16 latents).
_TEXT_WIDTH = 32
_UNET_CHANNELS = (32, 64)
_HEAD_DIM = 16
_GROUPS = 8


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizers import EOS_ID, PAD_ID, VOCAB_SIZE

    config = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=_TEXT_WIDTH, intermediate_size=2 * _TEXT_WIDTH,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=2, eos_token_id=EOS_ID, pad_token_id=PAD_ID, hidden_act="gelu")
    return CLIPTextModel(config)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    heads = tuple(c // _HEAD_DIM for c in _UNET_CHANNELS)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=_UNET_CHANNELS, norm_num_groups=_GROUPS, cross_attention_dim=_TEXT_WIDTH,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=heads)


def _tiny_motion_adapter():
    from diffusers import MotionAdapter

    return MotionAdapter(block_out_channels=_UNET_CHANNELS, motion_layers_per_block=1,
                         motion_mid_block_layers_per_block=1, motion_num_attention_heads=2,
                         motion_norm_num_groups=_GROUPS, motion_max_seq_length=TINY_MOTION_MAX_SEQ_LENGTH,
                         use_motion_mid_block=True)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, norm_num_groups=_GROUPS, layers_per_block=1, sample_size=32)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="linspace")


def _check_kind(kind: str) -> str:
    kind = str(kind).lower()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def tiny_pipeline(kind: str = "t2v", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight AnimateDiff pipeline, text-to-video (``"t2v"``) or video-to-video (``"v2v"``).

    The weights are a deterministic function of `seed` (the same for both kinds); the global RNG
    state is restored afterwards.
    """
    from diffusers import AnimateDiffPipeline, AnimateDiffVideoToVideoPipeline
    from diffusers.utils import logging as diffusers_logging

    from .tokenizers import char_tokenizer

    kind = _check_kind(kind)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet()
        motion_adapter = _tiny_motion_adapter()
        vae = _tiny_vae()
        text_encoder = _text_encoder()
    cls = AnimateDiffPipeline if kind == "t2v" else AnimateDiffVideoToVideoPipeline
    # The pipeline's constructor merges unet + motion_adapter into a UNetMotionModel; it and the
    # dtype cast log a warning about "modules to keep in float32" (there are none here): muted.
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=char_tokenizer(77), unet=unet,
                   motion_adapter=motion_adapter, scheduler=_scheduler(), feature_extractor=None, image_encoder=None)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    # The clip length the methods treat as "trained" (FIFO's default window): 4 frames, so that the
    # tiny demo's queue is small; real AnimateDiff checkpoints use 16.
    pipe.longvideo_trained_latent_frames = TINY_TRAINED_FRAMES
    return pipe


def from_pretrained(path, kind: str = "t2v", dtype: torch.dtype = torch.float16):
    """Load a local diffusers AnimateDiff checkpoint folder (``model_index.json`` with a motion UNet).

    ``kind`` picks `AnimateDiffPipeline` ("t2v") or `AnimateDiffVideoToVideoPipeline` ("v2v");
    both load the same folder. Nothing is downloaded (``local_files_only=True``).
    """
    from diffusers import AnimateDiffPipeline, AnimateDiffVideoToVideoPipeline

    kind = _check_kind(kind)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} is not a local diffusers checkpoint folder")
    cls = AnimateDiffPipeline if kind == "t2v" else AnimateDiffVideoToVideoPipeline
    try:
        pipe = cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise RuntimeError(f"could not load AnimateDiff checkpoint {path!r} as {kind}: {exc}") from exc
    return pipe
