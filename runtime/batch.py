"""Continuous batching: the sequences of many requests decoded together, one model forward per step.

    Request     what to generate: prompt ids, sampling, stop strings and ids, a token budget
    Sequence    a request in flight: its Session, its text so far, its counters; its events (text
                pieces, then one `done` or `error`) go to the callback it was submitted with
    Rows        one batch cache per layer with a row per decoding sequence: BatchKVCache for attention
                (each row its own length, the others' padding masked), an SSMState of R rows for Mamba
                layers (states stack as they are). Rows 0..n-1 are the active ones (a leaving sequence's
                row takes the last one's), so a step runs on views of the first n rows, no gather
    Batcher     the scheduler. submit() from any thread; one worker thread loops: admit waiting
                requests while rows are free, prefill the first joiner by one chunk (alone, in its own
                batch-1 cache, reusing a finished conversation's cache when the prompt continues it),
                then one decode step for every active sequence together. A joiner enters the batch at
                the next step once prefilled; a finished or cancelled sequence leaves at the step it ends

Prefix reuse: a finished sequence's row is copied back into its Session (prompt + reply), which joins a
small pool; a new prompt takes the pooled session sharing its longest prefix, and Session.prepare
prefills only the rest (an SSM state restarts at the checkpoint where its last prompt ended when the
reply re-tokenizes differently). So a client continuing a conversation prefills only its new turn.

Sampling per sequence is generate()'s (runtime/generate.py: sample, the repetition penalty) plus the
OpenAI presence / frequency penalties over the reply's own tokens; greedy rows take one batched argmax.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.cache import BatchKVCache, KVCache, RollingKVCache, SSMState
from runtime.errors import MambaCliError
from runtime.generate import Session, Stats, StopText, apply_repetition_penalty, sample

REPEAT_LAST_N = 64  # the repetition penalty's window, as generate()'s default


class QueueFull(MambaCliError):
    """Every row is busy and the waiting queue is at its limit."""


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # text that ends the reply (not emitted)
    stop_ids: list[int] | None = None  # ids that end it (None: the model's EOS ids)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclass
class Event:
    """What a sequence reports: a text piece, or its end (`finish`: stop | length, with `usage`), or an error."""

    text: str = ""
    finish: str | None = None
    usage: dict[str, int] | None = None
    error: str | None = None


class Sequence:
    """A request in flight, owned by the Batcher's worker thread (cancel() may be called from anywhere)."""

    def __init__(self, req: Request, emit: Callable[[Event], None], model):
        self.req, self.emit = req, emit
        self.stop_ids = set(model.eos_ids if req.stop_ids is None else req.stop_ids)
        self.gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        self.greedy = (req.temperature <= 0 and req.presence_penalty == 0 and req.frequency_penalty == 0
                       and req.repetition_penalty == 1.0)
        self.text = StopText(model.tokenizer, req.prompt, req.stop)
        self.session: Session | None = None
        self.stats = Stats()
        self.cached_tokens = 0
        self.prefill_calls = 0
        self.generated: list[int] = []
        self.counts: collections.Counter[int] = collections.Counter()
        self.fed = 0  # generated tokens the cache has consumed
        self.row = -1
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        """Stop at the next step, freeing the row (no further events)."""
        self.cancelled = True

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits [V] (float32)."""
        r = self.req
        if r.repetition_penalty != 1.0:
            history = (r.prompt + self.generated)[-REPEAT_LAST_N:]
            logits = apply_repetition_penalty(logits, history, r.repetition_penalty)
        if (r.presence_penalty or r.frequency_penalty) and self.counts:
            ids = torch.tensor(list(self.counts), device=logits.device)
            n = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits = logits.clone()
            logits[ids] -= r.presence_penalty + r.frequency_penalty * n
        return sample(logits, r.temperature, r.top_k, r.top_p, r.min_p, self.gen)

    def usage(self) -> dict[str, int]:
        n = len(self.req.prompt)
        return {"prompt_tokens": n, "completion_tokens": len(self.generated),
                "total_tokens": n + len(self.generated), "cached_tokens": self.cached_tokens}


class Rows:
    """A batch cache per layer, `rows` rows, shaped after the model's own single-sequence cache."""

    def __init__(self, model, rows: int):
        self.layers: list = []
        for c in model.make_cache(1):
            if isinstance(c, (KVCache, RollingKVCache)):
                _, h, _, d = c.k.shape
                window = c.window if isinstance(c, RollingKVCache) else None
                self.layers.append(BatchKVCache(rows, h, d, c.k.dtype, c.k.device, window))
            elif isinstance(c, SSMState):
                self.layers.append(SSMState(c.conv.new_zeros(rows, *c.conv.shape[1:]),
                                            c.ssm.new_zeros(rows, *c.ssm.shape[1:])))
            elif c is None:
                self.layers.append(None)
            else:
                raise MambaCliError(f"batched decoding does not know the cache kind {type(c).__name__}")

    def view(self, n: int) -> list:
        """The cache a forward over the first n rows takes (SSM views update the rows in place)."""
        return [SSMState(c.conv[:n], c.ssm[:n]) if isinstance(c, SSMState) else c for c in self.layers]

    def load(self, row: int, cache: list) -> None:
        for mine, c in zip(self.layers, cache, strict=True):
            if isinstance(mine, SSMState):
                mine.conv[row], mine.ssm[row] = c.conv[0], c.ssm[0]
            elif mine is not None:
                mine.load(row, c)

    def store(self, row: int, cache: list) -> None:
        """Copy a row into `cache`, a fresh single-sequence cache of the model, which continues it."""
        for mine, c in zip(self.layers, cache, strict=True):
            if isinstance(mine, SSMState):
                c.conv[0], c.ssm[0] = mine.conv[row], mine.ssm[row]
            elif mine is not None:
                mine.store(row, c)

    def move(self, src: int, dst: int) -> None:
        for mine in self.layers:
            if isinstance(mine, SSMState):
                mine.conv[dst], mine.ssm[dst] = mine.conv[src], mine.ssm[src]
            elif mine is not None:
                mine.move(src, dst)


