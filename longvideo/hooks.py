"""One way to patch a model: ``apply_<method>(pipe_or_model, <Method>Config(...)) -> PatchHandle``.

Every method that changes a model in place (FreeLOC's attention processors, StoryDiffusion's
consistent self-attention, Ouroboros' SACFA processors, FreeLOC's layer probe, the FreeInit
drop-in) returns a :class:`PatchHandle` (or an object derived from it). The handle records what
it replaced, so that::

    handle = longvideo.apply_freeloc(pipe, longvideo.FreeLOCConfig(trained_frames=21))
    ...
    handle.remove()                     # every processor / attribute / hook as it was, exactly

    with longvideo.apply_freeloc(pipe, longvideo.FreeLOCConfig()):   # or as a context manager
        video = pipe(prompt=..., num_frames=321).frames[0]

Rules (the same for every method, see docs/methods.md#patching-a-model):

- ``remove()`` restores the previous attention processors (the same objects), forward hooks and
  instance attributes, in the reverse order of their installation; a second ``remove()`` does
  nothing.
- A handle *claims* what it patches (a model's attention processors, a pipeline's FreeInit
  filter). Applying a second patch that claims the same thing while the first is active raises a
  ValueError naming the holder: two patches of one model's processors cannot be removed in any
  order without one undoing the other, so they are refused instead of silently combined. (A
  claim lapses when none of the holder's changes is still in place, e.g. after the processors
  were set by hand with ``set_attn_processor``.)
- A failure half-way through ``apply_*`` undoes what was already installed before the error
  propagates.

The handle imports nothing from diffusers: anything with ``attn_processors`` /
``set_attn_processor`` (diffusers models) or ``processor`` / ``set_processor`` (an ``Attention``
layer) can be patched.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["PatchHandle", "ATTENTION_PROCESSORS"]

ATTENTION_PROCESSORS = "attention processors"
_CLAIMS_ATTR = "_longvideo_patches"  # {resource: handle} in the patched object's __dict__
_MISSING = object()


def _claims(obj) -> dict:
    claims = obj.__dict__.get(_CLAIMS_ATTR)
    if claims is None:
        claims = {}
        obj.__dict__[_CLAIMS_ATTR] = claims  # plain dict in __dict__: not a parameter, buffer or submodule
    return claims


def active_patches(obj) -> Dict[str, "PatchHandle"]:
    """{resource: handle} of the patches currently applied to `obj` (a model or a pipeline)."""
    return {k: h for k, h in obj.__dict__.get(_CLAIMS_ATTR, {}).items() if h.active}


class PatchHandle:
    """What a patch changed, and how to undo it (see the module docstring).

    name: the method, used in messages (``"FreeLOC"``, ``"StoryDiffusion"`` ...). The ``claim``,
    ``set_processor``, ``set_attn_processors``, ``set_attr``, ``add_hook`` and ``on_remove``
    methods are for the ``apply_*`` functions that build a handle; users call ``remove()``, use
    the handle in a ``with`` block, or read ``active``.
    """

    def __init__(self, name: str):
        self.name = str(name)
        self._undo: List[Callable[[], None]] = []
        self._claimed: List[Tuple[Any, str]] = []
        self._checks: List[Callable[[], bool]] = []  # "is this change still in place?" per change
        self._removed = False

    # -- building ------------------------------------------------------------------------------
    def claim(self, obj, resource: str = ATTENTION_PROCESSORS) -> None:
        """Mark `resource` of `obj` as patched by this handle; ValueError if another active handle
        holds it."""
        held = _claims(obj).get(resource)
        if held is not None and held.active and held is not self and held.in_place():
            raise ValueError(f"{self.name}: the {resource} of this {type(obj).__name__} are already patched by "
                             f"{held.name}; call .remove() on that handle (or leave its `with` block) before "
                             f"applying {self.name}")
        _claims(obj)[resource] = self
        self._claimed.append((obj, resource))

    def set_processor(self, attn, processor) -> None:
        """``attn.set_processor(processor)`` on one attention layer; remove() puts the old one back."""
        previous = attn.processor
        attn.set_processor(processor)
        self._undo.append(lambda: attn.set_processor(previous))
        self._checks.append(lambda: attn.processor is processor)

    def set_attn_processors(self, model, processors: dict) -> None:
        """``model.set_attn_processor(processors)`` ({"<layer>.processor": processor} for every layer of
        a diffusers model); remove() puts back the previous dict of processors."""
        previous = dict(model.attn_processors)
        model.set_attn_processor(dict(processors))  # diffusers pops from the dict it is given
        self._undo.append(lambda: model.set_attn_processor(dict(previous)))
        ours = {id(p) for p in processors.values()} - {id(p) for p in previous.values()}
        self._checks.append(lambda: any(id(p) in ours for p in model.attn_processors.values()))

    def set_attr(self, obj, name: str, value) -> None:
        """Set an instance attribute (e.g. a method bound on one pipeline object); remove() restores
        the instance's previous entry, or deletes it when there was none (the class's again)."""
        previous = obj.__dict__.get(name, _MISSING)
        setattr(obj, name, value)
        self._checks.append(lambda: obj.__dict__.get(name, _MISSING) is value)

        def undo():
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous

        self._undo.append(undo)

    def add_hook(self, hook_handle) -> None:
        """A torch hook handle (register_forward_pre_hook, ...), removed by remove()."""
        self._undo.append(hook_handle.remove)

    def on_remove(self, fn: Callable[[], None]) -> None:
        """Any other undo step, run by remove() (in reverse order of registration)."""
        self._undo.append(fn)

    # -- using ---------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True from apply until remove()."""
        return not self._removed

    def in_place(self) -> bool:
        """Whether any of this handle's changes is still there (False once every patched
        processor / attribute was replaced by someone else: then the claim is void, so setting a
        model's processors by hand frees it for a new patch)."""
        return self.active and (not self._checks or any(check() for check in self._checks))

    def remove(self) -> None:
        """Undo the patch (idempotent). Every undo step runs even if one fails; the first error is
        raised afterwards."""
        if self._removed:
            return
        self._removed = True
        error: Optional[BaseException] = None
        while self._undo:
            try:
                self._undo.pop()()
            except BaseException as exc:  # keep undoing: a half-restored model is worse
                error = error or exc
        for obj, resource in self._claimed:
            claims = obj.__dict__.get(_CLAIMS_ATTR, {})
            if claims.get(resource) is self:
                del claims[resource]
        self._claimed = []
        self._checks = []
        if error is not None:
            raise error

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {'active' if self.active else 'removed'}>"
