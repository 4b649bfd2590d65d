"""`pull`'s transfer: list a repo once, fetch what the store lacks, resumable and verified.

    plan_pull(ref, rev, token)       model_info -> Plan (files, sizes, hashes, commit); the only listing call
    pending(plan)                    the files the store lacks, with the bytes a partial download kept
    download(plan, token, progress)  Range-resumable, sha256-verified, locked per blob; reports progress
                                     through a callback (the CLI draws it)

Files land in the standard Hugging Face cache, laid out as huggingface_hub lays it out:

    models--{owner}--{name}/
        blobs/{etag}                  file contents; etag = sha256 for LFS files, git blob sha1 otherwise
        blobs/{etag}.incomplete       a partial download, continued with an HTTP Range request
        snapshots/{commit}/{file}     relative symlinks into blobs/
        refs/{branch or tag}          the commit the revision pointed at; written once a pull completed

huggingface_hub gives the metadata (model_info, hf_hub_url, headers, typed errors); the bytes are moved
here because its downloads restart from zero when the process dies. huggingface_hub and httpx2 are
imported inside the functions that use the network: at module top they add ~1 s (hf_api) to the start
of every command, `mamba-cli --help` included.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import MambaCliError, ResourceError
from runtime.fileio import atomic_write_text
from store.paths import check_commit, check_file_name, check_hash, check_repo_id, check_revision, inside
from store.refs import ModelRef, cache_dir, endpoint, offline, repo_dir
from store.select import Selection, select_files

RETRIES = 5  # transfer attempts per file within one run (dropped connections, timeouts)
CHUNK = 1 << 20

# progress(file name, bytes of it held now, its size): called for every file to fetch before the first
# transfer (with the bytes a partial download kept), then after every chunk; when a server ignores
# Range, the count starts again from 0.
Progress = Callable[[str, int, int], None]


@dataclass
class RemoteFile:
    name: str
    size: int
    etag: str  # blob name in the cache: sha256 (LFS) or git blob sha1
    sha256: str | None  # None: not an LFS file; verified against the git blob sha1 instead


@dataclass
class Plan:
    """A resolved pull: the repo at one commit and the files to fetch."""

    ref: ModelRef
    revision: str
    commit: str
    selection: Selection
    files: list[RemoteFile]

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def blobs(self) -> Path:
        return repo_dir(self.ref.repo) / "blobs"

    @property
    def snapshot(self) -> Path:
        return repo_dir(self.ref.repo) / "snapshots" / self.commit

    @property
    def target(self) -> Path:
        return self.snapshot / self.selection.target if self.selection.target else self.snapshot


def hub_error(e: BaseException, repo: str, revision: str | None, token: str | None) -> BaseException:
    """Turn huggingface_hub / transport exceptions into one-line MambaCliErrors; others pass through."""
    import httpx2
    from huggingface_hub import get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{endpoint()}/{repo}"
    if isinstance(e, GatedRepoError):
        if token or get_token():
            return MambaCliError(f"{repo} is gated and your token has not been granted access; accept its "
                                 f"terms at {page} with the account the token belongs to, then retry")
        return MambaCliError(f"{repo} is gated: accept its terms at {page}, then set HF_TOKEN (or pass "
                             "--token) to a token of that account")
    if isinstance(e, RevisionNotFoundError):
        return MambaCliError(f"{repo} has no revision {revision!r}; give an existing branch, tag or commit "
                             "with --revision")
    if isinstance(e, RepositoryNotFoundError):
        return MambaCliError(f"{repo}: repository not found on {endpoint()}; check the name (a private repo "
                             "needs HF_TOKEN or --token)")
    if isinstance(e, RemoteEntryNotFoundError):
        return MambaCliError(f"{repo}: a listed file is missing at revision {revision}; the repo changed "
                             "during the pull, run it again")
    if isinstance(e, OfflineModeIsEnabled):
        return MambaCliError(f"{repo} is not in the local store and HF_HUB_OFFLINE=1 forbids downloading; "
                             f"unset it and run `mamba-cli pull {repo}`")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        return MambaCliError(f"{repo}: the Hub answered HTTP {status}; try again later")
    if isinstance(e, httpx2.TransportError):
        return MambaCliError(f"cannot reach {endpoint()} ({type(e).__name__}: {e}); check the network, or "
                             "set HF_HUB_OFFLINE=1 to use models already pulled")
    return e


def plan_pull(ref: ModelRef, revision: str | None = None, token: str | None = None) -> Plan:
    """List the repo at `revision` (one model_info call) and select the files to pull."""
    from huggingface_hub import HfApi

    if offline():
        raise MambaCliError(f"HF_HUB_OFFLINE=1 is set: cannot list {ref.repo}; unset it to pull")
    check_repo_id(ref.repo)
    if revision is not None:
        check_revision(ref.repo, revision)
    try:
        info = HfApi(endpoint=endpoint(), token=token).model_info(ref.repo, revision=revision,
                                                                 files_metadata=True)
    except Exception as e:
        raise hub_error(e, ref.repo, revision, token) from None
    # Everything below comes from the listing and becomes a path: checked before any is built.
    commit = check_commit(ref.repo, info.sha)
    siblings = {s.rfilename: s for s in info.siblings or [] if isinstance(s.rfilename, str)}
    selection = select_files(list(siblings), ref.quant, ref.repo)
    files = []
    for name in selection.files:
        check_file_name(ref.repo, name)
        s = siblings[name]
        if s.blob_id is None or s.size is None:
            raise MambaCliError(f"{ref.repo}: the Hub listing gives no size or hash for {name}; cannot "
                                "verify it")
        sha = check_hash(ref.repo, name, s.lfs.sha256, 64) if s.lfs else None
        size = s.lfs.size if s.lfs else s.size
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise MambaCliError(f"{ref.repo}: the Hub listing gives {name} the size {size!r}; cannot verify it")
        files.append(RemoteFile(name, size, sha or check_hash(ref.repo, name, s.blob_id, 40), sha))
    return Plan(ref, revision or "main", commit, selection, files)


# --------------------------------------------------------------------------------------------- download


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_disk_space(need: int, where: Path) -> None:
    """Raise ResourceError when `need` bytes do not fit on the disk holding `where`."""
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ResourceError(f"not enough disk space: {format_size(need)} to download, {format_size(free)} "
                            f"free in {where}; free some space or point HF_HUB_CACHE at another disk")


def _partial(blobs: Path, f: RemoteFile) -> Path:
    return blobs / f"{f.etag}.incomplete"


def pending(plan: Plan) -> list[tuple[RemoteFile, int]]:
    """The plan's files the store lacks, each with the bytes a partial download already kept."""
    out = []
    for f in plan.files:
        if not (plan.blobs / f.etag).is_file():
            part = _partial(plan.blobs, f)
            out.append((f, min(part.stat().st_size, f.size) if part.is_file() else 0))
    return out


