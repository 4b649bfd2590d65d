"""Continuous batching (runtime/batch.py): every sequence decoded in a shared batch gets exactly the tokens
it gets alone (greedy, fp32), whatever joins or leaves around it; rows move, caches are reused, a cancel
frees its row, the queue has a limit."""

from __future__ import annotations

import pytest
import torch

from runtime import load_model
from runtime.batch import Batcher, Event, QueueFull, Request
from runtime.generate import generate, stream_text
from tests.configs import ALL
from tests.fixtures import build_tiny

# attention (a window shorter than the prompts; MoE with a window), Mamba-1, Mamba-2 with groups, Jamba
# (attention + Mamba + MoE); tests/test_serve.py adds plain RoPE attention over HTTP
CONFIGS = ["mistral-window", "mixtral-4x-window", "mamba-k4", "mamba2-g2", "jamba-p2-x4-top2-gqa2"]


def model(name: str):
    return load_model(build_tiny(*ALL[name]), device="cpu", dtype="float32")


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(5, 320, (3 + 5 * i,), generator=g).tolist() for i in range(n)]


def run(b: Batcher, reqs: list[Request], join_every: int = 2) -> list:
    """Submit one request every `join_every` loops (so they join a running batch), loop until all end."""
    seqs, events, pending = [], [], list(reqs)
    loops = 0
    while pending or b.waiting or b.joining or b.active:
        if pending and loops % join_every == 0:
            log: list[Event] = []
            events.append(log)
            seqs.append(b.submit(pending.pop(0), log.append))
        with torch.inference_mode():
            b.step()
        loops += 1
        assert loops < 10_000
    return seqs, events


@pytest.mark.parametrize("name", CONFIGS)
def test_each_row_equals_the_sequence_alone(name):
    check_rows_equal_sequences_alone(model(name))


@pytest.mark.parametrize("name", ["mistral-window", "jamba-p2-x4-top2-gqa2"])
def test_rows_with_float16_keys_and_values(name, monkeypatch):
    """The caches a 4-bit GGUF gets on the CPU (float16 keys and values; forced here on a float model): the
    batch's index writes and a ring's take them as the sequence alone does."""
    monkeypatch.setenv("MAMBA_CLI_KV_CACHE", "f16")
    m = model(name)
    assert next(c for c in m.make_cache(1) if hasattr(c, "k")).k.dtype == torch.float16
    check_rows_equal_sequences_alone(m)


def check_rows_equal_sequences_alone(m) -> None:
    ps = prompts(5)
    budgets = [6, 11, 3, 9, 7]  # leave at different steps: rows move
    alone = [list(generate(m, p, max_new_tokens=k, stop_ids=[])) for p, k in zip(ps, budgets, strict=True)]
    texts = ["".join(stream_text(m, p, max_new_tokens=k, stop_ids=[])) for p, k in zip(ps, budgets, strict=True)]
    b = Batcher(m, max_seqs=4, max_queue=8)
    seqs, events = run(b, [Request(p, k, stop_ids=[]) for p, k in zip(ps, budgets, strict=True)])
    assert [s.generated for s in seqs] == alone
    assert b.peak >= 3  # they really shared steps
    for log, s, text in zip(events, seqs, texts, strict=True):
        assert log[-1].finish == "length" and log[-1].usage["completion_tokens"] == len(s.generated)
        assert "".join(e.text for e in log) == text


@pytest.mark.parametrize("name", ["mistral-window", "mamba2-g2", "jamba-p2-x4-top2-gqa2"])
def test_a_continued_conversation_reuses_the_finished_cache(name):
    m = model(name)
    b = Batcher(m, max_seqs=2, keep=2)
    first = prompts(3)[2]
    (s1,), _ = run(b, [Request(first, 8, stop_ids=[])])
    follow = first + s1.generated + [7, 8, 9, 10]
    (s2,), _ = run(b, [Request(follow, 6, stop_ids=[])])
    assert s2.cached_tokens >= len(first)  # SSM states: at least where the first prompt ended
    assert s2.generated == list(generate(m, follow, max_new_tokens=6, stop_ids=[]))
    (s3,), _ = run(b, [Request(prompts(2)[0], 4, stop_ids=[])])  # unrelated: nothing reused
    assert s3.cached_tokens == 0


def test_seeded_sampling_and_penalties_match_or_apply():
    m = model("llama-gqa4-tied")
    p = prompts(3)[1]
    want = list(generate(m, p, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7, stop_ids=[]))
    b = Batcher(m)
    (s, other), _ = run(b, [Request(p, 12, temperature=0.9, top_p=0.9, seed=7, stop_ids=[]),
                            Request(prompts(3)[2], 12, stop_ids=[])], join_every=1)
    assert s.generated == want
    (pen,), _ = run(b, [Request(p, 16, frequency_penalty=50.0, stop_ids=[])])
    assert len(set(pen.generated)) == len(pen.generated)  # a huge frequency penalty never repeats a token


def test_stop_ids_and_strings_end_a_row():
    m = model("mamba-k4")
    p = prompts(2)[1]
    free = list(generate(m, p, max_new_tokens=12, stop_ids=[]))
    text = m.tokenizer.decode(free)
    b = Batcher(m)
    (by_id,), logs = run(b, [Request(p, 12, stop_ids=[free[4]])])
    assert by_id.generated == free[: free.index(free[4])] and logs[0][-1].finish == "stop"
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    (by_text,), logs = run(b, [Request(p, 12, stop=[stop], stop_ids=[])])
    assert "".join(e.text for e in logs[0]) == text[: text.index(stop)] and logs[0][-1].finish == "stop"


def test_cancel_frees_the_row_and_spares_the_others():
    m = model("mistral-window")
    ps = prompts(3)
    b = Batcher(m, max_seqs=3)
    logs = [[] for _ in ps]
    seqs = [b.submit(Request(p, 10, stop_ids=[]), log.append) for p, log in zip(ps, logs, strict=True)]
    with torch.inference_mode():
        while len(b.active) < 3:
            b.step()
        b.step()
        b.cancel(seqs[0])
        while b.active or b.joining:
            b.step()
    assert b.load()["active"] == 0
    assert not any(e.finish for e in logs[0])
    for p, s in zip(ps[1:], seqs[1:], strict=True):
        assert s.generated == list(generate(m, p, max_new_tokens=10, stop_ids=[]))


def test_queue_limit():
    b = Batcher(model("mamba-k4"), max_seqs=1, max_queue=1)
    b.submit(Request([5, 6], 4), lambda e: None)
    b.submit(Request([5, 6], 4), lambda e: None)
    with pytest.raises(QueueFull):
        b.submit(Request([5, 6], 4), lambda e: None)


def test_worker_thread_serves_and_closes():
    import threading

    m = model("jamba-p2-x4-top2-gqa2")
    b = Batcher(m).start()
    done = threading.Event()
    log: list[Event] = []

    def emit(e: Event) -> None:
        log.append(e)
        if e.finish or e.error:
            done.set()

    b.submit(Request(prompts(2)[1], 6, stop_ids=[]), emit)
    assert done.wait(120)
    assert log[-1].finish == "length"
    b.close()
    assert b.thread is not None and not b.thread.is_alive()
