"""Wan pipelines: a built-in tiny random-weight model and local checkpoints.

``tiny_pipeline(kind)`` builds diffusers' `WanPipeline` ("t2v") or `WanVideoToVideoPipeline`
("v2v") from config with random weights, offline:

- `WanTransformer3DModel`: 4 layers, 2 heads of 32 channels (head dim 32 splits into Wan's RoPE
  parts as t/h/w = 12/10/10 channels), patch (1, 2, 2), RoPE tables for 1024 positions per axis
  (enough for any video the tiny model will see);
- `AutoencoderKLWan`: base width 8, z_dim 4, two down-sampling stages that compress space by 4
  and time by 4 (the real VAE compresses time by 4 too: 4k+1 frames -> k+1 latent frames);
- `UMT5EncoderModel` from a tiny `UMT5Config` (width 32, vocab 100) over the character
  tokenizer of ``longvideo.models.tokenizers``;
- `UniPCMultistepScheduler` with Wan's settings (flow prediction, flow sigmas, shift 3.0).

9 frames at 32x32 give 3 latent frames of 8x8 latents = 4x4 = 16 tokens each; two steps take
well under a second on a CPU. The videos are noise (random weights), but every code path of the
real pipelines runs.

The tiny pipeline records the latent length it is treated as "trained" on,
``pipe.longvideo_trained_latent_frames`` (= 3, i.e. 9 video frames): FreeLOC derives its
parameters from the trained length (21 latent frames = 81 video frames for the real Wan 2.1),
so on the tiny model it becomes active from 13 video frames on. ``pipe.longvideo_freeloc_layers``
is FreeLOC's default layer configuration for it (TSA on layers 0 and 2, VRPR on 1 and 3).

``from_pretrained(path, kind)`` loads a local diffusers Wan checkpoint folder.
"""
from __future__ import annotations

import os

import torch

KINDS = ("t2v", "v2v")

# Tiny sizes.
_TEXT_WIDTH = 32          # UMT5 d_model = transformer text_dim
_HEADS = 2
_HEAD_DIM = 32
_LAYERS = 4
_Z_DIM = 4
_TEXT_MAX_LENGTH = 512    # the Wan pipelines pad prompts to max_sequence_length (default 512)
TINY_TRAINED_LATENT_FRAMES = 3
# FreeLOC's default layer configuration for the tiny model (a demo, not a probing result): both
# kinds of layer, so `longvideo generate --method freeloc` exercises TSA and VRPR.
TINY_FREELOC_LAYERS = ("tsa", "vrpr", "tsa", "vrpr")
# Wan 2.1 / 2.2 were trained on 81-frame videos = 21 latent frames.
WAN_TRAINED_LATENT_FRAMES = 21


def _text_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    from .tokenizers import EOS_ID, PAD_ID, VOCAB_SIZE

    config = UMT5Config(vocab_size=VOCAB_SIZE, d_model=_TEXT_WIDTH, d_kv=16, d_ff=64, num_layers=2,
                        num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=PAD_ID,
                        eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID, is_encoder_decoder=False)
    return UMT5EncoderModel(config)


def _tiny_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=_HEADS, attention_head_dim=_HEAD_DIM, in_channels=_Z_DIM,
        out_channels=_Z_DIM, text_dim=_TEXT_WIDTH, freq_dim=32, ffn_dim=128, num_layers=_LAYERS,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def _tiny_vae():
    from diffusers import AutoencoderKLWan

    # len(dim_mult) - 1 = 2 down-sampling stages: space / 4; both also halve time: time / 4.
    # WanVideoToVideoPipeline reads the spatial factor as 2 ** len(temperal_downsample), WanPipeline
    # reads scale_factor_spatial: both are 4 here.
    return AutoencoderKLWan(base_dim=8, z_dim=_Z_DIM, dim_mult=[1, 1, 1], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[True, True], dropout=0.0,
                            latents_mean=[0.0] * _Z_DIM, latents_std=[1.0] * _Z_DIM,
                            scale_factor_temporal=4, scale_factor_spatial=4)


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    # The scheduler of the diffusers Wan 2.1 checkpoints (flow_shift 3.0: 480p; 5.0 for 720p).
    return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                   use_flow_sigmas=True, flow_shift=3.0, solver_order=2, solver_type="bh2",
                                   predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
                                   timestep_spacing="linspace")


