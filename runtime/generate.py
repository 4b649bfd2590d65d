"""Prefill once, decode step by step; sampling; stop conditions; incremental UTF-8-safe detokenizing.

    Session       a model's cache and the tokens it holds: a new prompt prefills only what is new;
                  save() / load() write and read the state (a conversation resumes without re-reading history)
    sample()      repetition penalty -> temperature -> top-k -> top-p -> min-p (transformers' order)
    generate()    yields token ids (the stop token itself is not yielded)
    Detokenizer   ids -> text pieces that never split a multi-byte character
    StopText      Detokenizer + stop strings (held back until they cannot be one, then cut)
    stream_text() generate() + StopText, the form run/chat print
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.cache import StateFileError, check_state, read_state_header, read_state_tensors, save_cache
from runtime.errors import MambaCliError

PREFILL_CHUNK = 512
STATE_FORMAT = "mamba-cli-chat/1"


class ContextError(MambaCliError):
    """The conversation no longer fits the model's context window."""


@dataclass
class Stats:
    prompt_tokens: int = 0  # tokens actually prefilled (new ones only)
    cached_tokens: int = 0  # prompt tokens reused from the cache
    prompt_seconds: float = 0.0
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    stop_reason: str = ""  # "eos" | "length" | "context" | "stop" | "interrupted"

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def gen_tps(self) -> float:
        return self.gen_tokens / self.gen_seconds if self.gen_seconds else 0.0


