"""Stable Diffusion 1.5 and SDXL pipelines: built-in tiny random-weight models and local checkpoints.

``tiny_pipeline(kind)`` builds a `StableDiffusionPipeline` ("sd15", alias "t2i") or a
`StableDiffusionXLPipeline` ("sdxl") from config with random weights, offline: a small
UNet2DConditionModel whose up blocks carry self-attention (``attn1``) at two resolutions (the
layers StoryDiffusion patches), a small AutoencoderKL, CLIP text encoders from a tiny
CLIPTextConfig (vocab 100, the character tokenizer of ``longvideo.models.tokenizers``), a DDIM
scheduler with SD's noise schedule, and no safety checker. Two steps at 64x64 take well under a
second on a CPU. The images are noise-like (random weights) but every code path of the real
pipelines runs, which is what tests, demos and CI need.

``from_pretrained(path, kind)`` loads a local diffusers checkpoint folder, or a single-file
``.safetensors``/``.ckpt`` checkpoint through ``from_single_file``.
"""
from __future__ import annotations

import os

import torch

KINDS = ("sd15", "sdxl")
_ALIASES = {"t2i": "sd15", "sd": "sd15", "sd1.5": "sd15", "sd15": "sd15", "sdxl": "sdxl", "xl": "sdxl"}

# Tiny sizes: width 32 text encoders; UNet channels (32, 64, 64) with head dim 16 (2 / 4 heads),
# cross-attention in the two deeper down blocks and the two shallower-in-order up blocks, so the
# up blocks hold self-attention at two resolutions (latent/4 and latent/2 tokens per side).
_TEXT_WIDTH = 32
_UNET_CHANNELS = (32, 64, 64)
_HEAD_DIM = 16


def canonical_kind(kind: str) -> str:
    try:
        return _ALIASES[str(kind).lower()]
    except KeyError:
        raise ValueError(f"kind must be one of {KINDS} (or 't2i' for sd15), got {kind!r}") from None


def _text_config(projection_dim=None):
    from transformers import CLIPTextConfig

    from .tokenizers import EOS_ID, PAD_ID, VOCAB_SIZE

    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=_TEXT_WIDTH, intermediate_size=2 * _TEXT_WIDTH,
              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
              bos_token_id=2, eos_token_id=EOS_ID, pad_token_id=PAD_ID, hidden_act="gelu")
    if projection_dim is not None:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def _tiny_unet(sdxl: bool):
    from diffusers import UNet2DConditionModel

    kw = {}
    if sdxl:
        # SDXL conditioning: cross-attention over the concatenated hidden states of both text
        # encoders, and the "text_time" added embedding (pooled text embeds + 6 size/crop ids).
        time_dim = 8
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                  projection_class_embeddings_input_dim=_TEXT_WIDTH + 6 * time_dim,
                  cross_attention_dim=2 * _TEXT_WIDTH, use_linear_projection=True,
                  transformer_layers_per_block=(1, 1, 2))
    else:
        kw.update(cross_attention_dim=_TEXT_WIDTH)
    heads = tuple(c // _HEAD_DIM for c in _UNET_CHANNELS)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=_UNET_CHANNELS, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads.
        attention_head_dim=heads, **kw)


def _tiny_vae():
    from diffusers import AutoencoderKL

    # Three blocks: latents at 1/4 of the image side (a 64x64 image -> 16x16 latents).
    return AutoencoderKL(block_out_channels=(16, 32, 32), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=64)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1)


def tiny_pipeline(kind: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight SD1.5 (``"sd15"``, alias ``"t2i"``) or SDXL (``"sdxl"``) pipeline built offline.

    The weights are a deterministic function of `seed`. The global RNG state is restored afterwards.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizers import char_tokenizer

    kind = canonical_kind(kind)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(kind == "sdxl")
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(_text_config())
        if kind == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=_TEXT_WIDTH))
    if kind == "sd15":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=char_tokenizer(77), unet=unet,
                                       scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                       image_encoder=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=char_tokenizer(77), tokenizer_2=char_tokenizer(77), unet=unet,
                                         scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
                                         add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def from_pretrained(path, kind: str = "sdxl", dtype: torch.dtype = torch.float16):
    """Load a local SD1.5 / SDXL checkpoint (diffusers folder, or a single ``.safetensors``/``.ckpt`` file).

    ``kind`` picks the pipeline class ("sd15" or "sdxl"); for a diffusers folder whose
    ``model_index.json`` names the class, that class wins. Nothing is downloaded
    (``local_files_only=True``); a single-file checkpoint needs its config available offline
    (diffusers' cached configs), otherwise the error says so.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kind = canonical_kind(kind)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"model path {path!r} does not exist (only local checkpoints can be loaded)")
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    if os.path.isfile(path):
        if not path.endswith((".safetensors", ".ckpt")):
            raise ValueError(f"model file {path!r} must be a .safetensors or .ckpt single-file checkpoint")
        try:
            pipe = cls.from_single_file(path, torch_dtype=dtype, local_files_only=True)
        except Exception as exc:
            raise RuntimeError(f"could not load single-file checkpoint {path!r} as {kind}: {exc}") from exc
    else:
        index = os.path.join(path, "model_index.json")
        if os.path.isfile(index):
            import json

            name = json.load(open(index)).get("_class_name", "")
            if "XL" in name:
                cls = StableDiffusionXLPipeline
            elif name == "StableDiffusionPipeline":
                cls = StableDiffusionPipeline
        kw = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
        pipe = cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **kw)
    return pipe
