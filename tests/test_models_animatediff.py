"""Smoke tests of the tiny AnimateDiff pipelines (random weights, offline, CPU)."""
import numpy as np
import pytest
import torch

from longvideo.models import animatediff


def _gen(pipe, **kw):
    return pipe("a red ball", num_frames=8, height=32, width=32, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).frames


def test_tiny_t2v_runs_and_is_deterministic():
    pipe = animatediff.tiny_pipeline("t2v", seed=0)
    assert type(pipe).__name__ == "AnimateDiffPipeline"
    assert type(pipe.unet).__name__ == "UNetMotionModel"
    frames = _gen(pipe)
    assert frames.shape == (1, 8, 32, 32, 3)
    assert np.isfinite(frames).all()
    again = _gen(animatediff.tiny_pipeline("t2v", seed=0))
    np.testing.assert_array_equal(frames, again)
    other = _gen(animatediff.tiny_pipeline("t2v", seed=1))
    assert np.abs(frames - other).max() > 1e-3  # the seed changes the weights


def test_tiny_v2v_runs():
    pipe = animatediff.tiny_pipeline("v2v")
    assert type(pipe).__name__ == "AnimateDiffVideoToVideoPipeline"
    video = [np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(8)]
    from PIL import Image

    out = pipe(video=[Image.fromarray(v) for v in video], prompt="a dog", num_inference_steps=2, strength=0.8,
               generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert out.shape == (1, 8, 32, 32, 3) and np.isfinite(out).all()


def test_tiny_dtype_and_kind_checks(tmp_path):
    pipe = animatediff.tiny_pipeline("t2v", dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kind"):
        animatediff.tiny_pipeline("t2i")
    with pytest.raises(ValueError, match="dtype"):
        animatediff.tiny_pipeline("t2v", dtype=torch.int32)
    with pytest.raises(ValueError, match="path"):
        animatediff.from_pretrained(tmp_path / "missing")


def test_from_pretrained_roundtrip(tmp_path):
    pipe = animatediff.tiny_pipeline("t2v")
    pipe.save_pretrained(tmp_path / "ckpt")
    loaded = animatediff.from_pretrained(tmp_path / "ckpt", kind="t2v", dtype=torch.float32)
    assert type(loaded).__name__ == "AnimateDiffPipeline"
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_gen(loaded), _gen(pipe), atol=1e-5)
