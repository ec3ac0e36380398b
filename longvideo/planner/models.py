"""Model descriptions for the planner: known public configs and local checkpoint folders.

A :class:`ModelSpec` is what the planner needs to know about a pipeline: its family, and for each
component the class and the ``config.json`` it would be built from -- never weights. Parameter
counts come from building the component from its config on the ``meta`` device (no memory, no
initialisation), so they are exact for any config; weight bytes follow the dtype rules the
loaders apply (``weight_bytes``).

Known configs (``KNOWN_MODELS``), written from the public diffusers-format repositories; each
entry names its source. Where a value is not used by the planner (latents_mean/std, scheduler
settings, tokenizers) it is left out.

* Wan2.1 T2V 1.3B / 14B -- Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan-AI/Wan2.1-T2V-14B-Diffusers:
  ``transformer/config.json`` (WanTransformer3DModel: 12 / 40 heads of 128, ffn 8960 / 13824,
  30 / 40 layers, patch (1, 2, 2), text_dim 4096, freq_dim 256, in/out 16), ``vae/config.json``
  (AutoencoderKLWan: base_dim 96, z_dim 16, dim_mult [1, 2, 4, 4], 2 res blocks, temporal
  downsample [F, T, T]), ``text_encoder/config.json`` (google/umt5-xxl's encoder: d_model 4096,
  d_ff 10240, 64 heads of 64, 24 layers, vocab 256384, gated-gelu). The same numbers are in
  this repository's benchmark shapes (benchmarks/bench_freeloc.py ``WAN_1_3B``).
* Wan2.2 T2V A14B -- Wan-AI/Wan2.2-T2V-A14B-Diffusers: two 14B-shaped experts ``transformer``
  (high noise) and ``transformer_2`` (low noise), ``boundary_ratio`` 0.875 in model_index.json;
  the Wan2.1 VAE and UMT5-XXL.
* Wan2.1 I2V 14B 480P / 720P -- Wan-AI/Wan2.1-I2V-14B-480P-Diffusers, ...-720P-Diffusers
  (WanImageToVideoPipeline): the 14B transformer with in_channels 36 (latents 16 + mask 4 +
  condition latents 16), out 16, image_dim 1280 and added_kv_proj_dim 5120 (diffusers'
  scripts/convert_wan_to_diffusers.py), the CLIP ViT-H/14 vision encoder (1280 wide, 32 layers,
  16 heads, MLP 5120, 224 px / 14 px patches: 257 tokens) loaded in float32, the Wan2.1 VAE and
  UMT5-XXL.
* Wan2.2 I2V A14B -- Wan-AI/Wan2.2-I2V-A14B-Diffusers: two experts shaped as the 14B I2V
  transformer without image_dim (no image encoder), ``boundary_ratio`` 0.9.
* Wan2.2 TI2V 5B -- Wan-AI/Wan2.2-TI2V-5B-Diffusers: transformer 24 heads of 128 (dim 3072),
  ffn 14336, 30 layers, in/out 48 channels; ``expand_timesteps`` true (one timestep per token,
  hence per-token modulation); the Wan2.2 VAE (AutoencoderKLWan base_dim 160, decoder_base_dim
  256, z_dim 48, is_residual, patch_size 2, in/out 12 channels: 16x spatial, 4x temporal).
* SkyReels-V2 DF 1.3B / 14B 540P -- Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers, ...-14B-540P-
  Diffusers: SkyReelsV2Transformer3DModel with the Wan 1.3B / 14B sizes (the 1.3B with
  ``inject_sample_info``, an fps embedding), the Wan2.1 VAE and UMT5-XXL; trained on 97-frame
  clips (25 latent frames) at 544x960 (longvideo.models.skyreels).
* SD1.5 -- stable-diffusion-v1-5/stable-diffusion-v1-5 (UNet2DConditionModel 320/640/1280/1280,
  8 heads, cross-attention 768; AutoencoderKL 128/256/512/512; CLIP ViT-L/14 text encoder:
  768 wide, 12 layers, 77 tokens). The safety checker is not loaded by longvideo.
* SDXL -- stabilityai/stable-diffusion-xl-base-1.0 (UNet 320/640/1280, heads 5/10/20 of 64,
  transformer layers 1/2/10, cross-attention 2048, text_time embedding; the same KL VAE with
  sample_size 1024 and force_upcast; CLIP-L and OpenCLIP bigG (1280 wide, 32 layers, projection
  1280) text encoders). Same UNet as benchmarks/bench_storydiffusion.py ``sdxl_unet_config``.
* AnimateDiff -- SD1.5 above plus guoyww/animatediff-motion-adapter-v1-5-2 (MotionAdapter:
  block_out_channels 320/640/1280/1280, 2 motion layers per block, 1 in the mid block, 8 heads,
  32 groups, max sequence 32), merged into a UNetMotionModel as AnimateDiffPipeline does; the
  pipeline also keeps the adapter itself (a second copy of the motion weights on the device).
"""
from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["ModelSpec", "ComponentSpec", "KNOWN_MODELS", "load_model_spec", "known_model_names"]


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    library: str          # "diffusers" or "transformers"
    class_name: str
    config: dict = field(hash=False, compare=False)


