"""`mamba-cli run MODEL [PROMPT]`: one-shot generation streamed to stdout."""

from __future__ import annotations

import typer


def run(model: str = typer.Argument(..., help="Model folder, .gguf file, repo id or alias."),
        prompt: str = typer.Argument(None, help="Prompt text; '-' or piped stdin reads it from stdin.")) -> None:
    """Generate a reply to PROMPT and stream it."""
    raise NotImplementedError
