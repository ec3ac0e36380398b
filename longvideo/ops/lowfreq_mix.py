"""``torch.ops.longvideo.lowfreq_mix``: FreeInit's spatio-temporal low-frequency mixing.

Schema (the contract: docs/ops.md, lowfreq_mix)::

    lowfreq_mix(Tensor x, Tensor noise, str filter="gaussian", float d_s=0.25, float d_t=0.25,
                float order=4) -> Tensor

x and noise: one shape (..., T, H, W) (T may be 1), one floating dtype, one device. The result
keeps the low frequencies of x and the high frequencies of noise (FreeInit, Wu et al. 2023, eq. 5-6):

    out = Re(ifftn(ifftshift(fftshift(fftn(x)) * LPF + fftshift(fftn(noise)) * (1 - LPF))))

over the last three dims, LPF one of "gaussian", "butterworth", "ideal" (diffusers'
``_get_free_init_freq_filter``) or "box" (the original FreeInit repository); see
``longvideo.reference.lowfreq_mix`` for the exact filter definitions. Returned in x's dtype.

Backends: ``reference`` (torch.fft, the CPU kernel), ``triton`` (single pass for T == 1 slices up
to 128x128; the three-pass plane path for 1 < T <= 64 with such planes; else rfftn + in-kernel
analytic filter + irfftn; docs/ops.md), ``cuda`` (the single pass and the rfftn path in
csrc/lowfreq_mix*.{cu,cpp}, private op ``longvideo::_lowfreq_mix_cuda``). Not differentiable
(FreeInit applies it to latents outside the graph).
"""
from __future__ import annotations

import math

import torch

from . import _registry as R
from ._constraints import FLOAT_DTYPES, ArgumentTypes, dtype_in, on_device
from .plan.lowfreq import FILTER_CODES, axis_table, filter_coef
from ..reference.lowfreq_mix import FILTERS, lowfreq_mix_reference

OP = "lowfreq_mix"


