"""Captured decode steps on a GPU: a whole one-token forward replayed as one CUDA graph.

A decode step of a 7B model in eager PyTorch launches ~1.3k kernels; on a GPU each costs a few
microseconds of CPU time, so the step is launch-bound. Here the step is captured once (per attention
span) with torch.cuda.CUDAGraph and replayed: one launch per token. What makes that possible:

    StaticCache (runtime/cache.py)  attention caches allocated whole, written at a device position
                                    (`cursor`); SSM states are updated in place anyway
    positions()                     RoPE reads the same device cursor
    MoE.route_on_device             routing without a host sync (no .tolist())
    spans                           a graph per power-of-two span of attended slots (256, 512, ...),
                                    so a short conversation does not read the whole preallocated cache

    DecodeRunner(model, cache, graph=CudaGraph)   step(tokens) -> logits (B, 1, V)
    CudaGraph                                     torch.cuda.CUDAGraph: warm up on a side stream, capture, replay
    EagerGraph                                    the same contract, run eagerly: the CPU dry run
                                                  (tests check the runner's bookkeeping with it)

Python side effects of the captured forward (offsets counting tokens) run at capture only; the runner
restores them around captures and advances them itself after every replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from runtime.cache import STEP, SSMState, StaticCache

Step = Callable[[], torch.Tensor]


class EagerGraph:
    """CudaGraph's contract without capturing: replay() calls the function again (the CPU stand-in)."""

    kind = "eager"

    def __init__(self, pool=None):
        self.fn: Step | None = None
        self.pool = pool

    def capture(self, fn: Step) -> None:
        self.fn = fn

    def replay(self) -> torch.Tensor:
        return self.fn()


class CudaGraph:
    """One captured step: warmed up on a side stream (lazy initializations, cuBLAS workspaces), captured
    into the shared memory pool, replayed by one launch; replay() returns the captured output tensor,
    overwritten by every replay."""

    kind = "cuda"

    def __init__(self, pool=None):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool
        self.out: torch.Tensor | None = None

    def capture(self, fn: Step) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.out = fn()
        self.pool = self.graph.pool()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


def span_for(n: int, capacity: int) -> int:
    """The attended span for a step that needs n slots: the smallest STEP * 2^i >= n, at most capacity."""
    span = STEP
    while span < n:
        span *= 2
    return min(span, capacity)


class DecodeRunner:
    """One-token steps of a model over one StaticCache, through a captured graph per span."""

    def __init__(self, module: torch.nn.Module, cache: StaticCache, graph: type = CudaGraph):
        self.module, self.cache, self.graph_type = module, cache, graph
        first = next(c for c in cache if c is not None)
        held = first.k if hasattr(first, "k") else first.conv  # (B, ...): the batch and the device
        self.tokens = torch.zeros(held.shape[0], 1, dtype=torch.long, device=held.device)  # the step's input
        self.graphs: dict[int, EagerGraph | CudaGraph] = {}  # span (0: no attention layers) -> graph
        self.attends = any(hasattr(c, "span") for c in cache)
        self.pool = None

    def _offsets(self) -> list[int]:
        return [c.offset if c is not None else 0 for c in self.cache]

    def _set_offsets(self, offsets: list[int]) -> None:
        for c, off in zip(self.cache, offsets, strict=True):
            if c is not None:
                c.offset = off

    def _capture(self, span: int) -> EagerGraph | CudaGraph:
        offsets = self._offsets()
        states = [(t, t.clone()) for c in self.cache if isinstance(c, SSMState) for t in (c.conv, c.ssm)]
        g = self.graph_type(self.pool)

        def step() -> torch.Tensor:
            with torch.inference_mode():
                return self.module(self.tokens, self.cache)

        g.capture(step)
        self.pool = g.pool
        for t, saved in states:  # the warm-up steps advanced the SSM states: put them back
            t.copy_(saved)
        self._set_offsets(offsets)
        self.graphs[span] = g
        return g

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) of one new token per row; the cache advances by one position."""
        offsets = self._offsets()
        n = max(offsets) + 1
        if self.attends and n > self.cache.capacity:
            raise ValueError(f"the static cache holds {self.cache.capacity} positions; position {n} was asked for")
        span = span_for(n, self.cache.capacity) if self.attends else 0
        for c in self.cache:
            if c is not None and hasattr(c, "span"):
                c.span = min(span, c.capacity)
        self.tokens.copy_(tokens)
        self.cache.cursor.fill_(n - 1)
        g = self.graphs.get(span) or self._capture(span)
        logits = g.replay().clone()  # the graph's output is overwritten by the next replay
        self._set_offsets([off + 1 for off in offsets])
        return logits

    @property
    def kind(self) -> str:
        return self.graph_type.kind