@dataclass
class ModelSpec:
    """What the planner knows about one pipeline (see the module docstring).

    family: "wan", "skyreels", "animatediff", "sd15" or "sdxl". trained_latent_frames: the clip
    length FIFO's default window is (21 for Wan, 25 for SkyReels-V2 540P, 16 for AnimateDiff).
    """

    name: str
    family: str
    pipeline_class: str
    components: dict
    source: str = ""
    boundary_ratio: Optional[float] = None
    expand_timesteps: bool = False
    trained_latent_frames: Optional[int] = None
    default_size: Optional[tuple] = None
    text_len: int = 512

    # -- components -------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.components

    @property
    def denoisers(self) -> list:
        """The denoiser component names, in the order a run uses them."""
        names = [n for n in ("transformer", "transformer_2", "unet") if n in self.components]
        return names

    @property
    def text_encoders(self) -> list:
        return [n for n in ("text_encoder", "text_encoder_2") if n in self.components]

    def module(self, name: str):
        """The component built from its config on the meta device (structure only)."""
        comp = self.components[name]
        return _build_meta(comp.library, comp.class_name, json.dumps(comp.config, sort_keys=True, default=list))

    def weight_bytes(self, name: str, dtype: torch.dtype) -> int:
        """Bytes of the component's parameters and persistent buffers as the loaders place them:
        the Wan-family VAEs and a Wan I2V pipeline's CLIP image encoder in float32 (longvideo's loaders), diffusers' ``_keep_in_fp32_modules``
        in float32 for any dtype, transformers' only for float16; RoPE tables as built."""
        return sum(self.weight_groups(name, dtype).values())

    def weight_groups(self, name: str, dtype: torch.dtype) -> dict:
        """{top-level child name: bytes} of the component (for offload granularity)."""
        comp = self.components[name]
        mod = self.module(name)
        dt = self.load_dtype(name, dtype)
        keep = set(getattr(mod, "_keep_in_fp32_modules", None) or ())
        if comp.library == "transformers" and dt != torch.float16:
            keep = set(getattr(mod, "_keep_in_fp32_modules_strict", None) or ()) if dt == torch.bfloat16 else set()
        item = torch.empty((), dtype=dt).element_size()
        groups: dict = {}
        for pname, p in mod.named_parameters():
            parts = pname.split(".")
            size = 4 if any(k in parts for k in keep) else item
            groups[parts[0]] = groups.get(parts[0], 0) + p.numel() * size
        for bname, b in mod.named_buffers(remove_duplicate=True):
            parts = bname.split(".")
            if b.is_floating_point():
                size = b.element_size() if any(k in parts for k in keep) or b.dtype == torch.float32 else item
            else:
                size = b.element_size()
            groups[parts[0]] = groups.get(parts[0], 0) + b.numel() * size
        return groups

    def load_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        comp = self.components[name]
        if comp.class_name == "AutoencoderKLWan":
            return torch.float32           # longvideo.models.wan loads the Wan VAE in float32
        if name == "image_encoder" and self.family == "wan":
            return torch.float32           # and a Wan I2V pipeline's CLIP image encoder (models.wan_i2v)
        return dtype

    def block_bytes(self, name: str, dtype: torch.dtype) -> tuple:
        """(bytes outside the repeated blocks, bytes of the largest block): the granularity of
        block-level group offloading (the children of the component's ModuleLists)."""
        mod = self.module(name)
        dt = self.load_dtype(name, dtype)
        item = torch.empty((), dtype=dt).element_size()
        largest = 0
        inside = 0
        for _, child in _block_lists(mod):
            for blk in child:
                n = sum(p.numel() for p in blk.parameters()) * item
                largest = max(largest, n)
                inside += n
        total = self.weight_bytes(name, dtype)
        return total - inside, largest

    def largest_leaf_bytes(self, name: str, dtype: torch.dtype) -> int:
        """The largest single module's own parameters: what sequential CPU offload holds at once."""
        mod = self.module(name)
        dt = self.load_dtype(name, dtype)
        item = torch.empty((), dtype=dt).element_size()
        best = 0
        for m in mod.modules():
            n = sum(p.numel() for p in m.parameters(recurse=False)) * item
            best = max(best, n)
        return best


