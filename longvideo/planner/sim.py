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

Frozen parameters (``Sim(grad=True, frozen=True)``: the model's parameters do not require grad,
only the input does): :meth:`Sim.save_w` is what autograd keeps only because a parameter requires
grad (a linear layer's or a convolution's input, for the weight gradient; a product's operand
whose partner is a modulation computed from the parameters; everything computed from the
parameters and the timestep alone): a no-op when frozen. :meth:`Sim.save` keeps what the
gradient with respect to the input needs, frozen or not.

A call that stops part-way (an exception raised out of the model, as Ouroboros' guidance pass
does after its last feature layer): :meth:`Sim.hold` marks a tensor something outside the call
keeps (a recorded feature), :meth:`Sim.unsave` drops tensors from the graph (graph nodes that
nothing upstream of the held tensors references die with the exception), and
:meth:`Sim.unwind` frees every live tensor that is neither saved nor held (the frames' locals).
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

    def __init__(self, grad: bool = False, frozen: bool = False):
        self.grad = grad
        self.frozen = frozen
        self.current = 0
        self.peak = 0
        self.peak_where = ""
        self.peak_tags: dict = {}
        self.where = ""
        self._by_tag: dict = defaultdict(int)
        self._saved: list = []
        self._live: dict = {}
        self._held: list = []
        self.facts: dict = {}      # what a walk records for its caller (e.g. the widest FFN seen)

    # -- tensors ----------------------------------------------------------------------------------
    def new(self, numel: float, itemsize: int, tag: str) -> Handle:
        h = Handle(numel, itemsize, tag)
        self._live[id(h)] = h
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

    def save_w(self, *hs: Optional[Handle]) -> None:
        """Autograd keeps these only for the parameters' gradients (no-op with frozen parameters)."""
        if not self.frozen:
            self.save(*hs)

    def mark(self) -> int:
        """A position in the list of saved tensors (for :meth:`saved_since`)."""
        return len(self._saved)

    def saved_since(self, mark: int) -> list:
        return list(self._saved[mark:])

    def unsave(self, *hs: Optional[Handle]) -> None:
        """These leave the graph (the nodes that kept them died): freed if nothing else refers to them."""
        drop = {id(h) for h in hs if h is not None}
        keep = []
        for h in self._saved:
            if id(h) in drop:
                h.saved = False
                if h.refs <= 0 and h.alive:
                    self._kill(h)
            else:
                keep.append(h)
        self._saved = keep

    def hold(self, h: Optional[Handle]) -> Optional[Handle]:
        """Something outside the call keeps `h` (a reference that survives :meth:`unwind`)."""
        if h is not None and not h.external:
            h.refs += 1
            self._held.append(h)
        return h

    @property
    def held(self) -> list:
        return [h for h in self._held if h.alive]

    def unwind(self) -> None:
        """An exception leaves the call: every live tensor neither saved nor held dies."""
        holds: dict = {}
        for h in self._held:
            holds[id(h)] = holds.get(id(h), 0) + 1
        for h in list(self._live.values()):
            h.refs = holds.get(id(h), 0)           # the only references left
            if h.alive and h.refs <= 0 and not h.saved:
                self._kill(h)

    def release_saved(self) -> None:
        """The graph is freed: saved tensors without other references die."""
        for h in self._saved:
            h.saved = False
            if h.refs <= 0 and h.alive:
                self._kill(h)
        self._saved = []

    def _kill(self, h: Handle) -> None:
        h.alive = False
        self._live.pop(id(h), None)
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
