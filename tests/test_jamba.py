"""What only Jamba has, against transformers' JambaForCausalLM: the MoE router and feed-forward equal
transformers'; the hybrid cache holds a KVCache only for attention layers; transformers' fused expert
layout loads like the per-expert one. The checks all families share (logits, greedy tokens, cached
decoding, resume) are tests/test_architectures.py's, over tests/configs.py's JAMBA configurations.
"""

from __future__ import annotations

import pytest
import torch

from runtime import load_model
from runtime.cache import KVCache, SSMState, cache_nbytes
from runtime.loader import build_module
from runtime.models import jamba
from tests.configs import JAMBA
from tests.fixtures import build_tiny, hf_model, prompt, rel


@pytest.fixture(scope="module", params=list(JAMBA))
def pair(request):
    folder = build_tiny(*JAMBA[request.param])
    return load_model(folder, device="cpu"), hf_model(folder)


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


def test_fused_expert_layout_loads_the_same():
    from safetensors.torch import load_file

    folder = build_tiny(*JAMBA["jamba-p2-x4-top2-gqa2"])
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
