"""The command line's exits (issue 17 items 2, 6): SIGTERM / SIGINT stop every command through one
path (exit 143 / 130, what was written kept), one rank reports under torchrun, a full disk or a
refused write is one line with exit status 1, `enhance` keeps the input's fps, `bench` on CPU
leaves the tracked records alone."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import longvideo.video as lvideo
from longvideo.cli import _signals, main

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI in a child process and touches MARKER when the first denoising step starts, so
# the test signals a run that is really inside the pipeline.
_CHILD = """
import sys
from pathlib import Path
import longvideo.cli.generate_freeloc as g
first = g.StepTimer.first_call
def marked(self, *a):
    Path(sys.argv[1]).touch()
    return first(self, *a)
g.StepTimer.first_call = marked
from longvideo.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_during_direct_generation_exits_143(tmp_path):
    """A real process and a real SIGTERM while the pipeline denoises."""
    sig, status, name = signal.SIGTERM, 143, "SIGTERM"
    marker = tmp_path / "started"
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-c", _CHILD, str(marker), "generate", "--method", "direct", "--num-frames", "9",
           "--steps", "500", "--device", "cpu", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    assert err.strip().splitlines()[-1] == f"longvideo: interrupted by {_signals.SIGNAL_NAMES[sig]}"
    assert "Traceback" not in err and name in err
    assert not out.exists()  # interrupted while denoising: no frame was decoded, no empty file is left


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_real_signal_in_process_takes_the_interrupt_path(monkeypatch, capsys, sig, status):
    """The handlers main installs turn both signals into the same exit (and are removed after)."""
    import longvideo.cli.info as info

    def run(args):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # interrupted long before
        return 0

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(info, "run", run)
    t0 = time.perf_counter()
    assert main(["info"]) == status
    assert time.perf_counter() - t0 < 4
    assert capsys.readouterr().err == f"longvideo: interrupted by {_signals.SIGNAL_NAMES[sig]}\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_while_stopping_is_ignored(monkeypatch, capsys):
    """torchrun forwards Ctrl-C to workers that already got it: the second signal must not cut
    the clean-up (joining the video, saving the queue state) short."""
    import longvideo.cli.info as info

    cleaned = []

    def run(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # arrives during the clean-up
            time.sleep(0.05)
            cleaned.append(True)

    monkeypatch.setattr(info, "run", run)
    assert main(["info"]) == 143
    assert cleaned == [True]
    assert capsys.readouterr().err == "longvideo: interrupted by SIGTERM\n"


def _interrupting(exc):
    def run(args):
        raise exc

    return run


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_one_rank_reports(monkeypatch, capsys, rank):
    """RANK 0 prints the one line; the other ranks exit with the same status and print nothing --
    also when what stops them is the interrupt's consequence (a collective whose peer has gone)."""
    import longvideo.cli.info as info

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(info, "run", _interrupting(_signals.Interrupted(signal.SIGTERM)))
    assert main(["info"]) == 143
    err = capsys.readouterr().err
    assert err == ("longvideo: interrupted by SIGTERM\n" if rank == "0" else "")

    def peer_gone(args):
        _signals._received = signal.SIGINT  # the signal arrived; the collective failed first
        raise RuntimeError("[gloo] Connection closed by peer")

    monkeypatch.setattr(info, "run", peer_gone)
    assert main(["info"]) == 130
    err = capsys.readouterr().err
    assert err == ("longvideo: interrupted by SIGINT (Ctrl-C)\n" if rank == "0" else "")


def test_an_error_without_a_signal_is_still_a_bug_with_its_traceback(monkeypatch):
    import longvideo.cli.info as info

    monkeypatch.setattr(info, "run", _interrupting(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info"])


def test_fifo_output_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    """A full disk while FIFO writes its video (the third segment refuses its first frame):
    `longvideo: error: cannot write <segment>: no space left on device; kept: frames 0..K-1 in
    OUT`, exit status 1, no traceback; the frames of the closed segments are joined into OUT (the
    join still had room here) and the last checkpoint claims no more frames than OUT holds."""
    import torch

    code, words = errno.ENOSPC, "no space left on device"

    real = lvideo._open_encoder
    opened = []

    class Failing:
        def __init__(self, inner):
            self.inner = inner

        def append_data(self, frame):
            raise OSError(code, os.strerror(code))

        def close(self):
            self.inner.close()

    def encoder(path, fps, quality, shape):
        opened.append(path)
        inner = real(path, fps, quality, shape)
        return Failing(inner) if len(opened) == 3 else inner

    monkeypatch.setattr(lvideo, "_open_encoder", encoder)
    out = tmp_path / "v.mp4"
    status = main(["generate", "--method", "fifo", "--num-frames", "30", "--fifo-partitions", "1", "--fifo-window", "2",
                   "--device", "cpu", "--fifo-checkpoint-every", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("longvideo:")]
    assert line.startswith("longvideo: error: cannot write ") and "seg_000002.mp4" in line
    held = lvideo.count_frames(out)
    assert line.endswith(f": {words}; kept: frames 0..{held - 1} in {out}")
    saved = torch.load(tmp_path / "v.fifo_state" / "fifo_state.pt", weights_only=True)
    assert held >= saved["frames_out"] > 0


def test_enhance_keeps_the_input_fps(tmp_path, capsys):
    src = tmp_path / "in.mp4"
    yy, xx = np.mgrid[0:32, 0:32]
    frames = np.asarray([np.stack([(xx * 6 + 9 * i) % 256, yy * 6, (xx + yy) * 3], -1) for i in range(9)], np.uint8)
    lvideo.write_video(src, frames, fps=24)
    assert lvideo.video_fps(src) == 24
    base = ["enhance", str(src), "--steps", "2", "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "a.mp4")]) == 0
    assert lvideo.video_fps(tmp_path / "a.mp4") == 24  # before: 8 whatever the input
    assert lvideo.count_frames(tmp_path / "a.mp4") == 9
    assert main(base + ["--fps", "12", "--out", str(tmp_path / "b.mp4")]) == 0
    assert lvideo.video_fps(tmp_path / "b.mp4") == 12
    capsys.readouterr()


def test_bench_on_cpu_leaves_the_tracked_records_alone(tmp_path, monkeypatch, capsys):
    from longvideo import benchmarking
    from longvideo.cli import bench

    tracked = ROOT / "benchmarks" / "results" / "README.md"
    before = tracked.read_bytes() if tracked.exists() else None
    where = []

    def fake_run_suite(suite, device, quick, out_dir, profile):
        where.append(Path(out_dir))
        return {"suite": suite}

    monkeypatch.setattr(benchmarking, "run_suite", fake_run_suite)
    monkeypatch.setattr(benchmarking, "write_record", lambda rec, out: Path(out) / "rec.json")
    monkeypatch.setattr(benchmarking, "render_table", lambda out: "table\n")
    monkeypatch.chdir(tmp_path)
    suite = benchmarking.available_suites()[0]
    assert main(["bench", "--suite", suite, "--quick", "--device", "cpu"]) == 0
    assert where == [Path(bench.CPU_RESULTS)]
    assert (tmp_path / bench.CPU_RESULTS / "README.md").read_text() == "table\n"
    assert (tracked.read_bytes() if tracked.exists() else None) == before
    # asked for explicitly: --out
    assert main(["bench", "--suite", suite, "--quick", "--device", "cpu", "--out", str(tmp_path / "mine")]) == 0
    assert where[-1] == tmp_path / "mine"
    # GPU runs, the table and the preferences keep reading/writing the checkout's records
    assert bench.results_dir(None, "cuda:0") == bench.results_dir(None) == ROOT / "benchmarks" / "results"
    capsys.readouterr()
