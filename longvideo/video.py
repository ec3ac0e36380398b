"""Video I/O: streaming mp4 writing (frames as they are produced), reading, format conversion.

Frames are numpy uint8 arrays (H, W, 3). mp4 encoding uses imageio's ffmpeg plugin
(imageio-ffmpeg ships its own ffmpeg binary, so nothing else needs installing).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np


def to_uint8_frames(video) -> np.ndarray:
    """Convert diffusers-style video outputs to uint8 frames (F, H, W, 3).

    Accepts: a list of PIL images; a numpy float array in [0, 1] or uint8, (F, H, W, 3) or (H, W, 3);
    a torch tensor in [0, 1] (or [-1, 1] if it has negatives), (F, 3, H, W), (3, F, H, W) or (F, H, W, 3);
    a batch of one of these with a leading batch dim of 1.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if isinstance(video, (list, tuple)):
        if len(video) == 0:
            return np.zeros((0, 0, 0, 3), np.uint8)
        if hasattr(video[0], "convert"):  # PIL
            return np.stack([np.asarray(im.convert("RGB")) for im in video])
        return np.concatenate([to_uint8_frames(v) for v in video])  # each (n, H, W, 3), a frame as n = 1
    if torch is not None and isinstance(video, torch.Tensor):
        t = video.detach().float().cpu()
        if t.ndim == 5 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3:
            t = t[None] if t.shape[-1] == 3 else t[None].permute(0, 2, 3, 1)
        elif t.ndim == 4:
            if t.shape[-1] == 3:
                pass
            elif t.shape[1] == 3:
                t = t.permute(0, 2, 3, 1)
            elif t.shape[0] == 3:
                t = t.permute(1, 2, 3, 0)
            else:
                raise ValueError(f"video tensor of shape {tuple(video.shape)} has no channel axis of size 3")
        else:
            raise ValueError(f"video tensor must have 3-5 dims, got shape {tuple(video.shape)}")
        if t.min() < 0:
            t = (t + 1) / 2
        return (t.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    arr = np.asarray(video)
    if arr.ndim == 5 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected frames (F, H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


SEGMENT_FRAMES = 120  # frames per segment file when nothing asks for a durable point sooner


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _run_ffmpeg(args, what) -> None:
    """Run ffmpeg (imageio-ffmpeg's binary) with `args`; an OSError with the errno its message names on failure
    (a separate function: tests make it fail)."""
    import subprocess

    res = subprocess.run([_ffmpeg(), "-y", "-v", "error", *args], capture_output=True, text=True)
    if res.returncode != 0:
        code = _errno_of(res.stderr)
        raise OSError(code, os.strerror(code) if code != errno.EIO else
                      f"ffmpeg failed {what}: {' '.join(res.stderr.split())[-300:]}")


def _errno_of(text: str) -> int:
    low = (text or "").lower()
    if "no space left" in low:
        return errno.ENOSPC
    if "permission denied" in low:
        return errno.EACCES
    if "read-only file system" in low:
        return errno.EROFS
    return errno.EIO


def count_frames(path) -> int:
    """Frames of a video file (ffmpeg decodes it; an unreadable file raises)."""
    import imageio_ffmpeg

    return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])


def _open_encoder(path: Path, fps: float, quality: int, shape):
    """An H.264 encoder for one segment (a separate function: tests make it fail): an
    :class:`_Encoder` with ``append_data(frame)`` and ``close()``.

    No B-frames (``-bf 0``): every frame is coded after the frames it refers to, so the first n
    packets of a segment are exactly its first n frames and a segment can be cut to a prefix by
    copying packets (``-c copy -frames:v n``) without re-encoding."""
    return _Encoder(path, fps, quality, shape)


