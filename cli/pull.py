"""`mamba-cli pull REPO[:QUANT]`: download a model into the local Hub cache, resumable and verified."""

from __future__ import annotations

import typer


def pull(
    model: str = typer.Argument(..., help="Alias, owner/repo, or owner/repo:QUANT for a GGUF repo."),
    revision: str = typer.Option(None, "--revision", "-r", help="Branch, tag or commit (default: main)."),
    token: str = typer.Option(None, "--token", help="Hub token for gated or private repos (default: HF_TOKEN "
                              "or the stored login)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and total size; download nothing."),
) -> None:
    """Download a model's files (config, tokenizer, weights) into the store; an interrupted pull resumes."""
    from rich.console import Console

    from runtime import hub

    out = Console(highlight=False)
    ref = hub.parse_ref(model)
    if hub.offline() and not dry_run:
        out.print(f"{ref} is in the store (offline): {hub.pull(ref, revision, token)}")
        return
    plan = hub.plan_pull(ref, revision, token)
    if dry_run:
        _print_plan(out, plan)
        return
    path = hub.download(plan, token, out)
    out.print(f"pulled {ref} @ {plan.commit[:12]} ({hub.format_size(plan.total)}) -> {path}", soft_wrap=True)


def _print_plan(out, plan) -> None:
    from rich.table import Table

    from runtime import hub

    blobs = hub.repo_dir(plan.ref.repo) / "blobs"
    table = Table(title=f"{plan.ref} @ {plan.commit[:12]} ({plan.selection.kind})", title_justify="left")
    for col, justify in (("file", "left"), ("size", "right"), ("status", "left")):
        table.add_column(col, justify=justify)
    need = 0
    for f in plan.files:
        partial = blobs / f"{f.etag}.incomplete"
        if (blobs / f.etag).is_file():
            status = "in store"
        elif partial.is_file():
            have = partial.stat().st_size
            status = f"partial, {hub.format_size(have)} kept"
            need += f.size - have
        else:
            status = "to download"
            need += f.size
        table.add_row(f.name, hub.format_size(f.size), status)
    out.print(table)
    out.print(f"total {hub.format_size(plan.total)} in {len(plan.files)} files, "
              f"{hub.format_size(need)} to download into {plan.snapshot}", soft_wrap=True)
