"""The local model store and `pull`: aliases, file selection, resumable verified downloads, resolution.

Files live in the standard Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub), so huggingface_hub, transformers and llama.cpp's tools share what mamba-cli
pulls, and the other way round:

    models--{owner}--{name}/
        blobs/{etag}                  file contents; etag = sha256 for LFS files, git blob sha1 otherwise
        blobs/{etag}.incomplete       a partial download, continued with an HTTP Range request
        snapshots/{commit}/{file}     relative symlinks into blobs/
        refs/{branch or tag}          the commit the revision pointed at; written once a pull completed

    parse_ref(source)             alias | owner/repo, with an optional :QUANT tag for GGUF repos
    select_files(names, ...)      which files of a repo listing a model needs (never pickle, never blind)
    plan_pull(ref, rev, token)    model_info -> Plan (files, sizes, hashes, commit); the only listing call
    download(plan, token, ...)    Range-resumable, sha256-verified, locked per blob, rich progress
    resolve_model(source)         what load_model calls: the cached snapshot, else a pull (unless offline)
    store_entries(), describe(), remove_entries()    list / show / rm

huggingface_hub gives the metadata (model_info, hf_hub_url, headers, typed errors); the bytes are moved
here because its downloads restart from zero when the process dies.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import MambaCliError, ModelFormatError, ResourceError

DEFAULT_QUANT = "Q4_K_M"
RETRIES = 5  # transfer attempts per file within one run (dropped connections, timeouts)
CHUNK = 1 << 20

# ---------------------------------------------------------------------------------------------- aliases


@dataclass(frozen=True)
class Alias:
    """A short name for a repo; `gguf`, when set, is a community 4-bit repo: the better CPU default."""

    name: str
    repo: str
    gguf: str | None = None


ALIASES: dict[str, Alias] = {a.name: a for a in [
    Alias("mistral-7b-instruct", "mistralai/Mistral-7B-Instruct-v0.3",
          "bartowski/Mistral-7B-Instruct-v0.3-GGUF"),
    Alias("mistral-7b-v0.1", "mistralai/Mistral-7B-v0.1", "TheBloke/Mistral-7B-v0.1-GGUF"),
    Alias("mixtral-8x7b-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1",
          "TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF"),
    Alias("codestral-mamba", "mistralai/Mamba-Codestral-7B-v0.1"),
    Alias("mamba-130m", "state-spaces/mamba-130m-hf"),
    Alias("mamba-370m", "state-spaces/mamba-370m-hf"),
    Alias("mamba-790m", "state-spaces/mamba-790m-hf"),
    Alias("mamba-1.4b", "state-spaces/mamba-1.4b-hf"),
    Alias("mamba-2.8b", "state-spaces/mamba-2.8b-hf"),
    Alias("falcon-mamba-7b", "tiiuae/falcon-mamba-7b", "tiiuae/falcon-mamba-7b-Q4_K_M-GGUF"),
    Alias("falcon-mamba-7b-instruct", "tiiuae/falcon-mamba-7b-instruct",
          "tiiuae/falcon-mamba-7b-instruct-Q4_K_M-GGUF"),
    Alias("jamba-reasoning-3b", "ai21labs/AI21-Jamba-Reasoning-3B", "ai21labs/AI21-Jamba-Reasoning-3B-GGUF"),
    Alias("jamba-mini", "ai21labs/AI21-Jamba-Mini-1.7"),
    Alias("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
          "bartowski/SmolLM2-135M-Instruct-GGUF"),
]}

REPO_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelRef:
    """What to pull: a repo id and, for GGUF repos, a quant tag (upper case)."""

    repo: str
    quant: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant else self.repo


def parse_ref(source: str) -> ModelRef:
    """`alias[:QUANT]` or `owner/repo[:QUANT]`; an alias with a GGUF repo defaults to its Q4_K_M file."""
    name, _, tag = source.strip().partition(":")
    quant = tag.strip().upper() or None
    alias = ALIASES.get(name.lower())
    if alias is not None:
        if alias.gguf:
            return ModelRef(alias.gguf, quant or DEFAULT_QUANT, alias.name)
        return ModelRef(alias.repo, quant, alias.name)
    if not REPO_RE.fullmatch(name) or ".." in name:
        raise MambaCliError(f"{source!r} is not a file, a known alias (see `mamba-cli aliases`) "
                            "or a Hub repo id like owner/name")
    return ModelRef(name, quant)


# ---------------------------------------------------------------------------------------- environment


def cache_dir() -> Path:
    """The Hub cache, read from the environment at call time (HF_HUB_CACHE > HF_HOME/hub > ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def repo_dir(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def repo_of_dir(folder: Path) -> str:
    return folder.name.removeprefix("models--").replace("--", "/", 1)


# ------------------------------------------------------------------------------------------ selection

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json",
                   "merges.txt", "tekken.json")
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
QUANT_RE = re.compile(r"(?:I?Q\d+(?:_[A-Z0-9]+)*|TQ\d_\d|B?F16|F32|FP16)", re.IGNORECASE)


def gguf_quant(name: str) -> str | None:
    """The quant tag in a GGUF file name: `Mistral-7B-Instruct-v0.3-Q4_K_M.gguf` -> Q4_K_M."""
    stem = SPLIT_RE.sub("", Path(name).name)
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    for token in reversed(re.split(r"[-.]", stem)):
        if QUANT_RE.fullmatch(token):
            return token.upper()
    return None


def gguf_variants(names: list[str]) -> dict[str, list[str]]:
    """quant tag -> its file(s): all parts of a split GGUF, in order; incomplete splits are skipped."""
    groups: dict[tuple[str, str], dict[int, str]] = {}  # (quant, name without -0000k-of-0000n) -> parts
    counts: dict[tuple[str, str], int] = {}
    for n in sorted(names):
        base = Path(n).name.lower()
        quant = gguf_quant(n)
        if not base.endswith(".gguf") or base.startswith("mmproj") or quant is None:
            continue
        m = SPLIT_RE.search(n)
        key = (quant, SPLIT_RE.sub("", n))
        groups.setdefault(key, {})[int(m.group(1)) if m else 1] = n
        counts[key] = int(m.group(2)) if m else 1
    out: dict[str, list[str]] = {}
    for (quant, base), parts in groups.items():
        if sorted(parts) == list(range(1, counts[quant, base] + 1)) and quant not in out:
            out[quant] = [parts[i] for i in sorted(parts)]
    return out


def _default_quant(variants: dict[str, list[str]]) -> str:
    """Q4_K_M, or the only quant a repo has."""
    return next(iter(variants)) if len(variants) == 1 else DEFAULT_QUANT


@dataclass
class Selection:
    """The files a model needs; `target` is what load_model opens ("" = the snapshot folder)."""

    kind: str  # "hf" | "mistral" | "gguf"
    files: list[str]
    target: str = ""
    quant: str | None = None


def select_files(names: list[str], quant: str | None, repo: str) -> Selection:
    """Pick a model's files from a repo listing: config, tokenizer, generation config and the weights."""
    top = [n for n in names if "/" not in n]
    ggufs = gguf_variants(names)
    safetensors = [n for n in top if n.endswith(".safetensors")]
    if quant is None and not safetensors and ggufs:
        quant = _default_quant(ggufs)
    if quant is not None:
        if not ggufs:
            raise MambaCliError(f"{repo} has no GGUF files; drop the :{quant} tag to pull its safetensors "
                                "weights")
        if quant not in ggufs:
            raise MambaCliError(f"{repo} has no {quant} GGUF file; available: {', '.join(sorted(ggufs))} "
                                f"(pull one with {repo}:TAG)")
        return Selection("gguf", ggufs[quant], ggufs[quant][0], quant)
    if not safetensors:
        pickles = [n for n in top if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ModelFormatError(f"{repo} has only pickle weights ({pickles[0]}), which mamba-cli never "
                                   "loads; use a safetensors or GGUF version of this model")
        raise ModelFormatError(f"{repo} has no safetensors or GGUF weights")
    tokenizer = [n for n in top if n in TOKENIZER_FILES or n.startswith("tokenizer.model")]
    transformers = [n for n in safetensors if not n.startswith("consolidated")]
    if transformers and "config.json" in top:
        index = [n for n in top if n.endswith(".safetensors.index.json") and not n.startswith("consolidated")]
        meta = [n for n in CONFIG_FILES if n in top]
        return Selection("hf", meta + tokenizer + index + transformers)
    consolidated = [n for n in safetensors if n.startswith("consolidated")]
    if consolidated and "params.json" in top:
        return Selection("mistral", ["params.json"] + tokenizer + consolidated)
    raise ModelFormatError(f"{repo} has safetensors weights but no config.json (or params.json with "
                           "consolidated.safetensors)")


# ------------------------------------------------------------------------------------------ hub calls


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
    def snapshot(self) -> Path:
        return repo_dir(self.ref.repo) / "snapshots" / self.commit

    @property
    def target(self) -> Path:
        return self.snapshot / self.selection.target if self.selection.target else self.snapshot


def _hub_error(e: BaseException, repo: str, revision: str | None, token: str | None) -> BaseException:
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
    try:
        info = HfApi(endpoint=endpoint(), token=token).model_info(ref.repo, revision=revision,
                                                                 files_metadata=True)
    except Exception as e:
        raise _hub_error(e, ref.repo, revision, token) from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    selection = select_files(list(siblings), ref.quant, ref.repo)
    files = []
    for name in selection.files:
        s = siblings[name]
        if s.blob_id is None or s.size is None:
            raise MambaCliError(f"{ref.repo}: the Hub listing gives no size or hash for {name}; cannot "
                                "verify it")
        sha = s.lfs.sha256 if s.lfs else None
        files.append(RemoteFile(name, int(s.lfs.size if s.lfs else s.size), sha or s.blob_id, sha))
    return Plan(ref, revision or "main", info.sha, selection, files)


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


class _Bars:
    """rich bars: one per file and a total (bytes, rate, ETA); silent unless the console is a terminal."""

    def __init__(self, console, total: int, done: int):
        self.progress = None
        if console is None or not console.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console)
        self.total = self.progress.add_task("[bold]total", total=total, completed=done)

    def __enter__(self) -> _Bars:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def start(self, name: str, size: int, done: int) -> None:
        if self.progress:
            self.task = self.progress.add_task(name, total=size, completed=done)

    def advance(self, n: int) -> None:
        if self.progress:
            self.progress.advance(self.task, n)
            self.progress.advance(self.total, n)

    def restart(self, lost: int) -> None:
        if self.progress:
            self.progress.update(self.task, completed=0)
            self.progress.advance(self.total, -lost)


def _partial(blobs: Path, f: RemoteFile) -> Path:
    return blobs / f"{f.etag}.incomplete"


def download(plan: Plan, token: str | None = None, console=None) -> Path:
    """Fetch what the store lacks, verify it, link the snapshot, record the ref; return plan.target."""
    folder = repo_dir(plan.ref.repo)
    blobs = folder / "blobs"
    todo = [f for f in plan.files if not (blobs / f.etag).is_file()]
    have = {f.etag: _partial(blobs, f).stat().st_size for f in todo if _partial(blobs, f).is_file()}
    total = sum(f.size for f in todo)
    done = sum(min(have.get(f.etag, 0), f.size) for f in todo)
    check_disk_space(total - done, blobs)
    blobs.mkdir(parents=True, exist_ok=True)
    with _Bars(console, total, done) as bars:
        for f in todo:
            _fetch(plan, f, blobs, token, bars)
    for f in plan.files:
        _link(plan.snapshot / f.name, blobs / f.etag)
    if plan.revision != plan.commit:
        from runtime.fileio import atomic_write_text

        atomic_write_text(folder / "refs" / plan.revision, plan.commit)
    return plan.target


def _fetch(plan: Plan, f: RemoteFile, blobs: Path, token: str | None, bars: _Bars) -> None:
    """Download one blob into blobs/{etag}.incomplete (resuming it), verify, rename into place."""
    from huggingface_hub.utils import WeakFileLock

    lock = cache_dir() / ".locks" / repo_dir(plan.ref.repo).name / f"{f.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        blob, part = blobs / f.etag, _partial(blobs, f)
        if blob.is_file():  # another process finished it while we waited
            return
        if part.is_file() and part.stat().st_size > f.size:
            part.unlink()
        digest = hashlib.sha256() if f.sha256 else hashlib.sha1(b"blob %d\0" % f.size)
        if part.is_file():
            with open(part, "rb") as r:
                for chunk in iter(lambda: r.read(CHUNK), b""):
                    digest.update(chunk)
        with open(part, "ab", buffering=0) as out:
            done = out.tell()
            bars.start(f.name, f.size, done)
            attempt = 0
            while done < f.size:
                try:
                    done, digest = _transfer(plan, f, out, done, digest, token, bars)
                except Exception as e:
                    if not _is_transport(e):
                        err = _hub_error(e, plan.ref.repo, plan.commit, token)
                        if err is e:
                            raise
                        raise err from None
                    attempt += 1
                    if attempt >= RETRIES:
                        raise MambaCliError(f"{f.name}: download failed {RETRIES} times "
                                            f"({type(e).__name__}: {e}); {format_size(done)} of "
                                            f"{format_size(f.size)} kept, run the pull again to "
                                            "resume") from None
                    time.sleep(min(0.25 * 2 ** attempt, 4.0))
                    done = out.tell()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != f.etag:
            part.unlink()
            kind = "sha256" if f.sha256 else "git sha1"
            raise MambaCliError(f"{plan.ref.repo}/{f.name}: {kind} mismatch (expected {f.etag[:16]}…, got "
                                f"{got[:16]}…); the corrupt download was deleted, run the pull again")
        os.replace(part, blob)


def _is_transport(e: BaseException) -> bool:
    import httpx2

    return isinstance(e, httpx2.TransportError)


def _transfer(plan: Plan, f: RemoteFile, out, done: int, digest, token: str | None, bars: _Bars):
    """One GET from byte `done` (Range) to the end or until the connection drops; returns (done, digest)."""
    import httpx2
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(plan.ref.repo, f.name, revision=plan.commit, endpoint=endpoint())
    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"
    if done:
        headers["Range"] = f"bytes={done}-"
    timeout = httpx2.Timeout(30.0, read=60.0)
    with get_session().stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as r:
        if r.status_code >= 400:
            r.read()
            hf_raise_for_status(r)
        if done and r.status_code != 206:  # the server ignored Range: start over
            out.truncate(0)
            bars.restart(done)
            done, digest = 0, hashlib.sha256() if f.sha256 else hashlib.sha1(b"blob %d\0" % f.size)
        elif done and not r.headers.get("Content-Range", "").startswith(f"bytes {done}-"):
            raise MambaCliError(f"{f.name}: the server answered Range bytes={done}- with "
                                f"{r.headers.get('Content-Range')!r}; delete {out.name} and pull again")
        for chunk in r.iter_bytes():
            if done + len(chunk) > f.size:
                out.truncate(0)
                raise MambaCliError(f"{f.name}: the server sent more than the {f.size} bytes listed; "
                                    "partial data deleted, run the pull again")
            try:
                out.write(chunk)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise MambaCliError(f"disk full while downloading {f.name} into {out.name}; "
                                        f"{format_size(done)} kept, free space and run the pull again to "
                                        "resume") from None
                raise
            digest.update(chunk)
            done += len(chunk)
            bars.advance(len(chunk))
    return done, digest


def _link(link: Path, blob: Path) -> None:
    """snapshots/{commit}/{name} -> ../../blobs/{etag} (relative), as huggingface_hub lays it out."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.resolve() == blob.resolve():
            return
        link.unlink()
    try:
        os.symlink(os.path.relpath(blob, link.parent), link)
    except OSError:  # no symlinks (some Windows setups): a copy, as huggingface_hub does
        shutil.copyfile(blob, link)


# ----------------------------------------------------------------------------------------- resolution


def _read_ref(folder: Path, revision: str) -> str | None:
    if (folder / "snapshots" / revision).is_dir():
        return revision
    ref = folder / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def _usable_folder(snap: Path) -> bool:
    """A snapshot load_model can open: a config and all its safetensors weights are present."""
    from runtime.weights import safetensors_files

    if not snap.is_dir() or not ((snap / "config.json").is_file() or (snap / "params.json").is_file()):
        return False
    try:
        safetensors_files(snap)
    except ModelFormatError:
        return False
    return True


def _snapshot_files(snap: Path) -> list[str]:
    return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())


def find_local(ref: ModelRef, revision: str | None = None) -> Path | None:
    """The cached model for `ref` at `revision` (default main), or None; never touches the network."""
    folder = repo_dir(ref.repo)
    commit = _read_ref(folder, revision or "main")
    if commit is None:
        return None
    snap = folder / "snapshots" / commit
    if not snap.is_dir():
        return None
    variants = gguf_variants(_snapshot_files(snap))
    if ref.quant is None and _usable_folder(snap):
        return snap
    quant = ref.quant or _default_quant(variants)
    parts = variants.get(quant)
    if parts and all((snap / p).is_file() for p in parts):
        return snap / parts[0]
    return None


def pull(source: str | ModelRef, revision: str | None = None, token: str | None = None, console=None) -> Path:
    """Pull a model into the store (only what is missing) and return the path load_model opens."""
    ref = parse_ref(source) if isinstance(source, str) else source
    if offline():
        local = find_local(ref, revision)
        if local is not None:
            return local
        raise MambaCliError(f"{ref} is not in the local store and HF_HUB_OFFLINE=1 is set; unset it and run "
                            f"`mamba-cli pull {ref}`")
    return download(plan_pull(ref, revision, token), token, console)


def resolve_model(source: str, revision: str | None = None) -> Path:
    """Alias / repo id / repo:QUANT -> a local folder or .gguf; pulls on first use unless HF_HUB_OFFLINE=1."""
    ref = parse_ref(source)
    local = find_local(ref, revision)
    if local is not None:
        return local
    if offline():
        raise MambaCliError(f"{source} is not in the local store and HF_HUB_OFFLINE=1 is set; run "
                            f"`mamba-cli pull {source}` with network access first")
    from rich.console import Console

    return pull(ref, revision, console=Console(stderr=True))


# -------------------------------------------------------------------------------------------- store


@dataclass
class StoreEntry:
    """One loadable model in the store: a snapshot folder, or one GGUF quant (all its parts) in a snapshot."""

    repo: str
    commit: str
    refs: list[str]
    kind: str  # "hf" | "mistral" | "gguf"
    path: Path  # what load_model opens
    files: list[Path] = field(default_factory=list)
    quant: str | None = None

    @property
    def name(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant else self.repo

    @property
    def alias(self) -> str | None:
        """The alias that resolves to this entry, if any."""
        for a in ALIASES.values():
            if (a.gguf or a.repo) == self.repo and self.quant == (DEFAULT_QUANT if a.gguf else None):
                return a.name
        return None

    def size(self) -> int:
        seen, total = set(), 0
        for p in self.files:
            real = p.resolve()
            if real not in seen and real.is_file():
                seen.add(real)
                total += real.stat().st_size
        return total


def _refs(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    refs = folder / "refs"
    for p in sorted(refs.rglob("*")) if refs.is_dir() else []:
        if p.is_file():
            out.setdefault(p.read_text().strip(), []).append(p.relative_to(refs).as_posix())
    return out


def store_entries(repo: str | None = None) -> list[StoreEntry]:
    """Every loadable model in the store (optionally of one repo), newest snapshot first within a repo."""
    folders = [repo_dir(repo)] if repo else sorted(cache_dir().glob("models--*"))
    entries = []
    for folder in folders:
        snaps = folder / "snapshots"
        if not snaps.is_dir():
            continue
        refs = _refs(folder)
        for snap in sorted(snaps.iterdir(), key=lambda p: -p.stat().st_mtime):
            names = _snapshot_files(snap)
            variants = gguf_variants(names)
            gguf_names = {n for parts in variants.values() for n in parts}
            for quant, parts in sorted(variants.items()):
                entries.append(StoreEntry(repo_of_dir(folder), snap.name, refs.get(snap.name, []), "gguf",
                                          snap / parts[0], [snap / p for p in parts], quant))
            if _usable_folder(snap):
                kind = "hf" if (snap / "config.json").is_file() else "mistral"
                others = [snap / n for n in names if n not in gguf_names]
                entries.append(StoreEntry(repo_of_dir(folder), snap.name, refs.get(snap.name, []), kind, snap,
                                          others))
    return entries


def find_entries(source: str, revision: str | None = None) -> list[StoreEntry]:
    """Store entries matching an alias, `owner/repo` (all of its models) or `owner/repo:QUANT`; with
    `revision` (branch, tag or commit), only that snapshot's."""
    ref = parse_ref(source)
    commit = _read_ref(repo_dir(ref.repo), revision) if revision else None
    return [e for e in store_entries(ref.repo) if (ref.quant is None or e.quant == ref.quant)
            and (revision is None or e.commit == commit)]


def _safetensors_params(files: list[Path]) -> tuple[int, str]:
    """(parameter count, dominant dtype) from the safetensors headers alone."""
    count, by_dtype = 0, {}
    for p in files:
        with open(p, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in info["shape"]:
                n *= int(d)
            count += n
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
    return count, max(by_dtype, key=by_dtype.get) if by_dtype else "?"


def describe(entry: StoreEntry) -> dict:
    """What list/show print: architecture, parameters, format, context length, chat template, files."""
    snap = repo_dir(entry.repo) / "snapshots" / entry.commit
    info: dict = {"name": entry.name, "alias": entry.alias, "path": str(entry.path), "commit": entry.commit,
                  "refs": entry.refs, "size": entry.size(),
                  "files": [(p.relative_to(snap).as_posix(), p.stat().st_size)
                            for p in entry.files if p.exists()]}
    if entry.kind == "gguf":
        info.update(_describe_gguf(entry))
    else:
        info.update(_describe_folder(entry))
    return info


def _describe_folder(entry: StoreEntry) -> dict:
    from runtime.weights import read_config, safetensors_files

    cfg, cfg_path = read_config(entry.path)
    params, dtype = _safetensors_params(safetensors_files(entry.path))
    if cfg_path.name == "params.json":
        arch, ctx = "mamba2 (params.json)", "unlimited (recurrent state)"
        hidden, layers, vocab = cfg.get("dim"), cfg.get("n_layers"), cfg.get("vocab_size")
    else:
        arch = str(cfg.get("model_type", "?"))
        ctx = cfg.get("max_position_embeddings")
        if arch in ("mamba", "falcon_mamba", "mamba2"):
            ctx = "unlimited (recurrent state)"
        hidden, layers, vocab = cfg.get("hidden_size"), cfg.get("num_hidden_layers"), cfg.get("vocab_size")
    tok_cfg = entry.path / "tokenizer_config.json"
    template = (entry.path / "chat_template.jinja").is_file() or (
        tok_cfg.is_file() and bool(json.loads(tok_cfg.read_text(encoding="utf-8")).get("chat_template")))
    return {"architecture": arch, "parameters": params, "format": f"safetensors {dtype}", "quant": None,
            "context_length": ctx, "hidden_size": hidden, "layers": layers, "vocab_size": vocab,
            "chat_template": template, "window": cfg.get("sliding_window")}


def _describe_gguf(entry: StoreEntry) -> dict:
    from gguf import GGUFReader

    def field_value(reader, key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    params, arch, ctx, template, hidden, layers, vocab = 0, "?", None, False, None, None, None
    try:
        for i, part in enumerate(entry.files):
            reader = GGUFReader(part)
            params += sum(int(t.n_elements) for t in reader.tensors)
            if i == 0:
                arch = field_value(reader, "general.architecture") or "?"
                ctx = field_value(reader, f"{arch}.context_length")
                hidden = field_value(reader, f"{arch}.embedding_length")
                layers = field_value(reader, f"{arch}.block_count")
                tokens = reader.fields.get("tokenizer.ggml.tokens")
                vocab = len(tokens.data) if tokens is not None else None
                template = "tokenizer.chat_template" in reader.fields
    except (ValueError, OSError, KeyError) as e:
        raise ModelFormatError(f"{entry.path}: not a readable GGUF file ({e})") from None
    return {"architecture": arch, "parameters": params, "format": f"gguf {entry.quant}", "quant": entry.quant,
            "context_length": ctx, "hidden_size": hidden, "layers": layers, "vocab_size": vocab,
            "chat_template": template, "window": None}


@dataclass
class Removal:
    links: list[Path]
    blobs: list[Path]  # blobs no remaining snapshot file uses

    @property
    def freed(self) -> int:
        return sum(b.stat().st_size for b in self.blobs if b.is_file())


def plan_removal(entries: list[StoreEntry]) -> Removal:
    """The snapshot files of `entries` and the blobs only they use (other snapshots keep theirs)."""
    links = {p for e in entries for p in e.files}
    blobs: set[Path] = set()
    for folder in {repo_dir(e.repo) for e in entries}:
        kept: set[Path] = set()
        for p in (folder / "snapshots").rglob("*"):
            if (p.is_file() or p.is_symlink()) and p not in links:
                kept.add(p.resolve())
        own = (folder / "blobs").resolve()
        blobs |= {p.resolve() for p in links
                  if p.is_symlink() and p.resolve().parent == own and p.resolve() not in kept}
    return Removal(sorted(links), sorted(blobs))


def remove_entries(removal: Removal) -> int:
    """Delete the links and freed blobs, then empty snapshots, dangling refs and empty repo folders."""
    freed = removal.freed
    folders = set()
    for b in removal.blobs:
        b.unlink(missing_ok=True)
    for p in removal.links:
        folders.add(next(q for q in p.parents if q.name.startswith("models--")))
        p.unlink(missing_ok=True)
    for folder in folders:
        snaps = folder / "snapshots"
        for d in sorted((d for d in snaps.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        remaining = {d.name for d in snaps.iterdir()} if snaps.is_dir() else set()
        refs = folder / "refs"
        for r in list(refs.rglob("*")) if refs.is_dir() else []:
            if r.is_file() and r.read_text().strip() not in remaining:
                r.unlink()
        if not remaining:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(cache_dir() / ".locks" / folder.name, ignore_errors=True)
    return freed

