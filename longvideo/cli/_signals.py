"""Interrupts of a ``longvideo`` command: Ctrl-C (SIGINT) and SIGTERM (a job scheduler,
``timeout``, ``kill``, torchrun stopping its workers) both raise :class:`Interrupted` (a
KeyboardInterrupt) in the main thread, so every command leaves through the same path: ``with``
blocks close the video (every frame written so far joined into the output file), FIFO saves its
queue state, and the command exits with status 128 + the signal number (130 for SIGINT, 143 for
SIGTERM, the shell's convention).

A second signal while the command is stopping is ignored (torchrun forwards the terminal's
Ctrl-C to workers that already received it; schedulers repeat SIGTERM), so it cannot cut the
join of the video or the saving of the queue state short; SIGKILL still ends the process.

Under torchrun (``WORLD_SIZE`` > 1), one rank (``RANK`` 0) reports the interrupt; the others exit
with the same status and print nothing -- including when what stops them is the consequence of
the interrupt (a collective whose peer has gone), not the signal itself. (torchrun's own agent
prints a traceback of its ``SignalException`` when it is interrupted; that is torchrun's.)
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional

SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class Interrupted(KeyboardInterrupt):
    """A signal that stops a command; ``signum`` is the signal number."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


_received: Optional[int] = None


def received() -> Optional[int]:
    """The signal this process received while a command ran (None: none)."""
    return _received


def exit_status(exc: BaseException) -> int:
    """128 + the signal number (a bare KeyboardInterrupt counts as SIGINT)."""
    return 128 + int(getattr(exc, "signum", None) or _received or signal.SIGINT)


def signal_name(exc: Optional[BaseException] = None) -> str:
    signum = int(getattr(exc, "signum", None) or _received or signal.SIGINT)
    return SIGNAL_NAMES.get(signum, f"signal {signum}")


def distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def reporting_rank() -> bool:
    """True on the process that speaks for the run (RANK 0, or no torchrun)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


class interrupts_raise:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (the
    handlers before it are restored afterwards; nothing is installed off the main thread)."""

    def __enter__(self):
        global _received
        _received = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                global _received
                if _received is not None:
                    # already stopping (torchrun forwards the terminal's Ctrl-C a second time, a
                    # scheduler repeats SIGTERM): let the video be joined and the state be saved
                    return
                _received = signum
                raise Interrupted(signum)

            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, handler)
                except (ValueError, OSError):  # pragma: no cover - not settable here
                    pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
