"""`mamba-cli list | show MODEL | rm MODEL | aliases`: what is in the local store, and the alias table."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

import store
from runtime.errors import MambaCliError


def _console() -> Console:
    """stdout; wide enough when piped that table cells are not cut."""
    out = Console(highlight=False)
    if not out.is_terminal:
        out.width = 240
    return out


def _params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def list_models(verbose: bool = typer.Option(False, "--verbose", "-v", help="Say why an entry is unreadable.")
                ) -> None:
    """List pulled models: name, architecture, parameters, format/quant, size on disk."""
    out = _console()
    entries = store.store_entries()
    if not entries:
        out.print(f"no models in {store.cache_dir()}; pull one with `mamba-cli pull ALIAS` "
                  "(see `mamba-cli aliases`)")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "ALIAS", "ARCH", "PARAMS", "FORMAT", "SIZE", "REVISION"):
        table.add_column(col, justify="right" if col in ("PARAMS", "SIZE") else "left")
    unreadable = []
    for e in entries:
        try:
            d = store.describe(e)
            arch, params, fmt = str(d["architecture"]), _params(d["parameters"]), d["format"]
        except MambaCliError as why:  # describe raises nothing else: one bad entry never stops the list
            arch, params, fmt = "unreadable", "?", e.kind
            unreadable.append((e.name, str(why)))
        rev = ",".join(e.refs) + f"@{e.commit[:8]}" if e.refs else e.commit[:12]
        try:
            size = store.format_size(e.size())
        except OSError:
            size = "?"
        table.add_row(e.name, e.alias or "", arch, params, fmt, size, rev)
    out.print(table)
    if unreadable and verbose:
        for name, why in unreadable:
            out.print(f"{name}: {why}", soft_wrap=True)
    elif unreadable:
        out.print(f"{len(unreadable)} unreadable (run `mamba-cli list -v` for why)")


def show(model: str = typer.Argument(..., help="Alias, owner/repo or owner/repo:QUANT of a pulled model."),
         revision: str = typer.Option(None, "--revision", "-r", help="Branch, tag or commit (default: main).")
         ) -> None:
    """Show a pulled model: config summary, context length, quant, chat template, files."""
    out = _console()
    entry = store.find_entry(model, revision)
    if entry is None:
        raise MambaCliError(f"{model} is not in the local store; pull it with `mamba-cli pull {model}`")
    d = store.describe(entry)
    rows = [("name", d["name"]), ("alias", d["alias"] or "-"), ("path", d["path"]),
            ("revision", ", ".join(d["refs"]) + f" @ {d['commit']}" if d["refs"] else d["commit"]),
            ("architecture", d["architecture"]),
            ("parameters", f"{_params(d['parameters'])} ({d['parameters']:,})"),
            ("format", d["format"]), ("quant", d["quant"] or "none (full precision)"),
            ("context length", d["context_length"] or "-"), ("sliding window", d["window"] or "-"),
            ("hidden size", d["hidden_size"] or "-"), ("layers", d["layers"] or "-"),
            ("vocab size", d["vocab_size"] or "-"), ("chat template", "yes" if d["chat_template"] else "no"),
            ("size on disk", store.format_size(d["size"]))]
    for k, v in rows:
        out.print(f"{k:<15} {v}", soft_wrap=True)
    out.print("files")
    for name, size in d["files"]:
        out.print(f"  {name:<44} {store.format_size(size):>10}", soft_wrap=True)


def rm(model: str = typer.Argument(..., help="Alias, owner/repo (all of its models) or owner/repo:QUANT."),
       revision: str = typer.Option(None, "--revision", "-r", help="Remove only this snapshot (branch, tag "
                                    "or commit); default: every snapshot."),
       yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Remove a pulled model; frees only the blobs no other snapshot in the store uses."""
    out = _console()
    entries = store.find_entries(model, revision)
    if not entries:
        raise MambaCliError(f"{model} is not in the local store (see `mamba-cli list`)")
    removal = store.plan_removal(entries)
    for e in entries:
        out.print(f"{e.name} @ {e.commit[:12]}: {e.path}", soft_wrap=True)
    shared = removal.shared
    note = f" ({shared} files kept: other snapshots use them)" if shared > 0 else ""
    if not yes:
        if not sys.stdin.isatty():
            raise MambaCliError("rm needs confirmation; pass -y to remove without a prompt")
        freeing = store.format_size(removal.freed)
        if not typer.confirm(f"remove {len(entries)} model(s), freeing {freeing}{note}?"):
            out.print("nothing removed")
            raise typer.Exit(1)
    freed = store.remove_entries(removal)
    out.print(f"removed {len(entries)} model(s), freed {store.format_size(freed)}{note}")


def aliases() -> None:
    """List model aliases and the repo each pulls (a GGUF repo where 4-bit is the better CPU default)."""
    table = Table(box=None, pad_edge=False)
    for col in ("ALIAS", "PULLS", "ORIGINAL REPO"):
        table.add_column(col)
    for a in store.ALIASES.values():
        table.add_row(a.name, f"{a.gguf}:{store.DEFAULT_QUANT}" if a.gguf else a.repo, a.repo)
    _console().print(table)