@dataclass
class Session:
    """A model, its cache, and `tokens`: exactly the ids the cache has consumed, in order."""

    model: object
    cache: list = field(default=None)
    tokens: list[int] = field(default_factory=list)
    last_logits: torch.Tensor | None = None
    # SSM states cannot rewind: a copy taken where the last prompt ended lets the next turn restart
    # there (not from zero) when the reply re-tokenizes differently or was interrupted.
    checkpoint: tuple[int, list] | None = None

    def __post_init__(self):
        if self.cache is None:
            self.cache = self.model.make_cache(1)

    def reset(self) -> None:
        self.cache = self.model.make_cache(1)
        self.tokens = []
        self.last_logits = None
        self.checkpoint = None

    def _rewind(self, keep: int) -> int:
        """Make the cache hold tokens[:keep] or fewer; return how many it holds."""
        drop = len(self.tokens) - keep
        try:
            for c in self.cache:
                if c is not None:
                    c.trim(drop)
            del self.tokens[keep:]
            return keep
        except ValueError:  # an SSM state or a wrapped window cannot rewind
            pass
        if self.checkpoint is not None and self.checkpoint[0] <= keep:
            n, saved = self.checkpoint
            self.cache, self.tokens = copy.deepcopy(saved), self.tokens[:n]
            return n
        self.reset()
        return 0

    def feed(self, ids: list[int], chunk: int = PREFILL_CHUNK,
             should_stop: Callable[[], bool] | None = None) -> torch.Tensor | None:
        """Run ids through the model in chunks; return the last position's logits [V].

        should_stop is polled between chunks; when it says stop, feed returns None and the cache
        holds exactly self.tokens (never a half-fed chunk).
        """
        dev = self.model.input_device
        for i in range(0, len(ids), chunk):
            if should_stop is not None and should_stop():
                return None
            part = torch.tensor([ids[i : i + chunk]], dtype=torch.long, device=dev)
            logits = self.model.forward(part, self.cache, last_only=True)
            self.last_logits = logits[0, -1]
            self.tokens.extend(ids[i : i + chunk])
        return self.last_logits

    def save(self, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> int:
        """Write the cache, the tokens it holds and `meta` (e.g. the conversation) to one safetensors
        file, atomically; load() resumes from it. Returns how many tokens the saved state holds.

        With an SSM checkpoint, the state saved is the checkpoint's (where the last prompt ended): an SSM
        state cannot rewind, and the last reply may re-tokenize differently in the next prompt, which
        always extends the checkpoint; so a resumed chat prefills only the last reply and the new turn."""
        m = self.model
        n, cache = self.checkpoint or (len(self.tokens), self.cache)
        save_cache(path, cache, {"format": STATE_FORMAT, "model": m.source, "arch": m.arch,
                                 "fingerprint": model_fingerprint(m), "tokens": self.tokens[:n], **(meta or {})})
        return n

    def load(self, path: str | os.PathLike, check_meta: Callable[[dict[str, Any]], None] | None = None
             ) -> dict[str, Any]:
        """Restore a state written by save() with the same weights; returns the saved meta.

        The file is checked field by field against this model (format, architecture, weights fingerprint,
        tokens, every layer's kind, shapes and dtypes, positions vs tokens) from its header before any
        tensor is read, and `check_meta` (the caller's own fields) runs before anything changes: a bad
        file raises StateFileError and leaves the conversation as it was."""
        if not Path(path).is_file():
            raise MambaCliError(f"{path}: no such file")
        table, info = read_state_header(path)
        meta = info["meta"]
        m = self.model
        if meta.get("format") != STATE_FORMAT:
            raise StateFileError(f"{path}: not a {STATE_FORMAT} state file (format {meta.get('format')!r})")
        if meta.get("arch") != m.arch or meta.get("fingerprint") != model_fingerprint(m):
            raise StateFileError(f"{path} was saved with another model ({meta.get('model')!r}, "
                                 f"{meta.get('arch')!r}); load it with that model")
        tokens = meta.get("tokens")
        vocab = m.args.vocab_size
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab for t in tokens):
            raise StateFileError(f"{path}: its token list is not a list of ids below the vocabulary size {vocab}")
        limit = getattr(m, "context_length", None)
        if limit and len(tokens) > limit:
            raise StateFileError(f"{path}: holds {len(tokens)} tokens, more than the model's context of {limit}")
        fresh = m.make_cache(1)
        check_state(path, table, info["layers"], fresh, len(tokens))
        if check_meta is not None:
            check_meta(meta)
        cache = read_state_tensors(path, m.layer_devices(), fresh, len(tokens), info["layers"])
        cache = m.adopt_cache(cache) if hasattr(m, "adopt_cache") else cache  # a captured model's static cache
        self.cache, self.tokens = cache, list(tokens)
        self.last_logits = None
        self.checkpoint = None  # the previous conversation's: never rewind into it
        return meta

    def prepare(self, prompt: list[int], stats: Stats | None = None,
                should_stop: Callable[[], bool] | None = None) -> torch.Tensor | None:
        """Make the cache hold `prompt`, reusing the longest common prefix; return next-token logits."""
        if not prompt:
            raise ValueError("empty prompt")
        limit = getattr(self.model, "context_length", None)
        if limit and len(prompt) > limit:
            raise ContextError(f"the prompt is {len(prompt)} tokens but the model's context is {limit}; "
                               "shorten it or start a new conversation (/clear)")
        common = 0
        for a, b in zip(self.tokens, prompt, strict=False):
            if a != b:
                break
            common += 1
        if common == len(prompt) == len(self.tokens) and self.last_logits is not None:
            new = []
        else:
            common = self._rewind(min(common, len(prompt) - 1))
            new = prompt[common:]
        t0 = time.perf_counter()
        logits = self.feed(new, should_stop=should_stop) if new else self.last_logits
        if new and logits is not None and any(getattr(c, "kind", "") == "ssm" for c in self.cache):
            self.checkpoint = (len(self.tokens), copy.deepcopy(self.cache))
        if stats is not None:
            stats.prompt_tokens, stats.cached_tokens = len(new), len(prompt) - len(new)
            stats.prompt_seconds = time.perf_counter() - t0
        return logits


