"""Typed per-layer caches and their snapshot/restore.

A model's cache is a plain list with one entry per layer (None where a layer keeps no state):

    KVCache         attention keys/values, grown in steps (static shapes within a step)
    RollingKVCache  sliding-window attention: a ring of `window` slots, memory stops at the window
    SSMState        Mamba conv + SSM state, fp32, constant size whatever the context

and, for captured decode steps (runtime/graphs.py), a StaticCache: the same list whose attention caches
are preallocated whole (StaticKVCache, StaticRollingKVCache) and whose one-token updates read the
position from a device tensor (`cursor`), so one captured step replays at every position.

Legend: B batch, H kv heads, S cached positions, T new positions, D head dim.

Every cache counts the tokens it has seen in `offset`, exposes `nbytes`, and turns itself into
tensors + JSON meta (`to_state` / `from_state`) so `save_cache`/`load_cache` can snapshot a whole
conversation to one safetensors file.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

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
    """Keys/values of every position seen so far, preallocated in steps of STEP positions."""

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
        self.reserve(start + t)
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
        return self.k[:, :, : self.offset], self.v[:, :, : self.offset]

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
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
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
        self._reserve(self.offset + t)
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
        self.k.index_copy_(2, self.cursor, k)
        self.v.index_copy_(2, self.cursor, v)
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
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
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


def positions(cache: list | None, t: int, device: torch.device) -> torch.Tensor:
    """The positions (T,) of t new tokens: the device cursor for a StaticCache's one-token step (so a
    captured step reads it at replay), else offset .. offset + t - 1."""
    if t == 1 and isinstance(cache, StaticCache):
        return cache.cursor
    start = cache_offset(cache) if cache is not None else 0
    return torch.arange(start, start + t, device=device)


KINDS = {c.kind: c for c in (KVCache, RollingKVCache, SSMState)}


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache if c is not None)


def cache_offset(cache: list) -> int:
    return next((c.offset for c in cache if c is not None), 0)


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


def load_cache(path: str | os.PathLike, devices: list[torch.device], dtypes: list[torch.dtype]
               ) -> tuple[list, dict[str, Any]]:
    """Read a snapshot written by save_cache; devices/dtypes give each layer's placement."""
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {}).get("mamba_cli_cache", "null"))
            if not isinstance(info, dict):
                raise ValueError(f"{path}: not a mamba-cli state file")
            layers = info["layers"]
            if len(layers) != len(devices):
                raise ValueError(f"{path}: state has {len(layers)} layers, the model has {len(devices)}")
            cache = []
            for i, m in enumerate(layers):
                if m is None:
                    cache.append(None)
                    continue
                cls = KINDS[m["kind"]]
                ts = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.split(".", 1)[0] == str(i)}
                cache.append(cls.from_state(ts, m, devices[i], dtypes[i]))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable state file ({e})") from None
    return cache, info["meta"]
