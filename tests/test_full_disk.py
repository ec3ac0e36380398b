"""A real full filesystem and real permission errors (issue 17 item 2; docs/outputs.md).

The ENOSPC-injection tests (tests/test_outputs.py, tests/test_interrupts.py) make single writes
fail; here the operating system does it:

- a small tmpfs mounted for the test (needs root with CAP_SYS_ADMIN; skipped, saying so, where
  mounting is not permitted) fills while ``longvideo generate --method fifo`` runs as a
  subprocess: during a queue checkpoint, and during the video (no checkpoints);
- the command run as the unprivileged user ``nobody`` (setpriv) against folders it cannot write
  (EACCES never happens to root).

What is asserted is what a user sees and keeps: one line ``longvideo: error: cannot write PATH:
REASON; kept: ...`` naming the file and what was kept, exit status 1 (2 for an output refused
before generation starts), every file that line names decodes (the mp4 with ffmpeg, the PNG frames
with PIL, equal to an uninterrupted run's frames), no temporary file left, and ``--resume`` in a
folder with room completes the video to the uninterrupted run's frames.
"""
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from longvideo.video import count_frames, read_video

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 30
# tiny Wan, one frame per FIFO iteration; a queue checkpoint is 0.2-0.4 MB, a frame ~1 KB of mp4
# and ~2 KB of PNG (tmpfs counts 4 KB pages)
RUN = ["generate", "--method", "fifo", "--num-frames", str(FRAMES), "--fifo-partitions", "1", "--fifo-window", "2",
       "--device", "cpu", "--seed", "3"]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="0")


def _cli(args, user=None, timeout=300):
    cmd = [sys.executable, "-m", "longvideo", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd="/")


