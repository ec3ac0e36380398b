"""The id bank of consistent self-attention (StoryDiffusion): the storage layer behind
``ConsistentAttentionController`` (``longvideo/processors/consistent.py``).

``IdBank`` holds, per key (a character, or a video subject) and per (step, layer), the sampled
self-attention inputs of the id images, (groups, E, C). It lives where the user says: "auto" (on
the model's device within a memory budget, the rest in pinned host memory), a device (e.g.
"cuda"), "cpu" (pinned memory when CUDA is present: copied in and out asynchronously), or a
safetensors file read lazily; ``save``/``load`` continue a story in a later run;
``memory_summary`` gives its bytes per location. Options and placement rules: docs/methods.md,
"Where the id bank lives".
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Optional, Sequence, Union

import torch

BANK_FORMAT = "longvideo-idbank-v1"

def _resolved(device) -> torch.device:
    """`cuda` -> `cuda:N` (the current device), so that comparisons with tensors' devices hold."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())


# the id bank
DEFAULT_GPU_BUDGET_FRACTION = 0.10
"""Default device budget of an ``"auto"`` bank: this fraction of the device's total memory (and
never more than half of the memory free when the bank first stores an entry on that device)."""

_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_gpu_budget(budget, name: str = "gpu_budget") -> tuple:
    """Normalise a device budget: ``None`` (the default fraction, DEFAULT_GPU_BUDGET_FRACTION),
    bytes (an int or float >= 0), or a string: ``"2GiB"``, ``"512MiB"``, ``"1.5GB"``, ``"123"``
    (bytes) or ``"10%"`` (of the device's total memory). Returns ("bytes", n) or ("fraction", f).
    Raises ValueError naming `name` for a negative, non-finite or unreadable budget."""
    if budget is None:
        return ("fraction", DEFAULT_GPU_BUDGET_FRACTION)
    if isinstance(budget, bool):
        raise ValueError(f"{name} must be bytes (>= 0), '<n>GiB' or '<p>%', got {budget!r}")
    if isinstance(budget, (int, float)):
        if not math.isfinite(budget) or budget < 0:
            raise ValueError(f"{name} must be a number of bytes >= 0, got {budget!r}")
        return ("bytes", int(budget))
    if isinstance(budget, str):
        text = budget.strip().lower().replace(" ", "")
        try:
            if text.endswith("%"):
                frac = float(text[:-1]) / 100.0
                if not 0.0 <= frac <= 1.0:
                    raise ValueError
                return ("fraction", frac)
            num = text.rstrip("kmgtib")
            unit = text[len(num):]
            value = float(num) * _BYTE_UNITS[unit]
            if not math.isfinite(value) or value < 0:
                raise ValueError
            return ("bytes", int(value))
        except (ValueError, KeyError):
            pass
    raise ValueError(f"{name} must be bytes (>= 0), a size such as '2GiB' / '512MiB', or a percentage of the "
                     f"device's memory such as '10%', got {budget!r}")


