"""Consistent self-attention for diffusers ``Attention`` layers (StoryDiffusion; how this differs from
the official code: docs/fidelity.md).

Three pieces, data flowing one way (method -> controller -> processor -> op):

``ConsistentAttnProcessor``
    A diffusers attention processor for a self-attention layer (``attn1``). It projects q, k, v
    with the layer's own weights, views them as (B, H, N, D) (transposed views of the
    projections, no copies), and calls ``torch.ops.longvideo.consistent_attention`` with the plan
    the controller gives for this call: the step's sampled token indices, the group size (images
    per CFG half), an optional frame window, and the id bank (the cached self-attention inputs of
    the id images, projected here by the same layer's to_k / to_v). Row b attends with one softmax
    over its own tokens, the sampled tokens of the other images of its group and the bank:

        out[b] = softmax(q[b] [k[b]; k_S(b); K_bank]^T / sqrt(D)) [v[b]; v_S(b); V_bank]

    When the controller says "off" for the call, it is exactly diffusers' ``AttnProcessor2_0``.

``ConsistentAttentionController``
    Shared state of all processors of one model: the mode ("off", "write", "read"), the denoising
    step (counted by a forward pre-hook on the model: one model call = one step), the token
    sampling (a Bernoulli(sampling_rate) subset per image, drawn once per step from a seeded
    ``torch.Generator``, shared by all layers of the same resolution and by every group, i.e. both
    CFG halves), the official per-call probability schedule, the early steps (before the
    schedule's start: plain attention, or, as the official app reads, the WHOLE id bank), and the
    id bank.

``IdBank``
    The id bank: per key (a character, or a video subject) and per (step, layer), the sampled
    self-attention inputs of the id images, (groups, E, C). It lives where the user says:
    "auto" (on the model's device within a memory budget, the rest in pinned host memory), a
    device (e.g. "cuda"), "cpu" (pinned memory when CUDA is present: copied in and out
    asynchronously), or a safetensors file read lazily; ``save``/``load`` continue a story in a
    later run; ``memory_summary`` gives its bytes per location.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

BANK_FORMAT = "longvideo-idbank-v1"


def _derive_seed(*parts) -> int:
    """A 63-bit seed that is a fixed function of `parts` (stable across processes and runs)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _resolved(device) -> torch.device:
    """`cuda` -> `cuda:N` (the current device), so that comparisons with tensors' devices hold."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# the controller
@dataclass
class ConsistencyPlan:
    """What one attention call computes (see ConsistentAttnProcessor)."""

    sample_idx: torch.Tensor  # (M,) int64 flat token indices into [0, B*N)
    group_size: int
    window: int = -1
    bank: Optional[torch.Tensor] = None  # (groups, E, C) or (1, E, C) self-attention inputs


def bernoulli_token_subset(seed: int, call_key, step: int, tokens: int, count: int, rate: float) -> torch.Tensor:
    """Sorted indices in [0, count) of the tokens a write/read call shares at `step` at the
    resolution of `tokens` tokens per image: one Bernoulli(rate) draw per token of the group's
    `count` = images * tokens, from a generator seeded by (seed, call_key, step, tokens) only, so
    that the draw (and the id bank's size) can be replayed without running the model."""
    gen = torch.Generator().manual_seed(_derive_seed(seed, "sample", call_key, step, tokens))
    return torch.nonzero(torch.rand(count, generator=gen) < rate).flatten()


SCHEDULES = ("official_app", "low_vram")
"""StoryDiffusion's two official schedules of the steps before consistent attention starts:

* ``"official_app"`` (app.py, predict.py): consistent attention from step 5; before it, a write
  call runs plain self-attention (and the id bank keeps the WHOLE self-attention inputs of the id
  images), a read call attends to its own tokens plus the whole id bank.
* ``"low_vram"`` (gradio_app_sdxl_specific_id_low_vram.py): consistent attention from step 1;
  step 0 is plain self-attention in both phases (nothing is written for it)."""

SCHEDULE_START = {"official_app": 5, "low_vram": 1}


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return schedule


def step_kind(step: int, probability: float, start_step: int, full_bank_early: bool) -> str:
    """What consistent attention does at `step`: "full" (before `start_step` when the early
    steps read the whole id bank: the official app), "sampled" (the scheduled probability is
    > 0: write and read with the sampled token subset), or "none" (plain attention)."""
    if full_bank_early and step < start_step:
        return "full"
    return "sampled" if probability > 0 else "none"


def official_probability(step: int, start_step: int = 5, prob_early: float = 0.7, prob_late: float = 0.9,
                         late_step: int = 20) -> float:
    """StoryDiffusion's per-call schedule: off before `start_step`, then consistent attention with
    probability `prob_early` while step < `late_step`, `prob_late` afterwards (official app:
    5, 0.7, 0.9, 20)."""
    if step < start_step:
        return 0.0
    return prob_early if step < late_step else prob_late


class ConsistentAttentionController:
    """State shared by the consistent-attention processors of one model.

    sampling_rate   fraction of each image's tokens shared with the other images of its group
                    (Bernoulli per token; official 0.5). A float, or {tokens_per_image: rate}
                    (the official code has one rate per resolution, sa32 / sa64).
    start_step, prob_early, prob_late, late_step
                    the per-call probability schedule (:func:`official_probability`), or
                    `probability` = any callable(step) -> float replacing it.
    full_bank_early steps < start_step are "full" steps (:func:`step_kind`; StoryDiffusion's
                    ``schedule="official_app"``): a write call runs plain attention and stores
                    the WHOLE inputs of its images in the bank, a read call attends to its own
                    tokens plus all of them (the consistent_attention op with the bank and no
                    sampled tokens), with no per-call draw. False (default): those steps follow
                    the probability (0 in the official schedule: plain attention, nothing stored).
    window          frame window for video (images b, b' interact only if |b - b'| <= window);
                    -1 = whole group.
    bank            the IdBank; `bank_step_key` False keys bank entries by layer only (for
                    callers whose model calls are not aligned denoising steps, e.g. FIFO).
    seed            makes sampling and the per-call draws reproducible: a call's draws depend
                    only on (seed, call_key, step, resolution).
    """

    def __init__(self, sampling_rate: Union[float, dict] = 0.5, start_step: int = 5, prob_early: float = 0.7,
                 prob_late: float = 0.9, late_step: int = 20, probability: Optional[Callable[[int], float]] = None,
                 window: int = -1, bank: Optional[IdBank] = None, seed: int = 0, bank_step_key: bool = True,
                 full_bank_early: bool = False):
        rates = sampling_rate.values() if isinstance(sampling_rate, dict) else [sampling_rate]
        for r in rates:
            if not 0.0 <= float(r) <= 1.0:
                raise ValueError(f"sampling_rate must lie in [0, 1], got {sampling_rate!r}")
        for name, p in (("prob_early", prob_early), ("prob_late", prob_late)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p!r}")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if not isinstance(window, int) or window < -1:
            raise ValueError(f"window must be an int >= -1, got {window!r}")
        self.sampling_rate = sampling_rate
        self.start_step, self.prob_early, self.prob_late, self.late_step = start_step, prob_early, prob_late, late_step
        self.probability = probability
        self.full_bank_early = bool(full_bank_early)
        self.window = window
        self.bank = bank if bank is not None else IdBank()
        self.bank_step_key = bank_step_key
        self.seed = seed
        # per-call state, set by the method around each pipeline call
        self.mode = "off"  # "off" | "write" | "read"
        self.group_size: Optional[int] = None  # images per group (per CFG half); None: batch // groups
        self.num_groups = 2
        self.write_key: Optional[str] = None
        self.read_keys: list[str] = []
        self.call_key: object = 0
        self.step = -1
        self._samples: dict = {}
        self._call_gen: Optional[torch.Generator] = None
        self._hooks: list = []
        self._installed: dict = {}  # model -> {name: original processor}
        self.trace: Optional[list] = None  # set to [] to record (step, layer, used) per call (tests)

    # -- per call ---------------------------------------------------------------------------------
    def begin_call(self, mode: str, call_key=0, group_size: Optional[int] = None, write_key: Optional[str] = None,
                   read_keys: Sequence[str] = ()) -> None:
        if mode not in ("off", "write", "read"):
            raise ValueError(f"mode must be 'off', 'write' or 'read', got {mode!r}")
        if mode == "write" and not write_key:
            raise ValueError("write mode needs write_key (the character whose id bank is written)")
        self.mode, self.call_key, self.group_size = mode, call_key, group_size
        self.write_key, self.read_keys = write_key, list(read_keys)
        self.step = -1
        self._samples = {}
        self._call_gen = torch.Generator().manual_seed(_derive_seed(self.seed, "calls", call_key))

    def end_call(self) -> None:
        self.mode = "off"
        self.bank._prefetched.clear()
        self.bank.synchronize()

    def on_model_call(self, module=None, *_args, **_kwargs) -> None:
        """Forward pre-hook of the denoiser: one model call is one denoising step. In read mode
        with a host-memory bank, starts the step's bank transfer to the model's device."""
        self.step += 1
        self._samples = {}
        if self.mode == "read" and self.read_keys and module is not None and self.step_kind(self.step) != "none":
            param = next(module.parameters(), None)
            layers = self._installed.get(id(module), (None, {}))[1]
            if param is not None and param.device.type == "cuda" and layers:
                self.bank.prefetch(self.read_keys, self.step if self.bank_step_key else None, list(layers),
                                   param.device, param.dtype)

    def probability_at(self, step: int) -> float:
        if self.probability is not None:
            return float(self.probability(step))
        return official_probability(step, self.start_step, self.prob_early, self.prob_late, self.late_step)

    def step_kind(self, step: int) -> str:
        """"full", "sampled" or "none" (see :func:`step_kind`)."""
        return step_kind(step, self.probability_at(step), self.start_step, self.full_bank_early)

    def rate_for(self, tokens: int) -> float:
        if isinstance(self.sampling_rate, dict):
            return float(self.sampling_rate.get(tokens, 0.0))
        return float(self.sampling_rate)

    def sample_indices(self, step: int, tokens: int, group_size: int, groups: int,
                       device: torch.device) -> torch.Tensor:
        """Sorted flat indices of the tokens shared at `step` by images of `tokens` tokens: one
        Bernoulli(rate) draw per (image of a group, token), repeated for every group (both CFG
        halves see the same subset). Cached per step and resolution."""
        key = (tokens, group_size, groups, device)
        if self.step == step and key in self._samples:
            return self._samples[key]
        rate = self.rate_for(tokens)
        per_group = group_size * tokens
        if rate <= 0.0 or group_size <= 1 and self.mode != "write":
            half = torch.empty(0, dtype=torch.int64)
        else:
            half = bernoulli_token_subset(self.seed, self.call_key, step, tokens, per_group, rate)
        idx = torch.cat([half + g * per_group for g in range(groups)]) if groups > 1 else half
        idx = idx.to(device)
        if self.step == step:
            self._samples[key] = idx
        return idx

    def plan(self, layer: str, hidden_states: torch.Tensor) -> Optional[ConsistencyPlan]:
        """The plan of one self-attention call (None: plain attention), recording the bank in write
        mode. hidden_states: (B, N, C), the inputs of to_q/to_k/to_v."""
        if self.mode == "off":
            return None
        B, N, C = hidden_states.shape
        group_size = self.group_size or max(1, B // self.num_groups)
        if B % group_size:
            raise RuntimeError(f"consistent attention: batch {B} is not a multiple of group_size {group_size}")
        groups = B // group_size
        step = max(self.step, 0)
        kind = self.step_kind(step)
        if kind == "none":
            return None
        bank_step = step if self.bank_step_key else None
        if kind == "full":
            # the official app before start_step: a write runs plain attention and keeps the WHOLE
            # inputs of its images (groups, group_size * N, C); a read attends to its own tokens
            # plus all of them (no sampled tokens, no per-call draw)
            if self.mode == "write":
                self.bank.put(self.write_key, bank_step, layer,
                              hidden_states.detach().reshape(groups, group_size * N, C).clone())
            bank = self._read_bank(bank_step, layer, hidden_states, groups) if self.mode == "read" else None
            if self.trace is not None:
                self.trace.append((step, layer, bank is not None))
            if bank is None:
                return None
            empty = torch.empty(0, dtype=torch.int64, device=hidden_states.device)
            return ConsistencyPlan(sample_idx=empty, group_size=group_size, window=-1, bank=bank)
        p = self.probability_at(step)
        sample_idx = self.sample_indices(step, N, group_size, groups, hidden_states.device)
        if self.mode == "write":
            # the id images' sampled tokens (the same subset their write-mode attention shares),
            # kept per group: (groups, E, C)
            shared = hidden_states.reshape(B * N, C).index_select(0, sample_idx).view(groups, -1, C)
            self.bank.put(self.write_key, bank_step, layer, shared)
        used = p >= 1.0 or bool(torch.rand((), generator=self._call_gen) < p)
        if self.trace is not None:
            self.trace.append((step, layer, used))
        if not used:
            return None
        bank = self._read_bank(bank_step, layer, hidden_states, groups) if self.mode == "read" else None
        return ConsistencyPlan(sample_idx=sample_idx, group_size=group_size, window=self.window, bank=bank)

    def _read_bank(self, bank_step, layer: str, hidden_states: torch.Tensor, groups: int) -> Optional[torch.Tensor]:
        """The read keys' bank entries for (step, layer), (groups or 1, E, C); None when empty."""
        if not self.read_keys:
            return None
        bank = self.bank.get(self.read_keys, bank_step, layer, hidden_states.device, hidden_states.dtype)
        if bank.shape[0] not in (1, groups):
            raise RuntimeError(f"id bank has {bank.shape[0]} groups but this call has {groups} (one per CFG "
                               f"half): write and read with the same guidance setting")
        return None if bank.shape[1] == 0 else bank

    # -- installation ------------------------------------------------------------------------------
    def install(self, model: torch.nn.Module, layers: Union[str, Sequence[str], Callable[[str], bool]] = "up") -> list:
        """Put a ConsistentAttnProcessor on the selected self-attention layers of `model` and a
        step-counting pre-hook on `model`. Returns the patched layer names.

        layers: "up" (attn1 of up_blocks: the official choice), "up+mid", "all" (every attn1),
        "spatial" (every attn1 outside temporal/motion modules: video UNets), a list of layer
        names, or a predicate on the layer name.
        """
        originals, names = {}, []
        for name, module in self_attention_layers(model, layers):
            originals[name] = module.processor
            module.set_processor(ConsistentAttnProcessor(self, name))
            names.append(name)
        if not names:
            raise ValueError(f"layers={layers!r} selects no self-attention layer of {type(model).__name__}")
        self._installed[id(model)] = (model, originals)
        self._hooks.append(model.register_forward_pre_hook(self.on_model_call))
        return names

    def uninstall(self) -> None:
        """Restore the original processors and remove the hooks."""
        for model, originals in self._installed.values():
            mods = dict(model.named_modules())
            for name, proc in originals.items():
                mods[name].set_processor(proc)
        for h in self._hooks:
            h.remove()
        self._installed, self._hooks = {}, []


def self_attention_layers(model: torch.nn.Module, layers="up") -> list:
    """[(name, Attention module)] of the self-attention layers of `model` that `layers` selects
    (see ConsistentAttentionController.install); the layers that install() patches."""
    from diffusers.models.attention_processor import Attention

    select = _layer_selector(layers)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, Attention) and not getattr(module, "is_cross_attention", False) and select(name)]


