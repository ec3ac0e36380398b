"""Resume across processes (issue 17 item 1): the model fingerprint a checkpoint stores depends on
what determines the frames -- the model's public configuration and its weights -- and not on the
process (PYTHONHASHSEED orders diffusers' private `_use_default_values`) or on how the model path
was spelled."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longvideo.methods.fifo import _check_run_settings, model_fingerprint
from longvideo.models import animatediff

ROOT = Path(__file__).resolve().parents[1]


def test_fingerprint_ignores_private_config_and_follows_the_weights():
    a = animatediff.tiny_pipeline(seed=0).unet
    b = animatediff.tiny_pipeline(seed=0).unet
    fa = model_fingerprint(a)
    a.register_to_config(_use_default_values=["x", "y"], _name_or_path="/some/where")
    b.register_to_config(_use_default_values=["y", "x"], _name_or_path="elsewhere/../some/where")
    assert model_fingerprint(a) == model_fingerprint(b) == fa
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1.0  # one weight at a sampled position (the first)
    fb = model_fingerprint(b)
    assert fb != fa and fb.split(":")[1] == fa.split(":")[1]  # same configuration, other weights
    with pytest.raises(ValueError, match="different model: weights differ"):
        _check_run_settings({"model": fa, "seed": 1}, {"model": fb, "seed": 1}, "ckpt")
    with pytest.raises(ValueError, match="older longvideo"):
        _check_run_settings({"model": "UNetMotionModel:0123456789abcdef", "seed": 1}, {"model": fa, "seed": 1},
                            "ckpt")


def _cli(args, cwd, hash_seed):
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed), PYTHONPATH=str(ROOT))
    return [sys.executable, "-m", "longvideo", *args], dict(cwd=cwd, env=env)


def test_cli_interrupt_then_resume_in_a_new_process(tmp_path):
    """A real SIGINT to a CLI run on a saved checkpoint (model given by a relative path, hash seed 1),
    then --resume in a NEW process with hash seed 2, another working directory and the absolute
    path: accepted, and the video is completed."""
    ckpt = tmp_path / "models" / "ad"
    animatediff.tiny_pipeline(seed=3).save_pretrained(ckpt)
    out = tmp_path / "out" / "v.mp4"
    common = ["generate", "--method", "fifo", "--fifo-family", "animatediff", "--num-frames", "24",
              "--fifo-partitions", "1", "--fifo-window", "4", "--height", "64", "--width", "64", "--steps", "4",
              "--dtype", "float32", "--device", "cpu", "--seed", "5", "--fifo-checkpoint-every", "1",
              "--out", str(out)]
    cmd, kw = _cli(common + ["--model", os.path.join("models", "ad")], tmp_path, 1)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    state = out.parent / "v.fifo_state" / "fifo_state.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                if torch.load(state, weights_only=True)["frames_out"] >= 4:
                    break
            except Exception:  # noqa: BLE001 - being written
                pass
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.communicate()[0][-2000:]
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text[-2000:]
    done = torch.load(state, weights_only=True)["frames_out"]
    assert 0 < done < 24

    other_cwd = tmp_path / "elsewhere"
    other_cwd.mkdir()
    cmd, kw = _cli(common + ["--model", str(ckpt.resolve()), "--resume"], other_cwd, 2)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    from longvideo.video import read_video

    assert read_video(out).shape[0] == 24
