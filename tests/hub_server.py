"""A local HTTP server that speaks the Hugging Face Hub endpoints huggingface_hub uses (set HF_ENDPOINT).

    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]
         model info: sha, gated, siblings (size, blobId, lfs sha256)
    HEAD/GET /{repo}/resolve/{rev}/{path}
         small files: 200 + ETag (git blob sha1), X-Repo-Commit;
         LFS files: 302 to the CDN + X-Linked-Etag (sha256), X-Linked-Size, X-Repo-Commit
    HEAD/GET /cdn/{sha256}
         the CDN (a second port, so another origin): Range -> 206 + Content-Range

Errors carry the Hub's X-Error-Code: RepoNotFound (404), RevisionNotFound (404), EntryNotFound (404) and
GatedRepo (401 without a token, 403 with a token that was not granted). The CDN answers 400 to a request
that carries an Authorization header, as S3's signed URLs do, so a client must not forward the token.

Every request is logged (method, path, Range header, status, bytes of body sent) in `HubServer.log`.
Knobs for tests: `throttle` (bytes per chunk, seconds between chunks), `drop_after` (close the connection
after N body bytes, once per sha256; a list: one count per request in turn), `ignore_range` (sha256 -> how
many Range requests to answer 200 with the whole file, as a server that ignores Range), `hold_after` (after
N body bytes, once per sha256, set `held` and wait for `release`: a transfer stopped mid-file for as long as
a test needs), `corrupt` (sha256s whose served bytes get one byte flipped).

Hostile mode: a Repo's `listed` overrides fields of a file's listing entry (rfilename, blobId, lfs.sha256:
names and hashes an attacker controls) and `listed_commit` the commit id the listing gives;
`hostile_repos()` builds the repos the traversal tests pull.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".model", ".model.v1", ".model.v3")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """One model repo: files at one commit, branch/tag names pointing at it, optional gating."""

    repo_id: str
    files: dict[str, bytes]
    refs: tuple[str, ...] = ("main",)
    gated: bool = False
    listed_sizes: dict[str, int] = field(default_factory=dict)  # lie about a file's size in the listing
    commit: str = ""
    listed: dict[str, dict] = field(default_factory=dict)  # file name -> listing fields a hostile Hub sends
    listed_commit: str | None = None  # the commit id a hostile Hub lists

    def __post_init__(self) -> None:
        h = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            h.update(name.encode() + hashlib.sha256(self.files[name]).digest())
        self.commit = h.hexdigest()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES) or len(self.files[name]) > 10_000

    def sibling(self, name: str, blobs: bool) -> dict:
        if not blobs:
            return {"rfilename": name}
        data = self.files[name]
        size = self.listed_sizes.get(name, len(data))
        entry = {"rfilename": name, "size": size, "blobId": git_blob_sha1(data)}
        if self.is_lfs(name):
            entry["lfs"] = {"size": size, "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        for k, v in self.listed.get(name, {}).items():
            if k == "sha256":
                entry["lfs"] = {**entry.get("lfs", {"size": size, "pointerSize": 134}), "sha256": v}
            else:
                entry[k] = v
        return entry


class HubServer:
    """The Hub (API + resolve) on one port, its CDN on another; `endpoint` is HF_ENDPOINT."""

    def __init__(self, repos: list[Repo], tokens: set[str] = frozenset()):
        self.repos: dict[str, Repo] = {}
        self.tokens = set(tokens)  # tokens granted access to every gated repo
        self.blobs: dict[str, bytes] = {}
        for r in repos:
            self.add(r)
        self.log: list[dict] = []
        self.throttle: tuple[int, float] | None = None
        self.drop_after: dict[str, int | list[int]] = {}
        self.ignore_range: dict[str, int] = {}
        self.hold_after: dict[str, int] = {}
        self.held, self.release = threading.Event(), threading.Event()
        self.corrupt: set[str] = set()
        self._lock = threading.Lock()
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=False))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=True))
        self.hub.daemon_threads = self.cdn.daemon_threads = True

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def add(self, repo: Repo) -> None:
        """Serve `repo` (replacing a repo of that id: a new commit)."""
        self.repos[repo.repo_id] = repo
        self.blobs.update({hashlib.sha256(d).hexdigest(): d for d in repo.files.values()})

    def start(self) -> HubServer:
        for srv in (self.hub, self.cdn):
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for srv in (self.hub, self.cdn):
            srv.shutdown()
            srv.server_close()

    def record(self, **entry) -> None:
        with self._lock:
            self.log.append(entry)

    def requests(self, method: str | None = None, path_contains: str = "") -> list[dict]:
        with self._lock:
            return [e for e in self.log
                    if (method is None or e["method"] == method) and path_contains in e["path"]]


def _handler(server: HubServer, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args) -> None:  # keep pytest output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            self._sent = 0
            self._status = 0
            try:
                if cdn:
                    self._cdn(head)
                else:
                    self._hub(head)
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                server.record(method=self.command, path=urlsplit(self.path).path,
                              range=self.headers.get("Range"), auth=self.headers.get("Authorization"),
                              status=self._status, sent=self._sent, cdn=cdn)

        def _reply(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"",
                   head: bool = False) -> None:
            self._status = status
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if "Content-Length" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)
                self._sent = len(body)

        def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._reply(status, headers, json.dumps({"error": message}).encode(), head)

        def _repo(self, repo_id: str, head: bool) -> Repo | None:
            repo = server.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", head)
            return repo

        def _commit(self, repo: Repo, rev: str, head: bool) -> str | None:
            if rev in repo.refs or rev == repo.commit:
                return repo.commit
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            return None

        def _hub(self, head: bool) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/(.+))?", path)
            if m:
                repo = self._repo(m.group(1), head)
                commit = repo and self._commit(repo, m.group(2) or "main", head)
                if commit:
                    blobs = parse_qs(url.query).get("blobs", ["false"])[0].lower() == "true"
                    info = {"_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id,
                            "sha": repo.listed_commit or commit, "private": False,
                            "gated": "manual" if repo.gated else False, "disabled": False,
                            "tags": [], "siblings": [repo.sibling(n, blobs) for n in sorted(repo.files)]}
                    self._reply(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), head)
                return
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path)
            if not m:
                self._error(404, None, "Not found", head)
                return
            repo = self._repo(unquote(m.group(1)), head)
            commit = repo and self._commit(repo, unquote(m.group(2)), head)
            if not commit:
                return
            name = unquote(m.group(3))
            if repo.gated:
                auth = self.headers.get("Authorization", "")
                if not auth:
                    self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must "
                                "have access to it and be authenticated to access it. Please log in.", head)
                    return
                if auth.removeprefix("Bearer ") not in server.tokens:
                    self._error(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are "
                                "not in the authorized list.", head)
                    return
            if name not in repo.files:
                self._error(404, "EntryNotFound", f"{name} does not exist on {commit}", head)
                return
            data = repo.files[name]
            headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
            if repo.is_lfs(name):
                sha = hashlib.sha256(data).hexdigest()
                headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                "ETag": f'"{git_blob_sha1(data)}"',
                                "Location": f"{server.cdn_url}/cdn/{sha}"})
                self._reply(302, headers, b"", head)
                return
            headers.update({"ETag": f'"{git_blob_sha1(data)}"', "Content-Type": "application/octet-stream"})
            self._reply(200, headers, data, head)

        def _cdn(self, head: bool) -> None:
            m = re.fullmatch(r"/cdn/([0-9a-f]{64})", urlsplit(self.path).path)
            data = server.blobs.get(m.group(1)) if m else None
            if data is None:
                self._error(404, None, "NoSuchKey", head)
                return
            if self.headers.get("Authorization"):
                self._error(400, None, "Only one auth mechanism allowed", head)
                return
            sha = m.group(1)
            start, end = 0, len(data) - 1
            status, headers = 200, {"Accept-Ranges": "bytes", "ETag": f'"{sha}"'}
            rng = self.headers.get("Range")
            if rng and server.ignore_range.get(sha, 0) > 0:
                server.ignore_range[sha] -= 1
                rng = None
            if rng:
                r = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                if not r or int(r.group(1)) >= len(data):
                    self._reply(416, {"Content-Range": f"bytes */{len(data)}"}, b"", head)
                    return
                start = int(r.group(1))
                end = min(int(r.group(2)), end) if r.group(2) else end
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            body = data[start:end + 1]
            if sha in server.corrupt and body:
                mid = len(body) // 2
                body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1:]
            headers["Content-Length"] = str(len(body))
            self._status = status
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if head:
                return
            drop = server.drop_after.pop(sha, None)
            if isinstance(drop, list):
                if drop[1:]:
                    server.drop_after[sha] = drop[1:]
                drop = drop[0] if drop else None
            hold = server.hold_after.pop(sha, None)
            chunk, delay = server.throttle or (1 << 20, 0.0)
            for i in range(0, len(body), chunk):
                piece = body[i:i + chunk]
                if drop is not None and self._sent + len(piece) > drop:
                    self.wfile.write(piece[:drop - self._sent])
                    self._sent = drop
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(piece)
                self.wfile.flush()
                self._sent += len(piece)
                if hold is not None and self._sent >= hold:
                    hold = None
                    server.held.set()
                    server.release.wait(300)  # a hang guard: the test releases it as soon as it is done
                if delay:
                    time.sleep(delay)

    return Handler


def repo_from_folder(repo_id: str, folder: Path, extra: dict[str, bytes] | None = None, **kw) -> Repo:
    """A Repo holding every regular file of `folder` (except the fixture's `done` marker), plus `extra`."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "done"}
    files.update(extra or {})
    return Repo(repo_id, files, **kw)


# ------------------------------------------------------------------------------------ the test Hub's repos

LLAMA_CFG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)


