"""A liveness simulator for symbolic tensors: the planner's bookkeeping of what is alive when.

The activation models in :mod:`longvideo.planner.activations` walk a model's forward pass in
the order diffusers runs it and tell this simulator which tensors come into existence (with their
bytes and a component tag), when the Python code drops its last reference to them, and which
ones autograd keeps for the backward pass. The simulator keeps the running total and the peak,
with the bytes per tag at the peak: that is the predicted peak of one model call and its
breakdown. Nothing is allocated; sizes are plain integers.

Reference counting follows Python: :meth:`Sim.new` returns a handle with one reference (the
variable that holds it), :meth:`Sim.ref` adds one (an alias: a view, ``.float()`` of a float32
tensor), :meth:`Sim.free` drops one. :meth:`Sim.save` is autograd keeping the tensor (or a view
of it) for backward; saved tensors die at :meth:`Sim.release_saved` (the graph is freed) and not
before, whatever the code does with its variables.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional


class Handle:
    __slots__ = ("nbytes", "tag", "refs", "saved", "alive", "itemsize", "numel", "external")

    def __init__(self, numel: int, itemsize: int, tag: str, external: bool = False):
        self.external = external
        self.numel = int(numel)
        self.itemsize = int(itemsize)
        self.nbytes = self.numel * self.itemsize
        self.tag = tag
        self.refs = 1
        self.saved = False
        self.alive = True


class Sim:
    """Running total and peak of the live symbolic tensors (see the module docstring).

    grad: whether autograd records (``save`` keeps tensors; with grad off it is a no-op).
    """

    def __init__(self, grad: bool = False):
        self.grad = grad
        self.current = 0
        self.peak = 0
        self.peak_where = ""
        self.peak_tags: dict = {}
        self.where = ""
        self._by_tag: dict = defaultdict(int)
        self._saved: list = []

    # -- tensors ----------------------------------------------------------------------------------
    def new(self, numel: float, itemsize: int, tag: str) -> Handle:
        h = Handle(numel, itemsize, tag)
        self.current += h.nbytes
        self._by_tag[tag] += h.nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_where = self.where
            self.peak_tags = {k: v for k, v in self._by_tag.items() if v}
        return h

    def external(self, numel: float, itemsize: int, tag: str) -> Handle:
        """A tensor that exists outside the simulated call (an input): never counted or freed."""
        return Handle(numel, itemsize, tag, external=True)

    def retag(self, h: Optional[Handle], tag: str) -> None:
        """Count a live tensor under another component from now on."""
        if h is None or h.external or not h.alive:
            return
        self._by_tag[h.tag] -= h.nbytes
        self._by_tag[tag] += h.nbytes
        h.tag = tag

    def ref(self, h: Optional[Handle]) -> Optional[Handle]:
        if h is not None and not h.external:
            h.refs += 1
        return h

    def free(self, *hs: Optional[Handle]) -> None:
        for h in hs:
            if h is None or not h.alive or h.external:
                continue
            h.refs -= 1
            if h.refs <= 0 and not h.saved:
                self._kill(h)

    def save(self, *hs: Optional[Handle]) -> None:
        """Autograd keeps these for backward (only when grad is on)."""
        if not self.grad:
            return
        for h in hs:
            if h is not None and h.alive and not h.saved and not h.external:
                h.saved = True
                self._saved.append(h)

    def release_saved(self) -> None:
        """The graph is freed: saved tensors without other references die."""
        for h in self._saved:
            h.saved = False
            if h.refs <= 0 and h.alive:
                self._kill(h)
        self._saved = []

    def _kill(self, h: Handle) -> None:
        h.alive = False
        self.current -= h.nbytes
        self._by_tag[h.tag] -= h.nbytes

    # -- helpers ----------------------------------------------------------------------------------
    def bump(self, nbytes: float, tag: str) -> None:
        """A transient that lives for one instant (allocated and freed at once)."""
        h = self.new(int(nbytes), 1, tag)
        self.free(h)

    def cast(self, h: Handle, itemsize: int, tag: Optional[str] = None) -> Handle:
        """``.to(dtype)``: an alias when the dtype does not change, else a new tensor."""
        if h.itemsize == itemsize and not h.external:
            return self.ref(h)
        return self.new(h.numel, itemsize, tag or h.tag)

    @property
    def saved_bytes(self) -> int:
        return sum(h.nbytes for h in self._saved if h.alive)

    def tags_now(self) -> dict:
        return {k: v for k, v in self._by_tag.items() if v}
