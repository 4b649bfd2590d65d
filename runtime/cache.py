"""Typed per-layer caches and their snapshot/restore.

A model's cache is a plain list with one entry per layer (None where a layer keeps no state):

    KVCache         attention keys/values, grown in steps (static shapes within a step)
    RollingKVCache  sliding-window attention: a ring of `window` slots, memory stops at the window
    SSMState        Mamba conv + SSM state, fp32, constant size whatever the context
    BatchKVCache    attention keys/values of several sequences of different lengths decoded together, one
                    row per sequence (runtime/batch.py); a row's own length masks the others' padding

and, for captured decode steps (runtime/graphs.py), a StaticCache: the same list whose attention caches
are preallocated whole (StaticKVCache, StaticRollingKVCache) and whose one-token updates read the
position from a device tensor (`cursor`), so one captured step replays at every position.

Legend: B batch, H kv heads, S cached positions, T new positions, D head dim.

Every cache counts the tokens it has seen in `offset`, exposes `nbytes`, and turns itself into
tensors + JSON meta (`to_state` / `from_state`) so `save_cache`/`load_cache` can snapshot a whole
conversation to one safetensors file. A state file is untrusted input: `check_state` compares its
header (layer kinds, offsets vs token count, every tensor's shape and dtype) with the model's fresh
cache before a single tensor is read from it.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from runtime.errors import MambaCliError
from runtime.fileio import atomic_path

STEP = 256


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [T, S] mask: query at position p sees key at q iff 0 <= q <= p (and p - q < window)."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    m = (kp <= qp) & (kp >= 0)
    if window is not None:
        m &= (qp - kp) < window
    return m


class KVCache:
    """Keys/values of every position seen so far, preallocated in steps of STEP positions.

    `k` and `v` are [B, H, S, D], position-major (runtime/layers.py `one_query_attention` says why values are
    not stored dims-major on the CPU).
    """

    kind = "kv"

    def __init__(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 max_len: int | None = None):
        self.shape = (batch, n_kv, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.k = torch.zeros(batch, n_kv, max_len or 0, head_dim, dtype=dtype, device=device)  # [B, H, S, D]
        self.v = torch.zeros_like(self.k)
        self.offset = 0

    @property
    def capacity(self) -> int:
        """Positions the buffers hold before they grow."""
        return self.k.shape[2]

    def reserve(self, n: int) -> None:
        """Make room for n positions (in steps of STEP); the positions held so far are kept."""
        if n <= self.k.shape[2]:
            return
        size = ((n + STEP - 1) // STEP) * STEP
        b, h, d = self.shape
        k = torch.zeros(b, h, size, d, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        k[:, :, : self.offset] = self.k[:, :, : self.offset]
        v[:, :, : self.offset] = self.v[:, :, : self.offset]
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append k, v [B, H, T, D]; return all keys, values and the [T, S] mask (None: all visible)."""
        t = k.shape[2]
        start = self.offset
        # a spare slot after a prompt, as append_one keeps: the first decode step would otherwise regrow the
        # buffers and copy every position (a 512-token prompt: SmolLM2's first step 20-23 ms, the next 13-16)
        self.reserve(start + t + (t > 1))
        self.k[:, :, start : start + t] = k
        self.v[:, :, start : start + t] = v
        self.offset += t
        mask = None
        if t > 1:
            pos = torch.arange(self.offset, device=k.device)
            mask = attention_mask(pos[start:], pos, None)
        return self.k[:, :, : self.offset], self.v[:, :, : self.offset], mask

    def append_one(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for one more position; return the keys and values of all positions, the new one
        last (still to be written by the caller: a compiled decode step writes it in its graph).

        One slot always stays spare, so the view never spans the whole buffer: torch would specialize
        a compiled graph on that case (the view is then contiguous) and recompile mid-conversation."""
        self.reserve(self.offset + 2)
        self.offset += 1
        return self.k.narrow(2, 0, self.offset), self.v.narrow(2, 0, self.offset)

    def trim(self, n: int) -> None:
        """Forget the last n positions (used when a chat turn re-renders differently)."""
        self.offset = max(0, self.offset - n)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({"k": self.k[:, :, : self.offset].contiguous(), "v": self.v[:, :, : self.offset].contiguous()},
                {"offset": self.offset})

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device, dtype) -> KVCache:
        k = tensors["k"]
        c = cls(k.shape[0], k.shape[1], k.shape[3], dtype, device)
        c.reserve(k.shape[2])
        c.k[:, :, : k.shape[2]] = k.to(device, dtype)
        c.v[:, :, : k.shape[2]] = tensors["v"].to(device, dtype)
        c.offset = int(meta["offset"])
        return c


class RollingKVCache:
    """Sliding-window attention cache: position p lives in slot p % window; memory is capped at the window.

    The ring grows in steps of STEP slots up to `window` (before the first wrap, slot p holds position
    p), so a short conversation does not pay for a whole window.
    """

    kind = "rolling_kv"

    def __init__(self, batch: int, n_kv: int, head_dim: int, window: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.window = window
        self.k = torch.zeros(batch, n_kv, 0, head_dim, dtype=dtype, device=device)  # [B, H, W', D], W' <= W
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((0,), -1, dtype=torch.long, device=device)  # position held by each slot
        self.offset = 0

    def _reserve(self, n: int) -> None:
        size = min(self.window, ((n + STEP - 1) // STEP) * STEP)
        have = self.k.shape[2]
        if size <= have:
            return
        b, h, _, d = self.k.shape
        grow = torch.zeros(b, h, size - have, d, dtype=self.k.dtype, device=self.k.device)
        self.k = torch.cat([self.k, grow], dim=2)
        self.v = torch.cat([self.v, grow], dim=2)
        self.pos = torch.cat([self.pos, torch.full((size - have,), -1, dtype=torch.long, device=self.pos.device)])

    def _write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        slots = positions % self.window
        self.k[:, :, slots] = k.to(self.k.dtype)  # an index write takes no other dtype (a float16 cache)
        self.v[:, :, slots] = v.to(self.v.dtype)
        self.pos[slots] = positions

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        t = k.shape[2]
        new_pos = torch.arange(self.offset, self.offset + t, device=k.device)
        if t == 1:
            # The slot we overwrite holds position p - window, which p no longer sees.
            self._reserve(self.offset + 1)
            self._write(k, v, new_pos)
            self.offset += 1
            if self.offset < self.window:  # not wrapped yet: slots [0, offset) hold positions [0, offset)
                return self.k[:, :, : self.offset], self.v[:, :, : self.offset], None
            return self.k, self.v, None
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        mask = attention_mask(new_pos, torch.cat([self.pos, new_pos]), self.window)
        keep = min(t, self.window)
        self._reserve(self.offset + t + 1)  # a spare slot for the next step (KVCache.update)
        self._write(k[:, :, -keep:], v[:, :, -keep:], new_pos[-keep:])
        self.offset += t
        return keys, values, mask

    def trim(self, n: int) -> None:
        """Rewinding a ring is only possible while the dropped positions' predecessors are still held."""
        if n == 0:
            return
        new_offset = max(0, self.offset - n)
        if self.offset > self.window and new_offset > 0:
            raise ValueError("cannot rewind a sliding-window cache past its window")
        self.pos[self.pos >= new_offset] = -1
        self.offset = new_offset

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"k": self.k, "v": self.v, "pos": self.pos}, {"offset": self.offset, "window": self.window}

    @classmethod
    def from_state(cls, tensors, meta, device, dtype) -> RollingKVCache:
        c = cls(tensors["k"].shape[0], tensors["k"].shape[1], tensors["k"].shape[3], int(meta["window"]), dtype,
                device)
        c.k, c.v = tensors["k"].to(device, dtype), tensors["v"].to(device, dtype)
        c.pos = tensors["pos"].to(device)
        c.offset = int(meta["offset"])
        return c


