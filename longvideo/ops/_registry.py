"""Backend registry shared by the ``torch.ops.longvideo.*`` ops.

Each op module (``longvideo/ops/<op>.py``) defines its schema with ``torch.library``,
validates its arguments, and then calls :func:`dispatch`, which picks one of the backends
registered here for that op. A registration declares what the backend accepts as a list of
small named constraints (``longvideo.ops._constraints``: device type, dtype, head dim, strides,
alignment); the registry evaluates them in order and reports the first failing one's reason.

``reference``  the pure-PyTorch ground truth (``longvideo.reference``); always available; the
               CPU kernel of every op.
``triton``     the Triton kernels (``longvideo.triton_kernels``): on CUDA devices, and on CPU
               only under ``TRITON_INTERPRET=1`` when asked for explicitly (that is how CI tests
               the kernels).
``cuda``       the CUDA extension ``longvideo._C`` (``csrc/``), when it is built and loaded.
``auto``       (the default setting) per device, the backend the recorded benchmarks show
               faster (``backend_preferences.json``, generated from benchmarks/results by
               ``longvideo bench --update-preferences``), else the lowest ``rank`` among the
               available backends that support the input; on CPU always ``reference``.

Choosing a backend::

    import longvideo
    with longvideo.ops.use_backend("triton"):            # every op
        ...
    with longvideo.ops.use_backend("cuda", op="consistent_attention"):   # one op
        ...
    longvideo.ops.set_backend("reference")               # process-wide
    # or the environment: LONGVIDEO_BACKEND=triton

An explicitly chosen backend that is unavailable or does not support the input raises a
RuntimeError that says why; ``auto`` silently falls back to the next backend instead.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ._constraints import Constraint, OnDevice

BACKEND_NAMES = ("auto", "triton", "cuda", "reference")


@dataclass
class Backend:
    """One implementation of one op.

    fn           called with the op's (already validated) arguments, returns the op's result.
    available    capability gate: () -> (ok, reason); evaluated lazily, cached per process.
    rank         preference when no benchmark record decides (lower is preferred).
    tolerances   {dtype: (atol, rtol)} against the reference; tests read these.
    constraints  per-call checks (head dims, dtypes, strides, ...), evaluated in order by
                 :meth:`supports`, each on the call's arguments named as fn's parameters.
    devices      device types the backend runs on (its ``on_device`` constraint).
    params       fn's positional parameter names: the names the constraints read a call's arguments by.
    """

    op: str
    name: str
    fn: Callable
    available: Callable[[], tuple[bool, str]]
    rank: int
    tolerances: dict = field(default_factory=dict)
    constraints: tuple = ()
    devices: tuple = ("cuda",)
    params: tuple = ()
    _avail_cache: Optional[tuple[bool, str]] = None

    def supports(self, *args, **kwargs) -> Optional[str]:
        """None when this call's arguments pass every constraint, else the first failing one's reason."""
        if not self.constraints:
            return None
        named = dict(zip(self.params, args))
        if kwargs:
            named.update(kwargs)
        for check in self.constraints:
            why = check(named)
            if why:
                return why
        return None

    def is_available(self) -> tuple[bool, str]:
        if self._avail_cache is None:
            try:
                self._avail_cache = tuple(self.available())
            except Exception as exc:  # a broken gate means unavailable, never a crash
                self._avail_cache = (False, f"{type(exc).__name__}: {exc}")
        return self._avail_cache

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        return self.tolerances.get(dtype, _DEFAULT_TOL[dtype])


_DEFAULT_TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

_REGISTRY: dict[str, dict[str, Backend]] = {}
# (op, device type, device index) -> backends in `auto` order: computed once (cleared when backends
# or preferences change), since querying the device name and sorting on every call is a measurable
# part of a small op.
_ORDER_CACHE: dict = {}
_global_setting: dict[Optional[str], str] = {None: os.environ.get("LONGVIDEO_BACKEND", "auto")}
_ctx_setting: contextvars.ContextVar = contextvars.ContextVar("longvideo_backend", default=None)


class UnsupportedInput(ValueError, RuntimeError):
    """The backend asked for (``set_backend`` / ``LONGVIDEO_BACKEND``) cannot take these inputs (a
    head dim, dtype or stride it has no kernel for): a ValueError about the arguments, and a
    RuntimeError as it was before it had its own class."""


def _check_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def _check_op(op: Optional[str]):
    if op is not None and op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}")


def register_backend(op: str, name: str, fn: Callable, *, available=None, rank: int = 100,
                     tolerances=None, constraints: Sequence[Constraint] = ()) -> Backend:
    """Register `fn` as backend `name` of `op` (called at import of the op module).

    `constraints`: what the backend accepts (``longvideo.ops._constraints``), in the order to check;
    an ``on_device(...)`` among them gives the device types (default: CUDA only)."""
    if name not in BACKEND_NAMES or name == "auto":
        raise ValueError(f"backend name must be one of triton/cuda/reference, got {name!r}")
    devices = [c.types for c in constraints if isinstance(c, OnDevice)]
    params = tuple(p.name for p in inspect.signature(fn).parameters.values()
                   if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    be = Backend(op=op, name=name, fn=fn, available=available or (lambda: (True, "")), rank=rank,
                 tolerances=dict(tolerances or {}), devices=devices[0] if devices else ("cuda",),
                 constraints=tuple(c for c in constraints if not isinstance(c, OnDevice)), params=params)
    _REGISTRY.setdefault(op, {})[name] = be
    _ORDER_CACHE.clear()
    return be


def backends(op: str) -> dict[str, Backend]:
    _check_op(op)
    return dict(_REGISTRY[op])


def get_backend(op: str, name: str) -> Backend:
    _check_op(op)
    try:
        return _REGISTRY[op][name]
    except KeyError:
        raise ValueError(f"op {op!r} has no backend {name!r}; it has {sorted(_REGISTRY[op])}") from None


def set_backend(name: str, op: Optional[str] = None) -> None:
    """Process-wide backend setting, for every op or for one."""
    _check_name(name)
    _check_op(op)
    _global_setting[op] = name


@contextlib.contextmanager
def use_backend(name: str, op: Optional[str] = None):
    """Context manager: use backend `name` (for every op, or only `op`) inside the block."""
    _check_name(name)
    _check_op(op)
    cur = dict(_ctx_setting.get() or {})
    cur[op] = name
    token = _ctx_setting.set(cur)
    try:
        yield
    finally:
        _ctx_setting.reset(token)


def current_setting(op: str) -> str:
    ctx = _ctx_setting.get() or {}
    for key in (op, None):
        if key in ctx:
            return ctx[key]
    for key in (op, None):
        if key in _global_setting:
            return _global_setting[key]
    return "auto"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> tuple[bool, str]:
    """Capability gate shared by the Triton backends."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton not importable ({exc})"
    if triton_interpreting():
        return True, "TRITON_INTERPRET=1 (CPU interpreter)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return True, f"triton {triton.__version__}"


