"""Bad inputs a new user types that issue 17 did not list (found by a sweep of every command;
tests/test_cli.py holds the issue's own list). Each is one line ``longvideo: error: ...`` naming
the option, exit status 2, refused before the run starts where the value alone says it is wrong
(no settings line printed, nothing written)."""
import json

import pytest
import torch

from longvideo.cli import main, out_of_memory


def _gen(*argv):
    return ["generate", "--device", "cpu", *argv]


# (argv, a piece of the message, refused before the settings line?)
MISTAKES = {
    "seed_negative": (_gen("--seed", "-1"), "--seed: must be in [0, 2**64 - 1], got -1", True),
    "seed_beyond_64_bits": (_gen("--method", "direct", "--seed", str(2 ** 70)), "--seed: must be in [0, 2**64 - 1]",
                            True),
    "seed_float": (_gen("--seed", "1.5"), "--seed: expected an integer, got '1.5'", True),
    "fps_huge": (_gen("--fps", "1e300"), "--fps: must be in [0.001, 1000]", True),
    "fps_tiny": (_gen("--fps", "1e-9"), "--fps: must be in [0.001, 1000]", True),
    "fps_nan": (_gen("--fps", "nan"), "--fps: must be > 0, got nan", True),
    "prompt_empty": (_gen("--prompt", ""), "--prompt: must not be empty", True),
    "prompt_blank": (_gen("--method", "direct", "--prompt", "   "), "--prompt: must not be empty",
                                       True),
    "schedule_not_increasing": (_gen("--fifo-prompt-schedule", "10=a cat;0=a dog"),
                                "--fifo-prompt-schedule: start frames must begin at 0 and increase, got [10, 0]", True),
    "schedule_not_from_zero": (_gen("--fifo-prompt-schedule", "4=a cat"),
                               "--fifo-prompt-schedule: start frames must begin at 0", True),
    "schedule_empty_prompt": (_gen("--fifo-prompt-schedule", "0=a cat;8="),
                              "--fifo-prompt-schedule: the prompt from frame 8 is empty", True),
    "subject_blank": (_gen("--method", "ouroboros", "--ouroboros-subject", ","),
                      "--ouroboros-subject ',': expected comma-separated words, one of them is empty", True),
    "model_empty": (_gen("--model", ""), "--model: must not be empty", True),
    "enhance_steps_times_strength_below_one": (["enhance", "{d}/afile", "--device", "cpu", "--steps", "1"],
                                               "--steps 1 with --blend-strength 0.6 runs no denoising step", True),
    "fit_without_unit": (_gen("--fit", "24"), "--fit: expected a size with its unit such as 24GB or 80GiB, got '24' "
                                              "(bytes? write e.g. 24GB or 24GiB)", True),
    "plan_fit_without_unit": (["plan", "--method", "fifo", "--fit", "24"], "--fit: expected a size with its unit", True),
    "plan_fit_unknown_unit": (["plan", "--method", "fifo", "--fit", "24XB"], "--fit: expected a size with its unit",
                              True),
    "plan_fit_negative": (["plan", "--method", "fifo", "--fit=-1GB"], "--fit: expected a size with its unit", True),
    "plan_fit_nan": (["plan", "--method", "fifo", "--fit", "nanGB"], "--fit: expected a size with its unit", True),
    "plan_fit_zero": (["plan", "--method", "fifo", "--fit", "0GB"], "--fit: must be positive and finite", True),
    "plan_fit_overflow": (["plan", "--method", "fifo", "--fit", "1e400GB"], "--fit: must be positive and finite", True),
    "plan_bank_budget_without_unit": (["plan", "--method", "story", "--bank-budget", "5"],
                                      "--bank-budget: expected a size with its unit", True),
    "direct_frames_not_4k_plus_1": (_gen("--method", "direct", "--num-frames", "10"),
                                    "--num-frames 10: this model makes 4k + 1 frames (e.g. 9 or 13)", True),
    "freeloc_frames_not_4k_plus_1": (_gen("--method", "freeloc", "--num-frames", "34"),
                                     "--num-frames 34: this model makes 4k + 1 frames (e.g. 33 or 37)", True),
    "out_is_a_device_file": (_gen("--out", "/dev/full"), "/dev/full is a file, not a folder", True),
    "model_is_a_file": (_gen("--model", "{d}/afile"), "not a diffusers checkpoint folder", True),
    "model_empty_folder": (_gen("--model", "{d}/empty"), "no readable model_index.json", True),
    "model_unsupported_pipeline": (_gen("--method", "direct", "--model", "{d}/flux"),
                                   "holds a FluxPipeline pipeline; `longvideo generate --method direct` runs Wan", True),
    "png_dir_is_a_file": (_gen("--fifo-png-dir", "{d}/afile"), "--fifo-png-dir {d}/afile: {d}/afile is a file", True),
    "checkpoint_folder_is_a_file": (_gen("--out", "{d}/ck.mp4"), "the checkpoint folder {d}/ck.fifo_state is a file",
                                    True),
    "story_blank_prompts": (["story", "{d}/blank.txt", "--device", "cpu"], "has no prompts", True),
    "enhance_not_a_video": (["enhance", "{d}/afile", "--device", "cpu"], "cannot be read as a video", True),
    "out_name_only_a_suffix": (_gen("--out", "{d}/.mp4"), "--out {d}/.mp4: the file name is only a suffix; name the "
                                                          "file, e.g. {d}/video.mp4", True),
    "direct_out_name_only_a_suffix": (_gen("--method", "direct", "--out", "{d}/.MP4"),
                                      "the file name is only a suffix", True),
    "png_dir_empty": (_gen("--fifo-png-dir", ""), "--fifo-png-dir: must not be empty", True),
    "story_id_length_beyond_id_prompts": (["story", "{d}/two_lines.txt", "--device", "cpu", "--story-id-length", "3"],
                                          "--story-id-length 3: character [Ann] has 2 id prompt(s)", True),
    # the size is only known to be too large when it is allocated: after the settings line
    "size_beyond_memory": (_gen("--method", "direct", "--steps", "1", "--height", "1000000", "--width", "1000000",
                                "--out", "{d}/huge.mp4"),
                           "out of memory (the host's memory: ", False),
}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "afile").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (tmp_path / "blank.txt").write_text("\n  \n# only a comment\n")
    (tmp_path / "two_lines.txt").write_text("[Ann] reads a book\n[Ann] walks home\n")
    (tmp_path / "ck.fifo_state").write_text("a file where the checkpoint folder goes")
    return tmp_path


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_new_user_mistake_is_one_line_and_exit_2(case, files, capsys):
    argv, piece, before_run = MISTAKES[case]
    argv = [a.replace("{d}", str(files)) for a in argv]
    piece = piece.replace("{d}", str(files))
    before = sorted(p.name for p in files.iterdir())
    assert main(argv) == 2
    cap = capsys.readouterr()
    lines = [x for x in cap.err.splitlines() if x.strip() and "it/s" not in x and "s/it" not in x]
    assert len(lines) == 1 and lines[0].startswith("longvideo: error: "), cap.err[-2000:]
    assert piece in lines[0], lines[0]
    assert "Traceback" not in cap.err
    if before_run:
        assert "settings:" not in cap.out
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written