class SSMState:
    """Mamba layer state: conv [B, C, K-1] (the last K-1 conv inputs) and ssm [B, D, N] or [B, H, P, N], fp32."""

    kind = "ssm"

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor):
        self.conv = conv
        self.ssm = ssm
        self.offset = 0
        self.bound = None  # a compiled one-token step bound to these tensors (runtime/ssm.py bound_step)

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()

    def trim(self, n: int) -> None:
        if n:
            raise ValueError("an SSM state cannot be rewound")

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"conv": self.conv, "ssm": self.ssm}, {"offset": self.offset}

    @classmethod
    def from_state(cls, tensors, meta, device, dtype) -> SSMState:
        c = cls(tensors["conv"].to(device), tensors["ssm"].to(device))
        c.offset = int(meta["offset"])
        return c


class BatchKVCache:
    """Keys/values of up to `rows` sequences, one row each, decoded one token per row per step.

    Row b holds positions [0, lens[b]) in columns [0, lens[b]) or, with a window, position p in column
    p % window (RollingKVCache's layout, so a prefilled cache copies in column for column). A step over
    the first n rows writes each row's new key at its own column and attends over the columns every row
    has filled, masking each row's columns past its own length. Rows are filled and emptied by
    runtime/batch.py (load / store / move); prefill happens in a single sequence's cache, never here.
    """

    kind = "batch_kv"

    def __init__(self, rows: int, n_kv: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 window: int | None = None):
        self.window = window
        self.k = torch.zeros(rows, n_kv, 0, head_dim, dtype=dtype, device=device)  # [R, H, S, D]
        self.v = torch.zeros_like(self.k)
        self.lens = torch.zeros(rows, dtype=torch.long, device=device)  # positions each row holds
        self.host_lens = [0] * rows  # the same on the host: shapes are decided without a device sync

    def reserve(self, n: int) -> None:
        """Room for n columns (in steps of STEP, at most `window`) in every row."""
        size = ((n + STEP - 1) // STEP) * STEP
        if self.window is not None:
            size = min(size, self.window)
        have = self.k.shape[2]
        if size <= have:
            return
        r, h, _, d = self.k.shape
        grow = torch.zeros(r, h, size - have, d, dtype=self.k.dtype, device=self.k.device)
        self.k, self.v = torch.cat([self.k, grow], dim=2), torch.cat([self.v, grow], dim=2)

    def columns(self, length: int) -> int:
        """Columns a row of `length` positions fills."""
        return length if self.window is None else min(length, self.window)

    def positions(self, n: int) -> torch.Tensor:
        """The position of the next token of each of the first n rows: (n,)."""
        return self.lens[:n]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append one position to each of the first n rows: k, v [n, H, 1, D]; return their keys and
        values [n, H, S, D] and the [n, 1, 1, S] mask of the columns each row holds."""
        n, t = k.shape[0], k.shape[2]
        if t != 1:
            raise ValueError("a batch cache takes one token per row and step (prefill a row's own cache)")
        lens = self.lens[:n]
        self.reserve(max(self.host_lens[:n]) + 1)
        col = lens % self.window if self.window is not None else lens
        rows = torch.arange(n, device=k.device)
        self.k[rows, :, col] = k[:, :, 0].to(self.k.dtype)  # an index write takes no other dtype
        self.v[rows, :, col] = v[:, :, 0].to(self.v.dtype)
        lens += 1
        self.host_lens[:n] = [x + 1 for x in self.host_lens[:n]]
        width = self.columns(max(self.host_lens[:n]))
        held = torch.arange(width, device=k.device)[None, :] < lens[:, None]
        if self.window is not None:
            held |= (lens >= self.window)[:, None]
        return self.k[:n, :, :width], self.v[:n, :, :width], held[:, None, None, :]

    def load(self, row: int, c: KVCache | RollingKVCache) -> None:
        """Copy a single sequence's prefilled cache into `row`."""
        n = self.columns(c.offset)
        self.reserve(n)
        self.k[row, :, :n] = c.k[0, :, :n]
        self.v[row, :, :n] = c.v[0, :, :n]
        self.lens[row] = self.host_lens[row] = c.offset

    def store(self, row: int, c: KVCache | RollingKVCache) -> None:
        """Copy `row` into a fresh single-sequence cache `c` (of the matching kind), which then continues it."""
        length = self.host_lens[row]
        n = self.columns(length)
        if isinstance(c, RollingKVCache):
            c._reserve(length)
            n = min(n, c.k.shape[2])
            col = torch.arange(c.k.shape[2], device=c.pos.device)
            c.pos = torch.where(col < min(length, self.window), col + (length - 1 - col) // self.window * self.window,
                                -1)
        else:
            c.reserve(length)
        c.k[0, :, :n] = self.k[row, :, :n]
        c.v[0, :, :n] = self.v[row, :, :n]
        c.offset = length

    def move(self, src: int, dst: int) -> None:
        """Row src's sequence into row dst (dst's is dropped)."""
        n = self.columns(self.host_lens[src])
        self.k[dst, :, :n] = self.k[src, :, :n]
        self.v[dst, :, :n] = self.v[src, :, :n]
        self.lens[dst] = self.host_lens[dst] = self.host_lens[src]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class StaticKVCache(KVCache):
    """A KVCache allocated whole (capacity `max_len`, never reallocated) whose one-token update writes at
    the device position `cursor` and attends over the first `span` slots through a mask, so a decode
    step captured once (a CUDA graph per span) is right at every position below the span."""

    def __init__(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 max_len: int, cursor: torch.Tensor):
        super().__init__(batch, n_kv, head_dim, dtype, device, max_len)
        self.cursor = cursor  # (1,) long: the position being decoded, shared by every layer
        self.span = max_len  # slots a one-token step attends over (runtime/graphs.py sets it per graph)

    def reserve(self, n: int) -> None:
        if n > self.capacity:
            raise ValueError(f"the static cache holds {self.capacity} positions; {n} were asked for")

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if k.shape[2] != 1:
            return super().update(k, v)
        self.k.index_copy_(2, self.cursor, k.to(self.k.dtype))
        self.v.index_copy_(2, self.cursor, v.to(self.v.dtype))
        self.offset += 1
        mask = (torch.arange(self.span, device=self.k.device) <= self.cursor)[None]  # (1, S)
        return self.k[:, :, : self.span], self.v[:, :, : self.span], mask


class StaticRollingKVCache(RollingKVCache):
    """A RollingKVCache allocated at its full window, with StaticKVCache's device-position one-token update:
    slot cursor % window takes the new key; the mask admits the slots written so far."""

    def __init__(self, batch: int, n_kv: int, head_dim: int, window: int, dtype: torch.dtype,
                 device: torch.device | str, cursor: torch.Tensor):
        super().__init__(batch, n_kv, head_dim, window, dtype, device)
        self._reserve(window)
        self.cursor = cursor
        self.span = window

    @property
    def capacity(self) -> int:
        return self.window

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if k.shape[2] != 1:
            return super().update(k, v)
        slot = self.cursor % self.window
        self.k.index_copy_(2, slot, k.to(self.k.dtype))
        self.v.index_copy_(2, slot, v.to(self.v.dtype))
        self.pos.index_copy_(0, slot, self.cursor)
        self.offset += 1
        # every written slot holds a position in (cursor - window, cursor]: the ring overwrote older ones
        mask = (self.pos[: self.span] >= 0)[None]  # (1, S)
        return self.k[:, :, : self.span], self.v[:, :, : self.span], mask


class StaticCache(list):
    """A model's cache for captured decode steps: one entry per layer, as a plain cache list, plus the
    device position `cursor` its attention caches share and `capacity`, the positions they hold."""

    def __init__(self, layers: list, cursor: torch.Tensor, capacity: int):
        super().__init__(layers)
        self.cursor, self.capacity = cursor, capacity
        self.runner = None  # runtime/graphs.py: the captured steps over this cache's tensors

    def __deepcopy__(self, memo) -> StaticCache:
        cursor = copy.deepcopy(self.cursor, memo)  # first: the layers' copies then share the copied cursor
        return StaticCache(copy.deepcopy(list(self), memo), cursor, self.capacity)


def make_static(cache: list, capacity: int) -> StaticCache:
    """A StaticCache holding what `cache` (a plain per-layer cache list, all on one device) holds."""
    devices = {c.k.device if hasattr(c, "k") else c.conv.device for c in cache if c is not None}
    if len(devices) > 1:
        raise ValueError(f"a static cache lives on one device, not {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    cursor = torch.zeros(1, dtype=torch.long, device=device)
    out = []
    for c in cache:
        if isinstance(c, RollingKVCache):
            b, h, _, d = c.k.shape
            s = StaticRollingKVCache(b, h, d, c.window, c.k.dtype, device, cursor)
            held = c.k.shape[2]
            s.k[:, :, :held], s.v[:, :, :held], s.pos[:held] = c.k, c.v, c.pos
        elif isinstance(c, KVCache):
            if c.offset > capacity:
                raise ValueError(f"the cache holds {c.offset} positions, more than the static capacity {capacity}")
            s = StaticKVCache(*c.shape, c.dtype, device, capacity, cursor)
            s.k[:, :, : c.offset], s.v[:, :, : c.offset] = c.k[:, :, : c.offset], c.v[:, :, : c.offset]
        else:
            out.append(c)
            continue
        s.offset = c.offset
        out.append(s)
    return StaticCache(out, cursor, capacity)


KINDS = {c.kind: c for c in (KVCache, RollingKVCache, SSMState)}


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache if c is not None)


def cache_offset(cache: list) -> int:
    return next((c.offset for c in cache if c is not None), 0)


def cache_start(cache: list | None) -> int | None:
    """The position of the next token where every sequence is at the same one (no cache, or a plain list of
    caches): the start of cache_positions' range, as an int. None where positions come otherwise (a
    BatchKVCache's rows, a StaticCache's device cursor)."""
    if cache is None:
        return 0
    if type(cache) is not list or isinstance(next((c for c in cache if c is not None), None), BatchKVCache):
        return None
    return cache_offset(cache)


def cache_positions(cache: list | None, batch: int, t: int, device: torch.device) -> torch.Tensor:
    """Positions of t new tokens: (T,) when the batch shares one length, (B, T) for a BatchKVCache's rows;
    a StaticCache's one-token step reads its device cursor (so a captured step reads it at replay)."""
    if t == 1 and isinstance(cache, StaticCache):
        return cache.cursor
    first = next((c for c in cache if c is not None), None) if cache is not None else None
    new = torch.arange(t, device=device)
    if isinstance(first, BatchKVCache):
        return first.positions(batch).to(device)[:, None] + new
    return new + (first.offset if first is not None else 0)


def save_cache(path: str | os.PathLike, cache: list, meta: dict[str, Any]) -> None:
    """Snapshot a per-layer cache plus caller metadata (model id, tokens) to one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, c in enumerate(cache):
        if c is None:
            layers.append(None)
            continue
        ts, m = c.to_state()
        for name, t in ts.items():
            tensors[f"{i}.{name}"] = t.detach().to("cpu").contiguous()
        layers.append({"kind": c.kind, **m})
    header = {"mamba_cli_cache": json.dumps({"layers": layers, "meta": meta})}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=header)
        except SafetensorError as e:  # its I/O errors carry the OS error number only in the text
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), str(e)) from None


class StateFileError(MambaCliError):
    """A state file (chat /load, --resume) is malformed or belongs to another model."""


def _expected_state(fresh, offset: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
    """The tensors a layer's saved state must hold given the model's fresh cache entry and the saved
    offset: name -> (shape, None where only the rank is fixed; dtype)."""
    if isinstance(fresh, KVCache):
        b, h, d = fresh.shape
        return {"k": ((b, h, offset, d), fresh.dtype), "v": ((b, h, offset, d), fresh.dtype)}
    if isinstance(fresh, RollingKVCache):  # the ring's slots: at least min(offset, window), at most window
        b, h, _, d = fresh.k.shape
        return {"k": ((b, h, None, d), fresh.k.dtype), "v": ((b, h, None, d), fresh.k.dtype),
                "pos": ((None,), torch.long)}
    return {"conv": (tuple(fresh.conv.shape), fresh.conv.dtype), "ssm": (tuple(fresh.ssm.shape), fresh.ssm.dtype)}


KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_state_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, list[int]]], dict[str, Any]]:
    """The tensor table and the mamba-cli metadata of a state file, from its checked header alone."""
    from runtime.weights import read_safetensors_header

    try:
        table = read_safetensors_header(Path(path))
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {}).get("mamba_cli_cache", "null"))
    except (MambaCliError, SafetensorError, OSError, ValueError, RecursionError) as e:
        raise StateFileError(f"{path}: not a readable state file ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(info, dict) or not isinstance(info.get("layers"), list) or not isinstance(info.get("meta"),
                                                                                               dict):
        raise StateFileError(f"{path}: not a mamba-cli state file (no layers and meta in its header)")
    return table, info


def check_state(path, table: dict[str, tuple[str, list[int]]], layers: list, fresh: list, n_tokens: int) -> None:
    """Every layer of a saved state against the model's fresh cache, from the header only: kind, offset (the
    token count), each tensor's shape and dtype, and no tensor besides those."""
    if len(layers) != len(fresh):
        raise StateFileError(f"{path}: the state has {len(layers)} layers, the model has {len(fresh)}")
    wanted: dict[str, tuple[tuple[int | None, ...], torch.dtype]] = {}
    slots: dict[int, tuple[int, int]] = {}  # rolling layers: (fewest, most) slots
    for i, (m, c) in enumerate(zip(layers, fresh, strict=True)):
        if c is None or m is None:
            if (c is None) != (m is None):
                raise StateFileError(f"{path}: layer {i} {'keeps no state' if c is None else 'has a state'} in "
                                     "the model but not in the file")
            continue
        if not isinstance(m, dict) or m.get("kind") != c.kind:
            kind = m.get("kind") if isinstance(m, dict) else m
            raise StateFileError(f"{path}: layer {i} is {kind!r} in the file, {c.kind!r} in the model")
        offset = m.get("offset")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset != n_tokens:
            raise StateFileError(f"{path}: layer {i} holds {offset!r} positions but the file lists {n_tokens} "
                                 "tokens")
        if c.kind == "rolling_kv":
            if m.get("window") != c.window:
                raise StateFileError(f"{path}: layer {i} has window {m.get('window')!r}, the model {c.window}")
            slots[i] = (min(offset, c.window), c.window)
        wanted.update({f"{i}.{k}": v for k, v in _expected_state(c, offset).items()})
    extra = sorted(set(table) - set(wanted))
    if extra:
        raise StateFileError(f"{path}: unexpected tensor {extra[0]} in the state file")
    for name, (shape, dtype) in wanted.items():
        if name not in table:
            raise StateFileError(f"{path}: tensor {name} is missing from the state file")
        got_dtype, got_shape = table[name]
        layer = int(name.split(".")[0])
        if layer in slots:  # the ring's slot count, read from k: v and pos must match it
            k_shape = table.get(f"{layer}.k", ("", []))[1]
            ring = k_shape[2] if len(k_shape) == 4 else -1
            low, high = slots[layer]
            if not low <= ring <= high:
                raise StateFileError(f"{path}: layer {layer} has {ring} ring slots; the model needs {low}..{high}")
            shape = tuple(ring if s is None else s for s in shape)
        got = _ST_DTYPES.get(got_dtype)
        if got in KV_DTYPES and dtype in KV_DTYPES and name.rsplit(".", 1)[1] in ("k", "v"):
            got = dtype  # keys and values convert on reading (a float32 state into a float16 cache, or back)
        if tuple(got_shape) != shape or got != dtype:
            raise StateFileError(f"{path}: tensor {name} is {got_dtype} {list(got_shape)}, the model needs "
                                 f"{str(dtype).removeprefix('torch.')} {list(shape)}")


