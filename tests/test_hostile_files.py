"""Hostile files the runtime reads: GGUF headers past the parsing limits, config values the tensors cannot
back, a vocabulary with a huge token, and state files (/load, --resume) that do not fit the model.

Each is refused with one line naming the file and what is wrong, with work bounded (a count of calls or
a check that no tensor was read, not the clock) and, where it matters, memory measured with tracemalloc.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime import cache as cache_mod
from runtime import load_model
from runtime.errors import MambaCliError, ModelFormatError
from runtime.weights import MAX_ARRAY_LEN, MAX_KV, MAX_TENSORS, read_gguf
from tests.fixtures import build_tiny
from tests.hub_server import LLAMA_CFG
from tests.test_chat_cli import chat_for

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------- GGUF limits


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _key(key: str, vtype: int) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype)


def _zero_tensor(i: int) -> bytes:  # an F32 tensor of shape [0] at offset 0
    name = f"t{i}".encode()
    return struct.pack("<Q", len(name)) + name + struct.pack("<IqiQ", 1, 0, 0, 0)


HOSTILE_HEADERS = {
    "too many zero-size tensors": (lambda: _header(MAX_TENSORS + 1, 0)
                                   + b"".join(_zero_tensor(i) for i in range(MAX_TENSORS + 1)), "over the limits"),
    "too many keys": (lambda: _header(0, MAX_KV + 1)
                      + b"".join(_key(f"k{i}", 0) + b"\0" for i in range(MAX_KV + 1)), "over the limits"),
    "array too long": (lambda: _header(0, 1) + _key("a", 9) + struct.pack("<IQ", 0, MAX_ARRAY_LEN + 1)
                       + b"\0" * (MAX_ARRAY_LEN + 1), "over the limit of"),
    "too many array elements in all": (lambda: _header(0, 3) + b"".join(
        _key(f"a{i}", 9) + struct.pack("<IQ", 0, MAX_ARRAY_LEN) + b"\0" * MAX_ARRAY_LEN for i in range(3)),
        "in all, over the limit"),
    "many nested empty arrays": (lambda: _header(0, 1) + _key("a", 9) + struct.pack("<IQ", 9, 100_000)
                                 + struct.pack("<IQ", 0, 0) * 100_000, "over the limit of 4096"),
    "a huge vocabulary token": (lambda: _header(0, 1) + _key("tokenizer.ggml.tokens", 9) + struct.pack("<IQ", 8, 1)
                                + struct.pack("<Q", 300_000) + b"x" * 300_000, "over the limit of 65536"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_gguf_parsing_limits_reject_quickly(tmp_path, case):
    from tests.fixtures import calls_bounded

    blob, expected = HOSTILE_HEADERS[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(blob())
    tracemalloc.start()
    try:
        with calls_bounded(3_000_000), pytest.raises(ModelFormatError) as e:  # ~1 s of Python, not minutes
            read_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(f"{path}: malformed GGUF") and expected in str(e.value), str(e.value)
    assert peak < 256 * 2**20


def test_spm_merges_are_not_quadratic_in_token_length():
    from runtime.tokenizer import _spm_merges
    from tests.fixtures import calls_bounded

    pieces = ["a", "b", "ab", "x" * 1_000_000 + "ab", "abab"]
    t0 = time.perf_counter()
    with calls_bounded(10_000):
        merges = _spm_merges(pieces, [0.0, 0.0, -1.0, -2.0, -3.0], [1] * len(pieces))
    assert merges == [("a", "b"), ("ab", "ab")]
    assert time.perf_counter() - t0 < 30  # was ~200 s (quadratic); target well under a second


# ------------------------------------------------------------------------- config vs the tensors


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    from quant.gguf_out import plan_from_source, write_gguf

    path = tmp_path_factory.mktemp("cfg") / "tiny.gguf"
    write_gguf(plan_from_source(build_tiny("LlamaForCausalLM", LLAMA_CFG)), path, "f32")
    return path.read_bytes()


def _patch_u32(blob: bytes, key: str, value: int) -> bytes:
    k = key.encode()
    i = blob.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    assert struct.unpack_from("<I", blob, i)[0] == 4  # UINT32
    return blob[: i + 4] + struct.pack("<I", value) + blob[i + 8:]


@pytest.mark.parametrize("key,value,expected", [
    ("llama.block_count", 10_000_000, "num_hidden_layers = 10000000 is out of range"),
    ("llama.block_count", 1000, "the config says 1000 layers but the tensors hold 2"),
    ("llama.attention.head_count", 0, "a count of 0"),
    ("llama.embedding_length", 2**31, "hidden_size = 2147483648 is out of range"),
    ("llama.embedding_length", 128, "hidden size 128 but the embedding is 64 wide"),
    ("llama.feed_forward_length", 4096, "has 6144 elements"),
])
def test_gguf_config_values_are_checked_against_the_tensors(tiny_gguf_bytes, tmp_path, key, value, expected):
    path = tmp_path / "bad.gguf"
    path.write_bytes(_patch_u32(tiny_gguf_bytes, key, value))
    with pytest.raises(ModelFormatError) as e:
        load_model(path, device="cpu")
    assert str(e.value).startswith(str(path)) and expected in str(e.value), str(e.value)


def test_folder_layer_count_is_checked_before_building(tmp_path):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(build_tiny("LlamaForCausalLM", LLAMA_CFG), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 100_000}))
    with pytest.raises(ModelFormatError, match="config says 100000 layers but the tensors hold 2"):
        load_model(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 0}))
    with pytest.raises(ModelFormatError, match="a count of 0|out of range"):
        load_model(folder, device="cpu")


# ------------------------------------------------------------------------------------- state files


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A jamba chat (attention + SSM layers) saved after one turn: (file, its tensors, its header JSON)."""
    import json

    a = chat_for("jamba")
    a.reply("Hello there")
    path = tmp_path_factory.mktemp("state") / "good.safetensors"
    a.save(str(path))
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(f.metadata()["mamba_cli_cache"])
    return path, tensors, info


