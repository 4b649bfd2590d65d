"""Sampling against transformers' logits processors (the oracle): temperature, top-k, top-p, min-p and
the repetition penalty filter and reshape exactly what TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper, MinPLogitsWarper and RepetitionPenaltyLogitsProcessor do, in transformers' order.
Also: seeded sampling, stop strings and EOS.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from runtime import generate, load_model
from runtime.generate import Stats, apply_repetition_penalty, draw, sample, sampling_weights, stream_text
from tests.configs import LLAMA
from tests.fixtures import build_tiny, hf_model, prompt


def hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """transformers' sampling distribution: its warpers in generate()'s order, then softmax."""
    scores = logits[None].clone()
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p > 0 else []
    for w in warpers:
        scores = w(None, scores)
    return torch.softmax(scores, -1)[0]


SETTINGS = list(itertools.product([0.7, 1.0, 1.6], [0, 40], [1.0, 0.9, 0.5], [0.0, 0.05, 0.2]))


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_filtered_distribution_equals_transformers(scale):
    g = torch.Generator().manual_seed(int(scale))
    for temperature, top_k, top_p, min_p in SETTINGS:
        logits = torch.randn(1000, generator=g) * scale
        want = hf_probs(logits, temperature, top_k, top_p, min_p)
        got = sampling_weights(logits, temperature, top_k, top_p, min_p)
        setting = (temperature, top_k, top_p, min_p)
        assert torch.equal(got > 0, want > 0), (setting, int((got > 0).sum()), int((want > 0).sum()))
        assert (want > 0).sum() < 1000 or (top_k, top_p, min_p) == (0, 1.0, 0.0)  # something was filtered
        torch.testing.assert_close(got / got.sum(), want, rtol=1e-5, atol=1e-7, msg=str(setting))


def test_filters_on_candidates_equal_transformers():
    """The filters work on candidates (top-k's, or the largest logits holding top_p): ties at the k-th value
    are kept, a nucleus wider than the first look (64 logits) or than every widening, and a large vocabulary."""
    g = torch.Generator().manual_seed(11)
    tied = torch.randn(300, generator=g)
    order = tied.argsort(descending=True)
    tied[order[35:50]] = tied[order[35]].item()  # ranks 36-50 tie: across the 40th
    cases = [(tied, 1.0, 40, 1.0, 0.0), (tied, 1.0, 40, 1.0, 0.05),  # (which of equal logits top-p keeps: any)
             (torch.randn(5000, generator=g) * 0.3, 1.0, 0, 0.9, 0.0),  # a nucleus of thousands of tokens
             (torch.randn(50000, generator=g) * 2, 0.8, 0, 0.95, 0.0),
             (torch.randn(50000, generator=g) * 2, 0.8, 40, 0.95, 0.05),
             (torch.randn(50000, generator=g) * 2, 0.8, 0, 1.0, 0.05)]
    for logits, temperature, top_k, top_p, min_p in cases:
        want = hf_probs(logits, temperature, top_k, top_p, min_p)
        got = sampling_weights(logits, temperature, top_k, top_p, min_p)
        setting = (logits.numel(), temperature, top_k, top_p, min_p)
        assert torch.equal(got > 0, want > 0), (setting, int((got > 0).sum()), int((want > 0).sum()))
        torch.testing.assert_close(got / got.sum(), want, rtol=1e-5, atol=1e-7, msg=str(setting))
    assert int((sampling_weights(tied, 1.0, 40) > 0).sum()) == 50


def test_greedy_is_the_first_largest():
    logits = torch.tensor([0.5, 2.0, -1.0, 2.0])
    assert sample(logits) == 1 == int(torch.argmax(logits))
    x = torch.randn(49152)
    assert sample(x) == int(x.argmax())


def test_draw_follows_the_weights():
    g = torch.Generator().manual_seed(5)
    w = torch.tensor([0.0, 1.0, 3.0, 0.0, 6.0, 0.0])
    counts = torch.bincount(torch.tensor([draw(w, g) for _ in range(20000)]), minlength=6).float() / 20000
    assert counts[0] == counts[3] == counts[5] == 0  # zero weights are never drawn, the last one included
    torch.testing.assert_close(counts[[1, 2, 4]], torch.tensor([0.1, 0.3, 0.6]), atol=0.015, rtol=0)
    assert draw(torch.tensor([0.0, 0.0, 2.0]), g) == 2


def test_draws_stay_in_transformers_support():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(500, generator=g) * 3
    support = hf_probs(logits, 1.0, 40, 0.9, 0.05) > 0
    draws = [sample(logits, 1.0, 40, 0.9, 0.05, generator=g) for _ in range(300)]
    assert all(support[d] for d in draws)
    assert len(set(draws)) > 1 and int(logits.argmax()) in draws


def test_repetition_penalty_equals_transformers():
    g = torch.Generator().manual_seed(3)
    for penalty in (0.8, 1.3, 5.0):
        logits = torch.randn(300, generator=g) * 3
        recent = torch.randint(0, 300, (40,), generator=g).tolist()  # with repeats
        want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([recent]), logits[None].clone())[0]
        got = apply_repetition_penalty(logits, recent, penalty)
        assert torch.equal(got, want), penalty
        assert not torch.equal(got, logits)


def test_greedy_with_repetition_penalty_matches_transformers():
    """End to end: generate()'s penalty over the prompt and what it generated (well inside its 64-token
    window) picks the tokens transformers picks with RepetitionPenaltyLogitsProcessor."""
    folder = build_tiny(*LLAMA["llama-mha-bias"])
    m, ref = load_model(folder, device="cpu"), hf_model(folder)
    ids = prompt(8, 11)
    proc = RepetitionPenaltyLogitsProcessor(1.5)
    out = ids
    with torch.no_grad():
        for _ in range(24):
            out = torch.cat([out, proc(out, ref(out).logits[:, -1]).argmax(-1, keepdim=True)], dim=1)
    expect = out[0, 8:].tolist()
    got = list(generate(m, ids[0].tolist(), max_new_tokens=24, repetition_penalty=1.5, stop_ids=[]))
    assert got == expect
    assert got != list(generate(m, ids[0].tolist(), max_new_tokens=24, stop_ids=[]))  # the penalty mattered


def test_sampling_is_seeded_and_sane():
    folder = build_tiny(*LLAMA["llama-gqa4-tied"])
    m = load_model(folder, device="cpu")
    ids = prompt(8, 10)[0].tolist()
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, min_p=0.02, stop_ids=[])
    a = list(generate(m, ids, seed=1, **kw))
    b = list(generate(m, ids, seed=1, **kw))
    c = list(generate(m, ids, seed=2, **kw))
    assert a == b and a != c and len(a) == 16
    # top_k=1 at any temperature is greedy
    g = list(generate(m, ids, max_new_tokens=16, temperature=0.0, stop_ids=[]))
    assert list(generate(m, ids, max_new_tokens=16, temperature=5.0, top_k=1, seed=3, stop_ids=[])) == g


def test_stop_strings_and_eos():
    folder = build_tiny(*LLAMA["llama-gqa4-tied"])
    m = load_model(folder, device="cpu")
    ids = prompt(8, 12)[0].tolist()
    full = "".join(stream_text(m, ids, max_new_tokens=30, stop_ids=[]))
    assert len(full) > 6
    stop = full[3:6]
    st = Stats()
    cut = "".join(stream_text(m, ids, stop=[stop], max_new_tokens=30, stop_ids=[], stats=st))
    assert cut == full[: full.index(stop)] and st.stop_reason == "stop"
    first = list(generate(m, ids, max_new_tokens=30, stop_ids=[]))
    st = Stats()
    got = list(generate(m, ids, max_new_tokens=30, stop_ids=[first[5]], stats=st))
    assert got == first[: first.index(first[5])] and st.stop_reason == "eos"