def download(plan: Plan, token: str | None = None, progress: Progress | None = None) -> Path:
    """Fetch what the store lacks, verify it, link the snapshot, record the ref; return plan.target."""
    blobs, root = plan.blobs, repo_dir(plan.ref.repo)
    for path in [root, blobs, plan.snapshot, *((plan.snapshot / f.name).parent for f in plan.files)]:
        inside(cache_dir() if path == root else root, path)  # no link in the store may lead writes out
    todo = pending(plan)
    check_disk_space(sum(f.size - have for f, have in todo), blobs)
    blobs.mkdir(parents=True, exist_ok=True)
    inside(root, blobs)
    progress = progress or (lambda _name, _done, _size: None)
    for f, have in todo:
        progress(f.name, have, f.size)
    for f, _ in todo:
        _fetch(plan, f, blobs, token, progress)
    for f in plan.files:
        _link(plan.snapshot / f.name, blobs / f.etag)
    if plan.revision != plan.commit:
        atomic_write_text(inside(root, root / "refs" / plan.revision), plan.commit)
    return plan.target


class _Partial:
    """The running state of one blob's download: bytes in blobs/{etag}.incomplete and their hash, kept
    together so that a transfer which restarts from 0 (the server ignored Range) and then fails leaves
    them consistent for the next attempt."""

    def __init__(self, f: RemoteFile, out) -> None:
        self.f, self.out = f, out
        self.done, self.digest = 0, self._fresh()

    def _fresh(self):
        return hashlib.sha256() if self.f.sha256 else hashlib.sha1(b"blob %d\0" % self.f.size)

    def restart(self) -> None:
        self.out.truncate(0)
        self.out.seek(0)
        self.done, self.digest = 0, self._fresh()

    def append(self, chunk: bytes) -> None:
        """Write a chunk whole and hash it, or raise with the file cut back to the bytes hashed so far."""
        try:
            n = self.out.write(chunk)
        except OSError as e:
            self.out.truncate(self.done)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise MambaCliError(f"disk full while downloading {self.f.name} into {self.out.name}; "
                                    f"{format_size(self.done)} kept, free space and run the pull again to "
                                    "resume") from None
            raise
        if n != len(chunk):
            self.out.truncate(self.done)
            raise MambaCliError(f"{self.f.name}: short write into {self.out.name} ({n} of {len(chunk)} bytes); "
                                f"{format_size(self.done)} kept, check the disk and run the pull again to resume")
        self.digest.update(chunk)
        self.done += n


