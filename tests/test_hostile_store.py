"""A hostile Hub listing and hostile store entries: refused with one line, nothing outside the store touched.

The local Hub (tests/hub_server.py) serves repos whose listings name files `../../…`, absolute paths, a
commit id or hashes that climb out of the cache (hostile_repos); the store is seeded with links that lead
out of it. Every case must fail (or list) cleanly and leave the watched `victim` folder exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

import store as hub
from runtime.errors import MambaCliError
from store.download import RemoteFile, _Partial
from tests.hub_server import Repo, hostile_repos
from tests.test_pull import env, one_line_error, run_cli, served, server  # noqa: F401 (fixtures)


@pytest.fixture
def victim(tmp_path) -> Path:
    """A user's folder outside the store, with files an attacker would like to replace or delete."""
    v = tmp_path / "victim"
    v.mkdir()
    for name, data in {"x-Q4_K_M.gguf": b"user data", "config.json": b'{"mine": 1}', "important": b"keep",
                       "notes.txt": b"hello"}.items():
        (v / name).write_bytes(data)
    return v


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root: (kind, bytes or link target), to compare before and after."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", p.read_bytes())
            else:
                out[rel] = ("dir",)
    return out


def outside_store(tmp_path: Path) -> dict[str, tuple]:
    return {k: v for k, v in tree(tmp_path).items() if not k.startswith("hf")}


HOSTILE = ["evil/name-GGUF", "evil/absolute-GGUF", "evil/dot-GGUF", "evil/backslash-GGUF", "evil/commit-GGUF",
           "evil/sha256-GGUF", "evil/blobid"]
REASONS = {"evil/name-GGUF": "'..' path segment", "evil/absolute-GGUF": "is an absolute path",
           "evil/dot-GGUF": "'.' path segment", "evil/backslash-GGUF": "contains a backslash",
           "evil/commit-GGUF": "not 40 hex digits", "evil/sha256-GGUF": "not 64 hex digits",
           "evil/blobid": "not 40 hex digits"}


@pytest.mark.parametrize("repo", HOSTILE)
def test_hostile_listing_is_refused_before_any_path_is_built(env, server, victim, tmp_path, repo):  # noqa: F811
    for r in hostile_repos(victim):
        server.add(r)
    before = outside_store(tmp_path)
    start = len(server.log)
    with pytest.raises(MambaCliError) as e:
        hub.pull(repo)
    msg = str(e.value)
    assert "\n" not in msg and repo in msg and REASONS[repo] in msg, msg
    assert outside_store(tmp_path) == before
    assert not any(x["cdn"] or "/resolve/" in x["path"] for x in server.log[start:])  # nothing fetched
    assert not hub.repo_dir(repo).exists()


def test_hostile_listing_cli_is_one_line(env, server, victim, tmp_path):  # noqa: F811
    for r in hostile_repos(victim):
        server.add(r)
    before = outside_store(tmp_path)
    line = one_line_error(run_cli(env, "pull", "evil/name-GGUF"))
    assert "refusing to pull" in line and "'..' path segment" in line
    line = one_line_error(run_cli(env, "pull", "tiny/llama", "--revision", "../../../victim"))
    assert "revision '../../../victim'" in line
    assert outside_store(tmp_path) == before


def test_linked_store_folders_never_lead_writes_out(env, server, victim, tmp_path):  # noqa: F811
    before = outside_store(tmp_path)
    folder = hub.repo_dir("tiny/codestral")
    folder.mkdir(parents=True)
    (folder / "blobs").symlink_to(victim, target_is_directory=True)
    with pytest.raises(MambaCliError, match="outside the store"):
        hub.pull("tiny/codestral")
    (folder / "blobs").unlink()
    commit = server.repos["tiny/codestral"].commit
    (folder / "snapshots").mkdir()
    (folder / "snapshots" / commit).symlink_to(victim, target_is_directory=True)
    with pytest.raises(MambaCliError, match="outside the store"):
        hub.pull("tiny/codestral")
    (folder / "snapshots" / commit).unlink()
    (folder / "refs").symlink_to(victim, target_is_directory=True)
    with pytest.raises(MambaCliError, match="outside the store"):
        hub.pull("tiny/codestral")
    (folder / "refs").unlink()
    shutil.rmtree(folder)
    folder.symlink_to(victim, target_is_directory=True)  # the repo's whole folder
    with pytest.raises(MambaCliError, match="outside the store"):
        hub.pull("tiny/codestral")
    assert outside_store(tmp_path) == before


