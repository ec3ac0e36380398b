"""Declarative input constraints of the backends (``longvideo.ops._registry``).

Each backend registration lists what its kernel accepts as small named checks, shared by the ops
(as diffusers' attention dispatch lists constraint functions per backend)::

    R.register_backend(OP, "cuda", _cuda_impl, ..., constraints=(
        on_device("cuda"),
        dtype_in("q", HALF, "float16/bfloat16 only (got {dtype})"),
        head_dim_in({64, 128}, "head dims 64 and 128 with Dv == D (got {D}, {Dv})", ("q", "v"), equal=True),
        unit_last_stride(("q", "k", "v"), "{name} must have unit stride in its last dim"),
    ))

A check is called with the call's arguments by name (the backend function's parameter names)
and returns None when the input passes, else the reason, formatted from its message template.
The registry evaluates a backend's checks in the order declared and reports the first failing
one's reason (``Backend.supports``). :func:`on_device` is the one check the registry evaluates
per device rather than per call: it declares the device types the backend runs on.

Tensor checks name one argument or several (in order: the first failing one is reported) and
skip arguments that are None (optional banks).
"""
from __future__ import annotations

from typing import Callable, Collection, Mapping, Optional, Sequence, Union

import torch

Args = Mapping[str, object]
Names = Union[str, Sequence[str]]

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})


class Constraint:
    """One named check of a call's arguments: ``constraint(args) -> None or reason``."""

    __slots__ = ("name", "_check")

    def __init__(self, name: str, check: Callable[[Args], Optional[str]]):
        self.name = name
        self._check = check

    def __call__(self, args: Args) -> Optional[str]:
        return self._check(args)

    def __repr__(self) -> str:
        return f"Constraint({self.name})"


class OnDevice(Constraint):
    """The device types a backend runs on (evaluated by the registry per device, not per call)."""

    __slots__ = ("types",)

    def __init__(self, types: Sequence[str]):
        self.types = tuple(types)
        super().__init__(f"on_device{self.types}", lambda args: None)


def _names(names: Names) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def _each(names: Names, bad: Callable[[torch.Tensor], bool], message: str) -> Callable[[Args], Optional[str]]:
    """A check over the named tensors in order: the message of the first for which `bad` holds."""
    names = _names(names)

    def check(args: Args) -> Optional[str]:
        for name in names:
            t = args.get(name)
            if t is not None and bad(t):
                return message.format(name=name)
        return None

    return check


def on_device(*types: str) -> OnDevice:
    """The backend runs on tensors of these device types ("cuda", "cpu")."""
    return OnDevice(types)


def dtype_in(name: str, dtypes: Collection[torch.dtype], message: str) -> Constraint:
    """Argument `name`'s dtype is one of `dtypes`. Message fields: {name}, {dtype}."""
    dtypes = frozenset(dtypes)

    def check(args: Args) -> Optional[str]:
        dtype = args[name].dtype
        return None if dtype in dtypes else message.format(name=name, dtype=dtype)

    return Constraint(f"dtype_in({name})", check)


def head_dim_in(allowed: Collection[int], message: str, names: Names = ("q",), *, equal: bool = False) -> Constraint:
    """The last dim of each named tensor is in `allowed` (a set or a range); with `equal`, all
    equal the first's. Message fields: {D} (the first tensor's head dim), {Dv} (the second's)."""
    names = _names(names)

    def check(args: Args) -> Optional[str]:
        dims = [args[n].shape[-1] for n in names]
        if all(d in allowed for d in dims) and not (equal and any(d != dims[0] for d in dims)):
            return None
        return message.format(D=dims[0], Dv=dims[-1])

    return Constraint(f"head_dim_in({', '.join(names)})", check)


def unit_last_stride(names: Names, message: str) -> Constraint:
    """Each named tensor has stride 1 in its last dim. Message field: {name}."""
    return Constraint(f"unit_last_stride({', '.join(_names(names))})", _each(names, lambda t: t.stride(-1) != 1, message))


def aligned(names: Names, nbytes: int, message: str) -> Constraint:
    """Each named tensor's data starts at a multiple of `nbytes` bytes. Message field: {name}."""
    return Constraint(f"aligned{nbytes}({', '.join(_names(names))})",
                      _each(names, lambda t: t.data_ptr() % nbytes != 0, message))


def strides_multiple_of(names: Names, elems: int, message: str, *, skip_size_one: bool = False) -> Constraint:
    """Each named tensor's strides but the last are multiples of `elems` elements (rows of whole
    vectors); with `skip_size_one`, strides of dims of size 1 are not looked at. Message field: {name}."""
    def bad(t: torch.Tensor) -> bool:
        return any(s % elems for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1 or not skip_size_one)

    return Constraint(f"strides_multiple_of{elems}({', '.join(_names(names))})", _each(names, bad, message))


def requires(name: str, predicate: Callable[[Args], bool], message: str) -> Constraint:
    """A backend-specific condition on the arguments (a grid or index limit): `predicate(args)` holds."""
    return Constraint(name, lambda args: None if predicate(args) else message)
