"""Pipelines: built-in tiny random-weight models (offline) and loading of local checkpoints.

``load_pipeline(family, kind, model=None)``: with ``model=None`` the built-in tiny model of the
family (random weights built from config: for tests, demos and CI, where no weights can be
downloaded); otherwise a local diffusers checkpoint directory. Families: ``wan`` (t2v, v2v), ``wan22``
(Wan 2.2 A14B, two experts: t2v), ``wan22_ti2v`` (Wan 2.2 TI2V-5B: t2v, i2v),
``wan_i2v`` (Wan 2.1 image-to-video, with a CLIP image encoder: i2v), ``wan22_i2v`` (Wan 2.2 A14B
image-to-video, two experts: i2v), ``skyreels`` (SkyReels-V2 diffusion forcing: t2v, v2v),
``animatediff`` (t2v, v2v), ``sd`` (sd15, sdxl).
"""
from __future__ import annotations

from importlib import import_module

FAMILIES = ("wan", "wan22", "wan22_ti2v", "wan_i2v", "wan22_i2v", "skyreels", "animatediff", "sd")


def load_pipeline(family: str, kind: str = "t2v", model=None, device=None, dtype=None, seed: int = 0):
    import torch

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family == "sd" and kind in ("t2v", "t2i"):
        kind = "sd15"
    if family in ("wan_i2v", "wan22_i2v") and kind == "t2v":
        kind = "i2v"  # the image-to-video families have one kind
    mod = import_module(f"longvideo.models.{family}")
    if dtype is None:
        dtype = torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)} or a torch floating dtype, got {dtype!r}")
        dtype = names[dtype]
    elif dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be one of {sorted(names)} or torch.float32 / float16 / bfloat16, got {dtype!r}")
    if model is None:
        pipe = mod.tiny_pipeline(kind=kind, seed=seed, dtype=dtype)
    else:
        pipe = mod.from_pretrained(model, kind=kind, dtype=dtype)
    if device is not None:
        pipe = pipe.to(device)
    return pipe
