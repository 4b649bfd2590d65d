"""What the store holds, without the network: find a model, list / describe / remove entries.

    find_local(ref, revision)        the cached folder or .gguf for a reference, or None
    store_entries(), find_entries()  every loadable model in the store (or those matching a reference)
    find_entry(source, revision)     the one entry `show` describes
    describe(entry)                  architecture, parameters, format, context, chat template, files;
                                     read from headers with the runtime's validated readers
    plan_removal(), remove_entries() rm: the snapshot links and the blobs no other snapshot uses
    quantized_path(folder, qtype)    where the stored 4-bit copy of a float model lives: a .gguf beside its
                                     weights (in a snapshot, named after the repo), so list/rm/find_local
                                     see it as that repo's `:QTYPE` variant; fresh_copy(folder, path)
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import ModelFormatError
from runtime.weights import read_config, read_gguf, safetensors_files
from store.refs import ModelRef, alias_of, cache_dir, parse_ref, read_ref, repo_dir, repo_of_dir
from store.select import default_quant, gguf_variants


def usable_folder(snap: Path) -> bool:
    """A snapshot load_model can open: a config and all its safetensors weights are present."""
    if not snap.is_dir() or not ((snap / "config.json").is_file() or (snap / "params.json").is_file()):
        return False
    try:
        safetensors_files(snap)
    except ModelFormatError:
        return False
    return True


def snapshot_files(snap: Path) -> list[str]:
    return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())


def find_local(ref: ModelRef, revision: str | None = None) -> Path | None:
    """The cached model for `ref` at `revision` (default main), or None; never touches the network."""
    folder = repo_dir(ref.repo)
    commit = read_ref(folder, revision or "main")
    if commit is None:
        return None
    snap = folder / "snapshots" / commit
    if not snap.is_dir():
        return None
    variants = gguf_variants(snapshot_files(snap))
    if ref.quant is None and usable_folder(snap):
        return snap
    quant = ref.quant or default_quant(variants)
    parts = variants.get(quant)
    if parts and all((snap / p).is_file() for p in parts):
        return snap / parts[0]
    return None


def quantized_path(folder: Path, qtype: str) -> Path:
    """The stored `qtype` copy of the float model in `folder`: `{name}-{QTYPE}.gguf` beside its weights,
    `name` the repo's for a store snapshot, else the folder's."""
    snaps = folder.parent
    name = folder.name
    if snaps.name == "snapshots" and snaps.parent.name.startswith("models--"):
        name = repo_of_dir(snaps.parent).split("/")[-1]
    return folder / f"{name}-{qtype.upper()}.gguf"


def fresh_copy(folder: Path, path: Path) -> bool:
    """Whether a stored copy exists and is newer than every weights file it was made from."""
    if not path.is_file():
        return False
    made = path.stat().st_mtime
    return all(p.stat().st_mtime <= made for p in safetensors_files(folder))


# ------------------------------------------------------------------------------------------ entries


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
        return alias_of(self.repo, self.quant)

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
            names = snapshot_files(snap)
            variants = gguf_variants(names)
            gguf_names = {n for parts in variants.values() for n in parts}
            for quant, parts in sorted(variants.items()):
                entries.append(StoreEntry(repo_of_dir(folder), snap.name, refs.get(snap.name, []), "gguf",
                                          snap / parts[0], [snap / p for p in parts], quant))
            if usable_folder(snap):
                kind = "hf" if (snap / "config.json").is_file() else "mistral"
                others = [snap / n for n in names if n not in gguf_names]
                entries.append(StoreEntry(repo_of_dir(folder), snap.name, refs.get(snap.name, []), kind, snap,
                                          others))
    return entries


def find_entries(source: str, revision: str | None = None) -> list[StoreEntry]:
    """Store entries matching an alias, `owner/repo` (all of its models) or `owner/repo:QUANT`; with
    `revision` (branch, tag or commit), only that snapshot's."""
    ref = parse_ref(source)
    commit = read_ref(repo_dir(ref.repo), revision) if revision else None
    return [e for e in store_entries(ref.repo) if (ref.quant is None or e.quant == ref.quant)
            and (revision is None or e.commit == commit)]


def find_entry(source: str, revision: str | None = None) -> StoreEntry | None:
    """The entry `show` describes: the one load_model would open for `source` at `revision`, else
    (no revision given) the newest entry matching it; None when the store has none."""
    entries = find_entries(source)
    local = find_local(parse_ref(source), revision)
    for e in entries:
        if e.path == local:
            return e
    return entries[0] if revision is None and entries else None


# ------------------------------------------------------------------------------------------ describe


def _safetensors_params(files: list[Path]) -> tuple[int, str]:
    """(parameter count, dominant dtype) from the safetensors headers alone."""
    count, by_dtype = 0, {}
    for p in files:
        with open(p, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(int(d) for d in info["shape"])
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
    """From the GGUF headers (runtime.weights.read_gguf: validated; data never read); all split parts
    count towards the parameters, the first part's metadata describes the model."""
    parts = [read_gguf(p) for p in entry.files]
    params = sum(math.prod(t.shape) for gf in parts for t in gf.tensors.values())
    meta = parts[0].metadata
    arch = meta.get("general.architecture") or "?"
    tokens = meta.get("tokenizer.ggml.tokens")
    return {"architecture": arch, "parameters": params, "format": f"gguf {entry.quant}", "quant": entry.quant,
            "context_length": meta.get(f"{arch}.context_length"), "hidden_size": meta.get(f"{arch}.embedding_length"),
            "layers": meta.get(f"{arch}.block_count"), "vocab_size": len(tokens) if tokens is not None else None,
            "chat_template": "tokenizer.chat_template" in meta, "window": None}


# ------------------------------------------------------------------------------------------ removal


@dataclass
class Removal:
    links: list[Path]
    blobs: list[Path]  # blobs no remaining snapshot file uses

    @property
    def freed(self) -> int:
        """The freed blobs, and the files that are no link (stored 4-bit copies)."""
        own = [p for p in self.links if p.is_file() and not p.is_symlink()]
        return sum(p.stat().st_size for p in [*self.blobs, *own] if p.is_file())

    @property
    def shared(self) -> int:
        """Blobs the links point at that stay: other snapshots use them."""
        return len({p.resolve() for p in self.links if p.is_symlink()}) - len(self.blobs)


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