def _error_line(res) -> str:
    """The command's one error line (and nothing else of it on stderr but the progress bar)."""
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [x for x in res.stderr.splitlines() if x.strip() and "frame/s" not in x and "frame]" not in x]
    assert len(lines) == 1, res.stderr[-3000:]  # ffmpeg's own messages are not printed
    assert lines[0].startswith("longvideo: error: "), lines
    return lines[0]


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    """A tmpfs of `size` mounted at `where` for the block (always unmounted after)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN); the injected-ENOSPC tests cover this case")
    where.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        why = res.stderr.strip().lower()
        if any(w in why for w in ("permission denied", "not permitted", "must be superuser", "only root")):
            pytest.skip(f"mounting a tmpfs is not permitted here ({res.stderr.strip()}); "
                        "the injected-ENOSPC tests cover this case")
        raise AssertionError(f"mount failed: {res.stderr}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _pngs(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(folder.glob("frame_*.png"))
    assert [f.name for f in files] == [f"frame_{i:06d}.png" for i in range(len(files))]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]) if files else np.zeros((0,))


def _leftovers(folder: Path):
    """Temporary files (hidden names: .x.tmp, .v.joining.mp4, .seg.cut.mp4) and stray segment folders."""
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")
            or p.name.endswith(".segments")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its PNG frames (lossless) and its video."""
    from longvideo.cli import main

    d = tmp_path_factory.mktemp("reference")
    assert main(RUN + ["--fifo-png-dir", str(d / "png"), "--out", str(d / "v.mp4")]) == 0  # in this process: faster
    frames = _pngs(d / "png")
    assert frames.shape[0] == FRAMES
    return frames


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_then_resume_where_there_is_room(tmp_path, reference):
    """700 KB: the first queue checkpoints fit, a later one does not (the temporary file beside the
    previous checkpoint). The run stops with one line naming the checkpoint and what was kept (the
    previous checkpoint, the joined video, the PNGs); all of it decodes; no temporary file is left;
    the folder copied where there is room resumes to the uninterrupted run's frames."""
    full = tmp_path / "full"
    with small_tmpfs(full, "700k"):
        res = _cli(RUN + ["--fifo-checkpoint-every", "1", "--fifo-png-dir", str(full / "png"),
                          "--out", str(full / "v.mp4")])
        assert res.returncode == 1, res.stderr[-3000:]
        line = _error_line(res)
        ckpt = full / "v.fifo_state" / "fifo_state.pt"
        m = re.fullmatch(rf"longvideo: error: cannot write {re.escape(str(ckpt))}: no space left on device; "
                         rf"kept: the previous checkpoint {re.escape(str(ckpt))} \(unchanged\); "
                         rf"frames 0\.\.(\d+) in {re.escape(str(full / 'v.mp4'))}; "
                         rf"frames 0\.\.(\d+) as PNG files in {re.escape(str(full / 'png'))}", line)
        assert m, line
        in_video, in_pngs = int(m.group(1)) + 1, int(m.group(2)) + 1
        assert 0 < in_video < FRAMES and in_pngs == in_video
        assert _leftovers(full) == []
        # what the line says was kept is there and decodes
        video = read_video(full / "v.mp4")
        assert video.shape[0] == in_video == count_frames(full / "v.mp4")
        pngs = _pngs(full / "png")
        np.testing.assert_array_equal(pngs, reference[:in_pngs])
        assert float(np.abs(video.astype(int) - pngs.astype(int)).mean()) < 8  # lossy H.264 of those frames
        saved = torch.load(ckpt, weights_only=True)["frames_out"]
        assert 0 < saved <= in_video  # the checkpoint never claims more than the video holds
        roomy = tmp_path / "roomy"
        shutil.copytree(full, roomy)
    res = _cli(RUN + ["--fifo-checkpoint-every", "1", "--fifo-png-dir", str(roomy / "png"),
                      "--out", str(roomy / "v.mp4"), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_array_equal(_pngs(roomy / "png"), reference)
    after = read_video(roomy / "v.mp4")
    assert after.shape[0] == FRAMES
    np.testing.assert_array_equal(after[:saved], video[:saved])  # kept as coded, not encoded again
    assert _leftovers(roomy) == []


@pytest.mark.slow
def test_full_disk_during_the_video_keeps_the_png_frames(tmp_path, reference):
    """40 KB, no checkpoints: the video's one open segment cannot be finished. The line names the
    segment and says what was kept -- the PNG frames written so far, which decode to the
    uninterrupted run's frames -- and no half-written file (segment, PNG, temporary) is left."""
    full = tmp_path / "full"
    with small_tmpfs(full, "40k"):
        res = _cli(RUN + ["--fifo-checkpoint-every", "0", "--fifo-png-dir", str(full / "png"),
                          "--out", str(full / "v.mp4")])
        assert res.returncode == 1, res.stderr[-3000:]
        line = _error_line(res)
        seg = full / "v.segments" / "seg_000000.mp4"
        m = re.fullmatch(rf"longvideo: error: cannot write {re.escape(str(seg))}: no space left on device; "
                         rf"kept: frames 0\.\.(\d+) as PNG files in {re.escape(str(full / 'png'))}", line)
        assert m, line
        kept = int(m.group(1)) + 1
        assert 0 < kept < FRAMES
        np.testing.assert_array_equal(_pngs(full / "png"), reference[:kept])
        assert sorted(p.name for p in full.iterdir()) == ["png"]  # no unplayable segment, no 0-byte mp4
        assert _leftovers(full) == []


# ------------------------------------------------------------------------------------------------
# real permission errors: the command run as `nobody`
NOBODY = 65534


def _nobody_can_run() -> str:
    """'' when `nobody` can run the package here, else why not."""
    if os.geteuid() != 0:
        return "switching to the user nobody needs root"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing"
    res = _cli(["info"], user=NOBODY, timeout=120)
    if res.returncode != 0:
        return f"the user nobody cannot run this Python and checkout ({(res.stderr or res.stdout).strip()[-300:]})"
    return ""


@pytest.fixture(scope="module")
def shared_dir():
    """A folder nobody can reach (pytest's tmp_path is private to root) with one subfolder it may
    write and one it may not."""
    why = _nobody_can_run()
    if why:
        pytest.skip(why)
    d = Path(tempfile.mkdtemp(prefix="lv-eacces-"))
    try:
        os.chmod(d, 0o755)
        (d / "locked").mkdir()
        os.chmod(d / "locked", 0o755)             # root's: nobody may read, not write
        (d / "open").mkdir()
        os.chmod(d / "open", 0o777)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("what", ["video", "png dir", "checkpoint dir"])
def test_permission_denied_is_one_line_before_generation(shared_dir, what):
    """Refused before any model is loaded (exit 2, the option and the folder named, nothing
    written): the video's folder, --fifo-png-dir, and the checkpoint folder next to the video when
    it exists and is not writable (a previous root run's OUT.fifo_state/)."""
    locked, open_ = shared_dir / "locked", shared_dir / "open"
    out, png = open_ / f"{what[:3]}.mp4", open_ / "png"
    if what == "video":
        out = locked / "v.mp4"
    elif what == "png dir":
        png = locked / "png"
    else:
        state = out.with_suffix(".fifo_state")
        state.mkdir(exist_ok=True)
        os.chmod(state, 0o755)                    # root's, from an earlier run as root
    res = _cli(RUN + ["--fifo-png-dir", str(png), "--out", str(out), "--fifo-checkpoint-every", "1"], user=NOBODY)
    assert res.returncode == 2, (res.stdout + res.stderr)[-3000:]
    line = _error_line(res)
    expected = {"video": f"--out {out}: the folder {locked} is not writable",
                "png dir": f"--fifo-png-dir {png}: the folder {locked} is not writable",
                "checkpoint dir": f"--out {out}: the checkpoint folder {out.with_suffix('.fifo_state')} is not writable"}
    assert line == f"longvideo: error: {expected[what]}"
    assert "settings:" not in res.stdout  # refused before the run started
    assert not out.exists() and not list(locked.iterdir())


@pytest.mark.slow
def test_permission_lost_during_the_run_is_one_line_and_keeps_the_frames(shared_dir):
    """The PNG folder becomes unwritable while the run is going (a real EACCES from the kernel, for
    the user nobody): one line naming the PNG file, exit 1, and the video of every frame written
    so far joined and playable."""
    out_dir = shared_dir / "open" / "during"
    png = out_dir / "png"
    png.mkdir(parents=True)
    os.chmod(out_dir, 0o777)
    os.chmod(png, 0o777)
    # nobody's PNG folder is made read-only by root once 5 frames are there
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-m", "longvideo",
           *RUN, "--num-frames", "400", "--fifo-checkpoint-every", "0", "--fifo-png-dir", str(png),
           "--out", str(out_dir / "v.mp4")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd="/")
    try:
        import time

        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(list(png.glob("frame_*.png"))) < 5:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.chmod(png, 0o555)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert res.returncode == 1, err[-3000:]
    line = _error_line(res)
    m = re.fullmatch(rf"longvideo: error: cannot write {re.escape(str(png))}/frame_(\d+)\.png: permission denied; "
                     rf"kept: frames 0\.\.(\d+) in {re.escape(str(out_dir / 'v.mp4'))}; "
                     rf"frames 0\.\.(\d+) as PNG files in {re.escape(str(png))}", line)
    assert m, line
    failed, in_video, in_pngs = (int(g) for g in m.groups())
    assert failed == in_pngs + 1 and in_video == failed  # the frame whose PNG failed is in the video
    assert count_frames(out_dir / "v.mp4") == in_video + 1
    assert len(_pngs(png)) == in_pngs + 1
    assert _leftovers(out_dir) == []
