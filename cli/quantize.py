"""`mamba-cli quantize MODEL --type q4_k_m [-o FILE]`: write a llama.cpp-compatible GGUF, then report quality.

The tensors are read from the source's own files (safetensors, or the .gguf being requantized), typed
by quant/recipe.py, packed by quant/formats.py and written by quant/gguf_out.py (temp file, re-read,
fsync, rename), with progress on stderr (a bar in a terminal, plain lines in a log). The report: size
before and after, tensors per type, and, unless --no-eval, the perplexity of the original and the
quantized model on a text (built in, or --eval FILE; --eval-tokens N keeps its first N tokens) and
the mean KL divergence of their next-token distributions (runtime/evaluate.py), the two models
loaded one after the other.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import typer
from rich.table import Table

from cli.common import DEVICE_OPT, MODEL_ARG, THREADS_OPT, Steps, err, load, peak_memory, resolve
from quant import native
from quant.recipe import QUANT_TYPES
from runtime.device import set_threads
from runtime.errors import MambaCliError
from runtime.evaluate import DEFAULT_CTX, compare_to, eval_ids, read_text, reference, windows


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def announce_native_build(qtype: str) -> None:
    """The native packers' one-time build (~30 s), announced; the float types and q8_0 have no K-quant tensor."""
    if qtype in ("f32", "f16", "q8_0") or native.built():
        return
    err.print("[dim]building mamba-cli's native kernels for this CPU (once per machine and torch version)[/]")
    with err.status("compiling quant/kernels/*.cpp (~30 s)…", spinner="dots"):
        why = native.load()
    if why:
        err.print(f"[dim]{why}; packing with the (slower) torch port[/]")


def write_quantized(source: Path, output: Path, qtype: str) -> tuple[list, list[str], int]:
    """Quantize a local model (folder or .gguf) to `output` with progress on stderr; returns (tensors
    written, warnings, source bytes)."""
    # not at module top: the writer imports the gguf package (~0.8 s, measured), which every command's
    # start (`mamba-cli --help` too) would pay
    from quant.gguf_out import plan_from_source, write_gguf

    announce_native_build(qtype)
    with err.status(f"reading {source.name}…", spinner="dots"):
        plan = plan_from_source(source)
    if output.resolve() == plan.path.resolve():
        raise MambaCliError(f"{output}: the output would overwrite the source")
    with Steps(err, f"quantizing to {qtype}", "weights") as steps:
        def progress(written, done: int, total: int) -> None:
            steps.update(done, total, f"{written.name:<32} {written.ggml_type.name:<5}")

        written, warnings = write_gguf(plan, output, qtype, progress)
    return written, warnings, plan.source_bytes


def quantize(
    model: str = MODEL_ARG,
    qtype: str = typer.Option("q4_k_m", "--type", "-t", help=f"One of {', '.join(QUANT_TYPES)}."),
    output: Path = typer.Option(None, "--output", "-o", help="Output .gguf (default: ./<model>-<TYPE>.gguf)."),
    force: bool = typer.Option(False, "--force", help="Replace the output file if it exists."),
    eval_file: Path = typer.Option(None, "--eval", help="UTF-8 text for the quality report (default: built in)."),
    eval_tokens: int = typer.Option(None, "--eval-tokens", help="Evaluate on the first N tokens of the text only "
                                    "(default: all of it, ~1,000 tokens for the built-in text)."),
    ctx: int = typer.Option(DEFAULT_CTX, "--ctx", help="Window length of the quality report's evaluation."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the quality report."),
    device: str = DEVICE_OPT,
    threads: int = THREADS_OPT,
) -> None:
    """Quantize MODEL (folder, .gguf, repo id or alias) to a GGUF file llama.cpp and mamba-cli can run."""
    qtype = qtype.lower()
    if qtype not in QUANT_TYPES:
        raise MambaCliError(f"--type {qtype}: unknown; use one of {', '.join(QUANT_TYPES)}")
    if eval_tokens is not None and eval_tokens < 2:
        raise MambaCliError("--eval-tokens needs at least 2 tokens")
    set_threads(threads)
    text = None if no_eval else read_text(eval_file)
    source = resolve(model)
    output = output or Path(f"{source.stem if source.is_file() else source.name}-{qtype.upper()}.gguf")
    if output.suffix != ".gguf":
        raise MambaCliError(f"{output}: the output file must end in .gguf")
    if output.exists() and not force:
        raise MambaCliError(f"{output} exists; pass --force to replace it")
    t0 = time.perf_counter()
    written, warnings, source_bytes = write_quantized(source, output, qtype)
    seconds = time.perf_counter() - t0
    size = output.stat().st_size
    err.print(f"wrote [bold]{output}[/] in {seconds:.1f} s ({peak_memory()})")
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
    if text is not None:
        quality_report(model, output, text, eval_file, eval_tokens, ctx, device, seconds)


def quality_report(model: str, output: Path, text: str, eval_file: Path | None, eval_tokens: int | None, ctx: int,
                   device: str, quantize_seconds: float) -> None:
    """Perplexity of the original and the quantized model and their mean KL, one model in memory at a time."""
    base = load(model, device, None, None)
    ids = eval_ids(base, text)
    if eval_tokens is not None:
        ids = ids[:eval_tokens]
    params = sum(p.numel() for p in base.module.parameters())
    n = len(ids) - 1
    size = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"
    err.print(f"quality report: the original ({size} parameters) and the {output.name} model each "
              f"score {n} tokens ({len(windows(len(ids), ctx))} windows of up to {ctx}) on {base.input_device}; "
              "expected time: the ETA below once the first window is done. --eval-tokens N shortens it, "
              "--no-eval skips it.", soft_wrap=True)
    t0 = time.perf_counter()
    with Steps(err, "evaluating the original", "tokens") as steps:
        ref = reference(base, ids, ctx, lambda done, total: steps.update(done, total))
    base_seconds = time.perf_counter() - t0
    del base
    quant = load(str(output), device, None, None)
    with Steps(err, "evaluating the quantized model", "tokens") as steps:
        ppl_base, ppl_quant, kl = compare_to(ref, quant, ids, ctx, lambda done, total: steps.update(done, total))
    if base_seconds > quantize_seconds:
        err.print(f"[dim]the original took {base_seconds:.0f} s to evaluate (the quantize {quantize_seconds:.0f} s); "
                  "--eval-tokens N shortens the report[/]")
    err.print(f"quality on {n} tokens ({'built-in text' if eval_file is None else eval_file}, "
              f"windows of {ctx}): perplexity {ppl_base:.4f} -> {ppl_quant:.4f} "
              f"({(ppl_quant / ppl_base - 1) * 100:+.2f}%), mean KL {kl:.5f} nats/token")
