"""`mamba-cli serve MODEL`: an OpenAI- and Mistral-compatible HTTP API with continuous batching
(runtime/server.py over runtime/batch.py); this module parses the options, loads the model and says where."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from cli.common import (
    COMPILE_HELP,
    DEVICE_OPT,
    DTYPE_OPT,
    GPU_LAYERS_OPT,
    MODEL_ARG,
    THREADS_OPT,
    cpu_threads,
    err,
    load,
)
from runtime.server import Limits, bind, serve


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_cmd(
    model: str = MODEL_ARG,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8080, "--port", "-p", help="TCP port (0: any free port; the URL is printed)."),
    api_key: str = typer.Option(None, "--api-key", envvar="MAMBA_CLI_API_KEY",
                                help="Require 'Authorization: Bearer KEY' on /v1/ (also from MAMBA_CLI_API_KEY)."),
    name: str = typer.Option(None, "--name", help="Model id the API reports (default: the MODEL argument's name)."),
    max_seqs: int = typer.Option(8, "--max-seqs", min=1, help="Sequences decoded together in one batch."),
    max_queue: int = typer.Option(32, "--max-queue", min=0, help="Requests waiting for a batch row; more get 429."),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1,
                                   help="Most tokens one reply may ask for (also the default when it names none)."),
    max_body: int = typer.Option(4 * 2**20, "--max-body", min=1024, help="Largest request body, in bytes (413)."),
    keep: int = typer.Option(4, "--keep", min=0, help="Finished conversations kept cached for prefix reuse."),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    gpu_layers: int = GPU_LAYERS_OPT,
    threads: int = THREADS_OPT,
    compile: bool = typer.Option(False, "--compile/--no-compile", help=COMPILE_HELP + " Off by default: batched "
                                 "steps of changing size would compile one graph per batch size."),
) -> None:
    """Serve MODEL over HTTP: OpenAI's and Mistral's chat-completions API, concurrent requests batched."""
    sock = bind(host, port)  # before loading: a busy port fails at once
    try:
        m = load(model, device, dtype, gpu_layers, compile, threads)
        if not is_loopback(host) and not api_key:
            err.print(f"[yellow]warning: listening on {host} without --api-key: anyone who can reach this port "
                      "can use the model[/]")
        bound_host, bound_port = sock.getsockname()[:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        err.print(f"[dim]{Path(m.source).name} ({m.arch}) on {m.input_device}{cpu_threads(m)}, "
                  f"loaded in {m.load_seconds:.1f} s[/]")
        err.print(f"serving at http://{url_host}:{bound_port}/v1 (up to {max_seqs} sequences at once); "
                  "Ctrl-C to stop", highlight=False, soft_wrap=True)
        limits = Limits(max_seqs=max_seqs, max_queue=max_queue, max_body=max_body, max_tokens=max_tokens, keep=keep)
        serve(m, name or Path(model.rstrip("/")).name.removesuffix(".gguf"), sock, limits, api_key)
    finally:
        sock.close()
