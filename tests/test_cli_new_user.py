"""Bad inputs a new user types that issue 17 did not list (found by a sweep of every command;
tests/test_cli.py holds the issue's own list). Each is one line ``longvideo: error: ...`` naming
the option, exit status 2, refused before the run starts where the value alone says it is wrong
(no settings line printed, nothing written)."""
import json

import pytest
import torch
# transformers binds its log handler to the stderr of its first import: importing it here (not
# inside a test whose captured stderr is closed afterwards) keeps its notes about a missing
# torchvision, logged once whichever case first loads a CLIP model, out of the checked stderr
import transformers  # noqa: F401

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
    "plan_fit_negative_as_its_own_word": (["plan", "--method", "fifo", "--fit", "-24GB"],
                                          "--fit: expected a size with its unit such as 24GB or 80GiB, got '-24GB'",
                                          True),
    "story_bank_budget_negative_percent": (["story", "{d}/two_lines.txt", "--device", "cpu", "--story-bank-budget",
                                            "-5%"], "--story-bank-budget: expected a size with its unit", True),
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
    # FIFO's window and queue, checked before the model is loaded ({d}/wan: a Wan checkpoint folder
    # without weights, so reaching the loader would fail differently)
    "fifo_window_beyond_trained_clip_and_video": (
        _gen("--fifo-window", "1000", "--out", "{d}/v.mp4"),
        "--fifo-window 1000: longer than the model's trained clip (3 latent frames) and than the whole video "
        "(--num-frames 48 = 13 latent frames)", True),
    "ouroboros_window_one_beyond_the_video": (
        _gen("--method", "ouroboros", "--fifo-window", "14", "--out", "{d}/v.mp4"),
        "--fifo-window 14: longer than the model's trained clip", True),
    "fifo_window_beyond_checkpoint_trained_clip": (
        _gen("--model", "{d}/wan", "--fifo-window", "22", "--num-frames", "81", "--out", "{d}/v.mp4"),
        "--fifo-window 22: longer than the model's trained clip (21 latent frames) and than the whole video "
        "(--num-frames 81 = 21 latent frames)", True),
    "fifo_window_one_with_lookahead": (
        _gen("--fifo-window", "1", "--out", "{d}/v.mp4"),
        "--fifo-window 1: lookahead denoising needs windows of at least 2 latent frames", True),
    "fifo_partitions_beyond_timesteps": (
        _gen("--fifo-partitions", "1000000", "--out", "{d}/v.mp4"),
        "--fifo-partitions 1000000 with a window of 3 latent frames: a queue of 2000000 levels, i.e. 2000000 "
        "denoising steps per frame, more than the scheduler's 1000 training timesteps", True),
    "fifo_queue_beyond_checkpoint_timesteps": (
        _gen("--model", "{d}/wan", "--fifo-partitions", "6", "--out", "{d}/v.mp4"),
        "a queue of 120 levels, i.e. 120 denoising steps per frame, more than the scheduler's 100 training", True),
    "fifo_window_beyond_motion_modules": (
        _gen("--fifo-family", "animatediff", "--fifo-window", "33", "--num-frames", "48", "--out", "{d}/v.mp4"),
        "--fifo-window 33: AnimateDiff's motion modules take clips of at most 32 frames", True),
    # direct / FreeLOC: beyond the transformer's RoPE table diffusers failed with a shape-error traceback
    "direct_frames_beyond_rope_table": (
        _gen("--method", "direct", "--num-frames", "100001", "--out", "{d}/v.mp4"),
        "--num-frames 100001: 25001 latent frames, more than the 1024 the transformer's RoPE table covers "
        "(rope_max_seq_len = 1024); at most 4093 frames", True),
    "freeloc_frames_beyond_checkpoint_rope_table": (
        _gen("--method", "freeloc", "--model", "{d}/wan", "--num-frames", "45", "--out", "{d}/v.mp4"),
        "--num-frames 45: 12 latent frames, more than the 10 the transformer's RoPE table covers (rope_max_seq_len = "
        "10); at most 37 frames", True),
    # story's id bank options, before anything is loaded (they were refused after the settings line,
    # naming the library's arguments, and a bare number was taken as bytes)
    "story_bank_budget_bare_number": (["story", "{d}/two_lines.txt", "--device", "cpu", "--story-bank-budget", "24"],
                                      "--story-bank-budget: expected a size with its unit", True),
    "story_bank_budget_percent_beyond": (["story", "{d}/two_lines.txt", "--device", "cpu", "--story-bank-budget",
                                          "200%"], "a percentage of the GPU's memory must be in [0, 100]", True),
    "story_bank_unknown": (["story", "{d}/two_lines.txt", "--device", "cpu", "--story-bank", "bogus"],
                           "--story-bank 'bogus': expected auto, cpu, cuda, cuda:N, none or a .safetensors file", True),
    "story_bank_budget_without_auto": (["story", "{d}/two_lines.txt", "--device", "cpu", "--story-bank", "cpu",
                                        "--story-bank-budget", "1GB"],
                                       "--story-bank-budget applies to --story-bank auto only", True),
    # `longvideo plan`: what generate would refuse, refused too; nothing silently ignored
    "plan_overlap_not_below_chunk": (["plan", "--method", "enhance", "--overlap-frames", "30"],
                                     "--overlap-frames 30: must be smaller than --chunk-frames 24", True),
    "plan_overlap_latent_not_below_chunk": (
        ["plan", "--method", "blending", "--overlap-frames", "21"],
        "--overlap-frames 21 is 6 latent frames, not less than the 6 latent frames of --chunk-frames 24", True),
    "plan_window_beyond_trained_clip_and_video": (
        ["plan", "--window", "1000", "--num-frames", "241"],
        "--window 1000: longer than the model's trained clip (21 latent frames) and than the whole video "
        "(--num-frames 241 = 61 latent frames)", True),
    "plan_window_one": (["plan", "--window", "1"], "--window 1: lookahead denoising needs windows of at least 2", True),
    "plan_partitions_beyond_timesteps": (["plan", "--partitions", "1000000"],
                                         "--partitions 1000000 with a window of 21 latent frames: a queue of 20000000 "
                                         "levels", True),
    "plan_window_beyond_motion_modules": (["plan", "--model", "animatediff", "--window", "33", "--num-frames", "100"],
                                          "--window 33: AnimateDiff's motion modules take clips of at most 32", True),
    "plan_height_not_a_multiple": (["plan", "--height", "33"],
                                   "--height 33: must be divisible by 16 for this model (VAE scale 8 x patch size 2)",
                                   True),
    "plan_sdxl_width_not_a_multiple": (["plan", "--method", "story", "--width", "1001"],
                                       "--width 1001: must be divisible by 8 for this model", True),
    "plan_window_with_direct": (["plan", "--method", "direct", "--window", "4"],
                                "--window does not apply to --method direct", True),
    "plan_bank_with_fifo": (["plan", "--bank", "cpu"], "--bank does not apply to --method fifo", True),
    "plan_no_tail_with_fifo": (["plan", "--no-tail"], "--no-tail does not apply to --method fifo", True),
    "plan_chunk_frames_with_story": (["plan", "--method", "story", "--chunk-frames", "30"],
                                     "--chunk-frames does not apply to --method story", True),
    "plan_latent_only_with_fifo": (["plan", "--latent-only"], "--latent-only does not apply to --method fifo", True),
    "plan_device": (["plan", "--device", "cuda"], "--device does not apply to `longvideo plan` (it predicts memory "
                                                  "and runs nothing; --kernels says whose", True),
    "plan_guidance_scale": (["plan", "--guidance-scale", "1"], "--guidance-scale does not apply to `longvideo plan` "
                                                               "(it predicts memory and runs nothing; the plan assumes "
                                                               "classifier-free guidance", True),
    "plan_seed": (["plan", "--seed", "3"], "--seed does not apply to `longvideo plan`", True),
    "plan_out": (["plan", "--out", "{d}/p.json"], "--out does not apply to `longvideo plan`", True),
    "plan_list_models_with_fit": (["plan", "--list-models", "--fit", "24GB"], "--fit does not apply to --list-models",
                                  True),
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
    (tmp_path / "wan" / "scheduler").mkdir(parents=True)
    (tmp_path / "wan" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (tmp_path / "wan" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 100}))
    (tmp_path / "wan" / "transformer").mkdir()
    (tmp_path / "wan" / "transformer" / "config.json").write_text(json.dumps({"rope_max_seq_len": 10,
                                                                              "patch_size": [1, 2, 2]}))
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


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("argv,note", [
    (["--fifo-window", "2", "--num-frames", "1"], False),             # within the trained clip, longer than the video
    (["--fifo-window", "3"], False),                                   # the trained clip (the default)
    (["--fifo-window", "4"], True),                                    # beyond the trained clip, within the video
    (["--fifo-window", "13", "--num-frames", "48"], True),             # the whole video (13 latent frames)
    (["--fifo-window", "1", "--fifo-no-lookahead"], False),
    (["--fifo-partitions", "333"], False),                             # 2 * 333 * 1 = 666 levels
    (["--fifo-partitions", "1000", "--fifo-window", "1", "--fifo-no-lookahead"], False),  # 1000 levels
    (["--fifo-family", "animatediff", "--fifo-window", "32", "--num-frames", "48"], True),
    (["--method", "ouroboros", "--fifo-window", "4"], True),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_fifo_queue_accepted_reaches_the_loader(argv, note, tmp_path, monkeypatch, capsys):
    """The valid side of the window / queue checks: the run goes on to load the model (stopped
    there), with a note exactly when the window is longer than the model's trained clip."""
    import longvideo.cli.generate_fifo as generate_fifo

    def loader(*args, **kwargs):
        raise _Loaded

    monkeypatch.setattr(generate_fifo, "load_pipeline", loader)
    with pytest.raises(_Loaded):
        main(_gen("--method", "fifo", *argv, "--out", str(tmp_path / "v.mp4")))
    out = capsys.readouterr().out
    assert ("note: --fifo-window" in out and "longer than the model's trained clip" in out) == note, out


def test_animatediff_window_beyond_motion_modules_refused_by_the_family():
    """The Python API refuses what the CLI refuses before loading (the motion modules' positional
    embedding has 32 rows; 33 frames failed deep inside the UNet with a shape error)."""
    from longvideo import FIFODiffusion, RandomizedBlending
    from longvideo.models import animatediff

    pipe = animatediff.tiny_pipeline()
    assert FIFODiffusion(pipe, num_partitions=1, frames_per_window=32).f == 32
    with pytest.raises(ValueError, match=r"^frames_per_window: AnimateDiff's motion modules take clips of at most "
                                         r"motion_max_seq_length = 32 frames .*got 33$"):
        FIFODiffusion(pipe, num_partitions=1, frames_per_window=33)
    blending = RandomizedBlending(pipe, chunk_frames=40, overlap_frames=8)
    assert blending.layout(20).chunk == 20  # a video shorter than the chunk: one chunk of its length
    with pytest.raises(ValueError, match=r"^chunk_frames: AnimateDiff's motion modules .* got 40$"):
        blending.layout(100)


@pytest.mark.parametrize("argv,note", [
    (["--window", "22", "--num-frames", "200"], True),   # beyond the trained clip, within the video
    (["--window", "22"], True),                          # no --num-frames: FIFO's memory does not depend on it
    (["--partitions", "47"], False),                     # 2 * 47 * 10 = 940 levels
    (["--method", "ouroboros", "--no-tail", "--no-sacfa"], False),
    (["--method", "blending", "--chunk-frames", "9", "--overlap-frames", "4"], False),
    (["--method", "story", "--id-length", "2", "--bank", "cpu", "--height", "1024"], False),
    (["--method", "direct", "--latent-only", "--height", "480", "--width", "832"], False),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_plan_accepted_options_run(argv, note, capsys):
    """The valid side of plan's checks: a plan is printed (exit 0), with the window note exactly
    when the window is longer than the model's trained clip."""
    assert main(["plan", *argv]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out
    assert ("note: --window" in out) == note, out


def test_blending_chunk_starts_refuses_an_overlap_that_does_not_advance():
    """chunk_starts looped forever when the overlap was not shorter than the chunk (`plan --method
    enhance --overlap-frames 30` hung): now a ValueError (an alarm turns a hang into a failure)."""
    import signal

    from longvideo.methods.blending import chunk_starts

    def hung(signum, frame):
        raise AssertionError("chunk_starts did not return")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        assert chunk_starts(10, 4, 3) == [0, 1, 2, 3, 4, 5, 6]
        with pytest.raises(ValueError, match=r"overlap \(3 latent frames\) must be smaller than the chunk \(3"):
            chunk_starts(10, 3, 3)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("frames,ok", [(4093, True), (4097, False), (None, True)])
def test_direct_frame_limit_is_the_rope_table(frames, ok):
    """The last frame count the tiny Wan transformer's 1024 RoPE positions take is 4093 (1024
    latent frames); 4097 is one latent frame more."""
    import argparse

    from longvideo.cli._common import UsageError
    from longvideo.cli.generate_freeloc import check_frames_before_loading

    args = argparse.Namespace(num_frames=frames, model=None)
    if ok:
        check_frames_before_loading(args)
    else:
        with pytest.raises(UsageError, match="1025 latent frames, more than the 1024"):
            check_frames_before_loading(args)