def _fetch(plan: Plan, f: RemoteFile, blobs: Path, token: str | None, progress: Progress) -> None:
    """Download one blob into blobs/{etag}.incomplete (resuming it), verify, rename into place."""
    from huggingface_hub.utils import WeakFileLock

    lock = cache_dir() / ".locks" / repo_dir(plan.ref.repo).name / f"{f.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        blob, part = blobs / f.etag, _partial(blobs, f)
        for p in (blob, part):  # blobs are never links: one planted there is dropped, never written through
            if p.is_symlink():
                p.unlink()
        if blob.is_file():  # another process finished it while we waited
            return
        if part.is_file() and part.stat().st_size > f.size:
            part.unlink()
        with open(part, "ab", buffering=0) as out:
            state = _Partial(f, out)
            with open(part, "rb") as r:
                for chunk in iter(lambda: r.read(CHUNK), b""):
                    state.digest.update(chunk)
                    state.done += len(chunk)
            progress(f.name, state.done, f.size)
            attempt = 0
            while state.done < f.size:
                try:
                    _transfer(plan, f, state, token, progress)
                except Exception as e:
                    if not _is_transport(e):
                        err = hub_error(e, plan.ref.repo, plan.commit, token)
                        if err is e:
                            raise
                        raise err from None
                    attempt += 1
                    if attempt >= RETRIES:
                        raise MambaCliError(f"{f.name}: download failed {RETRIES} times "
                                            f"({type(e).__name__}: {e}); {format_size(state.done)} of "
                                            f"{format_size(f.size)} kept, run the pull again to "
                                            "resume") from None
                    time.sleep(min(0.25 * 2 ** attempt, 4.0))
            os.fsync(out.fileno())
            got = state.digest.hexdigest()
        if got != f.etag:
            part.unlink()
            kind = "sha256" if f.sha256 else "git sha1"
            raise MambaCliError(f"{plan.ref.repo}/{f.name}: {kind} mismatch (expected {f.etag[:16]}…, got "
                                f"{got[:16]}…); the corrupt download was deleted, run the pull again")
        os.replace(part, blob)


def _is_transport(e: BaseException) -> bool:
    import httpx2

    return isinstance(e, httpx2.TransportError)


def _transfer(plan: Plan, f: RemoteFile, state: _Partial, token: str | None, progress: Progress) -> None:
    """One GET from byte state.done (Range) to the end or until the connection drops; advances state."""
    import httpx2
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(plan.ref.repo, f.name, revision=plan.commit, endpoint=endpoint())
    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"
    if state.done:
        headers["Range"] = f"bytes={state.done}-"
    timeout = httpx2.Timeout(30.0, read=60.0)
    with get_session().stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as r:
        if r.status_code >= 400:
            r.read()
            hf_raise_for_status(r)
        if state.done and r.status_code != 206:  # the server ignored Range: start over
            state.restart()
            progress(f.name, 0, f.size)
        elif state.done and not r.headers.get("Content-Range", "").startswith(f"bytes {state.done}-"):
            raise MambaCliError(f"{f.name}: the server answered Range bytes={state.done}- with "
                                f"{r.headers.get('Content-Range')!r}; {format_size(state.done)} kept in "
                                f"{state.out.name}, run the pull again")
        for chunk in r.iter_bytes():
            if state.done + len(chunk) > f.size:
                state.restart()
                raise MambaCliError(f"{f.name}: the server sent more than the {f.size} bytes listed; "
                                    "partial data deleted, run the pull again")
            state.append(chunk)
            progress(f.name, state.done, f.size)


def _link(link: Path, blob: Path) -> None:
    """snapshots/{commit}/{name} -> ../../blobs/{etag} (relative), as huggingface_hub lays it out."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and os.readlink(link) == os.path.relpath(blob, link.parent):
            return
        if link.is_dir() and not link.is_symlink():
            raise MambaCliError(f"{link} is a folder where the snapshot file belongs; remove it and pull again")
        link.unlink()  # never follows the link: only the store's own entry goes
    try:
        os.symlink(os.path.relpath(blob, link.parent), link)
    except OSError:  # no symlinks (some Windows setups): a copy, as huggingface_hub does
        shutil.copyfile(blob, link)
