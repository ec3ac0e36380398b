"""Interrupting ``torchrun --nproc-per-node 2 -m longvideo generate`` (issue 17 item 6;
docs/outputs.md, Interrupts).

A real launch: torchrun's agent with two CPU ranks over gloo, the signal sent to torchrun's process
group as a terminal's Ctrl-C (SIGINT) or a job scheduler (SIGTERM) does; the agent forwards it to
each rank's own process group. Asserted per rank (torchrun's ``--redirects 3`` keeps each rank's
stdout and stderr apart):

- rank 0 reports the interrupt, once; rank 1 prints nothing on stderr;
- neither rank prints a traceback (the agent's own traceback of its ``SignalException`` is
  torchrun's, and the only one allowed in torchrun's stream);
- each rank's ``longvideo.cli.main`` returns 130 (SIGINT) / 143 (SIGTERM) -- recorded by a
  two-line wrapper around ``main``, because torchrun's agent exits 1 on a signal whatever its
  workers return;
- FIFO (window split over the ranks, queue checkpoints written by rank 0): ``--resume`` in a NEW
  torchrun launch completes the video to frames equal to an uninterrupted single-process run's
  (PNGs compared bit for bit). FreeLOC under Ulysses context parallelism has no queue state, so
  there is no resume to test: the interrupt leaves no video (it was still denoising) and no
  0-byte file.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _distributed import free_port

ROOT = Path(__file__).resolve().parents[1]

# What each rank runs: longvideo's main, its return value recorded; for FreeLOC a marker touched
# when the first denoising step starts (the signal must reach a run that is really in the pipeline).
_WRAPPER = """
import os, sys
from pathlib import Path
import longvideo.cli.generate_freeloc as g
first = g.StepTimer.first_call
def marked(self, *a):
    Path(os.environ["LV_TEST_DIR"], "denoising").touch()
    return first(self, *a)
g.StepTimer.first_call = marked
from longvideo.cli import main
status = main(sys.argv[1:])
Path(os.environ["LV_TEST_DIR"], "status_rank" + os.environ["RANK"]).write_text(str(status))
sys.exit(status)
"""

FIFO = ["generate", "--method", "fifo", "--fifo-partitions", "1", "--fifo-window", "2", "--device", "cpu",
        "--seed", "4", "--fifo-checkpoint-every", "2"]
FREELOC = ["generate", "--method", "freeloc", "--device", "cpu", "--num-frames", "33", "--steps", "500"]


def _torchrun(work: Path, args, log_dir: Path) -> subprocess.Popen:
    wrapper = work / "rank_main.py"
    wrapper.write_text(_WRAPPER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), LV_TEST_DIR=str(work))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "--log-dir", str(log_dir), "--redirects", "3", str(wrapper), *args]
    # its own process group: the signal goes to torchrun as a terminal's Ctrl-C would
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=work,
                            start_new_session=True)


def _rank_logs(log_dir: Path, rank: int):
    """(stdout, stderr) of `rank` as torchrun's --redirects wrote them."""
    def read(name):
        (f,) = list(log_dir.rglob(f"attempt_*/{rank}/{name}"))
        return f.read_text()

    return read("stdout.log"), read("stderr.log")


def _wait(proc, ready, what: str, limit: float = 300):
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    if proc.poll() is not None:
        out, err = proc.communicate()
        pytest.fail(f"torchrun ended before {what}: {(out + err)[-3000:]}")
    assert ready(), f"timed out waiting for {what}"


def _interrupted(proc, sig):
    os.killpg(proc.pid, sig)
    try:
        return proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _check_ranks(work, log_dir, sig, status, torchrun_err):
    name = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}[sig]
    for rank in (0, 1):
        assert (work / f"status_rank{rank}").read_text() == str(status), f"rank {rank}"
    out0, err0 = _rank_logs(log_dir, 0)
    out1, err1 = _rank_logs(log_dir, 1)
    for text in (out0, err0, out1, err1):
        assert "Traceback" not in text, text[-3000:]
    assert err1 == "" and "interrupted" not in out1  # the other rank exits quietly
    reports = [x for x in (out0 + err0).splitlines() if "interrupted by" in x]
    assert len(reports) == 1 and name in reports[0], out0 + err0
    # torchrun's own stream: at most the agent's traceback of its SignalException, nothing of ours
    if "Traceback" in torchrun_err:
        agent = torchrun_err.split("Traceback", 1)[1]
        assert torchrun_err.count("Traceback") == 1 and "SignalException" in agent, torchrun_err[-3000:]
        assert "longvideo" not in agent
    return reports[0]


def _pngs(folder: Path, n=None) -> np.ndarray:
    from PIL import Image

    files = sorted(folder.glob("frame_*.png"))[:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


@pytest.mark.slow
def test_sigint_under_torchrun_then_resume_in_a_new_launch(tmp_path):
    """FIFO, 2 ranks: Ctrl-C after a few frames, one report, exit 130 on both ranks; a new torchrun
    launch with --resume completes 40 frames equal (PNG, bit for bit) to one process's run."""
    from longvideo.cli import main

    frames = 40
    assert main(FIFO + ["--num-frames", str(frames), "--fifo-png-dir", str(tmp_path / "ref_png"),
                        "--out", str(tmp_path / "ref.mp4")]) == 0
    reference = _pngs(tmp_path / "ref_png")
    work = tmp_path / "run"
    work.mkdir()
    # asks for more frames than the resume will (num_frames may grow or shrink on resume): the
    # interrupt cannot miss a run that is still going
    run = FIFO + ["--fifo-png-dir", "png", "--out", "v.mp4"]
    proc = _torchrun(work, run + ["--num-frames", "400"], work / "logs1")
    ckpt = work / "v.fifo_state" / "fifo_state.pt"
    _wait(proc, lambda: ckpt.exists() and len(list((work / "png").glob("*.png"))) >= 4, "the first checkpoint")
    _, err = _interrupted(proc, signal.SIGINT)
    report = _check_ranks(work, work / "logs1", signal.SIGINT, 130, err)
    assert "the queue state is saved in v.fifo_state" in report

    import torch

    done = torch.load(ckpt, weights_only=True)["frames_out"]
    assert 0 < done < frames
    for f in work.glob("status_rank*"):
        f.unlink()
    proc = _torchrun(work, run + ["--num-frames", str(frames), "--resume"], work / "logs2")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out + err)[-3000:]
    np.testing.assert_array_equal(_pngs(work / "png", frames), reference)
    from longvideo.video import count_frames

    assert count_frames(work / "v.mp4") == frames


@pytest.mark.slow
def test_sigterm_under_torchrun_freeloc_context_parallel(tmp_path):
    """FreeLOC with the sequence split over 2 ranks (all-to-all in every attention layer): SIGTERM
    while denoising, one report from rank 0, exit 143 on both ranks, no traceback, no video file
    (nothing was decoded yet), no 0-byte file."""
    work = tmp_path / "run"
    work.mkdir()
    proc = _torchrun(work, FREELOC + ["--out", "v.mp4"], work / "logs")
    _wait(proc, lambda: (work / "denoising").exists(), "the first denoising step")
    _, err = _interrupted(proc, signal.SIGTERM)
    report = _check_ranks(work, work / "logs", signal.SIGTERM, 143, err)
    assert report == "longvideo: interrupted by SIGTERM"
    assert not (work / "v.mp4").exists() and not list(work.glob("*.segments"))