def tiny_gguf(path: Path, seed: int, n: int = 64) -> bytes:
    """A small valid GGUF (llama architecture metadata, one F32 tensor of n*seed elements)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(n)
    w.add_block_count(1)
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", np.full((seed, n), seed, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def sharded(folder: Path) -> dict[str, bytes]:
    """model.safetensors of `folder` split in two shards, plus model.safetensors.index.json."""
    from safetensors.torch import load_file, save

    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    files, weight_map = {}, {}
    for i, part in enumerate(halves, 1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        files[shard] = save({k: tensors[k].contiguous() for k in part}, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    files["model.safetensors.index.json"] = json.dumps({"metadata": {"total_size": total},
                                                        "weight_map": weight_map}).encode()
    return files


def make_repos(work: Path) -> tuple[list[Repo], Path]:
    """The repos the pull/store tests use, and the tiny Llama folder they come from."""
    import random

    import torch
    from safetensors.torch import save

    from tests.fixtures import build_tiny

    llama = build_tiny("LlamaForCausalLM", LLAMA_CFG)
    hf_files = {p.name: p.read_bytes() for p in llama.iterdir()
                if p.is_file() and p.name not in ("done", "model.safetensors")}
    hf_files.update(sharded(llama))
    decoys = {"pytorch_model.bin": b"PK\x03\x04 pickle", "README.md": b"# tiny", "params.json": b"{}",
              "consolidated.safetensors": save({"x": torch.zeros(4)}), "original/consolidated.pth": b"pickle"}
    rng = random.Random(0)
    work.mkdir(parents=True, exist_ok=True)
    ggufs = {name: tiny_gguf(work / name, seed) for seed, name in enumerate(
        ["tiny-Q4_K_M.gguf", "tiny-Q4_0.gguf", "tiny-F16.gguf", "tiny-Q8_0-00001-of-00002.gguf",
         "tiny-Q8_0-00002-of-00002.gguf", "tiny-Q2_K-00001-of-00002.gguf", "mmproj-tiny-f16.gguf"], start=2)}
    params = {"dim": 64, "n_layers": 2, "vocab_size": 320, "n_groups": 1}
    codestral = {"params.json": json.dumps(params).encode(),
                 "consolidated.safetensors": save({"backbone.embedding.weight": torch.zeros(320, 64)}),
                 "tokenizer.model.v3": b"\x0a\x05sentencepiece", "README.md": b"# codestral-like"}
    big = {"config.json": b'{"model_type": "llama"}', "model.safetensors": rng.randbytes(3 << 19)}
    repos = [
        Repo("tiny/llama", {**hf_files, **decoys}),
        Repo("state-spaces/mamba-130m-hf", hf_files),  # an alias's repo, served with the tiny Llama
        Repo("tiny/gated", hf_files, gated=True),
        Repo("tiny/codestral", codestral),
        Repo("tiny/model-GGUF", ggufs),
        Repo("tiny/pickle", {"config.json": b'{"model_type": "llama"}', "pytorch_model.bin": b"pickle"}),
        Repo("tiny/big", big),
        Repo("tiny/corrupt", {**big, "model.safetensors": rng.randbytes(1 << 18)}),
        Repo("tiny/flaky", {**big, "model.safetensors": rng.randbytes(1 << 19)}),
        Repo("tiny/huge", big, listed_sizes={"model.safetensors": 10 ** 13}),
    ]
    return repos, llama


def hostile_repos(victim: Path) -> list[Repo]:
    """Repos whose listings point outside the cache at `victim` (a folder the tests watch): traversal and
    absolute file names, a traversal commit id, traversal hashes; each serves a tiny valid GGUF."""
    gguf = tiny_gguf(victim.parent / "hostile-src.gguf", 2)
    up = "../" * 12
    repos = [
        Repo("evil/name-GGUF", {"x-Q4_K_M.gguf": gguf},
             listed={"x-Q4_K_M.gguf": {"rfilename": f"{up}{victim.relative_to('/')}/x-Q4_K_M.gguf"}}),
        Repo("evil/absolute-GGUF", {"x-Q4_K_M.gguf": gguf},
             listed={"x-Q4_K_M.gguf": {"rfilename": f"{victim}/abs/x-Q4_K_M.gguf"}}),
        Repo("evil/dot-GGUF", {"x-Q4_K_M.gguf": gguf}, listed={"x-Q4_K_M.gguf": {"rfilename": "./x-Q4_K_M.gguf"}}),
        Repo("evil/backslash-GGUF", {"x-Q4_K_M.gguf": gguf},
             listed={"x-Q4_K_M.gguf": {"rfilename": "..\\..\\x-Q4_K_M.gguf"}}),
        Repo("evil/commit-GGUF", {"x-Q4_K_M.gguf": gguf}, listed_commit=f"{up}{victim.relative_to('/')}"),
        Repo("evil/sha256-GGUF", {"x-Q4_K_M.gguf": gguf},
             listed={"x-Q4_K_M.gguf": {"sha256": f"{up}{victim.relative_to('/')}/important"}}),
        Repo("evil/blobid", {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"x" * 100},
             listed={"config.json": {"blobId": f"{up}{victim.relative_to('/')}/config"}}),
    ]
    return repos
