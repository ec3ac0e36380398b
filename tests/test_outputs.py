"""Writes that never lose work (issue 17 item 2): the segmented video writer, resume without
re-encoding, atomic checkpoints, and a full disk (ENOSPC injected: this machine has no small
filesystem to fill without root) during a segment, during the checkpoint and during the join."""
import errno
import json

import numpy as np
import pytest
import torch

import longvideo._io as lio
import longvideo.video as lvideo
from longvideo._io import OutputError, atomic_write_bytes
from longvideo.video import VideoWriter, count_frames, read_video


def _frames(n, h=32, w=48, seed=0):
    """Smooth moving gradients (a codec's ordinary input; noise would be coded intra anyway)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = [np.stack([(xx * 5 + 7 * i) % 256, (yy * 7 + 3 * i) % 256, ((xx + yy) * 3 + seed) % 256], -1)
           for i in range(n)]
    return np.asarray(out, dtype=np.uint8)


def _segments(writer_or_dir):
    folder = getattr(writer_or_dir, "segments_dir", writer_or_dir)
    return json.loads((folder / "segments.json").read_text())["segments"]


def test_segments_join_into_one_video_of_every_frame(tmp_path):
    frames = _frames(17)
    out = tmp_path / "v.mp4"
    with VideoWriter(out, fps=8, segment_frames=5) as w:
        for f in frames:
            w.write(f)
        assert [s["frames"] for s in _segments(w)] == [5, 5, 5]  # closed ones; 2 frames still open
        seg0 = read_video(w.segments_dir / "seg_000000.mp4")  # a closed segment plays on its own
    assert seg0.shape[0] == 5
    video = read_video(out)
    assert video.shape == frames.shape
    err = float(np.abs(video.astype(int) - frames.astype(int)).mean())
    assert err < 8  # lossy H.264, close to the input
    np.testing.assert_array_equal(video[:5], seg0)  # joined by copying packets: the same decoded frames
    assert not w.segments_dir.exists() and not list(tmp_path.glob(".*"))


def test_a_writer_that_writes_nothing_makes_no_file(tmp_path):
    with VideoWriter(tmp_path / "v.mp4"):
        pass
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("source", ["joined file", "segments of a killed run"])
def test_resume_keeps_the_old_frames_without_re_encoding(tmp_path, source):
    """keep_frames=N keeps the first N frames exactly as they were coded (bit-equal decodes: a
    second encode of lossy frames would change them) and appends the new ones."""
    frames = _frames(20)
    out = tmp_path / "v.mp4"
    w = VideoWriter(out, fps=8, segment_frames=4)
    w.write(frames[:14])
    if source == "joined file":
        w.close()
        before = read_video(out)
    else:  # killed: the open segment (frames 12, 13) never closed; its file is unreadable junk
        w._writer = None
        (w.segments_dir / "seg_000003.mp4").write_bytes(b"\0" * 100)
        before = np.concatenate([read_video(w.segments_dir / f"seg_{i:06d}.mp4") for i in range(3)])
    keep = 10
    resumed = VideoWriter(out, fps=8, segment_frames=4, keep_frames=keep)
    assert resumed.frames_written == keep
    resumed.write(frames[keep:])
    resumed.close()
    after = read_video(out)
    assert after.shape[0] == 20
    np.testing.assert_array_equal(after[:keep], before[:keep])
    err = float(np.abs(after[keep:].astype(int) - frames[keep:].astype(int)).mean())
    assert err < 8  # lossy H.264 of the new frames: close to the input
    # the test can fail: encoding the kept frames again (what resume did before) changes them
    lvideo.write_video(tmp_path / "again.mp4", before[:keep])
    assert not np.array_equal(read_video(tmp_path / "again.mp4"), before[:keep])


def test_resume_with_fewer_frames_than_asked_reports_what_it_holds(tmp_path):
    out = tmp_path / "v.mp4"
    lvideo.write_video(out, _frames(3))
    w = VideoWriter(out, keep_frames=8)
    assert w.frames_written == 3
    assert VideoWriter(tmp_path / "missing.mp4", keep_frames=8).frames_written == 0


class _FailingEncoder:
    """An imageio writer stand-in that fails like a full disk after `ok` frames."""

    def __init__(self, inner, ok):
        self.inner, self.ok = inner, ok

    def append_data(self, frame):
        if self.ok <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.ok -= 1
        self.inner.append_data(frame)

    def close(self):
        self.inner.close()


def test_full_disk_during_a_segment_keeps_the_closed_segments(tmp_path, monkeypatch):
    frames = _frames(13)
    real = lvideo._open_encoder
    opened = []

    def encoder(path, fps, quality, shape):
        opened.append(path)
        return _FailingEncoder(real(path, fps, quality, shape), ok=2 if len(opened) == 3 else 10 ** 6)

    monkeypatch.setattr(lvideo, "_open_encoder", encoder)
    out = tmp_path / "v.mp4"
    w = VideoWriter(out, segment_frames=5)
    with pytest.raises(OutputError) as info:
        w.write(frames)
    msg = str(info.value)
    assert "\n" not in msg and "seg_000002.mp4" in msg and "no space left on device" in msg
    assert "kept: frames 0..9 in 2 playable segment file(s)" in msg
    assert info.value.errno == errno.ENOSPC and w.frames_written == 10
    assert [s["frames"] for s in _segments(w)] == [5, 5]
    kept = np.concatenate([read_video(w.segments_dir / s["file"]) for s in _segments(w)])
    err = float(np.abs(kept.astype(int) - frames[:10].astype(int)).mean())
    assert kept.shape[0] == 10 and err < 8
    # after space is freed, the same writer file set resumes from what was kept
    monkeypatch.setattr(lvideo, "_open_encoder", real)
    again = VideoWriter(out, segment_frames=5, keep_frames=13)
    assert again.frames_written == 10
    again.write(frames[10:])
    again.close()
    assert count_frames(out) == 13


def test_full_disk_during_the_join_keeps_the_segments(tmp_path, monkeypatch):
    frames = _frames(9)
    out = tmp_path / "v.mp4"
    out.write_bytes(b"an older file that must stay as it was")

    def full(args, what):
        (tmp_path / ".v.joining.mp4").write_bytes(b"partial")  # ffmpeg had started writing
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lvideo, "_run_ffmpeg", full)
    w = VideoWriter(out, segment_frames=4)
    w.write(frames)
    with pytest.raises(OutputError, match=r"cannot write .*v\.mp4: no space left on device; kept: frames 0\.\.8 "):
        w.close()
    assert out.read_bytes() == b"an older file that must stay as it was"
    assert not (tmp_path / ".v.joining.mp4").exists()
    segs = _segments(w)
    assert [s["frames"] for s in segs] == [4, 4, 1]
    assert sum(read_video(w.segments_dir / s["file"]).shape[0] for s in segs) == 9


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_write_bytes(path, b"old")

    def full(fd, data):
        lio.os.write(fd, data[:2])  # part of it, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lio, "_write_all", full)
    with pytest.raises(OutputError, match="state.pt: no space left on device; kept: the old one"):
        atomic_write_bytes(path, b"new contents", kept="the old one")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_full_disk_during_a_fifo_checkpoint(tmp_path, monkeypatch):
    """FIFO on the tiny Wan model, a checkpoint every iteration, the disk full at the third
    checkpoint: OutputError names the checkpoint and says the previous one is kept; that one
    loads and continues (resume gives the uninterrupted run's frames), no temporary file is left,
    and the video holds every frame the kept checkpoint claims."""
    from longvideo.methods.fifo import FIFODiffusion
    from longvideo.models import wan

    pipe = wan.tiny_pipeline()
    fifo = FIFODiffusion(pipe, num_partitions=1, frames_per_window=2)
    ckpt_dir = tmp_path / "v.fifo_state"
    reference = np.stack(list(fifo.generate("a cat", 13, guidance_scale=1.0, seed=3)))  # uint8 frames
    checkpoints = []
    real = lio._write_all

    def write_all(fd, data):
        if data[:2] == b"PK":  # a torch.save zip: the queue checkpoint (not the segment manifest)
            checkpoints.append(len(data))
            if len(checkpoints) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(lio, "_write_all", write_all)
    writer = VideoWriter(tmp_path / "v.mp4", segment_frames=100)
    got = []
    with pytest.raises(OutputError) as info:
        for frame in fifo.generate("a cat", 13, guidance_scale=1.0, seed=3, writer=writer, checkpoint_dir=ckpt_dir,
                                   checkpoint_every=1):
            got.append(frame)
    msg = str(info.value)
    assert "fifo_state.pt: no space left on device; kept: the previous checkpoint" in msg and "\n" not in msg
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["fifo_state.pt"]
    saved = torch.load(ckpt_dir / "fifo_state.pt", weights_only=True)
    assert saved["iteration"] == 2
    assert writer.kept_frames >= saved["frames_out"] > 0  # synced before every checkpoint
    monkeypatch.setattr(lio, "_write_all", real)
    writer.close()
    assert count_frames(tmp_path / "v.mp4") >= saved["frames_out"]
    rest = list(fifo.generate("a cat", 13, guidance_scale=1.0, seed=3, checkpoint_dir=ckpt_dir, checkpoint_every=1,
                              resume=True))
    np.testing.assert_array_equal(np.stack(got[:saved["frames_out"]] + rest), reference)