class _Encoder:
    """imageio-ffmpeg's ffmpeg binary encoding raw RGB frames from a pipe into `path` (the same
    command line imageio's writer runs: libx264, crf from `quality` 1..10, yuv420p -- yuv444p for
    odd sizes, which 4:2:0 cannot hold -- no resizing), with what imageio's writer does not do:

    - ffmpeg's messages are captured, not printed (a full disk must be ONE line from the command,
      not ffmpeg's "Error writing trailer" on the terminal);
    - ``close()`` waits for ffmpeg and raises OSError (the errno its message names: ENOSPC, EACCES,
      EROFS, else EIO) when it failed: a file whose trailer could not be written is not a playable
      segment and must not be counted as one;
    - a frame the dead encoder cannot take raises the same OSError (not a bare broken pipe).

    ffmpeg runs in its own process group (as imageio starts it) so that the terminal's Ctrl-C
    reaches only this process, which then closes the segment properly."""

    def __init__(self, path, fps, quality, shape):
        import subprocess
        import tempfile
        from fractions import Fraction

        h, w = int(shape[0]), int(shape[1])
        self.path = Path(path)
        self.shape = (h, w)
        pix_out = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
        crf = int((1 - quality / 10.0) * 51)
        cmd = [_ffmpeg(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{w}x{h}", "-pix_fmt", "rgb24",
               "-r", str(Fraction(fps).limit_denominator()), "-i", "-", "-an", "-vcodec", "libx264",
               "-pix_fmt", pix_out, "-crf", str(crf), "-v", "error", "-bf", "0", str(self.path)]
        # ffmpeg's messages: an unlinked temporary file (a pipe nobody reads could fill and block it)
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log,
                                      start_new_session=True)

    def _failure(self, what: str) -> OSError:
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        code = _errno_of(text)
        detail = " ".join(text.split())[-300:]
        return OSError(code, os.strerror(code) if code != errno.EIO else f"ffmpeg failed {what}: {detail}",
                       str(self.path))

    def append_data(self, frame) -> None:
        arr = np.ascontiguousarray(frame, dtype=np.uint8)
        if arr.shape != (*self.shape, 3):
            raise ValueError(f"frame of shape {arr.shape}, the video's frames are {(*self.shape, 3)}")
        try:
            self._proc.stdin.write(arr.tobytes())
        except OSError:  # the encoder has gone (a full disk, no permission): say why, in its words
            self._proc.wait()
            raise self._failure("encoding") from None

    def close(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            code = proc.wait()
        except BaseException:  # interrupted while waiting: do not leave ffmpeg behind
            proc.kill()
            proc.wait()
            raise
        try:
            if code != 0:
                raise self._failure("writing the file")
        finally:
            self._log.close()


class VideoWriter:
    """Write a video frame by frame so that no written frame is lost (docs/outputs.md).

        with VideoWriter("out.mp4", fps=8, png_dir=None) as w:
            w.write(frame_or_frames)

    The frames are encoded (H.264, no B-frames) into segment files in ``OUT.segments/`` next to
    the output (``seg_000000.mp4``...), each a complete, playable video once closed. A segment is
    closed every `segment_frames` frames and at every :meth:`sync` (FIFO calls it before saving a
    queue checkpoint, so a checkpoint never claims frames the video does not hold); a closed
    segment is fsynced and recorded in ``segments.json`` (written atomically). :meth:`close` (also
    on an exception or Ctrl-C, through ``with``) closes the last segment and joins the segments
    into OUT by copying their packets (``ffmpeg -f concat -c copy``: nothing is encoded again)
    into a temporary file that is fsynced and renamed over OUT; then ``OUT.segments/`` is removed.
    A killed process loses at most the open segment; its closed segments stay playable and a
    later writer with ``keep_frames`` picks them up.

    keep_frames: resume: the video already holds these frames (``OUT.segments/`` of an
        interrupted run, else the file OUT itself); they are kept as they are (a longer video is
        cut to its first `keep_frames` frames by copying packets) and new frames are appended.
        ``frames_written`` then starts at the number of frames kept, which is less than
        `keep_frames` when the old video is missing or shorter (the caller decides what to do).
    png_dir: also write every new frame as ``frame_<index>.png`` there, index counted from
        `first_frame_index` (the video's frame number of this file's first frame).

    A write that fails (a full disk, no permission) raises :class:`longvideo._io.OutputError`
    naming the file and what was kept (the closed segments, in order).
    """

    def __init__(self, path: Union[str, os.PathLike], fps: float = 8, png_dir=None, quality: int = 8,
                 segment_frames: int = SEGMENT_FRAMES, keep_frames: int = 0, first_frame_index: int = 0):
        if not (isinstance(segment_frames, int) and segment_frames >= 1):
            raise ValueError(f"segment_frames must be a positive int, got {segment_frames!r}")
        if not (isinstance(keep_frames, int) and keep_frames >= 0):
            raise ValueError(f"keep_frames must be a non-negative int, got {keep_frames!r}")
        self.path = Path(path)
        self.fps = fps
        self.png_dir = Path(png_dir) if png_dir else None
        self.quality = quality
        self.segment_frames = segment_frames
        self.first_frame_index = int(first_frame_index)
        self.segments_dir = self.path.with_name(self.path.name.rsplit(".", 1)[0] + ".segments") \
            if "." in self.path.name else self.path.with_name(self.path.name + ".segments")
        self.segments: list = []     # [(file name, frames)] of the closed segments, in order
        self.frames_written = 0      # frames in the video: kept + closed segments + open segment
        self._writer = None          # the open segment's encoder
        self._open_path: Optional[Path] = None
        self._open_frames = 0
        self.joined = False
        self._stale = not keep_frames
        self._plan = None            # resume: the old frames kept (applied at the first write)
        self._touched = False        # this writer has written or synced
        self._failed_kept = None     # what a failed segment or PNG write said was kept
        self._png_first = None       # frame index of this writer's first PNG file
        self._png_count = 0          # PNG files this writer has written completely
        if keep_frames:
            self._keep(keep_frames)

    # -- segments ---------------------------------------------------------------------------
    @property
    def kept_frames(self) -> int:
        """Frames in closed (durable) segments."""
        return sum(n for _, n in self.segments)

    def _manifest(self) -> Path:
        return self.segments_dir / "segments.json"

    def _save_manifest(self) -> None:
        import json

        from ._io import atomic_write_bytes

        data = {"format": "longvideo.segments/1", "fps": self.fps, "output": self.path.name,
                "segments": [{"file": f, "frames": n} for f, n in self.segments]}
        atomic_write_bytes(self._manifest(), json.dumps(data, indent=1).encode(), kept=self.describe_kept())

    def describe_kept(self) -> str:
        """Where the frames written so far are, in words (for error messages): the closed
        segments, and the PNG files when there are any."""
        n, first = self.kept_frames, self.first_frame_index
        video = (f"frames {first}..{first + n - 1} in {len(self.segments)} playable segment file(s) in "
                 f"{self.segments_dir} (listed in order in segments.json)") if n else ""
        return "; ".join(x for x in (video, self.describe_pngs()) if x) or "no frames yet"

    def describe_pngs(self) -> str:
        """The PNG files this writer has written, in words ("" when none)."""
        if not self._png_count:
            return ""
        return (f"frames {self._png_first}..{self._png_first + self._png_count - 1} as PNG files in "
                f"{self.png_dir}")

    def _next_segment(self) -> Path:
        return self.segments_dir / f"seg_{len(self.segments):06d}{self.path.suffix or '.mp4'}"

    def _close_segment(self) -> None:
        """Close the open segment: encoder flushed, file fsynced, recorded in the manifest."""
        if self._writer is None:
            return
        from ._io import fsync_dir, fsync_file, output_error

        writer, self._writer = self._writer, None
        path, frames = self._open_path, self._open_frames
        self._open_path, self._open_frames = None, 0
        try:
            writer.close()
            fsync_file(path)
            fsync_dir(path.parent)
        except Exception as exc:  # noqa: BLE001 - the encoder reports a full disk as whatever it gets
            self.frames_written = self.kept_frames
            _unlink(path)
            self._failed_kept = self.describe_kept()
            raise output_error(path, exc, self._failed_kept) from exc
        self.segments.append((path.name, frames))
        self._save_manifest()

    def _open_segment(self, shape) -> None:
        from ._io import output_error

        path = self._next_segment()
        try:
            if self._stale and self.segments_dir.exists():  # a fresh video: an old run's segments go
                _rmtree(self.segments_dir)
            self._stale = False
            self.segments_dir.mkdir(parents=True, exist_ok=True)
            self._writer = _open_encoder(path, self.fps, self.quality, shape)
        except OSError as exc:
            raise output_error(path, exc, self.describe_kept()) from exc
        self._open_path, self._open_frames = path, 0

    def write(self, frames) -> None:
        """Append frames (anything :func:`to_uint8_frames` takes)."""
        from ._io import output_error

        arr = to_uint8_frames(frames)
        if len(arr) and not self._touched:
            self._touched = True
            self._apply_keep()
        for frame in arr:
            if self._writer is not None and self._open_frames >= self.segment_frames:
                self._close_segment()
            if self._writer is None:
                self._open_segment(frame.shape)
            try:
                self._writer.append_data(frame)
            except OSError as exc:  # BrokenPipe/IOError: the encoder process could not write
                writer, path = self._writer, self._open_path
                self._writer, self._open_path, self._open_frames = None, None, 0
                self.frames_written = self.kept_frames
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - it failed already
                    pass
                _unlink(path)
                self._failed_kept = self.describe_kept()
                raise output_error(path, exc, self._failed_kept) from exc
            self._open_frames += 1
            self.frames_written += 1
            if self.png_dir:
                self._write_png(frame, self.first_frame_index + self.frames_written - 1)

    def _write_png(self, frame, index: int) -> None:
        """``frame_<index>.png``, written to a temporary name and renamed: a full disk or a killed
        process never leaves a truncated PNG under a frame's name."""
        from PIL import Image

        from ._io import output_error

        png = self.png_dir / f"frame_{index:06d}.png"
        tmp = png.with_name(f".{png.name}.tmp")
        try:
            self.png_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(frame).save(tmp, format="PNG")
            os.replace(tmp, png)
        except OSError as exc:
            _unlink(tmp)
            self._failed_kept = self.describe_kept()
            raise output_error(png, exc, self._failed_kept) from exc
        if self._png_first is None:
            self._png_first = index
        self._png_count += 1

    def sync(self) -> int:
        """Make every frame written so far durable (the open segment is closed; the next frame
        opens a new one). Returns the number of durable frames."""
        if not self._touched:
            self._touched = True
            self._apply_keep()
        self._close_segment()
        return self.kept_frames

    # -- resume -----------------------------------------------------------------------------
    def _keep(self, keep: int) -> None:
        """Plan which frames of the old video are kept (nothing is changed on disk until this
        writer writes or syncs: a writer that writes nothing leaves the old video as it was)."""
        import json

        plan = []  # (source file, frames it holds, frames kept of it)
        if self._manifest().exists():  # an interrupted or killed run: its closed segments
            data = json.loads(self._manifest().read_text())
            total = 0
            for s in data["segments"]:
                name, n = s["file"], int(s["frames"])
                if total < keep and (self.segments_dir / name).exists():
                    plan.append((self.segments_dir / name, n, min(n, keep - total)))
                    total += min(n, keep - total)
        elif self.path.exists():  # a finished (or interrupted and joined) run: the file itself
            try:
                have = count_frames(self.path)
            except Exception:  # noqa: BLE001 - unreadable: nothing can be kept from it
                have = 0
            if have:
                plan.append((self.path, have, min(have, keep)))
        self._plan = plan
        self.frames_written = sum(k for _, _, k in plan)

    def _apply_keep(self) -> None:
        """Carry out the plan of _keep: the kept frames become this writer's first segments."""
        plan, self._plan = self._plan, None
        if plan is None:
            return
        from ._io import output_error

        try:
            self.segments_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(self.segments_dir, exc) from exc
        if plan and plan[0][0] == self.path:  # the joined file: linked (or cut) in as segment 0
            src, have, keep = plan[0]
            first = self._next_segment()
            if keep < have:
                self._cut(src, keep, dst=first)
            else:
                _unlink(first)
                try:
                    os.link(src, first)  # no copy: the final rename replaces OUT, not this link
                except OSError:
                    import shutil

                    shutil.copyfile(src, first)
            self.segments.append((first.name, keep))
        else:
            listed = {p for p, _, _ in plan}
            for p in self.segments_dir.iterdir():  # segments open when the process died, or past the end
                if p.name != "segments.json" and p not in listed:
                    _unlink(p)
            for src, have, keep in plan:
                if keep < have:
                    self._cut(src, keep)
                self.segments.append((src.name, keep))
        self._save_manifest()

    def _cut(self, src: Path, frames: int, dst: Optional[Path] = None) -> None:
        """`src`'s first `frames` frames into `dst` (default: `src` itself), packets copied."""
        from ._io import fsync_file, output_error

        dst = dst or src
        tmp = dst.with_name(f".{dst.stem}.cut{dst.suffix}")
        try:
            _run_ffmpeg(["-i", str(src), "-map", "0:v:0", "-c", "copy", "-frames:v", str(frames), str(tmp)],
                        f"cutting {src} to {frames} frames")
            fsync_file(tmp)
            os.replace(tmp, dst)
        except OSError as exc:
            _unlink(tmp)
            raise output_error(dst, exc, self.describe_kept()) from exc

    # -- the end ----------------------------------------------------------------------------
    def join(self) -> Optional[Path]:
        """Join the closed segments into the output file (packets copied, atomically replaced)
        and remove ``OUT.segments/``; None when there are no frames (no empty file is made)."""
        from ._io import OutputError, fsync_dir, fsync_file, output_error

        try:
            self._close_segment()
        except OutputError:
            if not self.segments:  # the only segment could not be finished: no folder of nothing is left
                _rmtree(self.segments_dir)
            raise
        if not self.segments:
            if self.segments_dir.exists():
                _rmtree(self.segments_dir)
            return None
        tmp = self.path.with_name(f".{self.path.stem}.joining{self.path.suffix}")
        files = [self.segments_dir / f for f, _ in self.segments]
        try:
            if len(files) == 1:
                os.replace(files[0], self.path)
            else:
                listing = self.segments_dir / "concat.txt"
                listing.write_text("".join("file '" + str(f.resolve()).replace("'", "'\\''") + "'\n"
                                           for f in files))
                _run_ffmpeg(["-f", "concat", "-safe", "0", "-i", str(listing), "-map", "0:v:0", "-c", "copy",
                             str(tmp)], f"joining the segments of {self.path}")
                fsync_file(tmp)
                os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            _unlink(tmp)
            raise output_error(self.path, exc, self.describe_kept()) from exc
        _rmtree(self.segments_dir)
        self.segments = []
        self.joined = True
        return self.path

    def close(self) -> None:
        """Close the open segment and join every segment into the output file (a writer that
        wrote nothing changes nothing)."""
        if self._touched:
            self.join()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        from ._io import OutputError

        self.close()
        if isinstance(exc, OutputError) and self.joined and exc.kept == self._failed_kept:
            # a segment or a PNG could not be written, but the frames before it could still be joined
            video = (f"frames {self.first_frame_index}..{self.first_frame_index + self.frames_written - 1} "
                     f"in {self.path}")
            exc.set_kept("; ".join(x for x in (video, self.describe_pngs()) if x))


def _unlink(path) -> None:
    if path is None:
        return
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass


def _rmtree(folder) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def write_video(path, frames, fps: float = 8) -> Path:
    with VideoWriter(path, fps=fps) as w:
        w.write(frames)
    return Path(path)


def read_video(path) -> np.ndarray:
    """All frames of a video file as uint8 (F, H, W, 3)."""
    import imageio

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    reader = imageio.get_reader(str(path))
    try:
        frames = [np.asarray(f)[..., :3] for f in reader]
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"video file has no frames: {path}")
    return np.stack(frames)


def video_fps(path) -> Optional[float]:
    """Frames per second of a video file from its metadata (None where it gives none: an image
    sequence, a GIF without frame durations)."""
    import imageio

    try:
        reader = imageio.get_reader(str(path))
    except Exception:  # noqa: BLE001 - unreadable: no fps to read
        return None
    try:
        meta = reader.get_meta_data()
    except Exception:  # noqa: BLE001
        meta = {}
    finally:
        reader.close()
    fps = meta.get("fps")
    if not fps and meta.get("duration"):  # GIF: milliseconds per frame
        fps = 1000.0 / float(meta["duration"])
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        return None
    return fps if fps > 0 and fps == fps and fps != float("inf") else None


def iter_frames(frames: Iterable) -> Iterable[np.ndarray]:
    for f in frames:
        yield from to_uint8_frames(f)
