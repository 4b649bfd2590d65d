"""Jamba against transformers' JambaForCausalLM (CPU fallback paths) on tiny random configs.

Attention periods 2/4/8 with offsets, 4-16 experts, top-1/2, GQA ratios 1/2/8: fp32 logits within 1e-4
relative; 32 greedy tokens identical; cached decode == full forward; the MoE router and feed-forward
== transformers'; the hybrid cache holds a KVCache only for attention layers; snapshot/resume (KV
included); transformers' fused expert layout loads like the per-expert one.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import build_tiny, hf_model, prompt, rel

from runtime import load_model
from runtime.cache import KVCache, SSMState, cache_nbytes, load_cache, save_cache
from runtime.generate import Session, generate
from runtime.loader import build_module
from runtime.models import jamba

J = "JambaForCausalLM"


def config(layers, period, offset, e_period, e_offset, experts, top_k, heads, kv, **kw) -> dict:
    return dict(num_hidden_layers=layers, attn_layer_period=period, attn_layer_offset=offset,
                expert_layer_period=e_period, expert_layer_offset=e_offset, num_experts=experts,
                num_experts_per_tok=top_k, num_attention_heads=heads, num_key_value_heads=kv, **kw)


CONFIGS = {
    "p2-x4-top2-gqa2": config(4, 2, 1, 2, 1, 4, 2, 4, 2, hidden_size=64, intermediate_size=64,
                              mamba_d_state=8, mamba_d_conv=4, mamba_expand=2),
    "p4-x8-top1-gqa8": config(8, 4, 2, 2, 0, 8, 1, 8, 1, hidden_size=32, intermediate_size=48,
                              mamba_d_state=4, mamba_d_conv=3, mamba_expand=2, mamba_dt_rank=5,
                              tie_word_embeddings=True),
    "p8-x16-top2-mha": config(8, 8, 4, 4, 3, 16, 2, 4, 4, hidden_size=32, intermediate_size=32,
                              mamba_d_state=16, mamba_d_conv=2, mamba_expand=1, mamba_conv_bias=False,
                              mamba_proj_bias=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    folder = build_tiny(J, CONFIGS[request.param])
    return load_model(folder, device="cpu"), hf_model(folder)


@pytest.mark.parametrize("n", [1, 3, 37, 300])
def test_logits_match_transformers(pair, n):
    m, hf = pair
    ids = prompt(n)
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel(m.forward(ids), ref) < 1e-4


def test_greedy_32_tokens_match_transformers(pair):
    m, hf = pair
    ids = prompt(9)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 9:].tolist()
    ours = list(generate(m, ids[0].tolist(), max_new_tokens=32, temperature=0.0, stop_ids=[]))
    assert len(ref) == 32 and ours == ref


def test_cached_pieces_and_steps_match_full_forward(pair):
    m, _ = pair
    ids = prompt(50, seed=1)
    full = m.forward(ids)
    cache = m.make_cache(1)
    outs, s = [], 0
    for n in [1, 2, 27] + [1] * 20:
        outs.append(m.forward(ids[:, s : s + n], cache))
        s += n
    assert rel(torch.cat(outs, 1), full) < 1e-4


def test_moe_router_and_feed_forward_match_transformers(pair):
    m, hf = pair
    a = m.args
    moe_layers = [i for i in range(a.num_hidden_layers) if a.is_moe(i)]
    assert moe_layers
    x = torch.randn(1, 23, a.hidden_size, generator=torch.Generator().manual_seed(5))
    for i in moe_layers:
        ours, theirs = m.module.model.layers[i].feed_forward, hf.model.layers[i].feed_forward
        with torch.no_grad():
            _, ref_w, ref_idx = theirs.router(x.view(-1, a.hidden_size))
            probs = torch.softmax(ours.gate(x.view(-1, a.hidden_size)).float(), -1)
            w, idx = torch.topk(probs, a.num_experts_per_tok, dim=-1)
            assert torch.equal(idx, ref_idx) and rel(w, ref_w) < 1e-6  # not renormalized, as transformers
            assert rel(ours(x), theirs(x)) < 1e-5
            assert rel(ours(x[:, :1]), theirs(x[:, :1])) < 1e-5  # the decode path


def test_cache_is_kv_only_for_attention_layers(pair):
    m, _ = pair
    a = m.args
    cache = m.make_cache(1)
    assert [isinstance(c, KVCache) for c in cache] == [a.is_attention(i) for i in range(a.num_hidden_layers)]
    assert all(isinstance(c, SSMState) for i, c in enumerate(cache) if not a.is_attention(i))
    ssm_bytes = sum(c.nbytes for c in cache if isinstance(c, SSMState))
    m.forward(prompt(300, seed=2), cache)
    assert sum(c.nbytes for c in cache if isinstance(c, SSMState)) == ssm_bytes
    kv = [c for c in cache if isinstance(c, KVCache)]
    per_token = 2 * a.num_key_value_heads * a.head_dim * 4  # k + v, fp32
    assert sum(c.nbytes for c in kv) >= len(kv) * 300 * per_token
    assert cache_nbytes(cache) == ssm_bytes + sum(c.nbytes for c in kv)


def test_snapshot_resume_continues_identically(pair, tmp_path):
    m, _ = pair
    ids = prompt(21, seed=3)[0].tolist()
    straight = list(generate(m, ids, max_new_tokens=14, stop_ids=[]))
    s = Session(m)
    first = list(generate(m, ids, max_new_tokens=7, stop_ids=[], session=s))
    save_cache(tmp_path / "jamba.safetensors", s.cache, {"tokens": s.tokens})
    dtypes = [torch.float32] * len(s.cache)
    cache, meta = load_cache(tmp_path / "jamba.safetensors", m.layer_devices(), dtypes)
    assert any(isinstance(c, KVCache) and c.offset == len(s.tokens) for c in cache)
    resumed = Session(m, cache=cache, tokens=list(meta["tokens"]))
    rest = list(generate(m, ids + first, max_new_tokens=7, stop_ids=[], session=resumed))
    assert first + rest == straight


def test_fused_expert_layout_loads_the_same():
    from safetensors.torch import load_file

    folder = build_tiny(J, CONFIGS["p2-x4-top2-gqa2"])
    per_expert = load_file(folder / "model.safetensors")
    args = jamba.Args.from_config(hf_model(folder).config.to_dict())
    fused = {k: v for k, v in per_expert.items() if ".experts." not in k}
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}.feed_forward"
        if not args.is_moe(i):
            continue
        w = {n: [per_expert[f"{p}.experts.{x}.{n}.weight"] for x in range(args.num_experts)]
             for n in ("gate_proj", "up_proj", "down_proj")}
        pairs = zip(w["gate_proj"], w["up_proj"], strict=True)
        fused[f"{p}.experts.gate_up_proj"] = torch.stack([torch.cat(gu) for gu in pairs])
        fused[f"{p}.experts.down_proj"] = torch.stack(w["down_proj"])
    a = build_module(jamba, args, dict(per_expert), None, "per-expert")
    b = build_module(jamba, args, fused, None, "fused")
    ids = prompt(17, seed=4)
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