def rewinds(c) -> bool:
    """Whether a layer's single-sequence cache can forget its last positions (KVCache.trim)."""
    return c is None or c.kind == "kv" or (c.kind == "rolling_kv" and c.offset <= c.window)


def reusable(session: Session, prompt: list[int]) -> int:
    """How many of prompt's tokens a pooled session's cache would spare prefilling (an estimate that
    Session.prepare makes exact)."""
    common = 0
    for a, b in zip(session.tokens, prompt, strict=False):
        if a != b:
            break
        common += 1
    common = min(common, len(prompt) - 1)
    if common == len(session.tokens) or all(rewinds(c) for c in session.cache):
        return common
    if session.checkpoint is not None and session.checkpoint[0] <= common:
        return session.checkpoint[0]
    return 0


class Batcher:
    """Continuous batching over one model: up to `max_seqs` sequences decode together, `max_queue` more
    wait (submit raises QueueFull beyond), and `keep` finished conversations stay cached for reuse."""

    def __init__(self, model, max_seqs: int = 8, max_queue: int = 32, keep: int = 4):
        self.model, self.max_seqs, self.max_queue, self.keep = model, max_seqs, max_queue, keep
        self.rows = Rows(model, max_seqs)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.joining: list[Sequence] = []  # admitted, prefilling (the first one a chunk per loop)
        self.active: list[Sequence] = []  # active[i] decodes in row i
        self.pool: list[Session] = []  # finished conversations, oldest first
        self.cond = threading.Condition()
        self.closed: str | None = None
        self.thread: threading.Thread | None = None
        self.steps = 0  # decode steps run
        self.peak = 0  # most sequences one step decoded

    # ---- any thread

    def submit(self, req: Request, emit: Callable[[Event], None]) -> Sequence:
        seq = Sequence(req, emit, self.model)
        with self.cond:
            if self.closed:
                raise MambaCliError(self.closed)
            busy = len(self.active) + len(self.joining)
            if busy + len(self.waiting) >= self.max_seqs + self.max_queue:
                raise QueueFull(f"{self.max_seqs} sequences are decoding and {len(self.waiting)} waiting; "
                                "try again later")
            self.waiting.append(seq)
            self.cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        with self.cond:
            self.cond.notify()

    def load(self) -> dict[str, int]:
        """How busy the batcher is: active (decoding or prefilling), waiting, the row count."""
        with self.cond:
            return {"active": len(self.active) + len(self.joining), "waiting": len(self.waiting),
                    "max_seqs": self.max_seqs, "max_queue": self.max_queue, "steps": self.steps,
                    "peak_batch": self.peak}

    def start(self) -> Batcher:
        self.thread = threading.Thread(target=self._run, name="mamba-cli-batcher", daemon=True)
        self.thread.start()
        return self

    def close(self, reason: str = "the server is shutting down", wait: bool = True) -> None:
        """End every sequence (an error event saying `reason`) and stop the worker; without `wait` it only
        tells the worker, which ends them after its current step (safe from a signal handler)."""
        with self.cond:
            if not self.closed:
                self.closed = reason
            self.cond.notify()
        if self.thread is None:
            self._end_all()
        elif wait:
            self.thread.join()

    # ---- the worker thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.closed and not (self.waiting or self.joining or self.active):
                        self.cond.wait()
                    if self.closed:
                        break
                try:
                    self.step()
                except Exception as e:  # a failed forward ends what was in flight; the server goes on
                    self._fail(f"{type(e).__name__}: {e}")
        self._end_all()

    def _end_all(self) -> None:
        with self.cond:
            seqs = [*self.waiting, *self.joining, *self.active]
            self.waiting.clear()
            self.joining.clear()
            self.active.clear()
        for seq in seqs:
            if not seq.finished and not seq.cancelled:
                seq.finished = True
                seq.emit(Event(error=self.closed))

    def step(self) -> None:
        """One loop of the scheduler: admit, prefill one chunk of the first joiner, decode one step."""
        with self.cond:
            while self.waiting and len(self.active) + len(self.joining) < self.max_seqs:
                self.joining.append(self.waiting.popleft())
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
        for seq in [s for s in self.joining if s.cancelled]:
            self._retire(seq)
        if self.joining:
            self._prefill(self.joining[0])
        for seq in [s for s in self.active if s.cancelled]:
            self._leave(seq)
        if self.active:
            self._decode()

    def _prefill(self, seq: Sequence) -> None:
        prompt = seq.req.prompt
        if seq.session is None:
            seq.session = self._session_for(prompt)
        chunks = itertools.count()
        logits = seq.session.prepare(prompt, seq.stats, should_stop=lambda: next(chunks) > 0 or seq.cancelled)
        if seq.prefill_calls == 0:
            seq.cached_tokens = seq.stats.cached_tokens
        seq.prefill_calls += 1
        if logits is None:
            return  # one chunk done (or cancelled: retired at the next loop)
        with self.cond:
            self.joining.remove(seq)
        self._accept(seq, seq.pick(logits))
        if seq.finished:
            self._retire(seq)
            return
        seq.row = len(self.active)
        self.rows.load(seq.row, seq.session.cache)
        seq.session.cache = None  # the row holds it until the sequence leaves
        with self.cond:
            self.active.append(seq)

    def _decode(self) -> None:
        n = len(self.active)
        dev = self.model.input_device
        tokens = torch.tensor([[s.generated[-1]] for s in self.active], dtype=torch.long, device=dev)
        logits = self.model.forward(tokens, self.rows.view(n), last_only=True)[:, 0]  # (n, V)
        greedy = logits.argmax(-1).tolist()
        self.steps += 1
        self.peak = max(self.peak, n)
        for i, seq in enumerate(self.active):
            seq.fed += 1
            self._accept(seq, greedy[i] if seq.greedy else seq.pick(logits[i]))
        for seq in [s for s in self.active if s.finished]:
            self._leave(seq)

    def _accept(self, seq: Sequence, tok: int) -> None:
        """A sampled token: stop id, stop string, budget; emit its text."""
        if seq.cancelled:
            return
        if tok in seq.stop_ids:
            self._finish(seq, "stop", seq.text.flush())
            return
        seq.generated.append(tok)
        seq.counts[tok] += 1
        piece = seq.text.add(tok)
        if seq.text.stopped:
            self._finish(seq, "stop", piece)
        elif len(seq.generated) >= seq.req.max_tokens:
            self._finish(seq, "length", piece + seq.text.flush())
        elif piece:
            seq.emit(Event(text=piece))

    def _finish(self, seq: Sequence, reason: str, piece: str) -> None:
        seq.finished = True
        if piece:
            seq.emit(Event(text=piece))
        seq.emit(Event(finish=reason, usage=seq.usage()))

    def _leave(self, seq: Sequence) -> None:
        """Take a sequence out of the batch: its row back into its session (pooled), the last row into its place."""
        row, last = seq.row, len(self.active) - 1
        s = seq.session
        s.cache = self.model.make_cache(1)
        self.rows.store(row, s.cache)
        s.tokens = seq.req.prompt + seq.generated[: seq.fed]
        s.last_logits = None
        if row != last:
            self.rows.move(last, row)
            self.active[last].row = row
        with self.cond:
            self.active[row] = self.active[last]
            self.active.pop()
        self._pool(s)

    def _retire(self, seq: Sequence) -> None:
        """A sequence that ends before it has a row (finished at its first token, or cancelled)."""
        with self.cond:
            if seq in self.joining:
                self.joining.remove(seq)
        if seq.session is not None and seq.session.cache is not None:
            self._pool(seq.session)

    def _session_for(self, prompt: list[int]) -> Session:
        best = max(self.pool, key=lambda s: reusable(s, prompt), default=None)
        if best is not None and reusable(best, prompt) > 0:
            self.pool.remove(best)
            return best
        return Session(self.model)

    def _pool(self, session: Session) -> None:
        if self.keep > 0 and session.tokens:
            self.pool.append(session)
            del self.pool[: -self.keep]

    def _fail(self, why: str) -> None:
        for seq in [*self.joining, *self.active]:
            if not seq.cancelled and not seq.finished:
                seq.emit(Event(error=why))
        with self.cond:
            self.joining.clear()
            self.active.clear()
        self.rows = Rows(self.model, self.max_seqs)
        self.pool.clear()
