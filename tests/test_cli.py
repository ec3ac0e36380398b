"""The `longvideo` command line (longvideo/cli/): one error convention, checks before work starts,
a parser that imports no method, and method modules that import no command-line code."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longvideo
from longvideo.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path):
    """Inputs a user may get wrong: checkpoints of the wrong kind, a broken model_index.json, a
    text file named .mp4, a plain file where a folder is expected, a story, a broken checkpoint."""
    sd = tmp_path / "sd15"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    wan = tmp_path / "wan"
    wan.mkdir()
    (wan / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    (tmp_path / "text.mp4").write_text("not a video\n")
    (tmp_path / "afile").write_text("")
    (tmp_path / "story.txt").write_text("[Bob] at home\n[Bob] in a park\n")
    wan_cfg = tmp_path / "wan_cfg"  # config files only: sizes are checked before any weight is loaded
    (wan_cfg / "vae").mkdir(parents=True)
    (wan_cfg / "transformer").mkdir()
    (wan_cfg / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (wan_cfg / "vae" / "config.json").write_text(json.dumps({"temperal_downsample": [False, True, True]}))
    (wan_cfg / "transformer" / "config.json").write_text(json.dumps({"patch_size": [1, 2, 2]}))
    state = tmp_path / "v.fifo_state"
    state.mkdir()
    (state / "fifo_state.pt").write_bytes(b"not a checkpoint")
    return tmp_path


def _fast(*argv):
    return ["generate", *argv]


# (argv with {d} for the fixture folder, a piece of the message)
USER_MISTAKES = {
    "num_frames_zero": (_fast("--num-frames", "0"), "--num-frames: must be >= 1"),
    "num_frames_negative": (_fast("--method", "direct", "--num-frames", "-5"), "--num-frames"),
    "partitions_zero": (_fast("--method", "fifo", "--fifo-partitions", "0"), "--fifo-partitions: must be >= 1"),
    "fps_zero": (_fast("--fps", "0"), "--fps: must be > 0"),
    "steps_not_a_number": (_fast("--steps", "many"), "--steps: expected an integer"),
    "height_negative": (_fast("--height", "-16"), "--height"),
    "eta_out_of_range": (_fast("--fifo-eta", "2"), "--fifo-eta: must be in [0, 1]"),
    "dtype_unknown": (_fast("--dtype", "fp8"), "--dtype"),
    "option_unknown": (_fast("--fifo-bogus", "1"), "unrecognized arguments"),
    "wrong_model_kind_direct": (_fast("--method", "direct", "--model", "{d}/sd15"), "StableDiffusionPipeline"),
    "wrong_model_kind_fifo": (_fast("--method", "fifo", "--model", "{d}/sd15"), "Wan, SkyReels-V2, AnimateDiff"),
    "model_index_not_json": (_fast("--method", "fifo", "--model", "{d}/broken"), "not valid JSON"),
    "model_missing": (_fast("--method", "freeloc", "--model", "{d}/nowhere"), "no such folder"),
    "out_under_a_file": (_fast("--method", "direct", "--out", "{d}/afile/sub/v.mp4"), "is a file"),
    "out_suffix": (_fast("--method", "direct", "--out", "{d}/v.txt"), "suffixes"),
    "cuda_backend_on_cpu": (_fast("--device", "cpu", "--backend", "cuda"), "CUDA devices only"),
    "not_a_device": (_fast("--device", "gpu7"), "not a device"),
    "resume_without_checkpoint": (_fast("--method", "fifo", "--resume", "--out", "{d}/none/v.mp4"),
                                  "no checkpoint"),
    "resume_corrupt_checkpoint": (_fast("--method", "fifo", "--resume", "--out", "{d}/v.mp4", "--device", "cpu"),
                                  "not a readable queue checkpoint"),
    "prompt_schedule": (_fast("--fifo-prompt-schedule", "a cat;b dog"), "--fifo-prompt-schedule"),
    "freeloc_vrpr_count": (_fast("--method", "freeloc", "--freeloc-vrpr", "1,2"), "--freeloc-vrpr expects 5"),
    "guided_windows": (_fast("--method", "ouroboros", "--ouroboros-guided-windows", "one"),
                       "--ouroboros-guided-windows"),
    "enhance_missing_input": (["enhance", "{d}/missing.mp4", "--device", "cpu"], "no such file"),
    "enhance_text_as_video": (["enhance", "{d}/text.mp4", "--device", "cpu"], "cannot be read as a video"),
    "enhance_wrong_model_kind": (["enhance", "{d}/text.mp4", "--model", "{d}/sd15", "--device", "cpu"],
                                 "runs Wan, AnimateDiff, CogVideoX"),
    "story_missing_file": (["story", "{d}/missing.txt", "--device", "cpu"], "does not exist"),
    "story_missing_bank": (["story", "{d}/story.txt", "--story-load-bank", "{d}/missing.safetensors",
                            "--device", "cpu", "--out", "{d}/s"], "--story-load-bank"),
    "story_out_is_a_file": (["story", "{d}/story.txt", "--device", "cpu", "--out", "{d}/afile"], "not a folder"),
    "story_wrong_model_kind": (["story", "{d}/story.txt", "--model", "{d}/wan", "--device", "cpu",
                                "--out", "{d}/s"], "runs SD1.5, SDXL"),
    "story_sampling_rate": (["story", "{d}/story.txt", "--story-sampling-rate", "1.5"], "must be in [0, 1]"),
    "probe_shifts": (["probe", "--probe-shifts", "a,b", "--device", "cpu"], "--probe-shifts"),
    "probe_window_zero": (["probe", "--probe-window", "0"], "--probe-window: must be >= 1"),
    "plan_unknown_model": (["plan", "--model", "no-such-model"], "neither a local"),
    "plan_partitions_zero": (["plan", "--partitions", "0"], "--partitions: must be >= 1"),
    "bench_unknown_suite": (["bench", "--suite", "nope", "--quick", "--out", "{d}/b"], "unknown suite"),
    "no_command": ([], "required"),
    # options of another method: refused before anything is loaded
    "fifo_option_with_direct": (_fast("--method", "direct", "--fifo-partitions", "2"),
                                "--fifo-partitions does not apply to --method direct"),
    "ouroboros_option_with_fifo": (_fast("--method", "fifo", "--ouroboros-no-sacfa"),
                                   "--ouroboros-no-sacfa does not apply to --method fifo"),
    "freeloc_option_with_ouroboros": (_fast("--method", "ouroboros", "--freeloc-layers", "x.json"),
                                      "--freeloc-layers does not apply to --method ouroboros"),
    "resume_with_freeloc": (_fast("--method", "freeloc", "--resume"), "--resume does not apply to --method freeloc"),
    "coherent_tail_with_ouroboros": (_fast("--method", "ouroboros", "--fifo-coherent-tail"),
                                     "--fifo-coherent-tail does not apply to --method ouroboros"),
    "freeloc_semantics_with_direct": (_fast("--method", "direct", "--freeloc-semantics", "paper"),
                                      "--freeloc-semantics does not apply to --method direct"),
    "freeloc_semantics_unknown": (_fast("--method", "freeloc", "--freeloc-semantics", "exact"), "invalid choice"),
    "freeloc_option_with_direct": (_fast("--method", "direct", "--freeloc-sink-frames", "2"),
                                   "--freeloc-sink-frames does not apply to --method direct"),
    "story_num_frames": (["story", "{d}/story.txt", "--num-frames", "5"],
                         "--num-frames does not apply to `longvideo story`"),
    # sizes against the checkpoint's VAE scale x patch size, read from its config files (no weights)
    "height_not_divisible_direct": (_fast("--method", "direct", "--model", "{d}/wan_cfg", "--height", "40",
                                          "--device", "cpu"),
                                    "--height 40: must be divisible by 16 for this model (VAE scale 8 x patch size 2)"),
    "width_not_divisible_fifo": (_fast("--method", "fifo", "--model", "{d}/wan_cfg", "--width", "24",
                                       "--device", "cpu", "--out", "{d}/w.mp4"),
                                 "--width 24: must be divisible by 16"),
}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("longvideo: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "weights_only" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", sorted(USER_MISTAKES))
def test_user_mistake_is_one_line_and_exit_2(case, files, capsys, monkeypatch):
    monkeypatch.delenv("LONGVIDEO_BACKEND", raising=False)
    argv, expected = USER_MISTAKES[case]
    argv = [a.format(d=files) for a in argv]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert expected in line, line


def test_fifo_height_not_divisible_is_one_line(files, capsys):
    """A size the pipeline refuses (Wan: multiples of 16) after the model is loaded: still one line."""
    argv = ["generate", "--method", "fifo", "--height", "40", "--num-frames", "2", "--fifo-partitions", "1",
            "--fifo-window", "2", "--device", "cpu", "--out", str(files / "h.mp4")]
    assert main(argv) == 2
    assert "divisible by 16" in _one_error_line(capsys.readouterr().err)
    assert not (files / "h.mp4").exists()


@pytest.mark.parametrize("argv,multiple", [
    (["generate", "--method", "direct", "--height", "40"], 16),
    (["story", "{d}/story.txt", "--width", "{odd}"], None),
], ids=["direct", "story"])
def test_size_refused_after_loading_before_denoising(argv, multiple, files, capsys, monkeypatch):
    """The built-in tiny models have no config files to read: their sizes are checked right after
    loading, before any denoising (nothing written)."""
    from longvideo.models import sd, wan

    with capsys.disabled():  # first imports of the model stacks log warnings: keep them off the checked stderr
        multiple = multiple or sd.tiny_pipeline("sd15").vae_scale_factor
        wan.tiny_pipeline("t2v")
    argv = [a.format(d=files, odd=multiple * 4 + 1) for a in argv] + ["--device", "cpu", "--out",
                                                                       str(files / "o" / "v.mp4")]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"must be divisible by {multiple} for this model (VAE scale" in line, line
    assert not (files / "o").exists() or not any((files / "o").iterdir())


def test_settings_line_before_the_run(files, capsys):
    """ONE line with the settings actually used, printed before the run (before the video exists)."""
    out = files / "s.mp4"
    argv = ["generate", "--method", "fifo", "--num-frames", "1", "--fifo-partitions", "1", "--fifo-window", "2",
            "--device", "cpu", "--backend", "reference", "--out", str(out)]
    try:
        assert main(argv) == 0
    finally:
        longvideo.ops.set_backend("auto")  # --backend sets the process-wide setting
    lines = capsys.readouterr().out.splitlines()
    settings = [i for i, line in enumerate(lines) if line.startswith("settings: ")]
    assert len(settings) == 1, lines
    line = lines[settings[0]]
    for piece in ("method=fifo", "size=32x32", "frames=1", "steps=2", "window=2", "partitions=1", "dtype=float32",
                  "device=cpu", "backend=reference"):
        assert f" {piece}" in line, line
    wrote = [i for i, line in enumerate(lines) if line.startswith("wrote ")]
    assert wrote and settings[0] < wrote[0] and out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_device_without_gpu(capsys):
    assert main(["generate", "--device", "cuda"]) == 2
    assert "no CUDA device" in _one_error_line(capsys.readouterr().err)


def test_backend_refused_before_loading(files, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["generate", "--method", "ouroboros", "--backend", "triton", "--device", "cpu"]) == 2
    assert "TRITON_INTERPRET=1" in _one_error_line(capsys.readouterr().err)
    monkeypatch.setenv("LONGVIDEO_BACKEND", "bogus")
    assert main(["generate", "--device", "cpu"]) == 2
    assert "LONGVIDEO_BACKEND='bogus'" in _one_error_line(capsys.readouterr().err)


def test_debug_adds_the_traceback(files, capsys):
    argv = ["generate", "--method", "direct", "--model", str(files / "sd15")]
    assert main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("longvideo: error:")
    assert main(["--debug"] + argv) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["generate", "--num-frames", "0"],
    ["enhance", "{d}/text.mp4", "--device", "cpu"],
    ["generate", "--method", "direct", "--model", "{d}/sd15", "--device", "cpu"],
], ids=["parse", "input", "model_kind"])
def test_user_mistake_in_a_process(argv, files):
    """The console entry point: exit status 2 and one line on stderr, no traceback."""
    argv = [a.format(d=files) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "longvideo", *argv], capture_output=True, text=True, timeout=300,
                          cwd=files)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longvideo: error:"), proc.stderr


def test_help_shows_defaults(capsys):
    for command in ("generate", "probe", "story", "enhance", "plan", "bench", "info"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
    main_help = capsys.readouterr().out
    assert "--fifo-partitions" in main_help and "(default: 4)" in main_help
    assert "(default: 0.9)" in main_help and "(default: 0.6)" in main_help


def test_parser_imports_no_method_module():
    """Building the parser (and printing every command's help) imports no method, processor,
    model or planner module, and not diffusers: `longvideo --help` stays fast."""
    code = (
        "import sys\n"
        "import longvideo.cli as cli\n"
        "parser = cli.build_parser()\n"
        "for command in cli.COMMANDS:\n"
        "    try:\n"
        "        cli.main([command, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('longvideo.methods', 'longvideo.processors', 'longvideo.models', 'longvideo.planner',\n"
        "         'longvideo.benchmarking', 'diffusers', 'transformers')\n"
        "print([m for m in sys.modules if m.startswith(heavy)])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:]


def _imports(path: Path) -> set:
    """Every module a file imports, at any level (functions included), as absolute names."""
    from test_architecture import file_imports

    return file_imports(path)


def test_methods_are_library_code_and_the_freeloc_probe_cycle_is_gone():
    methods = sorted((ROOT / "longvideo" / "methods").glob("*.py"))
    for path in methods:
        imports = _imports(path)
        assert "argparse" not in imports and not any(m.startswith("longvideo.cli") for m in imports), path
        names = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        assert not names & {"print", "SystemExit", "exit"}, (path, names & {"print", "SystemExit", "exit"})
    assert not any(m.startswith("longvideo.methods.probe") for m in _imports(ROOT / "longvideo/methods/freeloc.py"))
    code = "import sys, longvideo.methods.freeloc; print('longvideo.methods.probe' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.stdout.strip() == "False", proc.stderr


def test_cli_choices_match_the_library():
    """The parser lists choices without importing the library; they must stay the library's."""
    from longvideo import ops
    from longvideo.cli import _common, enhance, generate_fifo, generate_freeloc, plan, probe, story
    from longvideo.methods import blending, families, fifo, fifo_ouroboros, freeloc
    from longvideo.methods import probe as probe_method
    from longvideo.planner import METHODS, OFFLOAD_MODES
    from longvideo.processors.consistent import SCHEDULES

    assert _common.BACKENDS == ops.BACKEND_NAMES
    assert generate_fifo.TIMESTEP_GRIDS == families.TIMESTEP_GRIDS
    assert generate_fifo.LOOKAHEAD_CONTEXTS == fifo.LOOKAHEAD_CONTEXTS
    assert generate_fifo.SACFA_TOKENS == fifo_ouroboros.SACFA_TOKENS
    assert (enhance.VARIANTS, enhance.MODES) == (blending.VARIANTS, blending.MODES)
    assert probe.TSA_RULES == probe_method.TSA_RULES
    assert probe.DEFAULT_TSA_FRACTION == probe_method.DEFAULT_TSA_FRACTION
    assert probe.EXPERTS == probe_method.EXPERTS
    assert (plan.METHODS, plan.OFFLOAD_MODES) == (METHODS, OFFLOAD_MODES)
    assert story.SCHEDULES == SCHEDULES
    assert generate_freeloc.SEMANTICS == freeloc.SEMANTICS


def test_family_layer_is_library_code_and_sources_point_to_docs():
    """The family layer (methods/families/) follows the methods' rules; docstrings and comments
    send readers to docs/*.md, never to design notes outside the repository."""
    for path in sorted((ROOT / "longvideo" / "methods" / "families").glob("*.py")):
        imports = _imports(path)
        assert "argparse" not in imports and not any(m.startswith("longvideo.cli") for m in imports), path
        names = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        assert not names & {"print", "SystemExit", "exit"}, path
    outside = ("DESIGN" + ".md", "METHODS" + ".md")
    for folder in ("longvideo", "triton_kernels", "benchmarks", "tools", "csrc"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".cu", ".cpp", ".h", ".sh") and path.is_file():
                text = path.read_text(errors="replace")
                assert not any(name in text for name in outside), path


def test_cli_family_choices_are_the_family_layers():
    """--fifo-family and --blend-family list exactly the families that serve the method."""
    from longvideo.cli import enhance, generate_fifo
    from longvideo.methods.families import FAMILIES

    assert set(generate_fifo.FAMILIES) == {c.name for c in FAMILIES if "fifo" in c.supports}
    assert set(enhance.FAMILIES) == {c.name for c in FAMILIES if "blending" in c.supports}


def test_checked_option_types():
    import argparse

    from longvideo.cli._common import at_least, one_line, real

    assert at_least(1)("3") == 3
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            at_least(1)(bad)
    assert real(0, 1)("1") == 1.0 and real(0, low_open=True)("0.5") == 0.5
    for bad in ("nan", "inf", "0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            real(0, low_open=True)(bad)
    assert one_line("resume: x differs:\n  a: 1\n  b: 2\n") == "resume: x differs: a: 1; b: 2"


WAN22_INDEX = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
               "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}
TI2V_INDEX = {**WAN22_INDEX, "transformer_2": [None, None], "boundary_ratio": None, "expand_timesteps": True}


@pytest.mark.parametrize("index, accepted, family", [
    (WAN22_INDEX, ("wan", "skyreels", "animatediff", "wan22"), "wan22"),            # FIFO: the two-expert family
    (WAN22_INDEX, ("wan",), "wan"),                                                 # FreeLOC: Wan loading, both experts
    ({**WAN22_INDEX, "transformer_2": [None, None], "boundary_ratio": None}, ("wan", "wan22"), "wan"),  # TI2V-5B shape
    ({**WAN22_INDEX, "boundary_ratio": None}, ("wan", "wan22"), "wan"),             # no boundary: one expert runs
    (TI2V_INDEX, ("wan", "wan22", "wan22_ti2v"), "wan22_ti2v"),                     # FIFO, FreeLOC: the TI2V loader
    (TI2V_INDEX, ("wan", "animatediff", "cogvideox"), None),                        # enhance: refused, not Wan 2.1
])
def test_model_index_detects_wan22(tmp_path, index, accepted, family):
    from longvideo.cli._common import checkpoint_family

    (tmp_path / "model_index.json").write_text(json.dumps(index))
    if family is None:
        from longvideo.cli._common import UsageError

        with pytest.raises(UsageError, match="holds a Wan 2.2 TI2V-5B"):
            checkpoint_family(tmp_path, accepted, "test")
        return
    assert checkpoint_family(tmp_path, accepted, "test") == family


def test_generate_fifo_on_a_wan22_checkpoint_folder(tmp_path, capsys):
    """`--model DIR` on a saved two-expert checkpoint (the tiny one, written with save_pretrained):
    the folder is detected as wan22, loaded with both experts, and FIFO runs across the boundary
    with --guidance-scale-2; a folder without transformer_2 is refused by the Wan 2.2 loader."""
    from longvideo.models import wan22

    folder = tmp_path / "Wan2.2-T2V-A14B-tiny"
    wan22.tiny_pipeline().save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert wan22.is_two_expert_index(index) and index["boundary_ratio"] == 0.875
    out = tmp_path / "v.mp4"
    argv = ["generate", "--method", "fifo", "--model", str(folder), "--dtype", "float32", "--num-frames", "5",
            "--height", "32", "--width", "32", "--fifo-partitions", "2", "--fifo-window", "4",
            "--guidance-scale-2", "1.5", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert out.exists()
    index["transformer_2"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a two-expert Wan 2.2 checkpoint"):
        wan22.from_pretrained(folder)
