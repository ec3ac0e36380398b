"""Live-tensor-bytes tracker: the measuring stick of the memory planner.

:class:`LiveTensorTracker` is a ``TorchDispatchMode``. Every aten (or custom) op dispatched
while it is active is run, and each tensor it returns whose storage is new -- not the storage
of one of the op's inputs (a view, an in-place or ``out=`` result) and not one the tracker
already counts -- is counted with its storage's size in bytes. A ``weakref.finalize`` on the
storage takes the bytes off again when the storage dies, so the count is the bytes of the
storages allocated inside the tracker that are still alive, and ``peak`` is its maximum.
Storages are counted once however many tensors view them; a storage resized in place
(``resize_``, ``out=`` into an empty tensor) is re-measured after every op that touches it.

What it sees, and what not:

* everything allocated while it is active, by any op, with or without autograd (the tensors
  autograd saves for backward are outputs of the forward ops, kept alive by the graph, so they
  count until the graph is freed), factory functions included (``torch.empty``, ``randn``);
* not what existed before it started (weights, inputs): a measurement is "beyond what was
  live", like ``torch.cuda.max_memory_allocated() - memory_allocated()`` before a call, the way
  the benchmark records measure peaks;
* not the internal temporaries of a single kernel: a custom op or a fused aten kernel (SDPA's
  flash kernels, the longvideo ops' reference implementations on CPU) is one dispatch, and what
  it allocates and frees inside is invisible; only its outputs count. This is the device
  picture of a flash-style kernel (its workspace lives on chip); where a real GPU kernel does
  allocate device workspace (the Triton ``tiered_sparse_attention`` variant copies), the planner
  lists it as its own component, which this tracker cannot confirm on a CPU;
* no allocator effects: CUDA's caching allocator rounds blocks to 512 bytes and may fragment;
  the counts here are exact tensor bytes.

Usage::

    with LiveTensorTracker() as t:
        out = model(x)
    t.peak, t.current          # bytes; t.peak_live (with record=True): what was alive at the peak

``device`` restricts the count to one device type (``"cpu"``, ``"cuda"``, ``"meta"``); None counts
every device.
"""
from __future__ import annotations

import threading
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorTracker", "LiveStorage", "track_peak"]


@dataclass(frozen=True)
class LiveStorage:
    """One counted storage: its bytes, the op that allocated it and the first tensor's shape."""

    nbytes: int
    op: str
    shape: tuple
    dtype: str
    device: str


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of live storages allocated inside it (see the module docstring).

    current     bytes alive now (allocated inside, not yet freed)
    peak        the maximum of ``current`` since the start (or :meth:`reset_peak`)
    allocated   total bytes ever allocated inside (freed or not)
    record      keep, for every new peak, the list of live storages (``peak_live``,
                ``peak_summary()``): slower, for finding what a peak is made of
    """

    def __init__(self, device: Optional[str] = None, record: bool = False):
        super().__init__()
        self.device = None if device is None else torch.device(device).type
        self.record = record
        self.current = 0
        self.peak = 0
        self.allocated = 0
        self.num_allocations = 0
        self.peak_op: Optional[str] = None
        self.peak_live: list = []
        self._live: dict = {}          # id(storage) -> [nbytes, LiveStorage or None]
        self._lock = threading.Lock()

    # -- counting ---------------------------------------------------------------------------------
    def _counts(self, t: torch.Tensor) -> bool:
        return self.device is None or t.device.type == self.device

    def _release(self, key: int) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.current -= entry[0]

    def _add(self, storage, t: torch.Tensor, op: str) -> None:
        nbytes = int(storage.nbytes())
        key = id(storage)
        info = LiveStorage(nbytes, op, tuple(t.shape), str(t.dtype).replace("torch.", ""), str(t.device)) \
            if self.record else None
        with self._lock:
            self._live[key] = [nbytes, info]
            self.current += nbytes
            self.allocated += nbytes
            self.num_allocations += 1
        weakref.finalize(storage, self._release, key)
        self._update_peak(op)

    def _update_peak(self, op: str) -> None:
        if self.current > self.peak:
            self.peak = self.current
            self.peak_op = op
            if self.record:
                with self._lock:
                    self.peak_live = [e[1] for e in self._live.values() if e[1] is not None]

    def _refresh(self, storage) -> None:
        """A counted storage resized in place: re-measure it."""
        key = id(storage)
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                return
            n = int(storage.nbytes())
            if n != entry[0]:
                self.current += n - entry[0]
                self.allocated += max(0, n - entry[0])
                entry[0] = n
                if entry[1] is not None:
                    old = entry[1]
                    entry[1] = LiveStorage(n, old.op, old.shape, old.dtype, old.device)

    def reset_peak(self) -> None:
        """Start a new peak measurement from the bytes alive now."""
        self.peak = self.current
        self.peak_op = None
        if self.record:
            self.peak_live = [e[1] for e in self._live.values() if e[1] is not None]

    # -- the mode ---------------------------------------------------------------------------------
    @staticmethod
    def _storage(t):
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. some wrappers)
            return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {}
        for t in tree_leaves((args, kwargs)):
            s = self._storage(t)
            if s is not None:
                inputs[id(s)] = s
        op = str(getattr(func, "__name__", func))
        for s in inputs.values():           # in-place / out= ops may have resized a counted storage
            self._refresh(s)
        self._update_peak(op)
        seen = set()
        for t in tree_leaves(out):
            s = self._storage(t)
            if s is None:
                continue
            key = id(s)
            if key in seen:
                continue
            seen.add(key)
            if key in inputs:
                continue
            if key in self._live:
                self._refresh(s)
                self._update_peak(op)
                continue
            if self._counts(t):
                self._add(s, t, op)
        return out

    # -- reports ----------------------------------------------------------------------------------
    def peak_summary(self, top: int = 20) -> list:
        """[(bytes, count, op, shape, dtype)] of the storages alive at the peak, largest groups
        first (needs record=True)."""
        groups: Counter = Counter()
        sizes: dict = {}
        for e in self.peak_live:
            key = (e.op, e.shape, e.dtype)
            groups[key] += 1
            sizes[key] = e.nbytes
        rows = [(sizes[k] * n, n, k[0], k[1], k[2]) for k, n in groups.items()]
        rows.sort(key=lambda r: -r[0])
        return rows[:top]


def track_peak(fn, *args, device: Optional[str] = None, **kwargs):
    """(fn(*args, **kwargs), peak bytes allocated inside beyond what was live before)."""
    with LiveTensorTracker(device=device) as tracker:
        result = fn(*args, **kwargs)
    return result, tracker.peak
