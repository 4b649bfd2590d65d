"""The checks every architecture shares, run over every tiny configuration in tests/configs.py.

Per configuration, against transformers (the oracle) on CPU, fp32:
- logits within 1e-4 relative for prompts of 1, 3, 37 and 300 tokens, and for a batch of two;
- 32 greedy tokens identical to transformers' greedy continuation (and on CLI_CASES, one process each,
  the text `mamba-cli run` prints);
- cached decoding (pieces shorter than a conv kernel or a window, longer ones, then single steps)
  equals one full forward, and a batched cache keeps its rows apart;
- the chunked scans (Mamba layers) equal the sequential reference scans inside the whole model;
- a saved and reloaded cache continues generation exactly where the session left off.
What only one family has lives in tests/test_llama.py, test_mamba.py and test_jamba.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import load_model, ssm
from runtime.cache import load_cache, save_cache
from runtime.generate import Session, generate
from tests.configs import ALL, FAMILY
from tests.fixtures import build_tiny, hf_model, prompt, rel

ROOT = Path(__file__).resolve().parents[1]
CLI_CASES = ("mistral-window", "mixtral-8x-gqa4", "mamba2-g2", "jamba-p2-x4-top2-gqa2")  # one process each


@pytest.fixture(scope="module", params=sorted(ALL))
def case(request):
    """(name, folder, our model, transformers' model)."""
    folder = build_tiny(*ALL[request.param])
    return request.param, folder, load_model(folder, device="cpu"), hf_model(folder)


def hf_greedy(ref, ids: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens by transformers' generate() (its own cache), whatever they are (no EOS stop)."""
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + n
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("n", [1, 3, 37, 300])
def test_logits_match_transformers(case, n):
    _, _, m, ref = case
    ids = prompt(n)
    with torch.no_grad():
        expect = ref(ids).logits
    assert rel(m.forward(ids), expect) < 1e-4


def test_batch_matches_transformers_and_rows_stay_apart(case):
    _, _, m, ref = case
    ids = torch.cat([prompt(20, 1), prompt(20, 2)])
    with torch.no_grad():
        expect = ref(ids).logits
    both = m.forward(ids)
    assert rel(both, expect) < 1e-4
    cache = m.make_cache(2)
    m.forward(ids[:, :19], cache)
    assert rel(m.forward(ids[:, 19:], cache), both[:, 19:]) < 1e-4


def test_greedy_tokens_match_transformers(case):
    _, _, m, ref = case
    ids = prompt(11, 4)
    expect = hf_greedy(ref, ids, 32)
    assert list(generate(m, ids[0].tolist(), max_new_tokens=32, temperature=0.0, stop_ids=[])) == expect


def test_cached_decoding_equals_full_forward(case):
    """Pieces shorter than the conv kernels (1, 2), longer than the windows (20 > 16, 12), then single
    steps: 70 tokens, several windows long, equal one full forward."""
    _, _, m, _ = case
    ids = prompt(70, 3)
    full = m.forward(ids)
    cache = m.make_cache(1)
    outs, s = [], 0
    for n in [1, 2, 20, 18] + [1] * 29:
        outs.append(m.forward(ids[:, s : s + n], cache))
        s += n
    assert s == 70 and rel(torch.cat(outs, 1), full) < 1e-4
    assert all(c.offset == 70 for c in cache)


@pytest.mark.parametrize("name", [n for n in sorted(ALL) if FAMILY[n] != "llama"])  # the ones with scans
def test_chunked_scans_equal_sequential_reference(name, monkeypatch):
    """Mamba layers' chunked scans (ssm.selective_scan / ssd_scan) against the token-by-token reference
    scans they share a signature with, inside the whole model, on 300 tokens (many chunks). (Attention
    layers' chunked prefill is test_cached_decoding_equals_full_forward's.)"""
    m = load_model(build_tiny(*ALL[name]), device="cpu")
    ids = prompt(300, 5)
    chunked = m.forward(ids)
    calls = []

    def reference(ref_fn):
        def scan(x, dt, A, B, C, D, state=None, chunk=None):
            calls.append(ref_fn.__name__)
            y, h = ref_fn(x, dt, A, B, C, D, state)
            return y, h
        return scan

    swap = {ssm.selective_scan: reference(ssm.selective_scan_ref), ssm.ssd_scan: reference(ssm.ssd_scan_ref)}
    modules = [module for module_name, module in sys.modules.items() if module_name.startswith("runtime")]
    for module in modules:  # wherever a fast scan is bound: runtime.ssm, and modules that import it by name
        for attr, value in list(vars(module).items()):
            if callable(value) and value in swap:
                monkeypatch.setattr(module, attr, swap[value])
    sequential = m.forward(ids)
    want = "ssd_scan_ref" if ALL[name][0] == "Mamba2ForCausalLM" else "selective_scan_ref"
    assert want in calls, calls  # the model ran the reference scans, not some other path
    assert rel(chunked, sequential) < 1e-4


def test_saved_cache_continues_identically(case, tmp_path):
    _, _, m, _ = case
    ids = prompt(21, 6)[0].tolist()
    straight = list(generate(m, ids, max_new_tokens=16, stop_ids=[]))
    s = Session(m)
    first = list(generate(m, ids, max_new_tokens=8, stop_ids=[], session=s))
    save_cache(tmp_path / "state.safetensors", s.cache, {"tokens": s.tokens})
    cache, meta = load_cache(tmp_path / "state.safetensors", m.layer_devices(), m.make_cache(1))
    assert meta["tokens"] == s.tokens and all(c.offset == len(s.tokens) for c in cache)
    resumed = Session(m, cache=cache, tokens=list(meta["tokens"]))
    rest = list(generate(m, ids + first, max_new_tokens=8, stop_ids=[], session=resumed))
    assert first + rest == straight


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_run_prints_transformers_greedy_text(name):
    folder = build_tiny(*ALL[name])
    m, ref = load_model(folder, device="cpu"), hf_model(folder)
    text = "The quick brown fox"
    ids = m.tokenizer.encode_prompt(text)
    expect = hf_greedy(ref, torch.tensor([ids]), 24)
    tail = ids[-4:]  # decoded with a little context, as the CLI's detokenizer does
    want = m.tokenizer.decode(tail + expect)[len(m.tokenizer.decode(tail)):]
    out = subprocess.run([sys.executable, "-m", "cli", "run", str(folder), text, "--raw", "--temperature", "0",
                          "-n", "24", "--ignore-eos", "--device", "cpu"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"
