"""`mamba-cli perplexity MODEL [--file TEXT] [--ctx N]`: perplexity on a text (runtime/evaluate.py),
evaluated in sliding windows of --ctx tokens that overlap by half."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from cli.common import DEVICE_OPT, DTYPE_OPT, GPU_LAYERS_OPT, MODEL_ARG, THREADS_OPT, err, load
from runtime.evaluate import DEFAULT_CTX, eval_ids, perplexity, read_text


def perplexity_cmd(
    model: str = MODEL_ARG,
    file: Path = typer.Option(None, "--file", "-f", help="UTF-8 text to evaluate on (default: a built-in text)."),
    ctx: int = typer.Option(DEFAULT_CTX, "--ctx", "-c", help="Window length in tokens; windows overlap by half."),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    gpu_layers: int = GPU_LAYERS_OPT,
    threads: int = THREADS_OPT,
) -> None:
    """Perplexity of MODEL on a text, evaluated in sliding windows of --ctx tokens."""
    text = read_text(file)
    m = load(model, device, dtype, gpu_layers, threads=threads)
    ids = eval_ids(m, text)
    t0 = time.perf_counter()
    with err.status(f"evaluating {len(ids)} tokens…", spinner="dots"):
        ppl = perplexity(m, ids, ctx)
    seconds = time.perf_counter() - t0
    print(f"perplexity {ppl:.4f}", flush=True)
    err.print(f"[dim]{len(ids) - 1} tokens scored in windows of {ctx}, {seconds:.1f} s "
              f"({(len(ids) - 1) / max(seconds, 1e-9):.0f} tok/s)[/]")
