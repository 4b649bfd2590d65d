"""A hostile Hub listing and hostile store entries: refused with one line, nothing outside the store touched.

The local Hub (tests/hub_server.py) serves repos whose listings name files `../../…`, absolute paths, a
commit id or hashes that climb out of the cache (hostile_repos); the store is seeded with links that lead
out of it. Every case must fail (or list) cleanly and leave the watched `victim` folder exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
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
