"""What the segmented VideoWriter costs (docs/outputs.md): the same frames written as one segment,
as segments of K frames (a FIFO checkpoint every few iterations closes one), and the old way (one
imageio writer, B-frames allowed); the time to write, the time of the final join, the file size,
and the time to resume (keep the first half without re-encoding).

    python tools/measure_video_writer.py [--frames 96] [--height 256] [--width 448] [--segment 8]

Prints one JSON object. Timings are wall-clock on whatever machine runs it (note its load).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def frames(n, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return [np.stack([(xx + 3 * i) % 256, (yy + 2 * i) % 256, ((xx + yy) // 2 + i) % 256], -1).astype(np.uint8)
            for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=448)
    ap.add_argument("--segment", type=int, default=8)
    a = ap.parse_args()
    import imageio

    from longvideo.video import VideoWriter, count_frames

    video = frames(a.frames, a.height, a.width)
    tmp = Path(tempfile.mkdtemp())
    result = {"frames": a.frames, "size": f"{a.width}x{a.height}", "segment_frames": a.segment,
              "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count()}
    try:
        t = time.perf_counter()
        w = imageio.get_writer(str(tmp / "old.mp4"), fps=8, codec="libx264", quality=8, macro_block_size=1,
                               pixelformat="yuv420p", ffmpeg_log_level="error")
        for f in video:
            w.append_data(f)
        w.close()
        result["single_writer_with_bframes_s"] = round(time.perf_counter() - t, 3)
        result["single_writer_with_bframes_bytes"] = (tmp / "old.mp4").stat().st_size
        for name, seg in (("one_segment", 10 ** 9), ("segments", a.segment)):
            out = tmp / f"{name}.mp4"
            t = time.perf_counter()
            w = VideoWriter(out, fps=8, segment_frames=seg)
            for f in video:
                w.write(f)
            w._close_segment()
            wrote = time.perf_counter() - t
            t = time.perf_counter()
            w.close()
            result[f"{name}_write_s"] = round(wrote, 3)
            result[f"{name}_join_s"] = round(time.perf_counter() - t, 3)
            result[f"{name}_bytes"] = out.stat().st_size
        out = tmp / "segments.mp4"
        t = time.perf_counter()
        w = VideoWriter(out, fps=8, segment_frames=a.segment, keep_frames=a.frames // 2)
        w.write(video[a.frames // 2:])
        w.close()
        result["resume_half_s"] = round(time.perf_counter() - t, 3)
        assert count_frames(out) == a.frames
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