def model_fingerprint(m) -> str:
    """Identifies the weights a saved state belongs to: config, every tensor's name, shape and dtype, and
    the values of the small 1-D tensors (norms, biases, SSM A and D: a few MB even for a 7B model)."""
    h = hashlib.sha256(json.dumps(m.config, sort_keys=True, default=str).encode())
    for name, t in m.module.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        if t.dim() == 1 and t.is_floating_point() and t.numel() <= 1 << 16 and t.device.type != "meta":
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           min_p: float = 0.0, generator: torch.Generator | None = None) -> int:
    """Pick the next token from logits [V] (float32)."""
    if temperature <= 0:
        return greedy(logits)
    probs, ids = candidates(logits, temperature, top_k, top_p, min_p)
    j = draw(probs.cpu(), generator)
    return j if ids is None else int(ids[j])


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """An index drawn with probability proportional to weights [V] (>= 0, some > 0), by the inverse of their
    cumulative sum: ~70 us for 49k weights, where torch.multinomial takes ~1.3 ms (the API server's default
    temperature 1 without filters draws over the whole vocabulary)."""
    c = weights.float().cumsum(0)
    j = int(torch.searchsorted(c, torch.rand((), generator=generator) * c[-1], right=True))
    return j if j < len(c) else int(torch.nonzero(weights)[-1])  # u rounded up to the total


def greedy(logits: torch.Tensor) -> int:
    """The index of the largest logit (the first of equals). numpy's argmax on the CPU: torch's takes ~55 us
    for a 49k vocabulary (a scalar loop), numpy's 5."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 1:
        return int(logits.detach().numpy().argmax())
    return int(torch.argmax(logits))


NUCLEUS_FIRST = 64  # top-p without top-k looks for the nucleus among this many largest logits first


def candidates(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sample()'s distribution as weights over candidate tokens (not renormalized) and their ids, largest
    logit first; ids None: the weights are over every token in order.

    transformers' order: temperature -> top-k (ties at the k-th value kept) -> top-p -> min-p. The filters
    work on the few candidates that can survive them, not the whole vocabulary: top-k's k largest, or for
    top-p alone the largest logits holding top_p of the mass (64, then 4x more until they do). Sorting a
    49k vocabulary for top-p cost ~6 ms a token, ~3 ms with top-k 40 first (the chat's defaults).
    """
    logits = logits.float() / temperature
    v = logits.shape[-1]
    ids = None
    lse = None  # log of the softmax's denominator over every token still allowed (None: over `logits`)
    if 0 < top_k < v:
        vals, ids = torch.topk(logits, top_k)
        keep = logits >= vals[-1]
        if int(keep.sum()) > top_k:  # ties with the k-th value stay, as in transformers
            ids = torch.nonzero(keep).squeeze(1)
            vals, order = torch.sort(logits[ids], descending=True)
            ids = ids[order]
        logits = vals
    elif top_p < 1.0:
        lse = torch.logsumexp(logits, -1)
        k = NUCLEUS_FIRST
        while k < v:
            vals, cand = torch.topk(logits, k)
            if float(torch.exp(vals - lse).sum()) >= top_p:  # the nucleus is among them
                logits, ids = vals, cand
                break
            k *= 4
        else:
            logits, ids = torch.sort(logits, descending=True)
    if top_p < 1.0:
        if ids is None:  # top_k >= V
            logits, ids = torch.sort(logits, descending=True)
        p = torch.exp(logits - (torch.logsumexp(logits, -1) if lse is None else lse))
        remove = p.cumsum(-1) - p >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(remove, float("-inf"))
    probs = torch.softmax(logits, -1)
    if min_p > 0:
        keep = probs >= min_p * probs.max()
        if ids is None:  # min-p alone: its survivors become the candidates (a draw over 49k weights: ~1.3 ms)
            ids = torch.nonzero(keep).squeeze(1)
            return probs[ids], ids
        probs = probs.masked_fill(~keep, 0.0)
    return probs, ids


