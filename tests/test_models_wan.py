"""Smoke tests of the built-in tiny Wan pipelines (offline, random weights)."""
import numpy as np
import pytest
import torch

from longvideo.models import wan


@pytest.fixture(scope="module")
def t2v():
    return wan.tiny_pipeline("t2v")


def test_tiny_t2v_generates_9_frames(t2v):
    out = t2v(prompt="a cat", num_frames=9, height=32, width=32, num_inference_steps=2,
              generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert out.shape == (1, 9, 32, 32, 3)
    assert np.isfinite(out).all()
    # 4k+1 frames -> k+1 latent frames of (H/4, W/4) latents: the real Wan's temporal compression
    assert t2v.vae_scale_factor_temporal == 4 and t2v.vae_scale_factor_spatial == 4


def test_tiny_pipeline_deterministic_in_seed(t2v):
    other = wan.tiny_pipeline("t2v", seed=0)
    for (name, a), (_, b) in zip(t2v.transformer.state_dict().items(), other.transformer.state_dict().items()):
        assert torch.equal(a, b), name
    third = wan.tiny_pipeline("t2v", seed=1)
    assert not torch.equal(third.transformer.proj_out.weight, t2v.transformer.proj_out.weight)


def test_tiny_v2v_runs():
    pipe = wan.tiny_pipeline("v2v")
    video = [np.random.default_rng(i).random((32, 32, 3)).astype(np.float32) for i in range(9)]
    from PIL import Image

    video = [Image.fromarray((v * 255).astype(np.uint8)) for v in video]
    out = pipe(video=video, prompt="a cat", height=32, width=32, num_inference_steps=4, strength=0.5,
               generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert out.shape == (1, 9, 32, 32, 3)


def test_bf16_keeps_fp32_modules_and_rope_tables():
    pipe = wan.tiny_pipeline("t2v", dtype=torch.bfloat16)
    tr = pipe.transformer
    assert tr.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert tr.blocks[0].scale_shift_table.dtype == torch.float32
    ref = wan.tiny_pipeline("t2v").transformer
    assert torch.equal(tr.rope.freqs_cos, ref.rope.freqs_cos)


def test_bad_kind_and_path():
    with pytest.raises(ValueError, match="kind"):
        wan.tiny_pipeline("t2i")
    with pytest.raises(ValueError, match="model path"):
        wan.from_pretrained("/nonexistent/wan")
