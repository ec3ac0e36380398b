"""Wan 2.1 image-to-video pipelines: a built-in tiny random-weight model and local checkpoints.

``tiny_pipeline("i2v")`` builds diffusers' `WanImageToVideoPipeline` from config with random
weights, offline. It is the tiny Wan 2.1 model of ``longvideo.models.wan`` (same VAE, text
encoder, scheduler, 4 layers of 2 heads x 32 channels, patch (1, 2, 2)) with Wan 2.1 I2V's
image conditioning:

- the transformer takes ``in_channels = 2 z + 4`` (12; the real 14B models: 36 = 16 + 4 + 16):
  the noisy latents, 4 mask channels (one per video frame a latent frame holds: the VAE
  compresses time by 4) and the VAE latents of the conditioning video (the image followed by
  zero frames), concatenated on the channel axis by the pipeline;
- ``image_dim`` (the CLIP image features' width) and ``added_kv_proj_dim`` (= the transformer
  width): the time/text embedder gets an image embedder, and every cross-attention layer has extra
  key/value projections ``add_k_proj`` / ``add_v_proj`` (plus ``norm_added_k``) for the image
  tokens, which diffusers' processor splits off the front of the cross-attention context;
- a tiny `CLIPVisionModel` (2 layers, width 16, 32x32 images in 8x8 patches: 17 tokens; the real
  ViT-H/14 gives 257 tokens of 1280) and its `CLIPImageProcessor` (resize and centre-crop to 32,
  CLIP's normalisation); the pipeline feeds the transformer the encoder's penultimate hidden
  states.

``from_pretrained(path)`` loads a local diffusers Wan 2.1 I2V checkpoint folder (e.g.
Wan2.1-I2V-14B-480P-Diffusers), its image encoder in float32 as diffusers' example does.
"""
from __future__ import annotations

import torch

from . import wan

KINDS = ("i2v",)

_CLIP_WIDTH = 16
_CLIP_IMAGE = 32
_CLIP_PATCH = 8
# Wan 2.1 I2V's checkpoints were trained on 81-frame clips too (21 latent frames)
WAN_I2V_TRAINED_LATENT_FRAMES = wan.WAN_TRAINED_LATENT_FRAMES


def check_kind(kind: str, family: str = "Wan image-to-video") -> str:
    kind = str(kind).lower()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} for {family} pipelines, got {kind!r}")
    return kind


def image_transformer(image_dim=None):
    """A tiny Wan transformer taking the I2V input (latents + mask + condition latents: 2 z + 4
    channels); with `image_dim` it also takes CLIP image features of that width (Wan 2.1 I2V),
    without it none (Wan 2.2 A14B I2V). Random weights from the global RNG."""
    from diffusers import WanTransformer3DModel

    added = wan._HEADS * wan._HEAD_DIM if image_dim is not None else None
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=wan._HEADS, attention_head_dim=wan._HEAD_DIM,
        in_channels=2 * wan._Z_DIM + 4, out_channels=wan._Z_DIM, text_dim=wan._TEXT_WIDTH, freq_dim=32, ffn_dim=128,
        num_layers=wan._LAYERS, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        image_dim=image_dim, added_kv_proj_dim=added, rope_max_seq_len=1024)


def _image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=_CLIP_WIDTH, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, image_size=_CLIP_IMAGE, patch_size=_CLIP_PATCH, projection_dim=16)
    return CLIPVisionModel(config)


def _image_processor():
    try:  # transformers without torchvision: the PIL backend under its own name (same computation)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    return Processor(size={"shortest_edge": _CLIP_IMAGE}, crop_size={"height": _CLIP_IMAGE, "width": _CLIP_IMAGE})


def tiny_pipeline(kind: str = "i2v", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight Wan 2.1 image-to-video pipeline (module docstring). The transformer and
    the VAE / text encoder are drawn as in ``wan.tiny_pipeline(seed=seed)`` (the transformer has
    other shapes, so other weights); the image encoder from seed + 2. Deterministic in `seed`; the
    global RNG state is restored. The image encoder stays float32."""
    from diffusers import WanImageToVideoPipeline

    check_kind(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        encoder = _image_encoder()

    def make(**components):
        return WanImageToVideoPipeline(**components, image_encoder=encoder, image_processor=_image_processor())

    pipe = wan.build_tiny_pipeline(make, lambda: image_transformer(_CLIP_WIDTH), wan._scheduler, seed, dtype)
    pipe.longvideo_freeloc_layers = list(wan.TINY_FREELOC_LAYERS)
    return pipe


def from_pretrained(path, kind: str = "i2v", dtype: torch.dtype = torch.bfloat16):
    """Load a local diffusers Wan 2.1 I2V checkpoint folder (``WanImageToVideoPipeline`` with an
    ``image_encoder``): the VAE and the image encoder in float32, the rest in `dtype`; nothing is
    downloaded."""
    check_kind(kind)
    path = wan._checkpoint_dir(path)
    from diffusers import WanImageToVideoPipeline

    pipe = load_i2v(WanImageToVideoPipeline, path, dtype, f"Wan 2.1 I2V checkpoint {path!r}")
    pipe.longvideo_trained_latent_frames = WAN_I2V_TRAINED_LATENT_FRAMES
    return pipe


def load_i2v(cls, path: str, dtype: torch.dtype, what: str):
    """`cls.from_pretrained(path)` offline with the VAE and, where the folder has one, the CLIP
    image encoder in float32 (diffusers' Wan I2V example); RuntimeError naming `what` on failure."""
    import os

    image_encoder = None
    if os.path.isdir(os.path.join(path, "image_encoder")):
        try:
            from transformers import CLIPVisionModel

            image_encoder = CLIPVisionModel.from_pretrained(path, subfolder="image_encoder", torch_dtype=torch.float32,
                                                            local_files_only=True)
        except Exception as exc:
            raise RuntimeError(f"could not load the image encoder of {what}: {exc}") from exc

    if image_encoder is None:
        return wan._load_with_float32_vae(cls, path, dtype, what)
    loader = _partial_loader(cls, image_encoder)
    return wan._load_with_float32_vae(loader, path, dtype, what)


def _partial_loader(cls, image_encoder):
    """An object whose ``from_pretrained(path, **kw)`` is ``cls.from_pretrained(path,
    image_encoder=image_encoder, **kw)``."""

    class Loader:
        @staticmethod
        def from_pretrained(path, **kwargs):
            return cls.from_pretrained(path, image_encoder=image_encoder, **kwargs)

    return Loader
