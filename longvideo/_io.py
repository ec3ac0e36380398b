"""Durable file writes: atomic replacement (temporary file in the same folder, fsync, rename,
fsync of the folder) and :class:`OutputError`, the one error for an output that cannot be
written (a full disk, a read-only folder, no permission), which names the file and what was kept.

See docs/outputs.md.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

__all__ = ["OutputError", "output_error", "atomic_write_bytes", "fsync_file", "fsync_dir", "reason", "DISK_ERRNOS"]

# errors of the storage, not of the program: reported in one line, never as a traceback
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO}


class OutputError(OSError):
    """An output could not be written. ``str()`` is one line: the file, why, and what was kept
    (the command line prints it as ``longvideo: error: ...``, exit status 1)."""

    def __init__(self, path, why: str, kept: Optional[str] = None, errno_: Optional[int] = None):
        self.path, self.why, self.kept = Path(path), why, kept
        text = f"cannot write {path}: {why}" + (f"; kept: {kept}" if kept else "")
        super().__init__(errno_ or 0, text)
        self.filename = str(path)

    def __str__(self) -> str:
        return self.args[1]

    def set_kept(self, kept: str) -> None:
        """Say what was kept after all (e.g. once the frames kept were joined into one file)."""
        self.kept = kept
        self.args = (self.args[0], f"cannot write {self.path}: {self.why}; kept: {kept}")


def reason(exc: BaseException) -> str:
    """A short why for an exception raised while writing (the OS's words where there are any)."""
    if isinstance(exc, OutputError):
        return exc.why
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() and exc.strerror[1:2].islower() else exc.strerror
    text = " ".join(str(exc).split())
    for marker in ("No space left on device", "Disk quota exceeded", "Permission denied", "Read-only file system"):
        if marker.lower() in text.lower():
            return marker.lower()
    return (text[:160] + "...") if len(text) > 160 else (text or type(exc).__name__)


def output_error(path, exc: BaseException, kept: Optional[str] = None) -> OutputError:
    """The OutputError for `exc` raised while writing `path` (its errno kept, or read from the
    message of a tool that reports a full disk in words)."""
    code = getattr(exc, "errno", None)
    if not code:
        low = str(exc).lower()
        code = next((c for c, marker in ((errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota"),
                                          (errno.EACCES, "permission denied"), (errno.EROFS, "read-only"))
                     if marker in low), None)
    return OutputError(path, reason(exc), kept, code)


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a separate function: tests make it fail)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes, kept: Optional[str] = None) -> Path:
    """Replace `path` by `data` so that a crash or a full disk leaves either the old file or the
    new one, never a mix: written to ``.<name>.tmp`` in the same folder, fsynced, renamed over
    `path`, and the folder fsynced. On failure the temporary file is removed and OutputError
    (naming `path`, the OS's reason and `kept`) is raised; the old file is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise output_error(path, exc, kept) from exc
    fsync_dir(path.parent)
    return path
