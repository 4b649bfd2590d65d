"""`mamba-cli bench MODEL`: llama-bench-style speed figures for our runtime (measured by runtime/bench.py).

Reports load time, prefill tokens/s (-p), decode tokens/s (-n) at a context depth (-d), peak memory,
and how close decode comes to the memory-bandwidth limit: this machine's measured copy bandwidth over the
bytes a decode step must move (the weights it reads, plus the cache: Mamba states read and written, keys and
values read at the figure's context).
"""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from cli.common import COMPILE_HELP, DEVICE_OPT, DTYPE_OPT, GPU_LAYERS_OPT, MODEL_ARG, resolve
from runtime import load_model
from runtime.bench import bench as measure_row
from runtime.device import set_threads


def bench(
    model: str = MODEL_ARG,
    prompt: int = typer.Option(512, "-p", "--prompt", help="Prompt tokens for the prefill figure."),
    decode: int = typer.Option(128, "-n", "--decode", help="Tokens for the decode figure."),
    depth: int = typer.Option(0, "-d", "--depth", help="Context already in the cache before measuring."),
    reps: int = typer.Option(3, "-r", "--repetitions", help="Runs to take the median of."),
    threads: int = typer.Option(None, "-t", "--threads", help="CPU threads (default: physical cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    gpu_layers: int = GPU_LAYERS_OPT,
    compile: bool = typer.Option(True, "--compile/--no-compile", help=COMPILE_HELP),
) -> None:
    """Measure load time, prefill and decode speed, memory and bandwidth use."""
    set_threads(threads)
    m = load_model(resolve(model), device=device, dtype=dtype, gpu_layers=gpu_layers)
    row = measure_row(m, prompt, decode, depth, reps, m.compile() if compile else "off")
    if as_json:
        print(json.dumps(row))
        return
    t = Table(title=f"{m.source} ({m.arch}) on {row['device']}, {row['threads']} threads, depth {depth}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in row.items():
        if k not in ("model", "arch", "device", "threads", "depth"):
            t.add_row(k.replace("_", " "), str(v))
    Console().print(t)
