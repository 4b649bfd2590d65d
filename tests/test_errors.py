"""Bad model folders and bad input: one-line errors naming what is wrong, non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runtime import load_model
from runtime.errors import ModelFormatError
from tests.fixtures import build_tiny

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)


@pytest.fixture
def folder(tmp_path) -> Path:
    src = build_tiny("LlamaForCausalLM", CFG)
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=ROOT,
                          input=stdin, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def assert_one_line_error(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode == 1, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    text = " ".join(lines)
    assert "Traceback" not in p.stderr
    assert text.startswith("error:"), p.stderr
    for w in words:
        assert w in text, (w, p.stderr)


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_model(folder, device="cpu")
    assert_one_line_error(cli("run", str(folder), "hi"), "config.json")


def test_config_not_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="config.json: not valid JSON"):
        load_model(folder, device="cpu")


def test_unknown_architecture(folder):
    edit_config(folder, model_type="gpt_bigcode")
    assert_one_line_error(cli("run", str(folder), "hi"), "unsupported model_type 'gpt_bigcode'")


def test_missing_field(folder):
    edit_config(folder, hidden_size=None)
    with pytest.raises(ModelFormatError, match="missing or invalid field 'hidden_size'"):
        load_model(folder, device="cpu")


def test_vocab_size_mismatch_with_weights(folder):
    edit_config(folder, vocab_size=999)
    with pytest.raises(ModelFormatError, match=r"(embed_tokens|lm_head).weight has shape \[320, 32\].*\[999, 32\]"):
        load_model(folder, device="cpu")


class _CreatesFile:
    """Unpickling this object calls open(path, "w"): the file appearing proves the pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_only_folder_is_refused_and_never_unpickled(folder):
    (folder / "model.safetensors").unlink()
    marker = folder / "pwned"
    payload = pickle.dumps(_CreatesFile(marker))
    pickle.loads(payload).close()  # the payload works: unpickling it creates the marker
    assert marker.exists()
    marker.unlink()
    (folder / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(ModelFormatError, match="only pickle weights"):
        load_model(folder, device="cpu")
    assert not marker.exists()
    assert_one_line_error(cli("run", str(folder), "hi"), "only pickle weights")
    assert not marker.exists()


def test_auto_map_code_is_never_run(folder):
    marker = folder / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"})
    load_model(folder, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("case", ["truncated", "huge_header", "bad_json", "out_of_file", "overlap", "shape"])
def test_malformed_safetensors(folder, case):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    if case == "truncated":
        path.write_bytes(data[:5])
    elif case == "huge_header":
        path.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    elif case == "bad_json":
        path.write_bytes(data[:8] + b"{" * n + data[8 + n :])
    else:
        a, b = header[names[0]], header[names[1]]
        if case == "out_of_file":
            a["data_offsets"] = [a["data_offsets"][0], len(data) * 2]
        elif case == "overlap":
            start = a["data_offsets"][0]
            b["data_offsets"] = [start, start + b["data_offsets"][1] - b["data_offsets"][0]]
        else:
            a["shape"] = [a["shape"][0] + 1] + a["shape"][1:]
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        load_model(folder, device="cpu")
    assert_one_line_error(cli("run", str(folder), "hi", "--raw"), "model.safetensors")


def test_missing_tensor(folder):
    from safetensors.torch import load_file

    w = load_file(folder / "model.safetensors")
    w.pop("model.layers.0.mlp.up_proj.weight")
    save_file(w, folder / "model.safetensors")
    with pytest.raises(ModelFormatError, match="missing 1 tensors, e.g. model.layers.0.mlp.up_proj.weight"):
        load_model(folder, device="cpu")


def test_sharded_index_with_missing_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelFormatError, match="shard model-00002-of-00002.safetensors is missing"):
        load_model(folder, device="cpu")


def test_sharded_checkpoint_loads(folder):
    from safetensors.torch import load_file

    w = load_file(folder / "model.safetensors")
    names = sorted(w)
    half = len(names) // 2
    (folder / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ns in shards.items():
        save_file({k: w[k] for k in ns}, folder / f)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ns in shards.items() for k in ns}}))
    m = load_model(folder, device="cpu")
    ref = load_model(build_tiny("LlamaForCausalLM", CFG), device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(m.forward(ids), ref.forward(ids))


def test_dtype_override_and_memory_refusal(folder):
    m = load_model(folder, device="cpu", dtype="bfloat16")
    assert m.module.lm_head.weight.dtype == torch.bfloat16
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAMBA_CLI_FAKE_FREE_RAM": "1000"}
    p = subprocess.run([sys.executable, "-m", "cli", "run", str(folder), "hi"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert_one_line_error(p, "needs", "free on cpu")


def test_cuda_without_gpu_is_one_line(folder):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_one_line_error(cli("run", str(folder), "hi", "--device", "cuda"), "no CUDA GPU")


def test_missing_model_path_is_one_line():
    assert_one_line_error(cli("run", "./no/such/model", "hi"), "no/such/model")


def test_prompt_from_stdin(folder):
    """`run MODEL -` reads the prompt from stdin: the reply is the greedy continuation of that text."""
    from runtime.generate import stream_text

    text = "The quick brown fox"
    m = load_model(folder, device="cpu")
    want = "".join(stream_text(m, m.tokenizer.encode_prompt(text), max_new_tokens=8, temperature=0.0, stop_ids=[]))
    p = cli("run", str(folder), "-", "--raw", "-n", "8", "-t", "0", "--ignore-eos", stdin=text)
    assert p.returncode == 0, p.stderr
    assert p.stdout == want + "\n" and want.strip()


def limited(code: str, limit: int) -> subprocess.CompletedProcess:
    """Run code with files capped at `limit` bytes (writes past it fail like a full disk: EFBIG)."""
    prelude = ("import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"})


def test_disk_full_during_quantize_leaves_no_file(folder, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old contents")
    p = limited("import sys\nfrom cli.main import main\n"
                f"sys.argv = ['mamba-cli', 'quantize', {str(folder)!r}, '-t', 'q8_0', '-o', {str(out)!r}, "
                "'--no-eval', '--force']\nmain()\n", 20_000)
    assert_one_line_error(p, "disk full")
    assert out.read_bytes() == b"old contents"  # the old file is untouched
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model", "out.gguf"]  # and no temp file is left


def test_disk_full_during_state_save_leaves_no_file(tmp_path):
    dest = tmp_path / "state.safetensors"
    p = limited("import torch\nfrom runtime.cache import SSMState, save_cache\n"
                "s = SSMState(torch.zeros(1, 64, 3), torch.zeros(1, 64, 4096))\n"
                f"save_cache({str(dest)!r}, [s], {{'tokens': [1, 2, 3]}})\n", 100_000)
    assert p.returncode != 0 and "disk full" in p.stderr
    assert list(tmp_path.iterdir()) == []
