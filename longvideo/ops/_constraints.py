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

:class:`ArgumentTypes` (end of this module) is a different kind of check: the Python types of
an op's arguments at its public function, before torch's schema parser sees them.
"""
from __future__ import annotations

import numbers
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


# ----------------------------------------------------------------------------------------------
# Python-interface argument types (the ops' public functions, before dispatch)
#
# torch parses a custom op's non-tensor arguments by its schema: a float where an int is expected
# raises a multi-line RuntimeError (position, value, declaration, a pybind11 cast note), and a bool
# is converted to 0 / 1 (or 1.0) before any code of ours runs, so `d_s=True` would silently be
# 1.0. The public functions (``longvideo.ops.lowfreq_mix`` etc.) therefore check each argument's
# Python type against the schema first and raise one line naming it. Calls of
# ``torch.ops.longvideo.*`` itself still go through torch's parser (docs/ops.md).

def _is_int(value) -> bool:
    # numbers.Integral covers Python and NumPy integers; SymInt appears under torch.compile with
    # dynamic shapes. bool is an int subclass, but True is not a size.
    if type(value) is int:  # the common case, without the abstract-class check
        return True
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def _is_float(value) -> bool:
    # any real number (int, float, NumPy scalars, Fraction), not a bool and not a tensor
    if type(value) is float or type(value) is int:
        return True
    return (isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat))
            and not isinstance(value, (bool, torch.Tensor)))


# schema type -> (what one value must be, what a list of them is, the test)
_SCALAR_KINDS = {"int": ("an int", "ints", _is_int), "float": ("a number (int or float)", "numbers", _is_float),
                 "str": ("a string", "strings", lambda v: isinstance(v, str)),
                 "Tensor": ("a tensor", "tensors", lambda v: isinstance(v, torch.Tensor))}


def _kind_of(jit_type) -> tuple[str, bool, bool]:
    """(scalar kind, is a list, optional) of one schema argument type."""
    optional = isinstance(jit_type, torch._C.OptionalType)
    if optional:
        jit_type = jit_type.getElementType()
    is_list = isinstance(jit_type, torch._C.ListType)
    if is_list:
        jit_type = jit_type.getElementType()
    return str(jit_type), is_list, optional


def _type_name(value) -> str:
    return "bool" if isinstance(value, bool) else type(value).__name__


def _short(value) -> str:
    """repr(value), cut to one short line (a long list or a tensor must not flood the message)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


class ArgumentTypes:
    """The Python types an op's public function accepts, read from its schema once.

    ``ArgumentTypes(op_overload)(values)`` checks a mapping of argument name -> value (the public
    function's arguments) and raises ``ValueError("<op>: <name> must be an int, got float 6.0")``
    for the first argument whose value is not of its schema type: an int (not a bool, not a
    float, not a tensor) for ``int``, a real number (not a bool, not a tensor) for ``float``, a
    list or tuple of such for ``int[]`` / ``float[]`` ("a list of ints" / "of numbers"), a string
    for ``str``, a tensor for ``Tensor``; None only where the schema says ``?``. Cost, measured
    with timeit on this project's CPU machine: 1.0 us per call for lowfreq_mix's six arguments
    (torch.add of two small tensors: 1.0 us); plain ints and floats skip the abstract-class
    checks (2.3-3.5 us without that fast path).
    """

    def __init__(self, op_overload):
        schema = op_overload._schema
        self.op = schema.name.split("::")[-1]
        self.kinds = {a.name: _kind_of(a.type) for a in schema.arguments}

    def __call__(self, values: Mapping[str, object]) -> None:
        for name, value in values.items():
            kind, is_list, optional = self.kinds[name]
            if value is None:
                if optional:
                    continue
                raise ValueError(f"{self.op}: {name} must be {_SCALAR_KINDS[kind][0]}, got None")
            if kind not in _SCALAR_KINDS:
                continue  # no such argument in the ops today; torch's parser handles it
            what, plural, ok = _SCALAR_KINDS[kind]
            if not is_list:
                if not ok(value):
                    raise ValueError(f"{self.op}: {name} must be {what}, got {_type_name(value)} {_short(value)}")
                continue
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{self.op}: {name} must be a list of {plural}, got {_type_name(value)} "
                                 f"{_short(value)}")
            for item in value:
                if not ok(item):
                    raise ValueError(f"{self.op}: {name} must be a list of {plural}, got {_short(list(value))} "
                                     f"({_short(item)} is a {_type_name(item)})")