def load_cache(path: str | os.PathLike, devices: list[torch.device], fresh: list) -> tuple[list, dict[str, Any]]:
    """Read a snapshot written by save_cache, checked against `fresh` (the model's make_cache(1)) before any
    tensor is read; devices give each layer's placement. Returns (cache, caller meta)."""
    table, info = read_state_header(path)
    tokens = info["meta"].get("tokens")
    n = len(tokens) if isinstance(tokens, list) else 0
    check_state(path, table, info["layers"], fresh, n)
    return read_state_tensors(path, devices, fresh, n, info["layers"]), info["meta"]


def read_state_tensors(path: str | os.PathLike, devices: list[torch.device], fresh: list, n_tokens: int,
                       layers: list) -> list:
    """Read the tensors of a state file whose header check_state accepted, onto each layer's device."""
    cache = []
    try:
        with safe_open(str(path), "pt") as f:
            for i, m in enumerate(layers):
                if m is None:
                    cache.append(None)
                    continue
                cls = KINDS[m["kind"]]
                ts = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.split(".", 1)[0] == str(i)}
                dtype = fresh[i].k.dtype if hasattr(fresh[i], "k") else fresh[i].conv.dtype
                cache.append(cls.from_state(ts, m, devices[i], dtype))
    except (SafetensorError, OSError) as e:
        raise StateFileError(f"{path}: unreadable state file ({e})") from None
    for i, c in enumerate(cache):
        if isinstance(c, RollingKVCache) and not bool(((c.pos >= -1) & (c.pos < n_tokens)).all()):
            raise StateFileError(f"{path}: layer {i} holds positions outside 0..{n_tokens - 1}")
    return cache
