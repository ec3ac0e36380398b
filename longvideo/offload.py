"""Offloading a pipeline's weights to host memory, in the modes the memory planner chooses from
(``longvideo.planner.OFFLOAD_MODES``), composed with this package's methods. See
docs/methods.md ("Offloading").

``enable_offload(pipe, mode, device)``:

- ``"none"``: everything on `device` (``pipe.to(device)``).
- ``"text"``: the text encoder(s) on `device` only while prompts are encoded (an accelerate
  offload hook that is released right after each call); every other component resident.
- ``"model"``: diffusers' ``enable_model_cpu_offload``: one component on the device at a time.
- ``"group"``: diffusers' group offloading (``apply_group_offloading``), block level, one block
  per group, with a CUDA stream (prefetching the next block) on CUDA devices. (diffusers gives
  the VAE's encoder, decoder and (post_)quant_conv groups of their own, so FIFO's direct calls
  to ``vae.decoder`` are hooked too.)
- ``"sequential"``: diffusers' ``enable_sequential_cpu_offload`` (one leaf module at a time;
  accelerate's implementation needs an accelerator).

Methods that call a component's submodule directly (below the hooks that the offload modes put
on the component's ``forward``) wrap the call in :func:`onloaded`.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["OFFLOAD_MODES", "enable_offload", "onloaded", "offload_mode"]

OFFLOAD_MODES = ("none", "text", "model", "group", "sequential")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")
_ATTR = "_longvideo_offload"


def offload_mode(pipe) -> str:
    """The mode :func:`enable_offload` put on `pipe` ("none" if it was not called)."""
    return getattr(pipe, _ATTR, "none")


def enable_offload(pipe, mode: str, device) -> None:
    """Put `pipe`'s weights where `mode` says (module docstring), computing on `device`.

    Call once, after loading (the pipeline may be on the host or on `device`) and before or
    after installing a method's processors (offloading moves weights, processors hold none).
    Raises ValueError for an unknown mode.
    """
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload mode must be one of {OFFLOAD_MODES}, got {mode!r}")
    device = torch.device(device)
    if mode == "none":
        pipe.to(device)
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode == "text":
        _offload_text_encoders(pipe, device)
    else:
        _group_offload(pipe, device)
    setattr(pipe, _ATTR, mode)


def _offload_text_encoders(pipe, device) -> None:
    from accelerate import cpu_offload_with_hook

    encoders = [n for n in _TEXT_ENCODERS if isinstance(getattr(pipe, n, None), torch.nn.Module)]
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module) and name not in encoders:
            comp.to(device)
    for name in encoders:
        module = getattr(pipe, name)
        module.to("cpu")
        _, hook = cpu_offload_with_hook(module, execution_device=device)
        # accelerate's hook moves the encoder to the device before its forward and leaves it there;
        # release it as soon as the call returns (the prompts are encoded once per run)
        module.register_forward_hook(lambda mod, args, out, hook=hook: hook.offload())


def _group_offload(pipe, device) -> None:
    from diffusers.hooks import apply_group_offloading

    stream = device.type == "cuda"
    for name, comp in pipe.components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        comp.to("cpu")
        apply_group_offloading(comp, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=stream)


@contextlib.contextmanager
def onloaded(module):
    """Make `module`'s weights available on the compute device for calls to its submodules that
    bypass its ``forward`` / ``decode`` (where model offload's hook runs).

    Under model offload (accelerate's hook in ``_hf_hook``) the module is moved to the hook's
    execution device and stays there, as diffusers' ``apply_forward_hook`` does for
    ``vae.decode``, but without offloading the previous component: a method that alternates the
    denoiser and the VAE, as FIFO does, keeps both resident instead of swapping them every step.
    Leaf hooks (sequential offload) and group offloading sit on the submodules themselves and need
    nothing; without offloading this does nothing either.
    """
    hf_hook = getattr(module, "_hf_hook", None)
    execution_device = getattr(hf_hook, "execution_device", None)
    if execution_device is not None and not _has_leaf_hooks(module):
        module.to(execution_device)
    yield module


def _has_leaf_hooks(module) -> bool:
    # enable_sequential_cpu_offload puts AlignDevicesHooks on the leaves (offload=True): moving the
    # whole module would fight them. (Model offload's CpuOffload hook has an offload() method,
    # AlignDevicesHook an `offload` flag.)
    return any(getattr(getattr(m, "_hf_hook", None), "offload", None) is True for m in module.modules())