def triton_module(op: str):
    """The Triton kernel module of `op` (``longvideo.triton_kernels.<op>``), imported on first use so
    that importing longvideo never imports triton. In a source checkout the package's __path__
    includes the checkout (see longvideo/__init__.py), so this resolves there too."""
    import importlib

    return importlib.import_module(f"longvideo.triton_kernels.{op}")


def cuda_extension_available(private_op: str) -> Callable[[], tuple[bool, str]]:
    """Capability gate for a CUDA-extension backend whose kernel is `torch.ops.longvideo.<private_op>`."""

    def gate():
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        from .._extension import extension_status, load_extension

        if not load_extension():
            return False, extension_status()[1]
        if not hasattr(torch.ops.longvideo, private_op):
            return False, f"extension loaded but does not register longvideo::{private_op}"
        return True, extension_status()[1]

    return gate


# ----------------------------------------------------------------------------------------------
# auto: preferences from the recorded benchmarks
_PREF_FILE = Path(__file__).with_name("backend_preferences.json")
_prefs_cache: Optional[dict] = None


def reload_preferences() -> None:
    """Forget the loaded preferences (after ``backend_preferences.json`` was rewritten)."""
    global _prefs_cache
    _prefs_cache = None
    _ORDER_CACHE.clear()


def _preferences() -> dict:
    global _prefs_cache
    if _prefs_cache is None:
        try:
            _prefs_cache = json.loads(_PREF_FILE.read_text())
        except (OSError, ValueError):
            _prefs_cache = {}
    return _prefs_cache


def _preferred_order(op: str, device: torch.device) -> list[Backend]:
    key = (op, device.type, device.index)
    cands = _ORDER_CACHE.get(key)
    if cands is not None:
        return cands
    cands = sorted(_REGISTRY[op].values(), key=lambda b: b.rank)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        pref = _preferences().get(op, {})
        winner = pref.get("by_device", {}).get(name) or pref.get("default")
        if winner:
            cands.sort(key=lambda b: (b.name != winner, b.rank))
    _ORDER_CACHE[key] = cands
    return cands


def select(op: str, device: torch.device, *args, **kwargs) -> Backend:
    """The backend that `dispatch` would use for this call."""
    _check_op(op)
    setting = current_setting(op)
    table = _REGISTRY[op]
    if setting != "auto":
        be = table.get(setting)
        if be is None:
            raise RuntimeError(f"longvideo.{op}: no {setting!r} backend (has {sorted(table)})")
        if device.type not in be.devices and not (setting == "triton" and device.type == "cpu"):
            raise RuntimeError(f"longvideo.{op}: backend {setting!r} does not run on {device.type} tensors")
        if setting == "triton" and device.type == "cpu" and not triton_interpreting():
            raise RuntimeError(f"longvideo.{op}: the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
        ok, why = be.is_available()
        if not ok:
            raise RuntimeError(f"longvideo.{op}: backend {setting!r} is unavailable: {why}")
        why = be.supports(*args, **kwargs)
        if why:
            raise UnsupportedInput(f"longvideo.{op}: backend {setting!r} does not support this input: {why}")
        return be
    if device.type != "cuda":
        return table["reference"]
    for be in _preferred_order(op, device):
        if device.type not in be.devices or not be.is_available()[0]:
            continue
        if be.supports(*args, **kwargs):
            continue
        return be
    return table["reference"]


def dispatch(op: str, device: torch.device, *args, **kwargs):
    """Run `op` on the selected backend."""
    return select(op, device, *args, **kwargs).fn(*args, **kwargs)


def report() -> dict:
    """{op: {backend: {"available": bool, "reason": str, "rank": int}}} for `longvideo info`."""
    out = {}
    for op, table in sorted(_REGISTRY.items()):
        out[op] = {}
        for name, be in sorted(table.items(), key=lambda kv: kv[1].rank):
            ok, why = be.is_available()
            out[op][name] = {"available": ok, "reason": why, "rank": be.rank, "devices": list(be.devices)}
    return out