def _check_kind(kind: str) -> str:
    kind = str(kind).lower()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def _pipeline_class(kind: str):
    from diffusers import WanPipeline, WanVideoToVideoPipeline

    return WanPipeline if kind == "t2v" else WanVideoToVideoPipeline


def _cast_transformer(transformer, dtype: torch.dtype) -> None:
    """Cast like ``from_pretrained(torch_dtype=...)`` does: the modules diffusers lists in
    ``_keep_in_fp32_modules`` (RoPE tables, time embedder, norms, modulation tables) stay float32,
    and the RoPE tables keep their float64 precision (a plain ``.to(dtype)`` would round them)."""
    keep = tuple(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    saved = {name: buf for name, buf in transformer.rope.named_buffers()}
    for name, param in transformer.named_parameters():
        if not any(part in keep for part in name.split(".")):
            param.data = param.data.to(dtype)
    for name, buf in saved.items():
        setattr(transformer.rope, name, buf)


def build_tiny_pipeline(pipeline_cls, make_transformer, make_scheduler, seed: int, dtype: torch.dtype):
    """A random-weight pipeline of the Wan family (Wan, SkyReels-V2): `make_transformer()`, the
    tiny Wan VAE and text encoder, built with weights that are a deterministic function of `seed`
    (the global RNG state is restored afterwards). With a `dtype` other than float32 the
    transformer (its fp32 modules kept) and text encoder are cast; the VAE stays float32, as Wan
    keeps it in practice."""
    from .tokenizers import char_tokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = make_transformer()
        vae = _tiny_vae()
        text_encoder = _text_encoder()
    pipe = pipeline_cls(tokenizer=char_tokenizer(_TEXT_MAX_LENGTH), text_encoder=text_encoder, vae=vae,
                        transformer=transformer, scheduler=make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        _cast_transformer(pipe.transformer, dtype)
        pipe.text_encoder.to(dtype=dtype)
    pipe.longvideo_trained_latent_frames = TINY_TRAINED_LATENT_FRAMES
    return pipe


def tiny_pipeline(kind: str = "t2v", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight Wan pipeline, text-to-video (``"t2v"``) or video-to-video (``"v2v"``).

    The weights are a deterministic function of `seed` (the same for both kinds); the global RNG
    state is restored afterwards. Heights and widths must be multiples of 16 (the pipelines'
    check); frame counts 4k+1.
    """
    pipe = build_tiny_pipeline(_pipeline_class(_check_kind(kind)), _tiny_transformer, _scheduler, seed, dtype)
    pipe.longvideo_freeloc_layers = list(TINY_FREELOC_LAYERS)
    return pipe


def from_pretrained(path, kind: str = "t2v", dtype: torch.dtype = torch.bfloat16):
    """Load a local diffusers Wan checkpoint folder (``model_index.json``; e.g. Wan2.1-T2V-1.3B-Diffusers).

    ``kind`` picks `WanPipeline` ("t2v") or `WanVideoToVideoPipeline` ("v2v"); both load the
    same folder. The VAE is loaded in float32 (as diffusers' Wan examples do), the rest in
    `dtype`. Nothing is downloaded (``local_files_only=True``).
    """
    kind = _check_kind(kind)
    path = _checkpoint_dir(path)
    pipe = _load_with_float32_vae(_pipeline_class(kind), path, dtype, f"Wan checkpoint {path!r} as {kind}")
    pipe.longvideo_trained_latent_frames = WAN_TRAINED_LATENT_FRAMES
    return pipe


def _checkpoint_dir(path) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} is not a local diffusers checkpoint folder")
    return path


def _read_model_index(path: str):
    """The parsed model_index.json of checkpoint folder `path` (whatever JSON it holds); a
    RuntimeError naming the folder when it cannot be read or parsed."""
    import json

    try:
        with open(os.path.join(path, "model_index.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"could not read {path!r}/model_index.json: {exc}") from exc


def _load_with_float32_vae(cls, path: str, dtype: torch.dtype, what: str):
    """`cls.from_pretrained(path)` offline in `dtype`, with the Wan VAE (when the folder has one) in
    float32; any failure is a RuntimeError naming `what`. Shared by the Wan-VAE families."""
    from diffusers import AutoencoderKLWan

    try:
        kwargs = {}
        if os.path.isdir(os.path.join(path, "vae")):
            kwargs["vae"] = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32,
                                                             local_files_only=True)
        return cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **kwargs)
    except Exception as exc:
        raise RuntimeError(f"could not load {what}: {exc}") from exc
