"""`mamba-cli run MODEL [PROMPT]`: one-shot generation streamed to stdout."""

from __future__ import annotations

import sys

import typer

from cli.common import (
    COMPILE_HELP,
    DEVICE_OPT,
    DTYPE_OPT,
    GPU_LAYERS_OPT,
    MODEL_ARG,
    QUANTIZE_OPT,
    THREADS_OPT,
    Sampling,
    cpu_threads,
    decode_path,
    err,
    load,
    quant_path,
    stats_line,
)
from runtime.chat import chat_prompt
from runtime.generate import Stats, stream_text


def run(
    model: str = MODEL_ARG,
    prompt: str = typer.Argument(None, help="Prompt text; '-' (or no prompt with piped stdin) reads stdin."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    system: str = typer.Option(None, "--system", "-s", help="System prompt (chat template only)."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(40, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (1 = off)."),
    min_p: float = typer.Option(0.05, "--min-p", help="Drop tokens below min_p x the top probability (0 = off)."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalty on the last 64 tokens (1 = off)."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed: same seed, same output."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens to generate."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop when this text appears (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence tokens."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print speed and memory to stderr."),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    gpu_layers: int = GPU_LAYERS_OPT,
    threads: int = THREADS_OPT,
    quantize: str = QUANTIZE_OPT,
    compile: bool = typer.Option(None, "--compile/--no-compile", show_default=False,
                                 help=COMPILE_HELP + " Default: off for one-shot runs on the CPU, on on a GPU."),
) -> None:
    """Generate a reply to PROMPT and stream it to stdout."""
    if prompt is None or prompt == "-":
        if sys.stdin.isatty() and prompt is None:
            raise typer.BadParameter("give a PROMPT, or pipe one on stdin")
        prompt = sys.stdin.read()
    m = load(model, device, dtype, gpu_layers, compile, threads, quantize)
    if raw:
        ids = m.tokenizer.encode_prompt(prompt)
    else:
        ids, format_stop = chat_prompt(m, [{"role": "user", "content": prompt}], system)
        stop = list(stop or []) + format_stop
    sampling = Sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens)
    stats = Stats()
    if verbose:
        err.print(f"[dim]loaded {m.source} ({m.arch}) in {m.load_seconds:.2f} s on "
                  f"{m.input_device}{cpu_threads(m)}{quant_path(m)}{decode_path(m)}[/]")
    try:
        extra = {"stop_ids": []} if ignore_eos else {}
        for piece in stream_text(m, ids, stop=stop, stats=stats, **extra, **sampling.kwargs()):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats.stop_reason == "context":
        err.print(f"[yellow]stopped: the model's context of {m.context_length} tokens is full[/]")
    if verbose:
        err.print(f"[dim]{stats_line(stats)}[/]")
