"""The local store: list / show / rm / aliases, and sharing the Hub cache with huggingface_hub both ways."""

from __future__ import annotations

import dataclasses
import hashlib

import store as hub
from tests.hub_server import Repo
from tests.test_pull import HF_FILES, env, one_line_error, run_cli, served, server  # noqa: F401 (fixtures)


def n_params(repo: Repo) -> int:
    from safetensors.torch import load

    shards = [load(repo.files[n]) for n in HF_FILES if n.endswith(".safetensors")]
    return sum(t.numel() for shard in shards for t in shard.values())


def test_list_and_show(env, server):  # noqa: F811
    assert "no models in" in run_cli(env, "list").stdout
    hub.pull("tiny/llama")
    hub.pull("tiny/model-GGUF")
    hub.pull("tiny/model-GGUF:Q8_0")
    p = run_cli(env, "list")
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line.split() for line in p.stdout.splitlines()[1:]}
    assert set(rows) == {"tiny/llama", "tiny/model-GGUF:Q4_K_M", "tiny/model-GGUF:Q8_0"}
    params = n_params(server.repos["tiny/llama"])
    assert rows["tiny/llama"][1:5] == ["llama", f"{params / 1e3:.1f}K", "safetensors", "F32"]
    assert rows["tiny/model-GGUF:Q4_K_M"][1:5] == ["llama", "128", "gguf", "Q4_K_M"]  # one 2 x 64 tensor
    assert rows["tiny/model-GGUF:Q8_0"][1:3] == ["llama", str(5 * 64 + 6 * 64)]  # both split parts counted

    p = run_cli(env, "show", "tiny/llama")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    fields = {line[:15].strip(): line[15:].strip() for line in lines if not line.startswith(" ")}
    assert fields["architecture"] == "llama" and fields["context length"] == "256"
    assert fields["chat template"] == "yes" and fields["layers"] == "2" and fields["hidden size"] == "64"
    assert fields["quant"] == "none (full precision)" and fields["parameters"].endswith(f"({params:,})")
    for name in HF_FILES:
        assert f"  {name}" in p.stdout
    p = run_cli(env, "show", "tiny/model-GGUF:q8_0")
    assert "Q8_0" in p.stdout and "tiny-Q8_0-00002-of-00002.gguf" in p.stdout
    assert "chat template   yes" in p.stdout and "context length  256" in p.stdout
    assert "is not in the local store" in one_line_error(run_cli(env, "show", "tiny/model-GGUF:F16"))


def test_aliases_command(env):  # noqa: F811
    p = run_cli(env, "aliases")
    assert p.returncode == 0
    for a in hub.ALIASES.values():
        assert a.name in p.stdout and a.repo in p.stdout
    assert "codestral-mamba" in p.stdout and "mistralai/Mamba-Codestral-7B-v0.1" in p.stdout


def test_huggingface_hub_reads_what_we_pull(env, server):  # noqa: F811
    from huggingface_hub import hf_hub_download, scan_cache_dir, try_to_load_from_cache

    snap = hub.pull("tiny/llama")
    cache = str(hub.cache_dir())
    assert try_to_load_from_cache("tiny/llama", "config.json", cache_dir=cache) == str(snap / "config.json")
    n = len(server.log)
    path = hf_hub_download("tiny/llama", "model-00001-of-00002.safetensors", cache_dir=cache,
                           local_files_only=True)
    assert path == str(snap / "model-00001-of-00002.safetensors") and len(server.log) == n
    report = scan_cache_dir(cache)
    assert not report.warnings
    (info,) = [r for r in report.repos if r.repo_id == "tiny/llama"]
    assert info.nb_files == len(HF_FILES) and info.size_on_disk == sum(
        len(server.repos["tiny/llama"].files[f]) for f in HF_FILES)


def test_we_resolve_what_huggingface_hub_downloaded(env, server, monkeypatch):  # noqa: F811
    from huggingface_hub import hf_hub_download

    for name in HF_FILES:
        hf_hub_download("state-spaces/mamba-130m-hf", name, cache_dir=str(hub.cache_dir()),
                        endpoint=server.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = hub.resolve_model("mamba-130m")
    assert path == hub.repo_dir("state-spaces/mamba-130m-hf") / "snapshots" / server.repos[
        "state-spaces/mamba-130m-hf"].commit


def test_rm_frees_only_unshared_blobs(env, server):  # noqa: F811
    old = server.repos["tiny/llama"]
    first = hub.pull("tiny/llama")
    new = dataclasses.replace(old, files={**old.files, "generation_config.json": b'{"temperature": 0.5}'})
    server.add(new)
    try:
        second = hub.pull("tiny/llama")
    finally:
        server.add(old)
    assert first != second and (hub.repo_dir("tiny/llama") / "refs" / "main").read_text() == new.commit
    blobs = hub.repo_dir("tiny/llama") / "blobs"
    assert len(list(blobs.iterdir())) == len(HF_FILES) + 1  # the shards are shared by both snapshots

    p = run_cli(env, "rm", "tiny/llama", "--revision", old.commit)
    assert "pass -y" in one_line_error(p) and first.is_dir()
    p = run_cli(env, "rm", "tiny/llama", "--revision", old.commit, "-y")
    assert p.returncode == 0, p.stderr
    assert f"freed {hub.format_size(len(old.files['generation_config.json']))}" in p.stdout
    assert not first.exists() and all((second / n).is_file() for n in HF_FILES)
    assert len(list(blobs.iterdir())) == len(HF_FILES)
    assert [e.commit for e in hub.store_entries()] == [new.commit]

    p = run_cli(env, "rm", "tiny/llama", "-y")
    assert p.returncode == 0, p.stderr
    assert not hub.repo_dir("tiny/llama").exists()


def test_rm_one_gguf_quant(env, server, monkeypatch):  # noqa: F811
    q4 = hub.pull("tiny/model-GGUF")
    q8 = hub.pull("tiny/model-GGUF:Q8_0")
    p = run_cli(env, "rm", "tiny/model-GGUF:Q8_0", "-y")
    assert p.returncode == 0, p.stderr
    assert not q8.exists() and not q8.with_name("tiny-Q8_0-00002-of-00002.gguf").exists()
    assert sorted(p.name for p in (q4.parent.parent.parent / "blobs").iterdir()) == [
        hashlib.sha256(server.repos["tiny/model-GGUF"].files["tiny-Q4_K_M.gguf"]).hexdigest()]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_model("tiny/model-GGUF") == q4
    assert "not in the local store" in one_line_error(run_cli(env, "rm", "tiny/model-GGUF:Q8_0", "-y"))
