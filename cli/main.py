"""The typer app: registers one module per command and turns errors into one-line messages.

Exit codes: 0 ok, 1 a user-facing error (one line, no traceback unless --debug), 130 Ctrl-C.
"""

from __future__ import annotations

import os
import sys

import click
import typer
from rich.console import Console

from cli import bench, chat, models, perplexity, pull, quantize, run, serve
from runtime.errors import MambaCliError

app = typer.Typer(
    name="mamba-cli",
    help="Pull, quantize and chat with Mamba, Mistral and Jamba models, locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    if debug:
        os.environ["MAMBA_CLI_DEBUG"] = "1"


def _register() -> None:
    app.command("run")(run.run)
    app.command("chat")(chat.chat)
    app.command("pull")(pull.pull)
    app.command("list")(models.list_models)
    app.command("show")(models.show)
    app.command("rm")(models.rm)
    app.command("aliases")(models.aliases)
    app.command("quantize")(quantize.quantize)
    app.command("perplexity")(perplexity.perplexity_cmd)
    app.command("bench")(bench.bench)
    app.command("serve")(serve.serve_cmd)


def main() -> None:
    _register()
    debug = "--debug" in sys.argv or os.environ.get("MAMBA_CLI_DEBUG")
    try:
        rc = app(standalone_mode=False)  # typer returns Exit codes (Ctrl-C: 130) instead of exiting
        if isinstance(rc, int) and rc:
            if rc == 130:
                err.print("[yellow]interrupted[/]")
            sys.exit(rc)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except MambaCliError as e:
        if debug:
            raise
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except Exception as e:  # click usage errors and unexpected failures
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if debug:
            raise
        err.print(f"[red]error:[/] {type(e).__name__}: {e} (run with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
