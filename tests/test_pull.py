"""`mamba-cli pull` against a local Hub (tests/hub_server.py) through the real huggingface_hub client.

Covers file selection (HF sharded, consolidated + params.json, GGUF quants and splits, pickle-only refusal),
resume after a killed process (the server log must show a Range request for exactly the missing bytes),
retry after a dropped connection, sha256 verification, dry-run, one-line errors, offline resolution.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import store as hub
from runtime.errors import MambaCliError, ModelFormatError
from tests.hub_server import HubServer, make_repos

ROOT = Path(__file__).resolve().parents[1]
HF_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repos, llama = make_repos(tmp_path_factory.mktemp("ggufs"))
    server = HubServer(repos, tokens={"hf_granted"}).start()
    yield server, llama
    server.stop()


@pytest.fixture
def server(served):
    srv = served[0]
    srv.throttle, srv.drop_after, srv.hold_after, srv.corrupt, srv.ignore_range = None, {}, {}, set(), {}
    srv.held.clear()
    srv.release.clear()
    return srv


@pytest.fixture
def env(server, tmp_path, monkeypatch) -> dict[str, str]:
    """A fresh store per test; the same variables for in-process calls and CLI subprocesses."""
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return dict(os.environ)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cli.main import main; main()", *args]


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def blob(repo: str, data: bytes) -> Path:
    return hub.repo_dir(repo) / "blobs" / hashlib.sha256(data).hexdigest()


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------- selection


def test_select_hf_sharded_skips_pickle_consolidated_and_subfolders():
    names = HF_FILES + ["pytorch_model.bin", "consolidated.safetensors", "params.json", "README.md",
                        "original/consolidated.pth", "special_tokens_map.json", "tokenizer.model"]
    sel = hub.select_files(names, None, "o/r")
    assert sel.kind == "hf" and sel.target == ""
    assert sorted(sel.files) == sorted(HF_FILES + ["special_tokens_map.json", "tokenizer.model"])


def test_select_consolidated_with_params_when_no_transformers_weights():
    names = ["params.json", "consolidated.safetensors", "tokenizer.model.v3", "README.md", "config.json"]
    sel = hub.select_files(names, None, "o/r")
    assert sel.kind == "mistral"
    assert sorted(sel.files) == ["consolidated.safetensors", "params.json", "tokenizer.model.v3"]


def test_select_gguf_quants():
    names = ["a-Q4_K_M.gguf", "a.q4_0.gguf", "a-Q8_0-00001-of-00002.gguf", "a-Q8_0-00002-of-00002.gguf",
             "a-Q2_K-00001-of-00002.gguf", "mmproj-a-f16.gguf", "Q6_K/a-Q6_K-00001-of-00001.gguf",
             "README.md"]
    assert hub.gguf_variants(names) == {"Q4_K_M": ["a-Q4_K_M.gguf"], "Q4_0": ["a.q4_0.gguf"],
                                        "Q8_0": ["a-Q8_0-00001-of-00002.gguf", "a-Q8_0-00002-of-00002.gguf"],
                                        "Q6_K": ["Q6_K/a-Q6_K-00001-of-00001.gguf"]}
    assert hub.select_files(names, None, "o/r").files == ["a-Q4_K_M.gguf"]  # default Q4_K_M
    sel = hub.select_files(names, "Q8_0", "o/r")
    assert sel.kind == "gguf" and sel.target == "a-Q8_0-00001-of-00002.gguf" and len(sel.files) == 2
    with pytest.raises(MambaCliError, match=r"no Q5_K_S GGUF file; available: Q4_0, Q4_K_M, Q6_K, Q8_0"):
        hub.select_files(names, "Q5_K_S", "o/r")


def test_select_refuses_pickle_only():
    with pytest.raises(ModelFormatError, match="only pickle weights"):
        hub.select_files(["config.json", "pytorch_model.bin", "tokenizer.json"], None, "o/r")


def test_parse_ref():
    assert hub.parse_ref("mistral-7b-instruct") == hub.ModelRef(
        "bartowski/Mistral-7B-Instruct-v0.3-GGUF", "Q4_K_M", "mistral-7b-instruct")
    assert hub.parse_ref("mistral-7b-instruct:q8_0").quant == "Q8_0"
    assert hub.parse_ref("codestral-mamba") == hub.ModelRef("mistralai/Mamba-Codestral-7B-v0.1", None,
                                                            "codestral-mamba")
    assert hub.parse_ref("owner/repo-GGUF:q4_k_m") == hub.ModelRef("owner/repo-GGUF", "Q4_K_M")
    with pytest.raises(MambaCliError, match="not a file, a known alias"):
        hub.parse_ref("no-such-alias")


# --------------------------------------------------------------------------------------- pulling


def test_pull_hf_layout_into_hub_cache(env, server, served):
    path = hub.pull("tiny/llama")
    repo = server.repos["tiny/llama"]
    assert path == hub.repo_dir("tiny/llama") / "snapshots" / repo.commit
    assert sorted(p.name for p in path.iterdir()) == sorted(HF_FILES)
    for name in HF_FILES:
        assert (path / name).is_symlink() and (path / name).read_bytes() == repo.files[name]
    assert (hub.repo_dir("tiny/llama") / "refs" / "main").read_text() == repo.commit
    lfs = [e for e in server.log if e["cdn"] and e["method"] == "GET"]
    assert all(e["auth"] is None for e in lfs)
    from runtime import load_model

    m, ref = load_model(path, device="cpu"), load_model(served[1], device="cpu")
    import torch

    x = torch.tensor([[1, 5, 9, 33]])
    assert torch.equal(m.forward(x), ref.forward(x))


def test_pull_consolidated_layout(env, server):
    path = hub.pull("tiny/codestral")
    assert sorted(p.name for p in path.iterdir()) == ["consolidated.safetensors", "params.json",
                                                       "tokenizer.model.v3"]


def test_pull_gguf_quant_and_split(env, server):
    repo = server.repos["tiny/model-GGUF"]
    path = hub.pull("tiny/model-GGUF")
    assert path.name == "tiny-Q4_K_M.gguf" and path.read_bytes() == repo.files["tiny-Q4_K_M.gguf"]
    path = hub.pull("tiny/model-GGUF:q8_0")
    assert path.name == "tiny-Q8_0-00001-of-00002.gguf"
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "tiny-Q4_K_M.gguf", "tiny-Q8_0-00001-of-00002.gguf", "tiny-Q8_0-00002-of-00002.gguf"]


def test_pull_cli_unknown_quant_lists_available(env, server):
    line = one_line_error(run_cli(env, "pull", "tiny/model-GGUF:Q5_K_S"))
    assert "no Q5_K_S GGUF file; available: F16, Q4_0, Q4_K_M, Q8_0" in line


def test_dry_run_lists_files_and_downloads_nothing(env, server):
    p = run_cli(env, "pull", "tiny/llama", "--dry-run")
    assert p.returncode == 0, p.stderr
    for name in HF_FILES:
        assert name in p.stdout
    assert "pytorch_model.bin" not in p.stdout and "consolidated" not in p.stdout
    total = sum(len(server.repos["tiny/llama"].files[n]) for n in HF_FILES)
    assert f"total {hub.format_size(total)} in 7 files" in p.stdout
    assert not hub.repo_dir("tiny/llama").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_pull_resumes_with_range(env, server, sig):
    data = server.repos["tiny/big"].files["model.safetensors"]
    sha = hashlib.sha256(data).hexdigest()
    part = hub.repo_dir("tiny/big") / "blobs" / f"{sha}.incomplete"
    server.throttle = (16 << 10, 0.0)  # 16 KB writes, so that the transfer stops right at 256 KB
    server.hold_after[sha] = 256 << 10  # ... and waits there until the pull has been killed
    logged = len(server.log)  # (the log is the module's server's: earlier tests' entries stay in it)
    proc = subprocess.Popen(cli("pull", "tiny/big"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120  # hang guards, not speed checks: each wait ends on an event
    while not (server.held.is_set() and part.is_file() and part.stat().st_size >= 256 << 10):
        assert proc.poll() is None and time.time() < deadline, "pull ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    server.release.set()
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 130), stderr
    assert "Traceback" not in stderr
    kept = part.stat().st_size
    assert 0 < kept < len(data)
    assert not blob("tiny/big", data).exists()

    server.throttle = None
    deadline = time.time() + 120  # the server logs the killed transfer once its write fails
    while not any(e["method"] == "GET" and e["path"].endswith(sha) for e in server.log[logged:]):
        assert time.time() < deadline
        time.sleep(0.02)
    start = len(server.log)
    p = run_cli(env, "pull", "tiny/big")
    assert p.returncode == 0, p.stderr
    gets = [e for e in server.log[start:] if e["method"] == "GET" and e["path"].endswith(sha)]
    assert [(g["range"], g["status"], g["sent"]) for g in gets] == [(f"bytes={kept}-", 206, len(data) - kept)]
    final = blob("tiny/big", data)
    assert hashlib.sha256(final.read_bytes()).hexdigest() == sha and not part.exists()


def test_dropped_connection_is_retried_with_range(env, server):
    data = server.repos["tiny/flaky"].files["model.safetensors"]
    sha = hashlib.sha256(data).hexdigest()
    server.drop_after[sha] = 300_000
    hub.pull("tiny/flaky")
    gets = [(e["range"], e["sent"]) for e in server.log if e["method"] == "GET" and e["path"].endswith(sha)]
    assert gets == [(None, 300_000), ("bytes=300000-", len(data) - 300_000)]
    assert blob("tiny/flaky", data).read_bytes() == data


def test_corrupt_download_is_detected_and_deleted(env, server):
    data = server.repos["tiny/corrupt"].files["model.safetensors"]
    sha = hashlib.sha256(data).hexdigest()
    server.corrupt.add(sha)
    line = one_line_error(run_cli(env, "pull", "tiny/corrupt"))
    assert "model.safetensors: sha256 mismatch" in line and "deleted" in line
    blobs = hub.repo_dir("tiny/corrupt") / "blobs"
    assert not (blobs / sha).exists() and not (blobs / f"{sha}.incomplete").exists()
    assert not (hub.repo_dir("tiny/corrupt") / "snapshots").exists()
    server.corrupt.clear()
    assert run_cli(env, "pull", "tiny/corrupt").returncode == 0
    assert (blobs / sha).read_bytes() == data


def test_gated_repo(env, server):
    line = one_line_error(run_cli(env, "pull", "tiny/gated"))
    assert f"tiny/gated is gated: accept its terms at {server.endpoint}/tiny/gated" in line
    assert "HF_TOKEN" in line
    line = one_line_error(run_cli(env, "pull", "tiny/gated", "--token", "hf_wrong"))
    assert "has not been granted access" in line
    p = run_cli({**env, "HF_TOKEN": "hf_granted"}, "pull", "tiny/gated")
    assert p.returncode == 0, p.stderr
    cdn = [e for e in server.log if e["cdn"] and e["method"] == "GET"]
    assert cdn and all(e["auth"] is None for e in cdn)  # the token never reaches the CDN


@pytest.mark.parametrize("args,expected", [
    (("no-owner/no-repo",), "no-owner/no-repo: repository not found on"),
    (("tiny/llama", "--revision", "v9"), "tiny/llama has no revision 'v9'"),
    (("tiny/pickle",), "tiny/pickle has only pickle weights (pytorch_model.bin)"),
    (("tiny/huge",), "not enough disk space: 10.0 TB to download"),
])
def test_one_line_errors(env, server, args, expected):
    assert expected in one_line_error(run_cli(env, "pull", *args))


def test_no_network(env):
    env = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}
    assert "cannot reach http://127.0.0.1:9" in one_line_error(run_cli(env, "pull", "tiny/llama"))


def test_revision_by_branch_and_commit(env, server):
    commit = server.repos["tiny/codestral"].commit
    assert hub.pull("tiny/codestral", revision=commit).name == commit
    assert not (hub.repo_dir("tiny/codestral") / "refs" / commit).exists()


def test_resolve_pulls_once_then_works_offline(env, server, served, monkeypatch):
    from runtime import load_model

    with pytest.raises(MambaCliError, match="HF_HUB_OFFLINE=1"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        hub.resolve_model("mamba-130m")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    path = hub.resolve_model("mamba-130m")  # first use pulls
    assert path.parent.parent == hub.repo_dir("state-spaces/mamba-130m-hf")
    n = len(server.log)
    assert hub.resolve_model("mamba-130m") == path and len(server.log) == n  # cached: no request
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert hub.resolve_model("mamba-130m") == path
    m = load_model("mamba-130m", device="cpu")
    assert m.source == str(path) and m.arch == "llama"
    offline = run_cli({**env, "HF_HUB_OFFLINE": "1"}, "pull", "tiny/codestral")
    assert "HF_HUB_OFFLINE=1 is set" in one_line_error(offline)


# --------------------------------------------------------------------------------- stored 4-bit copies


def test_pull_quantize_keeps_a_4bit_copy_that_list_run_and_rm_see(env, server):
    """`pull --quantize` stores the GGUF beside the snapshot; `list` shows it as REPO:TYPE; chat/run find it
    again by that name or by --quantize without re-quantizing; `rm` removes the copy with the snapshot.
    Progress goes to plain lines when the output is piped."""
    env = {**env, "MAMBA_CLI_PROGRESS_EVERY": "0"}
    p = run_cli(env, "pull", "tiny/llama", "--quantize", "q4_0")
    assert p.returncode == 0, p.stderr
    snap = hub.repo_dir("tiny/llama") / "snapshots" / server.repos["tiny/llama"].commit
    copy = snap / "llama-Q4_0.gguf"
    assert copy.is_file() and not copy.is_symlink()
    assert "downloading: 100% (" in p.stdout and "done in" in p.stdout  # piped: plain progress lines
    assert "quantizing to q4_0: " in p.stderr and "weights/s" in p.stderr
    assert f"tiny/llama:Q4_0 ({hub.format_size(copy.stat().st_size)}) -> {copy}" in " ".join(p.stdout.split())

    entries = {e.name: e for e in hub.store_entries()}  # what `list` prints
    assert entries["tiny/llama:Q4_0"].path == copy and hub.describe(entries["tiny/llama:Q4_0"])["format"] == "gguf Q4_0"
    assert entries["tiny/llama"].path == snap and copy not in entries["tiny/llama"].files

    made = copy.stat().st_mtime_ns
    p = run_cli(env, "chat", "tiny/llama", "--quantize", "q4_0", "--device", "cpu", "--no-compile")
    assert p.returncode == 0, p.stderr
    assert "using the stored q4_0 copy" in p.stderr and "llama-Q4_0.gguf (llama)" in p.stderr
    p = run_cli({**env, "HF_HUB_OFFLINE": "1"}, "run", "tiny/llama:Q4_0", "hello", "-n", "3", "--device", "cpu",
                "-v")
    assert p.returncode == 0, p.stderr
    assert f"loaded{copy}(llama)" in "".join(p.stderr.split())
    assert copy.stat().st_mtime_ns == made  # found, not made again

    removal = hub.plan_removal(hub.find_entries("tiny/llama"))  # what `rm tiny/llama` removes: both
    assert copy in removal.links and removal.freed >= copy.stat().st_size
    hub.remove_entries(removal)
    assert not hub.repo_dir("tiny/llama").exists()


def test_quantize_option_refuses_a_gguf_and_unknown_types(env, server):
    from cli.common import stored_quantized

    gguf = hub.pull("tiny/model-GGUF")
    with pytest.raises(MambaCliError, match="is a GGUF file already"):
        stored_quantized(gguf, "q4_0")
    with pytest.raises(MambaCliError, match="--quantize q9: unknown"):
        stored_quantized(hub.pull("tiny/codestral"), "q9")
    with pytest.raises(MambaCliError, match="mamba-cli pull tiny/llama --quantize q4_k_m"):
        hub.select_files(["config.json", "model.safetensors"], "Q4_K_M", "tiny/llama")
