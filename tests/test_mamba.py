"""Mamba-1, Falcon-Mamba and Mamba-2 against transformers (CPU fallback paths) on tiny random models.

Per config: fp32 logits within 1e-4 relative for prompts of 1, 3, 37 and 300 tokens; 32 greedy tokens
identical to transformers' generate(); prefill in pieces + step-by-step decode == one full forward.
Also: Codestral's mistral-inference layout (params.json + consolidated.safetensors), snapshot/resume of
the SSM state, constant state size, fp32 state under bf16 weights.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fixtures import CACHE, build_tiny, hf_model, prompt, rel

from runtime import load_model
from runtime.cache import cache_nbytes, load_cache, save_cache
from runtime.generate import Session, generate
from runtime.models.mamba2 import config_from_params

M1, F1, M2 = "MambaForCausalLM", "FalconMambaForCausalLM", "Mamba2ForCausalLM"
CONFIGS = {
    "mamba-k4": (M1, dict(hidden_size=64, state_size=8, num_hidden_layers=2, conv_kernel=4, expand=2)),
    "mamba-k2-bias": (M1, dict(hidden_size=48, state_size=16, num_hidden_layers=2, conv_kernel=2, expand=1,
                               time_step_rank=7, use_bias=True, use_conv_bias=False)),
    "falcon-k3": (F1, dict(hidden_size=64, state_size=4, num_hidden_layers=3, conv_kernel=3, expand=2,
                           time_step_rank=5, tie_word_embeddings=False)),
    "mamba2-g1": (M2, dict(hidden_size=64, expand=2, head_dim=16, num_heads=8, n_groups=1, state_size=8,
                           num_hidden_layers=2, conv_kernel=4, chunk_size=16)),
    "mamba2-g2": (M2, dict(hidden_size=32, expand=2, head_dim=8, num_heads=8, n_groups=2, state_size=16,
                           num_hidden_layers=2, conv_kernel=3, chunk_size=32, tie_word_embeddings=True)),
    "mamba2-g4": (M2, dict(hidden_size=64, expand=2, head_dim=32, num_heads=4, n_groups=4, state_size=4,
                           num_hidden_layers=2, conv_kernel=2, chunk_size=64, use_bias=True)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    cls, cfg = CONFIGS[request.param]
    folder = build_tiny(cls, cfg)
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
    ids = prompt(11)
    hf.generation_config.eos_token_id = None  # compare 32 tokens, whatever they are
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 11:].tolist()
    ours = list(generate(m, ids[0].tolist(), max_new_tokens=32, temperature=0.0, stop_ids=[]))
    assert len(ref) == 32 and ours == ref


def test_cached_pieces_and_steps_match_full_forward(pair):
    m, _ = pair
    ids = prompt(60, seed=1)
    full = m.forward(ids)
    cache = m.make_cache(1)
    outs, s = [], 0
    for n in [1, 2, 34] + [1] * 23:  # pieces shorter than the conv kernel, then one token at a time
        outs.append(m.forward(ids[:, s : s + n], cache))
        s += n
    assert rel(torch.cat(outs, 1), full) < 1e-4
    assert all(c.offset == 60 for c in cache)


def test_batch_rows_are_independent(pair):
    m, _ = pair
    a, b = prompt(20, seed=2), prompt(20, seed=3)
    both = m.forward(torch.cat([a, b]))
    assert rel(both[1:], m.forward(b)) < 1e-5
    cache = m.make_cache(2)
    m.forward(torch.cat([a, b])[:, :19], cache)
    step = m.forward(torch.cat([a, b])[:, 19:], cache)
    assert rel(step, both[:, 19:]) < 1e-4


def test_snapshot_resume_continues_identically(pair, tmp_path):
    m, _ = pair
    ids = prompt(25, seed=4)[0].tolist()
    straight = list(generate(m, ids, max_new_tokens=16, stop_ids=[]))
    s = Session(m)
    first = list(generate(m, ids, max_new_tokens=8, stop_ids=[], session=s))
    assert first == straight[:8]
    save_cache(tmp_path / "state.safetensors", s.cache, {"tokens": s.tokens})
    dtypes = [torch.float32] * len(s.cache)
    cache, meta = load_cache(tmp_path / "state.safetensors", m.layer_devices(), dtypes)
    resumed = Session(m, cache=cache, tokens=list(meta["tokens"]))
    rest = list(generate(m, ids + first, max_new_tokens=8, stop_ids=[], session=resumed))
    assert first + rest == straight
    assert resumed.cache[0].offset == len(ids) + len(first) + len(rest) - 1


def test_state_size_is_independent_of_context(pair):
    m, _ = pair
    cache = m.make_cache(1)
    before = cache_nbytes(cache)
    m.forward(prompt(300, seed=5), cache)
    m.forward(prompt(1, seed=6), cache)
    assert cache_nbytes(cache) == before > 0
    assert all(c.conv.dtype == torch.float32 and c.ssm.dtype == torch.float32 for c in cache)


def test_bf16_weights_keep_fp32_state():
    cls, cfg = CONFIGS["mamba2-g2"]
    folder = build_tiny(cls, cfg)
    m16, m32 = load_model(folder, device="cpu", dtype="bf16"), load_model(folder, device="cpu")
    ids = prompt(40, seed=7)
    cache = m16.make_cache(1)
    outs = [m16.forward(ids[:, :30], cache)] + [m16.forward(ids[:, i : i + 1], cache) for i in range(30, 40)]
    assert cache[0].ssm.dtype == torch.float32 and cache[0].conv.dtype == torch.float32
    assert rel(torch.cat(outs, 1), m16.forward(ids)) < 2e-2
    assert rel(m16.forward(ids), m32.forward(ids)) < 5e-2


# ---------------------------------------------------------------- Codestral (mistral-inference layout)


def test_config_from_params_codestral():
    params = {"dim": 4096, "n_layers": 64, "vocab_size": 32768, "n_groups": 8, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
              "tie_embeddings": False, "model_type": "mamba"}
    cfg = config_from_params(params)
    assert (cfg["model_type"], cfg["num_heads"], cfg["head_dim"], cfg["state_size"], cfg["n_groups"]) == \
        ("mamba2", 128, 64, 128, 8)
    padded = config_from_params({**params, "vocab_size": 32001, "pad_vocab_size_multiple": 16})
    assert padded["vocab_size"] == 32016


def test_config_from_params_rejects_other_layouts():
    from runtime.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match="model_type"):
        config_from_params({"dim": 64, "n_layers": 2, "vocab_size": 10, "model_type": "transformer"})
    with pytest.raises(ModelFormatError, match="n_layers"):
        config_from_params({"dim": 64, "vocab_size": 10})


def mistral_inference_name(name: str) -> str:
    """HF Mamba2 name -> its name in Codestral's consolidated.safetensors (mistral-inference)."""
    return "model." + name.replace("backbone.embeddings.", "backbone.embedding.")


