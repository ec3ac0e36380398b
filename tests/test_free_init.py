"""The FreeInit drop-in: diffusers' AnimateDiff FreeInit with and without lowfreq_mix agree.

Tolerance: on CPU the op runs its torch.fft reference, which builds the same float32 filter as
diffusers (bit-identical, see tests/test_lowfreq_mix.py) and mixes with the same FFT calls, so the
generated frames must agree to 1e-5 (observed: exactly). Through the Triton kernels (interpreter)
the latents differ by FFT rounding (~1e-6), and frames after two denoising steps and the VAE agree
to 1e-4.
"""
import numpy as np
import pytest
import torch

import longvideo  # noqa: F401  (registers the ops)
from diffusers.pipelines.free_init_utils import FreeInitMixin
from longvideo.methods.free_init import disable_fast_free_init, enable_fast_free_init, fast_free_init_enabled
from longvideo.models.animatediff import tiny_pipeline
from longvideo.reference.lowfreq_mix import lowpass_filter


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("t2v", seed=0)


def _frames(pipe):
    # 8 frames of 16x16 (8x8 latents): every FreeInit code path, at the smallest cost.
    return pipe("a cat", num_frames=8, height=16, width=16, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="np").frames


@pytest.mark.parametrize("method", ["gaussian", "butterworth", "ideal"])
def test_drop_in_matches_diffusers(pipe, method, monkeypatch):
    pipe.enable_free_init(num_iters=2, method=method, spatial_stop_frequency=0.3, temporal_stop_frequency=0.4)
    try:
        expected = _frames(pipe)
        calls = []
        original = FreeInitMixin._get_free_init_freq_filter

        def spy(self, *args, **kwargs):
            calls.append(1)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(FreeInitMixin, "_get_free_init_freq_filter", spy)
        enable_fast_free_init(pipe)
        try:
            got = _frames(pipe)
        finally:
            disable_fast_free_init(pipe)
        assert not calls, "the drop-in still built diffusers' Python-loop filter"
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    finally:
        pipe.disable_free_init()


def test_drop_in_box_filter(pipe):
    """method="box" (not in diffusers): equals diffusers' mixing with the original box filter tensor."""
    pipe.enable_free_init(num_iters=2, method="box", spatial_stop_frequency=0.5, temporal_stop_frequency=0.5)
    try:
        enable_fast_free_init(pipe)
        try:
            got = _frames(pipe)
        finally:
            disable_fast_free_init(pipe)

        def box_filter(shape, device, filter_type, order, spatial_stop_frequency, temporal_stop_frequency):
            lpf = lowpass_filter(shape[-3:], "box", spatial_stop_frequency, temporal_stop_frequency, order)
            assert lpf.sum() > 0  # a non-trivial box for these parameters
            return lpf.expand(shape).to(device)

        pipe._get_free_init_freq_filter = box_filter
        try:
            expected = _frames(pipe)
        finally:
            del pipe._get_free_init_freq_filter
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    finally:
        pipe.disable_free_init()


def test_drop_in_through_triton_kernels(pipe):
    pipe.enable_free_init(num_iters=2, method="butterworth")
    try:
        expected = _frames(pipe)
        enable_fast_free_init(pipe)
        try:
            with longvideo.ops.use_backend("triton", op="lowfreq_mix"):
                got = _frames(pipe)
        finally:
            disable_fast_free_init(pipe)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    finally:
        pipe.disable_free_init()


def test_enable_disable_bookkeeping(pipe):
    assert not fast_free_init_enabled(pipe)
    enable_fast_free_init(pipe)
    patched = pipe._apply_freq_filter
    enable_fast_free_init(pipe)  # idempotent
    assert pipe._apply_freq_filter is patched and fast_free_init_enabled(pipe)
    disable_fast_free_init(pipe)
    assert not fast_free_init_enabled(pipe)
    assert "_apply_freq_filter" not in pipe.__dict__ and "_get_free_init_freq_filter" not in pipe.__dict__
    disable_fast_free_init(pipe)  # no-op
    with pytest.raises(ValueError, match="pipe"):
        enable_fast_free_init(object())