def _check(x, noise, filter, d_s, d_t, order):
    """Argument checks shared by the op and its fake kernel (metadata only)."""
    for name, t in (("x", x), ("noise", noise)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"lowfreq_mix: {name} must be a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"lowfreq_mix: {name} must have a floating dtype, got {t.dtype}")
        if t.dim() < 3:
            raise ValueError(f"lowfreq_mix: {name} must be (..., T, H, W) with ndim >= 3, got shape {tuple(t.shape)}")
    if noise.shape != x.shape:
        raise ValueError(f"lowfreq_mix: noise shape {tuple(noise.shape)} must equal x's {tuple(x.shape)}")
    if noise.device != x.device:
        raise ValueError(f"lowfreq_mix: noise is on {noise.device}, x on {x.device}")
    if noise.dtype != x.dtype:
        raise ValueError(f"lowfreq_mix: noise dtype {noise.dtype} must equal x's {x.dtype}")
    if filter not in FILTERS:
        raise ValueError(f"lowfreq_mix: filter must be one of {FILTERS}, got {filter!r}")
    for name, val in (("d_s", d_s), ("d_t", d_t)):
        if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
            raise ValueError(f"lowfreq_mix: {name} must be a finite number > 0, got {val!r}")
        if filter == "box" and val > 1:
            raise ValueError(f"lowfreq_mix: {name} must be <= 1 for the box filter, got {val!r}")
    if not (isinstance(order, (int, float)) and math.isfinite(order)):
        raise ValueError(f"lowfreq_mix: order must be a finite number, got {order!r}")
    if filter == "butterworth" and order < 1:
        raise ValueError(f"lowfreq_mix: order must be >= 1 for the butterworth filter, got {order!r}")


SCHEMA = ("lowfreq_mix(Tensor x, Tensor noise, str filter='gaussian', float d_s=0.25, float d_t=0.25, "
          "float order=4.0) -> Tensor")

# Registered with the low-level torch.library API (define + CPU/CUDA impl + register_fake), not
# with custom_op + register_fake + register_autograd as the other ops: the op has no autograd
# formula (FreeInit and Ouroboros apply it to latents outside any graph; _check_no_grad refuses
# inputs that require grad) and at the Ouroboros tail sizes its kernel runs for a few
# microseconds, so what the dispatcher adds per call is a large part of the call. Re-measured
# (issue 16) with tools/op_call_overhead.py, torch 2.13 CPU, 2 cores, the backend stubbed out,
# median us per call over 3 runs: 8.0 through this registration, 12.2 with a register_autograd
# added to it, 16.3 through custom_op + register_fake (with register_autograd too: 16.3); the op
# body as a plain Python call 4.8, torch.add of small tensors 1.8. (First measured: 11.1 here,
# 28.7 through custom_op.) The gain holds: custom_op would double the host cost of a call.
_lib = torch.library.Library("longvideo", "FRAGMENT")
_lib.define(SCHEMA)


def _check_no_grad(x, noise):
    # Without an autograd kernel the dispatcher would hand back an output whose backward is
    # silently wrong (the reference's torch.fft ops on CPU, nothing on GPU): refuse instead.
    if torch.is_grad_enabled() and (x.requires_grad or noise.requires_grad):
        raise RuntimeError("lowfreq_mix is not differentiable: call it under torch.no_grad() or on detached tensors")


def _lowfreq_mix_kernel(x, noise, filter="gaussian", d_s=0.25, d_t=0.25, order=4.0):
    _check(x, noise, filter, d_s, d_t, order)
    _check_no_grad(x, noise)
    if x.numel() == 0:  # before dispatch: an empty result on every backend, as the fake kernel
        return x.new_empty(x.shape)
    return R.dispatch(OP, x.device, x, noise, filter, d_s, d_t, order)


def _lowfreq_mix_fake(x, noise, filter="gaussian", d_s=0.25, d_t=0.25, order=4.0):
    _check(x, noise, filter, d_s, d_t, order)
    _check_no_grad(x, noise)
    return x.new_empty(x.shape)


_lib.impl("lowfreq_mix", _lowfreq_mix_kernel, "CPU")
_lib.impl("lowfreq_mix", _lowfreq_mix_kernel, "CUDA")
torch.library.register_fake("longvideo::lowfreq_mix", _lowfreq_mix_fake, lib=_lib)
_OP = torch.ops.longvideo.lowfreq_mix.default
_argument_types = ArgumentTypes(_OP)


def lowfreq_mix(x: torch.Tensor, noise: torch.Tensor, filter: str = "gaussian", d_s: float = 0.25,
                d_t: float = 0.25, order: float = 4.0) -> torch.Tensor:
    """Low frequencies of x, high frequencies of noise (FreeInit freq_mix_3d), in x's dtype.

    out = Re(ifftn(ifftshift(X_s * LPF + N_s * (1 - LPF)))), X_s = fftshift(fftn(x)) over (T, H, W).
    The result is contiguous. Calls ``torch.ops.longvideo.lowfreq_mix``; not differentiable.
    Bad arguments (NaN/inf d_s, d_t or order included) raise ValueError naming them, and so do
    arguments of the wrong Python type (a bool or a string for d_s, d_t or order, a non-string
    filter), before torch's schema parser would convert or refuse them; empty input gives an empty
    result on every backend. A NaN or inf in x or noise makes its whole (T, H, W)
    output slice NaN on every backend (the transforms mix all elements of a slice), no other slice.
    """
    _argument_types({"x": x, "noise": noise, "filter": filter, "d_s": d_s, "d_t": d_t, "order": order})
    return _OP(x, noise, filter, d_s, d_t, order)


# ----------------------------------------------------------------------------------------------
# backends
def _reference_impl(x, noise, filter, d_s, d_t, order):
    return lowfreq_mix_reference(x, noise, filter, d_s, d_t, order).contiguous()


def _triton_module():
    return R.triton_module(OP)


def _triton_impl(x, noise, filter, d_s, d_t, order):
    return _triton_module().lowfreq_mix(x, noise, axis_table(x, filter, d_s, d_t), filter, float(d_s), float(order))


def _cuda_impl(x, noise, filter, d_s, d_t, order):
    stream = torch.cuda.current_stream(x.device).cuda_stream
    return torch.ops.longvideo._lowfreq_mix_cuda(x.contiguous(), noise.contiguous(), axis_table(x, filter, d_s, d_t),
                                                 FILTER_CODES[filter], filter_coef(filter, d_s), float(order), stream)


# Tolerances vs the reference (which computes in float32 and rounds once): fp32 covers the
# DFT-by-matmul / fp32 FFT rounding (|out| ~ a few units, sums of up to 16k terms); fp16/bf16 allow
# the two independent roundings of the output to differ by one unit in the last place.
_TOLS = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

# both kernels: float16/bfloat16/float32 on CUDA
_KERNEL_CONSTRAINTS = (
    on_device("cuda"),
    dtype_in("x", FLOAT_DTYPES, "dtype {dtype} (kernels take float16/bfloat16/float32; float64 runs on the reference)"),
)
R.register_backend(OP, "reference", _reference_impl, rank=100, constraints=(on_device("cpu", "cuda"),))
R.register_backend(OP, "triton", _triton_impl, available=R.triton_available, rank=10, tolerances=_TOLS,
                   constraints=_KERNEL_CONSTRAINTS)
R.register_backend(OP, "cuda", _cuda_impl, available=R.cuda_extension_available("_lowfreq_mix_cuda"), rank=20,
                   tolerances=_TOLS, constraints=_KERNEL_CONSTRAINTS)