def _write(path: Path, tensors: dict, info: dict) -> Path:
    import json

    save_file(tensors, str(path), metadata={"mamba_cli_cache": json.dumps(info)})
    return path


def _edit(saved, edit):
    import copy

    _, tensors, info = saved
    tensors, info = dict(tensors), copy.deepcopy(info)
    edit(tensors, info)
    return tensors, info


def _kinds(info):
    return [(i, m["kind"]) for i, m in enumerate(info["layers"]) if m]


def _ssm(info):
    return next(i for i, k in _kinds(info) if k == "ssm")


def _kv(info):
    return next(i for i, k in _kinds(info) if k != "ssm")


STATE_CASES = {
    "missing tokens": (lambda t, i: i["meta"].pop("tokens"), "token list"),
    "tokens of the wrong type": (lambda t, i: i["meta"].update(tokens="abc"), "token list"),
    "a token past the vocabulary": (lambda t, i: i["meta"]["tokens"].append(10**6), "token list"),
    "a shortened token list": (lambda t, i: i["meta"]["tokens"].pop(), "positions but the file lists"),
    "missing layers": (lambda t, i: i.pop("layers"), "not a mamba-cli state file"),
    "a layer of the wrong type": (lambda t, i: i["layers"].__setitem__(_ssm(i), 5), "in the file"),
    "swapped layer kinds": (lambda t, i: i["layers"].__setitem__(_ssm(i), {**i["layers"][_kv(i)]}), "in the file"),
    "a negative offset": (lambda t, i: i["layers"][_ssm(i)].update(offset=-3), "holds -3 positions"),
    "an offset of the wrong type": (lambda t, i: i["layers"][_ssm(i)].update(offset="7"), "holds '7' positions"),
    "a wrong conv shape": (lambda t, i: t.update({f"{_ssm(i)}.conv": t[f"{_ssm(i)}.conv"][:, :-1]}), ".conv is"),
    "an fp16 SSM state": (lambda t, i: t.update({f"{_ssm(i)}.ssm": t[f"{_ssm(i)}.ssm"].half()}), "needs float32"),
    "a missing tensor": (lambda t, i: t.pop(f"{_kv(i)}.v"), "is missing"),
    "an extra tensor": (lambda t, i: t.update({"99.k": torch.zeros(1)}), "unexpected tensor 99.k"),
    "a huge K/V": (lambda t, i: t.update({f"{_kv(i)}.k": torch.zeros(1, 1, 1, 4_000_000)}), ".k is"),
    "another architecture": (lambda t, i: i["meta"].update(arch="llama"), "saved with another model"),
    "another fingerprint": (lambda t, i: i["meta"].update(fingerprint="0" * 16), "saved with another model"),
    "another format": (lambda t, i: i["meta"].update(format="x/9"), "not a mamba-cli-chat/1 state file"),
    "messages not a list": (lambda t, i: i["meta"].update(messages="hi"), "chat messages must be a list"),
    "a message without a role": (lambda t, i: i["meta"]["messages"].append({"content": "x"}), "needs a role"),
    "a system prompt that is not text": (lambda t, i: i["meta"].update(system=[1]), "system prompt is not text"),
}


@pytest.fixture(scope="module")
def live():
    """A jamba chat in the middle of its own conversation: a refused /load must leave it untouched."""
    b = chat_for("jamba")
    b.reply("Something else entirely")
    return b


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_bad_state_file_is_refused_before_reading_tensors(saved, live, tmp_path, monkeypatch, case):
    edit, expected = STATE_CASES[case]
    path = _write(tmp_path / "bad.safetensors", *_edit(saved, edit))
    before = (list(live.messages), list(live.session.tokens), live.session.cache)

    def no_read(*a, **k):
        raise AssertionError("a tensor was read before the state file was checked")

    monkeypatch.setattr(sys.modules["runtime.generate"], "read_state_tensors", no_read)
    with pytest.raises(MambaCliError) as e:
        live.load(str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and expected in msg, msg
    assert (live.messages, live.session.tokens) == before[:2] and live.session.cache is before[2]


def test_good_state_still_loads_and_a_bad_one_leaves_the_chat_working(saved, tmp_path):
    b = chat_for("jamba")
    b.reply("A different conversation")
    bad = _write(tmp_path / "bad.safetensors", *_edit(saved, lambda t, i: i["layers"][_ssm(i)].update(offset=-1)))
    with pytest.raises(MambaCliError):
        b.load(str(bad))
    b.reply("Still here?")  # the conversation goes on as if nothing happened
    b.load(str(saved[0]))
    assert b.session.tokens == saved[2]["meta"]["tokens"]
    b.reply("And then?")


def test_resume_with_a_bad_state_is_one_line(saved, tmp_path):
    folder = build_tiny("JambaForCausalLM", __import__("tests.test_chat_cli", fromlist=["MODELS"]).MODELS["jamba"][1])
    bad = _write(tmp_path / "bad.safetensors", *_edit(saved, lambda t, i: i["meta"]["tokens"].pop()))
    p = subprocess.run([sys.executable, "-m", "cli", "chat", str(folder), "--resume", str(bad), "-n", "4"],
                       input="/bye\n", capture_output=True, text=True, cwd=ROOT, timeout=180,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "bad.safetensors" in lines[0], p.stderr


def test_state_module_names_the_check(saved):
    assert cache_mod.check_state.__doc__ and "before" in cache_mod.__doc__
