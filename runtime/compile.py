"""Decode-step capture on the CPU: each block's one-token work as torch.compile'd graphs (inductor).

A small model's decode step in eager PyTorch is dominated by dispatching ~40 tiny ops per layer.
The model files route one-token steps through functions wrapped by `graph()`: inductor fuses their
elementwise chains (norms, RoPE, conv and SSM state updates, gates) into a few C++ loops and calls the
matmuls and int4 kernels as they are. Weights are graph inputs, so one compiled graph serves every
layer of the same structure. What has growing shapes (the KV-cache append and SDPA) or data-dependent
control flow (MoE routing) stays eager between the graphs.

Off unless turned on per model (`LoadedModel.compile()`; the CLI does it on the CPU unless
`--no-compile` or MAMBA_CLI_NO_COMPILE=1). The first compile of a model shape takes seconds; torch
keeps the generated code on disk (~/.cache/mamba-cli/inductor), so later runs take ~1-3 s.
Anything that cannot compile (no C++ compiler, an op inductor does not take) falls back to eager for
good, its reason kept in `failures`.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections.abc import Callable

import torch

from runtime.cache import KVCache

failures: dict[str, str] = {}  # function name -> why it runs eagerly
compiled_calls: dict[str, int] = {}  # function name -> calls served by compiled code


def unavailable() -> str | None:
    """Why decode-step compilation cannot be used here, or None."""
    if os.environ.get("MAMBA_CLI_NO_COMPILE"):
        return "MAMBA_CLI_NO_COMPILE is set"
    if not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c):
        return "no C++ compiler (g++) on PATH"
    return None


# torch fixes its cache folder the first time anything asks for it (loading int4 kernels does): set ours first.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                   "mamba-cli", "inductor"))


def setup() -> None:
    import torch._dynamo  # not at module top: ~3 s of imports (measured) only compiling needs

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(cfg, name, max(getattr(cfg, name), 16))


def graph(fn: Callable | None = None, *, dynamic: bool | None = False) -> Callable:
    """fn, compiled (one whole graph) the first time it is called with compile on.

    Static shapes unless `dynamic=None`: then sizes the caller marks with `torch._dynamo.
    maybe_mark_dynamic` (a KV cache's length) stay symbolic, so one graph serves every length.
    Callers decide when (block.compiled_step); this wrapper only compiles and falls back.
    """
    if fn is None:
        return functools.partial(graph, dynamic=dynamic)
    name = fn.__qualname__
    holder: dict[str, Callable] = {}

    @functools.wraps(fn)
    def run(*args):
        if name in failures:
            return fn(*args)
        c = holder.get("c")
        if c is None:
            c = holder["c"] = torch.compile(fn, dynamic=dynamic, fullgraph=True)
        try:
            out = c(*args)
        except Exception as e:
            from torch._dynamo.exc import TorchDynamoException  # loaded by torch.compile by now (setup())

            if not isinstance(e, TorchDynamoException):
                raise
            # a compile-time failure (graph break, no compiler, an op inductor refuses): nothing ran yet
            failures[name] = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            return fn(*args)
        compiled_calls[name] = compiled_calls.get(name, 0) + 1
        return out

    return run


def enable(module: torch.nn.Module, on: bool = True) -> list[int]:
    """Mark the blocks of `module` that live on the CPU to take compiled one-token steps; their indices."""
    if on:
        setup()
    marked = []
    for i, layer in enumerate(module.layers):
        dev = next(layer.parameters()).device
        layer.compiled_step = bool(on and dev.type == "cpu")
        if layer.compiled_step:
            marked.append(i)
    return marked


def warm_up(m) -> None:
    """Compile a LoadedModel's graphs now rather than at its first token: decode steps on a scratch
    cache, at two KV lengths and two KV capacities, so the graphs generalize over both now, not mid-chat."""
    cache = m.make_cache(1)
    one = torch.zeros(1, 1, dtype=torch.long)
    m.forward(torch.zeros(1, 2, dtype=torch.long), cache)  # a KV length of 1 would be specialized
    m.forward(one, cache)
    with torch.inference_mode():  # as forward() allocates: the graphs guard on tensor kind
        for c in cache:
            if isinstance(c, KVCache):
                c.reserve(c.capacity + 1)
    m.forward(one, cache)


def compile_model(m, on: bool = True, warm: bool = True) -> tuple[str | None, float]:
    """Turn compiled one-token steps on (or off) for a LoadedModel's CPU layers, warming up when `warm`.

    Returns (why compilation is off or failed, None when compiled code runs; seconds spent warming up).
    """
    why = unavailable() if on else "turned off"
    if not enable(m.module, on and why is None):
        return why or "no layer on the CPU", 0.0
    seconds = 0.0
    if warm:
        t0 = time.perf_counter()
        warm_up(m)
        seconds = time.perf_counter() - t0
    if failures:
        return "; ".join(f"{k}: {v}" for k, v in failures.items()), seconds
    return None, seconds
