"""Video I/O: streaming mp4 writing (frames as they are produced), reading, format conversion.

Frames are numpy uint8 arrays (H, W, 3). mp4 encoding uses imageio's ffmpeg plugin
(imageio-ffmpeg ships its own ffmpeg binary, so nothing else needs installing).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Union

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
        return np.concatenate([to_uint8_frames(v)[None] if np.ndim(v) == 3 else to_uint8_frames(v) for v in video])
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


class VideoWriter:
    """Append frames to an mp4 as they are produced (a crash loses at most the encoder buffer).

    with VideoWriter("out.mp4", fps=8, png_dir=None) as w:
        w.write(frame_or_frames)
    """

    def __init__(self, path: Union[str, os.PathLike], fps: float = 8, png_dir=None, quality: int = 8):
        self.path = Path(path)
        self.fps = fps
        self.png_dir = Path(png_dir) if png_dir else None
        self.quality = quality
        self.frames_written = 0
        self._writer = None

    def _open(self, shape):
        import imageio

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.png_dir:
            self.png_dir.mkdir(parents=True, exist_ok=True)
        # macro_block_size=1 keeps odd sizes (the tiny models' 32x32 etc.) without resizing.
        self._writer = imageio.get_writer(str(self.path), fps=self.fps, codec="libx264", quality=self.quality,
                                          macro_block_size=1, pixelformat="yuv420p" if shape[0] % 2 == 0 and shape[1] % 2 == 0 else "yuv444p")

    def write(self, frames) -> None:
        arr = to_uint8_frames(frames)
        for frame in arr:
            if self._writer is None:
                self._open(frame.shape)
            self._writer.append_data(frame)
            if self.png_dir:
                from PIL import Image

                Image.fromarray(frame).save(self.png_dir / f"frame_{self.frames_written:06d}.png")
            self.frames_written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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


def iter_frames(frames: Iterable) -> Iterable[np.ndarray]:
    for f in frames:
        yield from to_uint8_frames(f)
