"""What only the attention family (Llama / Mistral / Mixtral) has: the sliding window's rolling cache,
rewinding a KV cache to a common prefix, the context limit. The checks all families share (logits,
greedy tokens, cached decoding vs transformers) are tests/test_architectures.py's.
"""

from __future__ import annotations

import pytest
import torch

from runtime import generate, load_model
from runtime.cache import RollingKVCache, cache_nbytes
from runtime.generate import ContextError, Session, Stats
from tests.configs import LLAMA
from tests.fixtures import build_tiny, rel


@pytest.fixture(scope="module", params=sorted(LLAMA))
def model(request):
    return load_model(build_tiny(*LLAMA[request.param]), device="cpu")


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 320, (1, n), generator=g)


def test_rolling_cache_memory_stops_at_window():
    folder = build_tiny(*LLAMA["mistral-window"])
    m = load_model(folder, device="cpu")
    cache = m.make_cache()
    assert all(isinstance(c, RollingKVCache) for c in cache)
    m.forward(prompt(10), cache)
    size = cache_nbytes(cache)
    m.forward(prompt(100, 5), cache)
    for i in range(20):
        m.forward(prompt(1, i), cache)
    assert cache_nbytes(cache) == size
    assert cache[0].offset == 130


@pytest.mark.parametrize("name", ["llama-mha-bias", "mistral-window"])
def test_prompt_leaves_a_spare_slot_for_the_first_step(name):
    """A prompt of a whole number of growth steps (STEP positions) leaves room for the next token: the first
    decode step writes into the buffers as they are instead of regrowing them and copying every position."""
    from runtime.cache import STEP

    cfg = {**LLAMA[name][1], "sliding_window": 4 * STEP} if name == "mistral-window" else LLAMA[name][1]
    m = load_model(build_tiny(LLAMA[name][0], cfg), device="cpu")
    cache = m.make_cache()
    m.forward(prompt(STEP), cache)
    buffers = [(c.k.data_ptr(), c.v.data_ptr()) for c in cache]
    m.forward(prompt(1, 3), cache)
    assert [(c.k.data_ptr(), c.v.data_ptr()) for c in cache] == buffers


@pytest.mark.parametrize("h,hk,d", [(9, 3, 64), (8, 2, 128), (16, 2, 32), (4, 4, 16), (32, 8, 16)])
@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_attention_on_cache_views(h, hk, d, t, kv_dtype):
    """sdpa() on a KVCache's views (the first s positions of a larger buffer) equals it on float32 copies: one
    query eagerly and in a compiled step (one_query_attention's loops: groups of 1, 3, 4 and 8 query heads per
    kv head), several queries through torch's kernels; keys and values stored in float16 (a 4-bit model's
    cache) as their float32 values."""
    from runtime.layers import sdpa

    g = torch.Generator().manual_seed(h + d + t)
    s = 37
    q = torch.randn(1, h, t, d, generator=g)
    k, v = (torch.randn(1, hk, 64, d, generator=g).to(kv_dtype)[:, :, :s] for _ in range(2))  # as KVCache.k[:, :, :s]
    mask = None if t == 1 else torch.ones(t, s, dtype=torch.bool).tril(s - t)
    ref = sdpa(q, k.float().contiguous(), v.float().contiguous(), mask, causal=False)
    ref64 = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(h // hk, 1), v.double().repeat_interleave(h // hk, 1),
        attn_mask=mask)
    assert rel(ref, ref64.float()) < 1e-5
    assert rel(sdpa(q, k, v, mask, causal=False), ref) < 1e-5
    from runtime.compile import unavailable

    if t == 1 and not unavailable():
        step = torch.compile(lambda q, k, v: sdpa(q, k, v, None, causal=False), fullgraph=True, dynamic=False)
        assert rel(step(q, k, v), ref) < 1e-5


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_table_rows_equal_forward(scaling):
    """RoPE.span (a step's cos and sin as rows of a table grown 1,024 positions at a time) gives exactly
    forward's values over the same positions, for each dtype, at the table's edges and across its growth; and
    the positions of a plain list of caches start where cache_positions' do."""
    from runtime.cache import KVCache, cache_positions, cache_start
    from runtime.layers import RoPE

    rope = RoPE(64, 10000.0, scaling)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for start, t in ((0, 1), (517, 1), (1023, 1), (1023, 2), (1024, 5), (40, 2100), (3071, 1)):
            got = rope.span(start, t, dtype, torch.device("cpu"))
            want = rope(torch.arange(t) + start, dtype)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), (dtype, start, t)
    assert rope.tables[(torch.float32, torch.device("cpu"))][0].shape == (3072, 64)
    caches = [KVCache(1, 2, 8, torch.float32, "cpu") for _ in range(2)]
    for c in caches:
        c.update(torch.zeros(1, 2, 7, 8), torch.zeros(1, 2, 7, 8))
    assert cache_start(caches) == 7 and cache_start(None) == 0
    assert torch.equal(cache_positions(caches, 1, 3, torch.device("cpu")), torch.arange(7, 10))


def test_session_prefills_only_new_tokens(model):
    m = model
    ids = prompt(30, 6)[0].tolist()
    s = Session(m)
    st = Stats()
    s.prepare(ids[:20], st)
    assert (st.prompt_tokens, st.cached_tokens) == (20, 0)
    logits = s.prepare(ids, st)
    assert (st.prompt_tokens, st.cached_tokens) == (10, 20)
    assert rel(logits, m.forward(torch.tensor([ids]))[0, -1]) < 1e-4
    # A diverging prompt rewinds to the common prefix; a ring that wrapped cannot, and starts over.
    other = ids[:12] + prompt(5, 7)[0].tolist()
    logits = s.prepare(other, st)
    wrapped = m.args.sliding_window is not None and len(ids) > m.args.sliding_window
    assert (st.prompt_tokens, st.cached_tokens) == ((17, 0) if wrapped else (5, 12))
    assert rel(logits, m.forward(torch.tensor([other]))[0, -1]) < 1e-4


def test_context_limit_is_enforced(tmp_path):
    folder = build_tiny("LlamaForCausalLM", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                 num_attention_heads=2, max_position_embeddings=40))
    m = load_model(folder, device="cpu")
    with pytest.raises(ContextError):
        list(generate(m, prompt(41)[0].tolist()))
    st = Stats()
    out = list(generate(m, prompt(30)[0].tolist(), max_new_tokens=100, stop_ids=[], stats=st))
    assert len(out) == 10 and st.stop_reason == "context"