def sampling_weights(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                     min_p: float = 0.0) -> torch.Tensor:
    """What sample() draws from at temperature > 0: weights [V], 0 for filtered tokens (not renormalized)."""
    probs, ids = candidates(logits, temperature, top_k, top_p, min_p)
    return probs if ids is None else torch.zeros_like(logits, dtype=probs.dtype).index_copy_(0, ids, probs)


def apply_repetition_penalty(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    if penalty == 1.0 or not recent:
        return logits
    idx = torch.tensor(sorted(set(recent)), device=logits.device)
    vals = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def generate(model, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             repeat_last_n: int = 64, seed: int | None = None, stop_ids: Iterable[int] | None = None,
             session: Session | None = None, stats: Stats | None = None,
             should_stop: Callable[[], bool] | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens sampled ids. Stops (without yielding) at an EOS / stop id.

    should_stop (e.g. set by a Ctrl-C handler) is polled between model calls, so an interrupted
    reply leaves the cache consistent with session.tokens.

    With a Session the prompt's cached prefix is reused and the session keeps the conversation's
    cache afterwards: it then holds prompt + every yielded id except the last one sampled.
    """
    session = session or Session(model)
    stats = stats if stats is not None else Stats()
    stop = set(model.eos_ids if stop_ids is None else stop_ids)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    logits = session.prepare(list(prompt_ids), stats, should_stop)
    if logits is None:
        stats.stop_reason = "interrupted"
        return
    history = list(prompt_ids)
    limit = getattr(model, "context_length", None)
    if limit:
        max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    t0 = time.perf_counter()
    stats.stop_reason = "length"
    try:
        for i in range(max_new_tokens):
            logits = apply_repetition_penalty(logits, history[-repeat_last_n:], repetition_penalty)
            tok = sample(logits, temperature, top_k, top_p, min_p, gen)
            if tok in stop:
                stats.stop_reason = "eos"
                return
            history.append(tok)
            stats.gen_tokens += 1
            yield tok
            if should_stop is not None and should_stop():
                stats.stop_reason = "interrupted"
                return
            if i + 1 < max_new_tokens:
                logits = session.feed([tok])
        if limit and len(history) >= limit:
            stats.stop_reason = "context"
    finally:
        stats.gen_seconds = time.perf_counter() - t0


class Detokenizer:
    """Turns a stream of ids into text pieces; holds back bytes until they form whole characters."""

    def __init__(self, tokenizer, context: list[int] | None = None):
        self.tok = tokenizer
        self.ids: list[int] = list(context or [])[-4:]
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class StopText:
    """Token ids -> printable text pieces, with `stop` strings held back and cut: what stream_text and
    the server's batched sequences (runtime/batch.py) emit. `stopped` turns true at a stop string."""

    def __init__(self, tokenizer, context: list[int] | None = None, stop: list[str] | None = None):
        self.detok = Detokenizer(tokenizer, context)
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=0) - 1
        self.pending = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """The text that is certain after `token` (empty while a stop string may still be forming)."""
        self.pending += self.detok.add(token)
        if not self.stop:
            out, self.pending = self.pending, ""
            return out
        hits = [self.pending.find(s) for s in self.stop if s in self.pending]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        if len(self.pending) > self.hold:
            cut = len(self.pending) - self.hold
            out, self.pending = self.pending[:cut], self.pending[cut:]
            return out
        return ""

    def flush(self) -> str:
        """The rest, at the end of a reply that no stop string ended."""
        out, self.pending = self.pending + self.detok.flush(), ""
        return out


def stream_text(model, prompt_ids: list[int], stop: list[str] | None = None, stats: Stats | None = None,
                **kw) -> Iterator[str]:
    """generate() as printable text; `stop` strings end the reply and are not printed."""
    stats = stats if stats is not None else Stats()
    text = StopText(model.tokenizer, prompt_ids, stop)
    for tok in generate(model, prompt_ids, stats=stats, **kw):
        piece = text.add(tok)
        if piece or not text.stop:
            yield piece
        if text.stopped:
            stats.stop_reason = "stop"
            return
    yield text.flush()