def test_planted_links_in_blobs_are_dropped_not_followed(env, server, victim, tmp_path):  # noqa: F811
    data = server.repos["tiny/codestral"].files["consolidated.safetensors"]
    sha = hashlib.sha256(data).hexdigest()
    blobs = hub.repo_dir("tiny/codestral") / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha}.incomplete").symlink_to(victim / "important")
    snap = hub.repo_dir("tiny/codestral") / "snapshots" / server.repos["tiny/codestral"].commit
    snap.mkdir(parents=True)
    (snap / "params.json").symlink_to(victim / "config.json")
    before = outside_store(tmp_path)
    path = hub.pull("tiny/codestral")
    assert (path / "consolidated.safetensors").read_bytes() == data
    assert (path / "params.json").resolve().parent == blobs.resolve()
    assert outside_store(tmp_path) == before


def test_resume_after_the_server_ignored_range_then_dropped(env, server):  # noqa: F811
    """Retry 1 ignores Range (200, whole file) and drops; retry 2 honours Range: the hash must be of the
    bytes on disk, not of the first attempt's."""
    data = server.repos["tiny/flaky"].files["model.safetensors"]
    sha = hashlib.sha256(data).hexdigest()
    server.drop_after[sha] = [300_000, 100_000]
    server.ignore_range[sha] = 1
    hub.pull("tiny/flaky")
    gets = [(e["range"], e["status"], e["sent"]) for e in server.log
            if e["method"] == "GET" and e["path"].endswith(sha)][-3:]
    assert gets == [(None, 200, 300_000), ("bytes=300000-", 200, 100_000),
                    ("bytes=100000-", 206, len(data) - 100_000)]
    assert (hub.repo_dir("tiny/flaky") / "blobs" / sha).read_bytes() == data


def test_short_write_is_an_error_and_keeps_a_consistent_partial(tmp_path):
    class Short:
        name = "part"

        def __init__(self):
            self.data = bytearray()

        def write(self, b):
            self.data += b[: len(b) // 2]
            return len(b) // 2

        def truncate(self, n):
            del self.data[n:]

    out = Short()
    state = _Partial(RemoteFile("m.safetensors", 100, "0" * 64, "0" * 64), out)
    with pytest.raises(MambaCliError, match="short write"):
        state.append(b"x" * 10)
    assert state.done == 0 and out.data == b"" and state.digest.hexdigest() == hashlib.sha256().hexdigest()


def test_listing_size_must_be_a_count(env, server):  # noqa: F811
    server.add(Repo("evil/size", {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"x" * 64},
                    listed={"config.json": {"size": -5}}))
    with pytest.raises(MambaCliError, match="config.json the size -5"):
        hub.pull("evil/size")


# --------------------------------------------------------------------------- hostile store entries


def _snapshot(repo: str, commit: str, files: dict[str, bytes]) -> Path:
    """A snapshot written straight into the store (regular files, as a copy-mode cache holds them)."""
    snap = hub.repo_dir(repo) / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    (hub.repo_dir(repo) / "refs").mkdir(exist_ok=True)
    (hub.repo_dir(repo) / "refs" / "main").write_text(commit)
    return snap


def _gguf_head(*kvs: bytes, n_kv: int | None = None) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs) if n_kv is None else n_kv) + b"".join(kvs)


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload


def _hostile_entries(victim: Path) -> dict[str, str]:
    """Seed the store with one bad entry per case; returns repo -> what its reason must mention."""
    import json
    import struct

    llama = {"config.json": b'{"model_type": "llama", "hidden_size": 64}'}
    st_huge = struct.pack("<Q", 2**62) + b"{}"
    no_shape = json.dumps({"w": {"dtype": "F32", "data_offsets": [0, 4]}}).encode()
    st_no_shape = struct.pack("<Q", len(no_shape)) + no_shape + b"\0" * 4
    st_ok = struct.pack("<Q", 2) + b"{}"
    cases = {
        # a 49-byte GGUF: a uint8 array claiming 2^62 items (gguf-py's reader ran for minutes on it)
        "bad/array-GGUF": ({"m-Q4_K_M.gguf": _gguf_head(_kv("a", 9, struct.pack("<IQ", 0, 2**62)))},
                           "claims 4611686018427387904 elements"),
        "bad/truncated-GGUF": ({"m-Q4_K_M.gguf": _gguf_head(_kv("general.architecture", 8,
                                                                struct.pack("<Q", 100) + b"lla"))}, "needs 100 bytes"),
        "bad/huge-header": ({**llama, "model.safetensors": st_huge}, "does not fit the file"),
        "bad/no-shape": ({**llama, "model.safetensors": st_no_shape}, "malformed header entry"),
        "bad/tokenizer-config": ({**llama, "model.safetensors": st_ok, "tokenizer_config.json": b"{not json"},
                                 "not valid JSON"),
    }
    reasons = {}
    for i, (repo, (files, why)) in enumerate(cases.items()):
        _snapshot(repo, f"{i:040x}", files)
        reasons[repo] = why
    dangling = hub.repo_dir("bad/dangling") / "snapshots"
    dangling.mkdir(parents=True)
    (dangling / ("d" * 40)).symlink_to(victim / "no-such-folder", target_is_directory=True)
    reasons["bad/dangling"] = "dangling or broken snapshot link"
    linked = hub.repo_dir("bad/linked") / "snapshots"
    linked.mkdir(parents=True)
    (linked / ("e" * 40)).symlink_to(victim, target_is_directory=True)
    reasons["bad/linked"] = "links outside the store"
    return reasons