def _block_lists(mod):
    """The ModuleLists of repeated blocks (transformer blocks, encoder layers), outermost first."""
    out = []
    for name, child in mod.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) >= 4:
            if not any(name.startswith(o + ".") for o, _ in out):
                out.append((name, child))
    return out


@functools.lru_cache(maxsize=32)
def _build_meta(library: str, class_name: str, config_json: str):
    config = json.loads(config_json)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, class_name)
            with torch.device("meta"):
                return cls.from_config(config)
        if library == "transformers":
            import transformers

            cls = getattr(transformers, class_name)
            cfg_cls = cls.config_class
            cfg = cfg_cls.from_dict({k: v for k, v in config.items() if k not in ("architectures",)})
            with torch.device("meta"):
                return cls(cfg)
    raise ValueError(f"cannot build component class {class_name!r} of library {library!r}")


# -------------------------------------------------------------------------------------------------
# known configs (sources in the module docstring)
_UMT5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=256384,
                 feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, is_gated_act=True, model_type="umt5")
_WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0)
_WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                  attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, is_residual=True,
                  in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)


def _wan_tr(heads, ffn, layers, in_ch=16, **kw):
    cfg = dict(patch_size=[1, 2, 2], num_attention_heads=heads, attention_head_dim=128, in_channels=in_ch,
               out_channels=in_ch, text_dim=4096, freq_dim=256, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
               rope_max_seq_len=1024)
    cfg.update(kw)
    return cfg


_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
               model_type="clip_text_model")
_CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280,
                  model_type="clip_text_model")
_SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
               layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512)
_SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32)
_SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=[320, 640, 1280],
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, norm_num_groups=32)
_MOTION_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=[320, 640, 1280, 1280], num_attention_heads=8, cross_attention_dim=768,
                    down_block_types=["CrossAttnDownBlockMotion"] * 3 + ["DownBlockMotion"],
                    up_block_types=["UpBlockMotion"] + ["CrossAttnUpBlockMotion"] * 3, norm_num_groups=32,
                    temporal_transformer_layers_per_block=1, temporal_transformer_layers_per_mid_block=1,
                    motion_num_attention_heads=8, motion_max_seq_length=32, use_motion_mid_block=True)
_MOTION_ADAPTER = dict(block_out_channels=[320, 640, 1280, 1280], motion_layers_per_block=2,
                       motion_mid_block_layers_per_block=1, motion_num_attention_heads=8, motion_norm_num_groups=32,
                       motion_max_seq_length=32, use_motion_mid_block=True)


# the CLIP ViT-H/14 vision tower of Wan 2.1 I2V (Wan-AI/Wan2.1-I2V-14B-*-Diffusers image_encoder/config.json:
# open-clip ViT-H-14, 1280 wide, 32 layers of 16 heads, MLP 5120, 224 px in 14 px patches: 257 tokens)
_CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                   image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
                   model_type="clip_vision_model")


def _wan_spec(name, tr, source, family="wan", vae=_WAN21_VAE, tr_cls="WanTransformer3DModel", experts=1,
              pipeline="WanPipeline", image_encoder=None, **kw):
    comps = {"transformer": ComponentSpec("transformer", "diffusers", tr_cls, tr)}
    if experts == 2:
        comps["transformer_2"] = ComponentSpec("transformer_2", "diffusers", tr_cls, tr)
    comps["vae"] = ComponentSpec("vae", "diffusers", "AutoencoderKLWan", vae)
    comps["text_encoder"] = ComponentSpec("text_encoder", "transformers", "UMT5EncoderModel", _UMT5_XXL)
    if image_encoder is not None:
        comps["image_encoder"] = ComponentSpec("image_encoder", "transformers", "CLIPVisionModel", image_encoder)
    return ModelSpec(name=name, family=family, pipeline_class=pipeline, components=comps, source=source, **kw)


