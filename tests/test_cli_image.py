"""`longvideo generate --image IMG` (image-to-video): the file checked at parse time, refusals for
text-only models and methods without image support, detection of I2V checkpoints from
model_index.json, the video size rule, and runs end to end on the tiny I2V models (one through
a saved checkpoint folder, i.e. the loading code path of real checkpoints) and in Wan 2.2
TI2V-5B's image mode; with --fit, the memory planner's image-to-video plan chosen and applied."""
import json

import numpy as np
import pytest
from PIL import Image

from longvideo.cli import main
from longvideo.cli._common import UsageError, checkpoint_family
from longvideo.cli._image import video_size


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "first.png"
    Image.fromarray((np.random.RandomState(0).rand(30, 60, 3) * 255).astype("uint8")).save(path)  # 60 wide, 30 high
    return path


def _error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("longvideo: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("case", ["missing", "not_an_image", "folder"])
def test_image_checked_at_parse_time(tmp_path, capsys, case):
    path = {"missing": tmp_path / "nope.png", "not_an_image": tmp_path / "bad.png", "folder": tmp_path}[case]
    if case == "not_an_image":
        path.write_text("not an image")
    assert main(["generate", "--image", str(path), "--out", str(tmp_path / "v.mp4")]) == 2
    err = _error(capsys)
    assert "argument --image" in err and {"missing": "no such file", "not_an_image": "not an image",
                                           "folder": "is a folder"}[case] in err


I2V_INDEX = {"_class_name": "WanImageToVideoPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
             "image_encoder": ["transformers", "CLIPVisionModel"], "transformer_2": [None, None],
             "boundary_ratio": None}
I2V22_INDEX = {**I2V_INDEX, "image_encoder": [None, None], "transformer_2": ["diffusers", "WanTransformer3DModel"],
               "boundary_ratio": 0.9}


@pytest.mark.parametrize("index, family", [(I2V_INDEX, "wan_i2v"), (I2V22_INDEX, "wan22_i2v")])
def test_model_index_detects_image_to_video(tmp_path, index, family):
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert checkpoint_family(tmp_path, ("wan", "wan22", "wan_i2v", "wan22_i2v"), "test") == family
    with pytest.raises(UsageError, match="holds a WanImageToVideoPipeline pipeline"):
        checkpoint_family(tmp_path, ("wan", "wan22"), "test")  # never loaded as text-to-video


@pytest.mark.parametrize("argv, message", [
    (["--method", "ouroboros"], "--image does not apply to --method ouroboros"),
    (["--method", "fifo", "--fifo-family", "wan"], "is a text-to-video model (wan)"),
    (["--method", "direct", "--model", "{t2v}"], "is a text-to-video model (wan)"),
])
def test_image_refused_where_it_does_not_apply(tmp_path, capsys, image_path, argv, message):
    t2v = tmp_path / "t2v"
    t2v.mkdir()
    (t2v / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    argv = [a.format(t2v=t2v) for a in argv]
    assert main(["generate", *argv, "--image", str(image_path), "--out", str(tmp_path / "v.mp4")]) == 2
    assert message in _error(capsys)


@pytest.mark.parametrize("argv", [["--method", "fifo", "--fifo-family", "wan22_i2v"],
                                  ["--method", "freeloc", "--model", "{i2v}"]])
def test_image_to_video_models_need_an_image(tmp_path, capsys, argv):
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    (i2v / "model_index.json").write_text(json.dumps(I2V_INDEX))
    argv = [a.format(i2v=i2v) for a in argv]
    assert main(["generate", *argv, "--out", str(tmp_path / "v.mp4")]) == 2
    assert "is an image-to-video model: give the first frame with --image IMG" in _error(capsys)


def test_video_size_keeps_the_aspect_ratio_at_the_area():
    class Img:
        def __init__(self, w, h):
            self.width, self.height = w, h

    for w, h in [(832, 480), (480, 832), (1000, 1000), (60, 30), (1920, 1080)]:
        height, width = video_size(Img(w, h), 480 * 832, 16)
        assert height % 16 == 0 and width % 16 == 0
        assert height * width <= 480 * 832 * 1.001  # floored to the multiple: never above the area
        assert abs((height / width) - (h / w)) <= 16 / min(height, width) + 1e-9  # aspect within one step
    assert video_size(Img(832, 480), 480 * 832, 16) == (480, 832)  # the example's own size is kept
    assert video_size(Img(10, 1000), 32 * 32, 16) == (16 * 20, 16)  # at least one multiple per side


def test_generate_direct_and_fifo_with_an_image(tmp_path, capsys, image_path):
    """direct on the tiny Wan 2.1 I2V model (the 60x30 image gives a 32x16 video at the tiny
    model's 32x32 area); FIFO through a saved tiny Wan 2.2 A14B I2V checkpoint folder (--model DIR:
    detected from model_index.json, both experts loaded; a loaded checkpoint counts as a real one,
    whose default area is 480x832, so the size is given)."""
    from longvideo.models import wan22_i2v

    out = tmp_path / "d.mp4"
    assert main(["generate", "--method", "direct", "--image", str(image_path), "--num-frames", "5", "--steps", "1",
                 "--device", "cpu", "--out", str(out)]) == 0, capsys.readouterr().err
    assert "32x16" in capsys.readouterr().out and out.exists()
    folder = tmp_path / "Wan2.2-I2V-A14B-tiny"
    wan22_i2v.tiny_pipeline().save_pretrained(folder)
    out = tmp_path / "f.mp4"
    assert main(["generate", "--method", "fifo", "--model", str(folder), "--dtype", "float32", "--image",
                 str(image_path), "--num-frames", "5", "--fifo-partitions", "1", "--fifo-window", "3",
                 "--guidance-scale-2", "1.5", "--height", "16", "--width", "32",
                 "--device", "cpu", "--out", str(out)]) == 0, capsys.readouterr().err
    assert "size=32x16" in capsys.readouterr().out and out.exists()


def test_generate_fifo_ti2v_image_mode(tmp_path, capsys, image_path):
    """--image on Wan 2.2 TI2V-5B (its optional image mode, set on the family): the tiny model's
    64x64 area and multiple of 32 give 64x32 for the 60x30 image."""
    out = tmp_path / "t.mp4"
    assert main(["generate", "--method", "fifo", "--fifo-family", "wan22_ti2v", "--image", str(image_path),
                 "--num-frames", "5", "--fifo-partitions", "1", "--device", "cpu", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert "size=64x32" in capsys.readouterr().out and out.exists()
    import torch

    saved = torch.load(out.with_suffix(".fifo_state") / "fifo_state.pt", weights_only=True)
    assert saved["settings"]["image"] is not None  # the run was in image mode (its image's hash)


def _planned(monkeypatch):
    """The keyword arguments of every planner call --fit makes (the real planner runs)."""
    import longvideo.planner as P

    calls, real = [], P.plan

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(P, "plan", spy)
    return calls


def test_generate_image_fit_plans_the_image_path_and_applies_it(tmp_path, capsys, image_path, monkeypatch):
    """`generate --image IMG --fit SIZE` on the tiny Wan 2.1 I2V model: the planner is asked for the
    image-to-video run at the size the image gives (32x16), with the image path in its phases, and
    for a size between its "text offload" and "everything resident" peaks chooses text offload +
    VAE tiling, which the run applies; the video equals the plain run's (the settings move weights
    and tile a decode of one tile)."""
    import torch

    from longvideo.models import wan_i2v
    from longvideo.planner import plan, spec_from_pipeline
    from longvideo.video import read_video

    p = plan("direct", spec_from_pipeline(wan_i2v.tiny_pipeline(), name="tiny model"), 16, 32, 5, torch.float32,
             device="cpu", gpu_memory=1, num_inference_steps=1, trained_frames=3)
    assert "condition encode (VAE)" in [ph.name for ph in p.phases]
    peaks = {c.settings.describe(): c.peak for c in p.candidates}
    resident, text = peaks["offload=none"], peaks["offload=text, vae_tiling"]
    assert text < resident
    size = f"{int((text + resident) / 2 / 0.95)}B"          # fits text offload, not everything resident
    calls = _planned(monkeypatch)
    argv = ["generate", "--method", "direct", "--image", str(image_path), "--num-frames", "5", "--steps", "1",
            "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path / "fit.mp4"), "--fit", size]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"fit {size}: offload=text, vae_tiling (predicted peak" in out and "size=32x16" in out, out
    assert [(kw["height"], kw["width"], kw["image"]) for kw in calls] == [(16, 32, True)]
    assert main(argv + ["--out", str(tmp_path / "plain.mp4")]) == 0
    np.testing.assert_array_equal(read_video(tmp_path / "fit.mp4"), read_video(tmp_path / "plain.mp4"))


@pytest.mark.parametrize("family,size", [("wan_i2v", "32x16"), ("wan22_ti2v", "64x32")])
def test_generate_fifo_image_fit(tmp_path, capsys, image_path, monkeypatch, family, size):
    """FIFO from an image with --fit: planned at the image's size (computed before the plan now)
    with the image path (Wan 2.1 I2V: always; TI2V: its image mode), everything resident on 24 GB,
    and the run goes through."""
    calls = _planned(monkeypatch)
    out = tmp_path / "f.mp4"
    assert main(["generate", "--method", "fifo", "--fifo-family", family, "--image", str(image_path),
                 "--num-frames", "5", "--fifo-partitions", "1", "--device", "cpu", "--out", str(out),
                 "--fit", "24GB"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "fit 24GB: offload=none (predicted peak" in text and f"size={size}" in text and out.exists(), text
    h, w = (int(v) for v in size.split("x")[::-1])
    assert [(kw["height"], kw["width"], kw["image"]) for kw in calls] == [(h, w, True)]