def keeps_on_device(device_bytes: int, entry_bytes: int, budget: int) -> bool:
    """Placement rule of an ``"auto"`` bank for an entry produced on an accelerator: it stays on
    the device iff the bank's bytes on that device, this entry included, stay within `budget`;
    otherwise it spills to (pinned) host memory. Applied greedily in write order, so the first
    steps written stay on the device and the later ones spill."""
    return device_bytes + entry_bytes <= budget


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                         "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class IdBank:
    """Cached self-attention inputs of id images, keyed by (key, step, layer).

    location: where entries live.

    * ``"auto"`` (StoryDiffusion's default): entries are produced on the model's device; each
      stays there while the bank's bytes on that device stay within `gpu_budget`, and spills to
      pinned host memory beyond it (:func:`keeps_on_device`). Entries may then live on different
      devices: :meth:`get` handles the mix, :meth:`prefetch` copies only the host entries. On a
      CPU-only run entries stay where they are produced (exactly like ``None``).
    * ``None``: keep entries on the device they were produced on (no budget).
    * a torch.device / device string ("cuda", "cuda:1", "cpu"): every entry is copied there
      ("cpu" with CUDA present: pinned memory, copied in and out asynchronously).
    * a path ending in ``.safetensors``: the bank is written there by :meth:`flush` /
      :meth:`save` and read back lazily, tensor by tensor, when attended to.

    gpu_budget (``"auto"`` only): bytes, ``"2GiB"``-style sizes or ``"10%"`` of the device's total
    memory (see :func:`parse_gpu_budget`); default DEFAULT_GPU_BUDGET_FRACTION (10%) of the
    total, capped at half of the memory free when the first entry is stored on the device. Read
    lazily, on the first entry stored on each device. For accelerators other than CUDA a
    percentage cannot be resolved and entries stay on the device.

    Each entry is a (groups, E, C) tensor: groups = the CFG halves of the write call (2 with
    classifier-free guidance), E = sampled tokens of all id images of the key, or, on a "full"
    step (see :meth:`ConsistentAttentionController.step_kind`: the official app's steps before
    start_step), ALL their tokens (E = id images * tokens). Only the steps the read phase can use
    are written: nothing for a step on which consistent attention is off (probability 0 and not
    a full step). :meth:`memory_summary` gives the bytes per location.
    """

    def __init__(self, location: Union[str, torch.device, os.PathLike, None] = None, gpu_budget=None):
        self.file: Optional[str] = None
        self.device: Optional[torch.device] = None
        self.auto = isinstance(location, str) and location == "auto"
        if location is not None and not self.auto:
            loc = os.fspath(location) if isinstance(location, os.PathLike) else location
            if isinstance(loc, str) and loc.endswith(".safetensors"):
                self.file = loc
                self.device = torch.device("cpu")
            else:
                try:
                    self.device = torch.device(loc)
                except (RuntimeError, TypeError) as exc:
                    raise ValueError(f"bank location must be 'auto', a device ('cuda', 'cpu') or a .safetensors "
                                     f"path, got {location!r}") from exc
        if gpu_budget is not None and not self.auto:
            raise ValueError(f"gpu_budget={gpu_budget!r} applies only to location='auto' (got location={location!r})")
        self._budget_spec = parse_gpu_budget(gpu_budget) if self.auto else None
        self._budgets: dict = {}  # device -> resolved budget in bytes
        self._mem: dict[tuple, torch.Tensor] = {}
        self._where: dict[tuple, str] = {}  # entry -> "device" | "host" (what memory_summary counts)
        self._device_bytes: dict = {}  # device -> bytes of entries kept there (the budget's ledger)
        self._lazy = None  # safe_open handle of a file-backed bank
        self._lazy_keys: set = set()
        self._lazy_bytes: dict = {}
        self.keys_order: list[str] = []  # the bank keys (character names), in write order
        self.meta: dict = {}  # what the bank was recorded with (steps, sampling rate, model, ...)
        self._pending_cuda = False
        self._stream = None  # side CUDA stream of the host -> device prefetch
        self._prefetched: dict = {}  # (key, step, layer) -> tensor copied by prefetch()

    # -- content -------------------------------------------------------------------------------
    @staticmethod
    def _name(key: str, step: Optional[int], layer: str) -> str:
        return f"{key}\x1f{'-' if step is None else step}\x1f{layer}"

    def __contains__(self, key: str) -> bool:
        return key in self.keys_order

    def keys(self) -> list[str]:
        return list(self.keys_order)

    def clear(self, key: Optional[str] = None) -> None:
        """Forget every entry of `key` (or everything)."""
        if key is None:
            self._mem.clear()
            self._where.clear()
            self._lazy, self._lazy_keys, self.keys_order = None, set(), []
        else:
            self._mem = {n: t for n, t in self._mem.items() if n[0] != key}
            self._where = {n: w for n, w in self._where.items() if n[0] != key}
            self._lazy_keys = {n for n in self._lazy_keys if n.split("\x1f")[0] != key}
            self.keys_order = [k for k in self.keys_order if k != key]
        self._recount()

    def _recount(self) -> None:
        self._device_bytes = {}
        for n, t in self._mem.items():
            if self._where.get(n) == "device":
                self._device_bytes[t.device] = self._device_bytes.get(t.device, 0) + _nbytes(t)

    def num_entries(self) -> int:
        return len(self._mem) + len(self._lazy_keys)

    def nbytes(self) -> int:
        """Bytes of the in-memory entries (device and host; not the file-backed ones)."""
        return sum(_nbytes(t) for t in self._mem.values())

    def memory_summary(self) -> dict:
        """Bytes of the bank per location: {"device": on accelerators, "host": in (pinned) host
        memory, "file": in a safetensors file read lazily, "entries": count, "device_budget":
        the auto bank's resolved budget in bytes (None when none was resolved)}."""
        out = {"device": 0, "host": 0, "file": 0}
        for n, t in self._mem.items():
            out[self._where.get(n, "host")] += _nbytes(t)
        out["file"] = sum(self._lazy_bytes.get(n, 0) for n in self._lazy_keys)
        out["entries"] = self.num_entries()
        out["device_budget"] = max(self._budgets.values()) if self._budgets else None
        return out

    @staticmethod
    def _is_accelerator(device: torch.device) -> bool:
        return device.type != "cpu"

    def _budget_for(self, device: torch.device) -> int:
        """The auto bank's budget on `device`, in bytes (resolved on first use)."""
        if device in self._budgets:
            return self._budgets[device]
        kind, value = self._budget_spec
        if kind == "bytes":
            budget = int(value)
        elif device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(min(value * total, free // 2))
        else:  # no portable way to ask another accelerator for its size: keep entries there
            budget = 1 << 62
        self._budgets[device] = budget
        return budget

    def _to_host(self, value: torch.Tensor) -> torch.Tensor:
        """A host copy of `value`: pinned and asynchronous from a CUDA device (the write pass does
        not wait for the transfer; synchronize() before reading it on the host)."""
        pin = value.device.type == "cuda"
        stored = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=pin)
        stored.copy_(value, non_blocking=pin)
        if pin:
            self._pending_cuda = True
        return stored

    def _place(self, value: torch.Tensor, target: Optional[torch.device] = None) -> tuple:
        """(stored tensor, "device" | "host") for a new entry produced on value.device (or, for
        `target` given, loaded from a file for the model's device `target`)."""
        if self.auto:
            where = value.device if target is None else target
            if not self._is_accelerator(where):
                return value, "host"
            if keeps_on_device(self._device_bytes.get(where, 0), _nbytes(value), self._budget_for(where)):
                return value.to(where), "device"
            if value.device.type == "cpu":
                return (value.pin_memory() if torch.cuda.is_available() else value), "host"
            return self._to_host(value), "host"
        dev = self.device if self.device is not None else target
        if dev is None:
            stored = value
        elif value.device == dev:
            stored = value.clone() if target is None else value
        elif dev.type == "cpu" and value.device.type == "cuda":
            stored = self._to_host(value)
        else:
            stored = value.to(dev)
        return stored, "device" if self._is_accelerator(stored.device) else "host"

    def put(self, key: str, step: Optional[int], layer: str, value: torch.Tensor) -> None:
        """Store `value` (groups, E, C) for (key, step, layer), on the bank's location."""
        if value.dim() != 3:
            raise ValueError(f"bank value must be (groups, E, C), got shape {tuple(value.shape)}")
        if key not in self.keys_order:
            self.keys_order.append(key)
        self._store((key, step, layer), value.detach())

    def _store(self, entry: tuple, value: torch.Tensor, target: Optional[torch.device] = None) -> None:
        old = self._mem.pop(entry, None)
        if old is not None and self._where.get(entry) == "device":
            self._device_bytes[old.device] -= _nbytes(old)
        stored, where = self._place(value, target)
        self._mem[entry] = stored
        self._where[entry] = where
        if where == "device":
            self._device_bytes[stored.device] = self._device_bytes.get(stored.device, 0) + _nbytes(stored)

    def synchronize(self) -> None:
        """Wait for pending device-to-host copies (call before reading the host tensors)."""
        if self._pending_cuda and torch.cuda.is_available():
            torch.cuda.synchronize()
        self._pending_cuda = False

    def _fetch(self, key, step, layer) -> torch.Tensor:
        t = self._mem.get((key, step, layer))
        if t is not None:
            return t
        name = self._name(key, step, layer)
        if self._lazy is not None and name in self._lazy_keys:
            return self._lazy.get_tensor(name)
        raise KeyError(name)

    def get(self, keys: Sequence[str], step: Optional[int], layer: str, device: torch.device,
            dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The entries of `keys` for (step, layer), concatenated along E, on `device` in `dtype`.

        Entries may live in different places (device, host, file): each comes from its prefetched
        copy when :meth:`prefetch` made one, else is copied from where it lives. Raises
        RuntimeError naming what is missing (a character never written, or a step or layer the
        bank was not recorded with: read with the same number of steps and layers as the write).
        """
        if not keys:
            return None
        device = _resolved(device)
        parts, waited, synced = [], False, False
        for key in keys:
            if key not in self.keys_order:
                raise RuntimeError(f"id bank has no character {key!r}; it holds {self.keys_order}")
            pre = self._prefetched.pop((key, step, layer), None)
            if pre is not None and pre.device == device and pre.dtype == dtype:
                # copied on the side stream: order the current stream after it (once), and tell the
                # caching allocator the tensor is used here
                cur = torch.cuda.current_stream(device)
                if not waited:
                    cur.wait_stream(self._stream)
                    waited = True
                pre.record_stream(cur)
                parts.append(pre)
                continue
            if not synced:
                self.synchronize()
                synced = True
            try:
                t = self._fetch(key, step, layer)
            except KeyError:
                raise RuntimeError(
                    f"id bank has no entry for character {key!r}, step {step}, layer {layer!r}: read with the "
                    f"same number of denoising steps, schedule and patched layers as the write "
                    f"(bank recorded with {self.meta or 'unknown settings'})") from None
            parts.append(t.to(device=device, dtype=dtype, non_blocking=True))
        if any(p.shape[0] != parts[0].shape[0] for p in parts):
            raise RuntimeError(f"id bank entries of {list(keys)} have different group counts "
                               f"{[p.shape[0] for p in parts]} (written with and without CFG?)")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def prefetch(self, keys: Sequence[str], step: Optional[int], layers: Sequence[str], device: torch.device,
                 dtype: torch.dtype) -> None:
        """Start copying the host-memory (or file) entries of `keys` for (step, each layer) to the
        CUDA `device` on a side stream, so that the transfer overlaps the model's compute before
        the patched layers run. Entries already on `device` are left to :meth:`get`; a no-op
        unless `device` is CUDA."""
        self._prefetched.clear()
        if not keys or device.type != "cuda":
            return
        todo = []
        for layer in layers:
            for key in keys:
                entry = (key, step, layer)
                t = self._mem.get(entry)
                if t is None:
                    name = self._name(key, step, layer)
                    if self._lazy is None or name not in self._lazy_keys:
                        continue  # get() raises the clear error if this entry is really needed
                    t = self._lazy.get_tensor(name)
                elif t.device.type != "cpu":
                    continue  # on this device already (or another accelerator: get() copies it)
                todo.append((entry, t))
        if not todo:
            return
        self.synchronize()
        device = _resolved(device)
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            for entry, t in todo:
                self._prefetched[entry] = t.to(device=device, dtype=dtype, non_blocking=True)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write every entry to a safetensors file (with the keys and meta data); returns the path."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            raise ValueError(f"bank path must end in .safetensors, got {path!r}")
        self.synchronize()
        tensors = {self._name(*n): t.detach().to("cpu").contiguous() for n, t in self._mem.items()}
        if self._lazy is not None:
            for name in self._lazy_keys:
                if name not in tensors:
                    tensors[name] = self._lazy.get_tensor(name)
        meta = {"format": BANK_FORMAT, "keys": json.dumps(self.keys_order), "meta": json.dumps(self.meta)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)  # the lazy handle (if any) keeps the old inode alive
        return path

    def flush(self) -> None:
        """For a file-backed bank: write the in-memory entries to the file and read them lazily."""
        if self.file is None or not self._mem:
            return
        self.save(self.file)
        self._mem.clear()
        self._where.clear()
        self._recount()
        self._open_lazy(self.file)

    def _open_lazy(self, path: str) -> None:
        from safetensors import safe_open

        handle = safe_open(path, framework="pt", device="cpu")
        meta = handle.metadata() or {}
        if meta.get("format") != BANK_FORMAT:
            raise ValueError(f"{path!r} is not a longvideo id bank (format {meta.get('format')!r}, "
                             f"expected {BANK_FORMAT!r})")
        self._lazy = handle
        self._lazy_keys = set(handle.keys())
        self._lazy_bytes = {}
        for name in self._lazy_keys:
            sl = handle.get_slice(name)
            numel = 1
            for d in sl.get_shape():
                numel *= d
            self._lazy_bytes[name] = numel * _SAFETENSORS_ITEMSIZE.get(sl.get_dtype(), 0)
        self.keys_order = json.loads(meta["keys"])
        self.meta = json.loads(meta.get("meta", "{}"))

    def load(self, path: Union[str, os.PathLike], keys: Optional[Iterable[str]] = None,
             device: Union[str, torch.device, None] = None) -> "IdBank":
        """Load a bank written by :meth:`save`: lazily for a file-backed bank, else onto the
        bank's location (or `device`, or the CPU, when the bank has none; an ``"auto"`` bank puts
        entries on `device` within its budget and the rest in pinned host memory). `keys`
        restricts to those characters. Returns self."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"bank file {path!r} does not exist")
        self._open_lazy(path)
        wanted = None if keys is None else set(keys)
        if wanted is not None:
            missing = wanted - set(self.keys_order)
            if missing:
                raise ValueError(f"bank file {path!r} has no character(s) {sorted(missing)}; it holds {self.keys_order}")
        if self.file is not None:  # file-backed: keep reading lazily from this file
            self.file = path
            if wanted is not None:
                self._lazy_keys = {n for n in self._lazy_keys if n.split("\x1f")[0] in wanted}
                self.keys_order = [k for k in self.keys_order if k in wanted]
            return self
        target = torch.device(device or "cpu")
        for name in sorted(self._lazy_keys, key=_entry_order):  # write order: early steps first
            key, step, layer = name.split("\x1f")
            if wanted is not None and key not in wanted:
                continue
            self._store((key, None if step == "-" else int(step), layer), self._lazy.get_tensor(name), target)
        if wanted is not None:
            self.keys_order = [k for k in self.keys_order if k in wanted]
        self._lazy, self._lazy_keys = None, set()
        return self



def _entry_order(name: str) -> tuple:
    key, step, layer = name.split("\x1f")
    return (key, -1 if step == "-" else int(step), layer)