KNOWN_MODELS = {
    "wan2.1-t2v-1.3b": lambda: _wan_spec(
        "Wan2.1-T2V-1.3B", _wan_tr(12, 8960, 30), "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        trained_latent_frames=21, default_size=(480, 832)),
    "wan2.1-t2v-14b": lambda: _wan_spec(
        "Wan2.1-T2V-14B", _wan_tr(40, 13824, 40), "Wan-AI/Wan2.1-T2V-14B-Diffusers",
        trained_latent_frames=21, default_size=(720, 1280)),
    "wan2.2-t2v-a14b": lambda: _wan_spec(
        "Wan2.2-T2V-A14B", _wan_tr(40, 13824, 40), "Wan-AI/Wan2.2-T2V-A14B-Diffusers", experts=2,
        boundary_ratio=0.875, trained_latent_frames=21, default_size=(720, 1280)),
    "wan2.1-i2v-14b-480p": lambda: _wan_spec(
        "Wan2.1-I2V-14B-480P", _wan_tr(40, 13824, 40, in_ch=36, out_channels=16, image_dim=1280,
                                       added_kv_proj_dim=5120), "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        pipeline="WanImageToVideoPipeline", image_encoder=_CLIP_VIT_H, trained_latent_frames=21,
        default_size=(480, 832)),
    "wan2.1-i2v-14b-720p": lambda: _wan_spec(
        "Wan2.1-I2V-14B-720P", _wan_tr(40, 13824, 40, in_ch=36, out_channels=16, image_dim=1280,
                                       added_kv_proj_dim=5120), "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
        pipeline="WanImageToVideoPipeline", image_encoder=_CLIP_VIT_H, trained_latent_frames=21,
        default_size=(720, 1280)),
    "wan2.2-i2v-a14b": lambda: _wan_spec(
        "Wan2.2-I2V-A14B", _wan_tr(40, 13824, 40, in_ch=36, out_channels=16), "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        experts=2, pipeline="WanImageToVideoPipeline", boundary_ratio=0.9, trained_latent_frames=21,
        default_size=(720, 1280)),
    "wan2.2-ti2v-5b": lambda: _wan_spec(
        "Wan2.2-TI2V-5B", _wan_tr(24, 14336, 30, in_ch=48), "Wan-AI/Wan2.2-TI2V-5B-Diffusers", vae=_WAN22_VAE,
        expand_timesteps=True, trained_latent_frames=31, default_size=(704, 1280)),
    "skyreels-v2-df-1.3b-540p": lambda: _wan_spec(
        "SkyReels-V2-DF-1.3B-540P", _wan_tr(12, 8960, 30, inject_sample_info=True, num_frame_per_block=1),
        "Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers", family="skyreels", tr_cls="SkyReelsV2Transformer3DModel",
        pipeline="SkyReelsV2DiffusionForcingPipeline", trained_latent_frames=25, default_size=(544, 960)),
    "skyreels-v2-df-14b-540p": lambda: _wan_spec(
        "SkyReels-V2-DF-14B-540P", _wan_tr(40, 13824, 40, num_frame_per_block=1),
        "Skywork/SkyReels-V2-DF-14B-540P-Diffusers", family="skyreels", tr_cls="SkyReelsV2Transformer3DModel",
        pipeline="SkyReelsV2DiffusionForcingPipeline", trained_latent_frames=25, default_size=(544, 960)),
    "sd1.5": lambda: ModelSpec(
        name="SD1.5", family="sd15", pipeline_class="StableDiffusionPipeline", source=
        "stable-diffusion-v1-5/stable-diffusion-v1-5", text_len=77, default_size=(512, 512), components={
            "unet": ComponentSpec("unet", "diffusers", "UNet2DConditionModel", _SD15_UNET),
            "vae": ComponentSpec("vae", "diffusers", "AutoencoderKL", dict(_SD_VAE, scaling_factor=0.18215)),
            "text_encoder": ComponentSpec("text_encoder", "transformers", "CLIPTextModel", _CLIP_L)}),
    "sdxl": lambda: ModelSpec(
        name="SDXL", family="sdxl", pipeline_class="StableDiffusionXLPipeline", source=
        "stabilityai/stable-diffusion-xl-base-1.0", text_len=77, default_size=(1024, 1024), components={
            "unet": ComponentSpec("unet", "diffusers", "UNet2DConditionModel", _SDXL_UNET),
            "vae": ComponentSpec("vae", "diffusers", "AutoencoderKL",
                                 dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)),
            "text_encoder": ComponentSpec("text_encoder", "transformers", "CLIPTextModel", _CLIP_L),
            "text_encoder_2": ComponentSpec("text_encoder_2", "transformers", "CLIPTextModelWithProjection",
                                            _CLIP_BIGG)}),
    "animatediff": lambda: ModelSpec(
        name="AnimateDiff (SD1.5 + motion adapter v1-5-2)", family="animatediff",
        pipeline_class="AnimateDiffPipeline", text_len=77, default_size=(512, 512), trained_latent_frames=16,
        source="stable-diffusion-v1-5/stable-diffusion-v1-5 + guoyww/animatediff-motion-adapter-v1-5-2",
        components={
            "unet": ComponentSpec("unet", "diffusers", "UNetMotionModel", _MOTION_UNET),
            "motion_adapter": ComponentSpec("motion_adapter", "diffusers", "MotionAdapter", _MOTION_ADAPTER),
            "vae": ComponentSpec("vae", "diffusers", "AutoencoderKL", dict(_SD_VAE, scaling_factor=0.18215)),
            "text_encoder": ComponentSpec("text_encoder", "transformers", "CLIPTextModel", _CLIP_L)}),
}