def test_seed_at_the_64_bit_limit_runs(tmp_path, capsys):
    """The largest seed the check lets through is one torch takes (the limit is not off by one)."""
    assert main(_gen("--method", "direct", "--num-frames", "5", "--steps", "1", "--seed", str(2 ** 64 - 1),
                     "--out", str(tmp_path / "v.mp4"))) == 0
    capsys.readouterr()


@pytest.mark.parametrize("exc,words", [
    (MemoryError(), "the host's memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 3000000000000 bytes. Error code 12"), "the host's memory: 2794.0 GiB asked for at once"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "the GPU's memory: CUDA out of memory"),
])
def test_out_of_memory_is_one_line(exc, words, monkeypatch, capsys):
    import longvideo.cli.info as info

    def run(args):
        raise exc

    monkeypatch.setattr(info, "run", run)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"longvideo: error: out of memory ({words}") and err.count("\n") == 1


def test_other_runtime_errors_stay_bugs(monkeypatch):
    """Only allocation failures are the user's: any other RuntimeError keeps its traceback."""
    import longvideo.cli.info as info

    def run(args):
        raise RuntimeError("shape mismatch in a kernel")

    monkeypatch.setattr(info, "run", run)
    assert out_of_memory(RuntimeError("shape mismatch in a kernel")) == ""
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["info"])