def _layer_selector(layers) -> Callable[[str], bool]:
    if callable(layers):
        return layers
    if isinstance(layers, str):
        if layers == "up":
            return lambda n: n.startswith("up_blocks.") and n.endswith("attn1")
        if layers == "up+mid":
            return lambda n: n.startswith(("up_blocks.", "mid_block.")) and n.endswith("attn1")
        if layers == "all":
            return lambda n: n.endswith("attn1")
        if layers == "spatial":  # video UNets: not the temporal attention of motion modules
            return lambda n: n.endswith("attn1") and not any(t in n for t in ("motion", "temporal", "temp_"))
        raise ValueError(f"layers must be 'up', 'up+mid', 'all', 'spatial', a list of names or a predicate, "
                         f"got {layers!r}")
    wanted = set(layers)
    return lambda n: n in wanted


# ----------------------------------------------------------------------------------------------
# the processor
class ConsistentAttnProcessor:
    """Self-attention through ``torch.ops.longvideo.consistent_attention`` (see module docstring).

    Works with any diffusers ``Attention`` used as self-attention (SD/SDXL UNets, AnimateDiff's
    spatial layers, other 2D/3D UNets and transformers built on ``Attention``): images or frames
    are the batch axis. Cross-attention calls, attention masks and calls the controller switches
    off run exactly like diffusers' ``AttnProcessor2_0``.
    """

    def __init__(self, controller: ConsistentAttentionController, name: str):
        self.controller = controller
        self.name = name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        B, N, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        plan = None
        if encoder_hidden_states is None and attention_mask is None:
            plan = self.controller.plan(self.name, hidden_states)
        context = hidden_states
        if encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        Bc = context.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], Bc)
            attention_mask = attention_mask.view(Bc, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # (B, N, H*D) -> (B, H, N, D): transposed views of the projections, no copies
        query = query.view(B, -1, heads, head_dim).transpose(1, 2)
        key = key.view(Bc, -1, heads, head_dim).transpose(1, 2)
        value = value.view(Bc, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if plan is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)
        else:
            bank_k = bank_v = None
            if plan.bank is not None:
                G, E, _ = plan.bank.shape
                bank_k = attn.to_k(plan.bank).view(G, E, heads, head_dim).transpose(1, 2)
                bank_v = attn.to_v(plan.bank).view(G, E, heads, head_dim).transpose(1, 2)
                if attn.norm_k is not None:
                    bank_k = attn.norm_k(bank_k)
                if G == 1:  # one bank shared by every group: the op's (H, E, D) form
                    bank_k, bank_v = bank_k[0], bank_v[0]
            out = torch.ops.longvideo.consistent_attention(query, key, value, plan.sample_idx, plan.group_size,
                                                           plan.window, bank_k, bank_v, attn.scale)

        out = out.transpose(1, 2).reshape(B, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