_ALIASES = {
    "wan2.1-1.3b": "wan2.1-t2v-1.3b", "wan-1.3b": "wan2.1-t2v-1.3b", "wan2.1-t2v-1.3b-diffusers": "wan2.1-t2v-1.3b",
    "wan2.1-14b": "wan2.1-t2v-14b", "wan-14b": "wan2.1-t2v-14b", "wan2.1-t2v-14b-diffusers": "wan2.1-t2v-14b",
    "wan2.2-a14b": "wan2.2-t2v-a14b", "wan2.2-t2v-a14b-diffusers": "wan2.2-t2v-a14b",
    "wan2.2-5b": "wan2.2-ti2v-5b", "wan2.2-ti2v-5b-diffusers": "wan2.2-ti2v-5b",
    "wan2.1-i2v-14b-480p-diffusers": "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p-diffusers": "wan2.1-i2v-14b-720p",
    "wan2.2-i2v-a14b-diffusers": "wan2.2-i2v-a14b",
    "skyreels-v2-1.3b": "skyreels-v2-df-1.3b-540p", "skyreels-1.3b": "skyreels-v2-df-1.3b-540p",
    "skyreels-v2-14b": "skyreels-v2-df-14b-540p", "skyreels-14b": "skyreels-v2-df-14b-540p",
    "sd15": "sd1.5", "sd-1.5": "sd1.5", "stable-diffusion-v1-5": "sd1.5",
    "sdxl-base": "sdxl", "stable-diffusion-xl-base-1.0": "sdxl", "animatediff-v1-5-2": "animatediff",
}


def known_model_names() -> list:
    return sorted(KNOWN_MODELS)


def _family_of(pipeline_class: str) -> str:
    if pipeline_class.startswith("SkyReelsV2"):
        return "skyreels"
    if pipeline_class.startswith("Wan"):
        return "wan"
    if pipeline_class.startswith("AnimateDiff"):
        return "animatediff"
    if "XL" in pipeline_class and pipeline_class.startswith("StableDiffusion"):
        return "sdxl"
    if pipeline_class.startswith("StableDiffusion"):
        return "sd15"
    raise ValueError(f"model_index.json names pipeline {pipeline_class!r}: the planner knows Wan, SkyReels-V2, "
                     "AnimateDiff, SD1.5 and SDXL pipelines")