def test_list_and_show_survive_hostile_entries(env, server, victim, tmp_path):  # noqa: F811
    import tracemalloc

    hub.pull("tiny/model-GGUF")
    reasons = _hostile_entries(victim)
    before = outside_store(tmp_path)
    tracemalloc.start()
    try:
        entries = hub.store_entries()
        for e in entries:
            try:
                hub.describe(e)
            except MambaCliError as err:
                assert "\n" not in str(err)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 2**20

    p = run_cli(env, "list")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines()[1:] if line.startswith(("tiny/", "bad/"))}
    assert "unreadable" not in rows["tiny/model-GGUF:Q4_K_M"]
    for repo in reasons:
        name = next(n for n in rows if n.split(":")[0] == repo)
        assert "unreadable" in rows[name], (repo, p.stdout)
    assert f"{len(reasons)} unreadable (run `mamba-cli list -v`" in p.stdout
    p = run_cli(env, "list", "-v")
    for repo, why in reasons.items():
        assert any(line.startswith(repo) and why in line for line in p.stdout.splitlines()), (repo, p.stdout)

    for repo, why in [("bad/array-GGUF", "claims"), ("bad/huge-header", "does not fit the file"),
                      ("bad/linked", "links outside the store")]:
        line = one_line_error(run_cli(env, "show", repo))
        assert why in line, line
    assert outside_store(tmp_path) == before


def test_rm_never_deletes_through_a_link_and_reports_what_it_freed(env, server, victim, tmp_path):  # noqa: F811
    _hostile_entries(victim)
    before = outside_store(tmp_path)
    p = run_cli(env, "rm", "bad/linked", "-y")
    assert p.returncode == 0, p.stderr
    assert "freed 0 B" in p.stdout and outside_store(tmp_path) == before
    assert not hub.repo_dir("bad/linked").exists()
    # a repo folder that links out of the store: refused, nothing deleted behind it
    (victim / "snapshots" / ("f" * 40)).mkdir(parents=True)
    (victim / "snapshots" / ("f" * 40) / "m-Q4_K_M.gguf").write_bytes(b"GGUF")
    before = outside_store(tmp_path)
    hub.repo_dir("bad/repo-link").symlink_to(victim, target_is_directory=True)
    assert "rm never deletes through it" in one_line_error(run_cli(env, "rm", "bad/repo-link", "-y"))
    hub.repo_dir("bad/repo-link").unlink()
    assert outside_store(tmp_path) == before
    # a snapshot file that links out of the store: only the link goes, the file behind it stays
    snap = hub.pull("tiny/codestral")
    (snap / "README.md").symlink_to(victim / "important")
    size = sum(len(server.repos["tiny/codestral"].files[n]) for n in ("params.json", "consolidated.safetensors",
                                                                     "tokenizer.model.v3"))
    p = run_cli(env, "rm", "tiny/codestral", "-y")
    assert p.returncode == 0, p.stderr
    assert f"freed {hub.format_size(size)}" in p.stdout, p.stdout
    assert (victim / "important").read_bytes() == b"keep" and outside_store(tmp_path) == before
    # an unreadable entry is removed with what it holds inside the store, and the count is exact
    p = run_cli(env, "rm", "bad/huge-header", "-y")
    assert p.returncode == 0, p.stderr
    assert "freed 52 B" in p.stdout, p.stdout  # config.json (42 B) + model.safetensors (10 B), copies
    assert not hub.repo_dir("bad/huge-header").exists()
