"""`mamba-cli pull REPO[:QUANT] [--quantize TYPE]`: download a model into the local Hub cache, resumable and
verified; with --quantize, also make (once) and keep a 4-bit GGUF copy of a safetensors model beside it."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

import store
from cli.common import DownloadBars, stored_quantized


def pull(
    model: str = typer.Argument(..., help="Alias, owner/repo, or owner/repo:QUANT for a GGUF repo."),
    revision: str = typer.Option(None, "--revision", "-r", help="Branch, tag or commit (default: main)."),
    token: str = typer.Option(None, "--token", help="Hub token for gated or private repos (default: HF_TOKEN "
                              "or the stored login)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and total size; download nothing."),
    quantize: str = typer.Option(None, "--quantize", "-q", help="Also make a 4-bit GGUF copy of this type "
                                 "(q4_k_m, q4_0, ...), kept in the store as REPO:TYPE; later runs of REPO:TYPE "
                                 "use it."),
) -> None:
    """Download a model's files (config, tokenizer, weights) into the store; an interrupted pull resumes."""
    out = Console(highlight=False)
    ref = store.parse_ref(model)
    if store.offline() and not dry_run:
        path = store.pull(ref, revision, token)
        out.print(f"{ref} is in the store (offline): {path}", soft_wrap=True)
    else:
        plan = store.plan_pull(ref, revision, token)
        if dry_run:
            _print_plan(out, plan)
            return
        with DownloadBars(out) as bars:
            path = store.download(plan, token, bars)
        out.print(f"pulled {ref} @ {plan.commit[:12]} ({store.format_size(plan.total)}) -> {path}", soft_wrap=True)
    if quantize:
        copy = stored_quantized(path, quantize)
        out.print(f"{ref.repo}:{quantize.upper()} ({store.format_size(copy.stat().st_size)}) -> {copy}", soft_wrap=True)


def _print_plan(out: Console, plan: store.Plan) -> None:
    table = Table(title=f"{plan.ref} @ {plan.commit[:12]} ({plan.selection.kind})", title_justify="left")
    for col, justify in (("file", "left"), ("size", "right"), ("status", "left")):
        table.add_column(col, justify=justify)
    todo = store.pending(plan)
    missing = {f.name: have for f, have in todo}
    for f in plan.files:
        have = missing.get(f.name)
        status = ("in store" if have is None else f"partial, {store.format_size(have)} kept" if have
                  else "to download")
        table.add_row(f.name, store.format_size(f.size), status)
    out.print(table)
    need = sum(f.size - have for f, have in todo)
    out.print(f"total {store.format_size(plan.total)} in {len(plan.files)} files, "
              f"{store.format_size(need)} to download into {plan.snapshot}", soft_wrap=True)