_TRAINED = {"wan": 21, "skyreels": 25, "animatediff": 16}
_SIZES = {"wan": (480, 832), "skyreels": (544, 960), "animatediff": (512, 512), "sd15": (512, 512),
          "sdxl": (1024, 1024)}
# Wan 2.2 TI2V-5B (a Wan index with expand_timesteps): 121 frames at 704 x 1280, as the known config
_TI2V_TRAINED, _TI2V_SIZE = 31, (704, 1280)


def _defaults(family: str, index: dict) -> tuple:
    """(trained latent frames, default (height, width)) of a pipeline of `family` whose
    model_index / config is `index`."""
    if family == "wan" and index.get("expand_timesteps"):
        return _TI2V_TRAINED, _TI2V_SIZE
    return _TRAINED.get(family), _SIZES.get(family)


def load_model_spec(model) -> ModelSpec:
    """A ModelSpec from a known name (``known_model_names()``, case-insensitive), a local diffusers
    checkpoint folder (``model_index.json`` and each component's ``config.json``; weights are never
    read), or a ModelSpec (returned as is)."""
    if isinstance(model, ModelSpec):
        return model
    text = os.fspath(model)
    if os.path.isdir(text):
        return _from_folder(text)
    key = text.strip().lower()
    key = _ALIASES.get(key, key)
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]()
    raise ValueError(f"model {text!r} is neither a local diffusers checkpoint folder nor a known config "
                     f"({', '.join(known_model_names())})")


def _from_folder(path: str) -> ModelSpec:
    index_path = os.path.join(path, "model_index.json")
    try:
        with open(index_path) as fh:
            index = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model path {path!r}: no readable model_index.json ({exc})") from exc
    pipeline_class = str(index.get("_class_name", ""))
    family = _family_of(pipeline_class)
    comps = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
            continue
        library, class_name = value
        if library not in ("diffusers", "transformers") or class_name is None:
            continue
        cfg_path = os.path.join(path, name, "config.json")
        if not os.path.isfile(cfg_path):
            continue               # tokenizers, schedulers, absent optional parts
        with open(cfg_path) as fh:
            cfg = json.load(fh)
        if library == "transformers":
            arch = (cfg.get("architectures") or [class_name])[0]
            class_name = arch if arch else class_name
        comps[name] = ComponentSpec(name, library, class_name, cfg)
    if not any(n in comps for n in ("transformer", "unet")):
        raise ValueError(f"model path {path!r}: no transformer/ or unet/ config.json found")
    spec = ModelSpec(name=os.path.basename(os.path.normpath(path)), family=family, pipeline_class=pipeline_class,
                     components=comps, source=path, boundary_ratio=index.get("boundary_ratio"),
                     expand_timesteps=bool(index.get("expand_timesteps", False)),
                     trained_latent_frames=_defaults(family, index)[0], default_size=_defaults(family, index)[1],
                     text_len=512 if family in ("wan", "skyreels") else 77)
    return spec


def spec_from_pipeline(pipe, name: str = "pipeline") -> ModelSpec:
    """A ModelSpec of an in-memory diffusers pipeline (its components' configs; for tests and for
    planning the exact pipeline one holds)."""
    index = dict(pipe.config)
    family = _family_of(type(pipe).__name__)
    comps = {}
    for cname, value in index.items():
        if cname.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
            continue
        library, class_name = value
        module = getattr(pipe, cname, None)
        if library not in ("diffusers", "transformers") or not isinstance(module, torch.nn.Module):
            continue
        if library == "transformers":
            cfg = module.config.to_dict()
            class_name = type(module).__name__
        else:
            cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(module.config).items()}
        comps[cname] = ComponentSpec(cname, library, class_name, copy.deepcopy(cfg))
    trained = getattr(pipe, "longvideo_trained_latent_frames", None) or _defaults(family, index)[0]
    return ModelSpec(name=name, family=family, pipeline_class=type(pipe).__name__, components=comps,
                     source="in-memory pipeline", boundary_ratio=index.get("boundary_ratio"),
                     expand_timesteps=bool(index.get("expand_timesteps", False)), trained_latent_frames=trained,
                     default_size=_defaults(family, index)[1],
                     text_len=getattr(getattr(pipe, "tokenizer", None), "model_max_length", None) or
                     (512 if family in ("wan", "skyreels") else 77))