def test_codestral_layout_loads_and_matches_transformers():
    from safetensors.torch import load_file, save_file

    cfg = dict(hidden_size=64, expand=2, head_dim=64, num_heads=2, n_groups=2, state_size=128,
               num_hidden_layers=2, conv_kernel=4, chunk_size=256)
    folder = build_tiny("Mamba2ForCausalLM", cfg)
    out = CACHE / "codestral-layout"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    weights = load_file(folder / "model.safetensors")
    save_file({mistral_inference_name(k): v.contiguous() for k, v in weights.items()},
              out / "consolidated.safetensors")
    (out / "params.json").write_text(json.dumps({
        "dim": 64, "n_layers": 2, "vocab_size": 320, "n_groups": 2, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
        "tie_embeddings": False, "model_type": "mamba"}))
    shutil.copy(folder / "tokenizer.json", out / "tokenizer.json")
    m = load_model(out, device="cpu")
    assert m.arch == "mamba2"
    assert "model.backbone.embedding.weight" in load_file(out / "consolidated.safetensors")
    ids = prompt(37, seed=8)
    with torch.no_grad():
        ref = hf_model(folder)(ids).logits
    assert rel(m.forward(ids), ref) < 1e-4


def test_mamba2_dt_limit_applies_to_prefill_and_decode():
    """time_step_limit clamps dt. transformers clamps only in its chunked path; we clamp in both, so a
    cached decode still equals the full forward, which equals transformers' full forward."""
    cls, cfg = CONFIGS["mamba2-g2"]
    folder = build_tiny(cls, {**cfg, "time_step_limit": [0.0, 0.3]})
    m = load_model(folder, device="cpu")
    assert m.module.layers[0].mixer.dt_limit == (0.0, 0.3)
    ids = prompt(45, seed=9)
    with torch.no_grad():
        ref = hf_model(folder)(ids).logits
    full = m.forward(ids)
    assert rel(full, ref) < 1e-4
    cache = m.make_cache(1)
    outs = [m.forward(ids[:, :40], cache)] + [m.forward(ids[:, i : i + 1], cache) for i in range(40, 45)]
    assert rel(torch.cat(outs, 1), full) < 1e-4
