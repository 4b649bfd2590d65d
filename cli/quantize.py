"""`mamba-cli quantize MODEL --type q4_k_m [-o FILE]`: write a llama.cpp-compatible GGUF, then report quality.

The tensors are read from the source's own files (safetensors, or the .gguf being requantized), typed
by quant/recipe.py, packed by quant/formats.py and written by quant/gguf_out.py (temp file, re-read,
fsync, rename). The report: size before and after, tensors per type, and, unless --no-eval, the
perplexity of the original and the quantized model on a text (built in, or --eval FILE) and the mean
KL divergence of their next-token distributions (runtime/evaluate.py).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.common import DEVICE_OPT, MODEL_ARG, err, load, resolve
from quant.recipe import QUANT_TYPES
from runtime.errors import MambaCliError
from runtime.evaluate import DEFAULT_CTX, compare, eval_ids, read_text


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def quantize(
    model: str = MODEL_ARG,
    qtype: str = typer.Option("q4_k_m", "--type", "-t", help=f"One of {', '.join(QUANT_TYPES)}."),
    output: Path = typer.Option(None, "--output", "-o", help="Output .gguf (default: ./<model>-<TYPE>.gguf)."),
    force: bool = typer.Option(False, "--force", help="Replace the output file if it exists."),
    eval_file: Path = typer.Option(None, "--eval", help="UTF-8 text for the quality report (default: built in)."),
    ctx: int = typer.Option(DEFAULT_CTX, "--ctx", help="Window length of the quality report's evaluation."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the quality report."),
    device: str = DEVICE_OPT,
) -> None:
    """Quantize MODEL (folder, .gguf, repo id or alias) to a GGUF file llama.cpp and mamba-cli can run."""
    # not at module top: the writer imports the gguf package (~0.8 s, measured), which every command's
    # start (`mamba-cli --help` too) would pay
    from quant.gguf_out import plan_from_source, write_gguf

    qtype = qtype.lower()
    if qtype not in QUANT_TYPES:
        raise MambaCliError(f"--type {qtype}: unknown; use one of {', '.join(QUANT_TYPES)}")
    text = None if no_eval else read_text(eval_file)
    source = resolve(model)
    with err.status(f"reading {model}…", spinner="dots"):
        plan = plan_from_source(source)
    output = output or Path(f"{plan.name}-{qtype.upper()}.gguf")
    if output.suffix != ".gguf":
        raise MambaCliError(f"{output}: the output file must end in .gguf")
    if output.exists() and not force:
        raise MambaCliError(f"{output} exists; pass --force to replace it")
    if output.resolve() == plan.path.resolve():
        raise MambaCliError(f"{output}: the output would overwrite the source")
    t0 = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(f"quantizing to {qtype}", total=1)

        def progress(written, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total,
                       description=f"{written.name:<32} {written.ggml_type.name:<5}")

        written, warnings = write_gguf(plan, output, qtype, progress)
    source_bytes = plan.source_bytes
    del plan
    seconds = time.perf_counter() - t0
    size = output.stat().st_size
    err.print(f"wrote [bold]{output}[/] in {seconds:.1f} s")
    for w in warnings:
        err.print(f"[yellow]warning:[/] {w}")
    types = Counter(w.ggml_type.name for w in written)
    table = Table(show_header=True, header_style="bold", box=None)
    table.add_column("size before", justify="right")
    table.add_column("size after", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("tensors by type")
    table.add_row(_size(source_bytes), _size(size), f"{source_bytes / max(size, 1):.2f}x",
                  ", ".join(f"{n} {t}" for t, n in types.most_common()))
    err.print(table)
    if text is None:
        return
    base = load(model, device, None, None)
    quant = load(str(output), device, None, None)
    ids = eval_ids(base, text)
    with err.status(f"evaluating both models on {len(ids)} tokens…", spinner="dots"):
        ppl_base, ppl_quant, kl = compare(base, quant, ids, ctx)
    err.print(f"quality on {len(ids) - 1} tokens ({'built-in text' if eval_file is None else eval_file}, "
              f"windows of {ctx}): perplexity {ppl_base:.4f} -> {ppl_quant:.4f} "
              f"({(ppl_quant / ppl_base - 1) * 100:+.2f}%), mean KL {kl:.5f} nats/token")
