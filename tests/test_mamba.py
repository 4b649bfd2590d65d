"""What only Mamba-1, Falcon-Mamba and Mamba-2 have: a constant-size fp32 state (also under bf16 weights),
Codestral's mistral-inference layout (params.json + consolidated.safetensors), Mamba-2's dt limit.
The checks all families share (logits, greedy tokens, cached decoding and chunked scans vs transformers
and the reference, resume) are tests/test_architectures.py's.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from runtime import load_model
from runtime.cache import cache_nbytes
from runtime.errors import ModelFormatError
from runtime.models.mamba2 import config_from_params
from tests.configs import MAMBA
from tests.fixtures import build_tiny, hf_model, prompt, rel


@pytest.fixture(scope="module", params=list(MAMBA))
def model(request):
    return load_model(build_tiny(*MAMBA[request.param]), device="cpu")


def test_state_size_is_independent_of_context(model):
    m = model
    cache = m.make_cache(1)
    before = cache_nbytes(cache)
    m.forward(prompt(300, seed=5), cache)
    m.forward(prompt(1, seed=6), cache)
    assert cache_nbytes(cache) == before > 0
    assert all(c.conv.dtype == torch.float32 and c.ssm.dtype == torch.float32 for c in cache)


def test_bf16_weights_keep_fp32_state():
    cls, cfg = MAMBA["mamba2-g2"]
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
    with pytest.raises(ModelFormatError, match="model_type"):
        config_from_params({"dim": 64, "n_layers": 2, "vocab_size": 10, "model_type": "transformer"})
    with pytest.raises(ModelFormatError, match="n_layers"):
        config_from_params({"dim": 64, "vocab_size": 10})


def mistral_inference_name(name: str) -> str:
    """HF Mamba2 name -> its name in Codestral's consolidated.safetensors (mistral-inference)."""
    return "model." + name.replace("backbone.embeddings.", "backbone.embedding.")


def test_codestral_layout_loads_and_matches_transformers(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = dict(hidden_size=64, expand=2, head_dim=64, num_heads=2, n_groups=2, state_size=128,
               num_hidden_layers=2, conv_kernel=4, chunk_size=256)
    folder = build_tiny("Mamba2ForCausalLM", cfg)
    out = tmp_path / "codestral"
    out.mkdir()
    weights = load_file(folder / "model.safetensors")
    save_file({mistral_inference_name(k): v.contiguous() for k, v in weights.items()},
              out / "consolidated.safetensors")
    (out / "params.json").write_text(json.dumps({
        "dim": 64, "n_layers": 2, "vocab_size": 320, "n_groups": 2, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
        "tie_embeddings": False, "model_type": "mamba"}))
    shutil.copy(folder / "tokenizer.json", out / "tokenizer.json")
    m = load_model(out, device="cpu")  # no config.json: params.json is the only description
    assert m.arch == "mamba2" and not (out / "config.json").exists()
    ids = prompt(37, seed=8)
    with torch.no_grad():
        ref = hf_model(folder)(ids).logits
    assert rel(m.forward(ids), ref) < 1e-4  # every weight found under its mistral-inference name


def test_mamba2_dt_limit_applies_to_prefill_and_decode():
    """time_step_limit clamps dt. transformers clamps only in its chunked path; we clamp in both, so a
    cached decode still equals the full forward, which equals transformers' full forward."""
    cls, cfg = MAMBA["mamba2-g2"]
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


def test_loaded_state_drops_the_previous_conversations_checkpoint(model, tmp_path):
    """/load replaces the conversation: a rewind afterwards must never restore the SSM checkpoint taken
    in the conversation before it (that state belongs to other tokens)."""
    from runtime.generate import Session

    a, b = prompt(21, 12)[0].tolist(), prompt(7, 12)[0].tolist()
    saved = Session(model)
    saved.prepare(b)
    saved.save(tmp_path / "b.safetensors")
    s = Session(model)
    s.prepare(a)  # an SSM checkpoint of conversation a, at 12 tokens
    s.load(tmp_path / "b.safetensors")
    assert s.checkpoint is None
    edited = b[:-1] + [b[-1] % 300 + 3]  # the next prompt differs in its last token: a rewind to 11
    fresh = Session(model)
    assert rel(s.prepare(edited), fresh.prepare(edited)) < 1e-5
