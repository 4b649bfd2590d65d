"""Options and helpers shared by the commands: model loading with a status line, sampling flags, stats."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass

import torch
import typer
from rich.console import Console

from quant import native

err = Console(stderr=True, highlight=False)

MODEL_ARG = typer.Argument(..., help="Model folder, .gguf file, Hub repo id (owner/name[:QUANT]) or alias.")
DEVICE_OPT = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda.")
DTYPE_OPT = typer.Option(None, "--dtype", help="Weights dtype: float32, bfloat16, float16 (default: checkpoint's).")
GPU_LAYERS_OPT = typer.Option(None, "--gpu-layers", help="Put the first N layers on the GPU, the rest on the CPU.")
THREADS_OPT = typer.Option(None, "--threads", help="CPU threads (default: the physical cores).")
COMPILE_HELP = ("Compile the CPU decode step with torch.compile: faster tokens after a few seconds of start-up "
                "(the first time for a model shape up to ~15 s, then cached).")


@dataclass
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 512

    def kwargs(self) -> dict:
        return asdict(self)

    def set(self, name: str, value: str) -> None:
        aliases = {"repeat_penalty": "repetition_penalty", "max_tokens": "max_new_tokens", "n": "max_new_tokens",
                   "temp": "temperature"}
        name = aliases.get(name.replace("-", "_"), name.replace("-", "_"))
        if name not in self.__dataclass_fields__:
            raise ValueError(f"unknown parameter {name!r}; one of {', '.join(self.__dataclass_fields__)}")
        kind = int if name in ("top_k", "seed", "max_new_tokens") else float
        setattr(self, name, None if (name == "seed" and value.lower() == "none") else kind(value))


def load(model: str, device: str, dtype: str | None, gpu_layers: int | None, compile: bool = False,
         threads: int | None = None):
    from runtime import load_model
    from runtime.device import set_threads

    set_threads(threads)
    if device in ("auto", "cpu") and not native.built():  # a one-time build: say what the wait is
        err.print("[dim]building mamba-cli's native 4-bit kernels for this CPU (once per machine and torch version)[/]")
        with err.status("compiling quant/kernels/ggml_cpu.cpp (~30 s)…", spinner="dots"):
            why = native.load()
        if why:
            err.print(f"[dim]{why}; 4-bit layers use torch's int4 kernels[/]")
    with err.status(f"loading {model}…", spinner="dots"):
        m = load_model(model, device=device, dtype=dtype, gpu_layers=gpu_layers)
    if compile:
        with err.status("compiling the decode step (first time for this model shape: up to ~15 s; then cached)…",
                        spinner="dots"):
            why = m.compile()
        if why and "MAMBA_CLI_NO_COMPILE" not in why and "no layer" not in why:
            err.print(f"[dim]decode step not compiled ({why}); running eagerly[/]")
    return m


def cpu_threads(m) -> str:
    """' (N threads)' when any layer runs on the CPU, else ''."""
    n = torch.get_num_threads()
    return f" ({n} thread{'s' * (n != 1)})" if any(d.type == "cpu" for d in m.layer_devices()) else ""


def quant_path(m) -> str:
    """Which 4-bit matrix path the model's layers run, for -v: '' for a float model."""
    from quant.linear import BlockLinear, QuantLinear

    kinds = {type(mod) for mod in m.module.modules()} & {BlockLinear, QuantLinear}
    if BlockLinear in kinds:
        return f"; 4-bit: {native.describe()}, GGUF blocks read in place"
    if QuantLinear in kinds:
        why = native.load()
        return f"; 4-bit: torch int4 kernels{f' ({why})' if why else ''}"
    return ""


def peak_memory() -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = f"peak RSS {rss / 2**20:.0f} MiB"
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        out += f", peak CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    return out


def stats_line(stats) -> str:
    cached = f" ({stats.cached_tokens} cached)" if stats.cached_tokens else ""
    return (f"prompt: {stats.prompt_tokens} new tokens{cached}, {stats.prompt_tps:.1f} tok/s · "
            f"generation: {stats.gen_tokens} tokens, {stats.gen_tps:.1f} tok/s · {peak_memory()}")


def is_tty() -> bool:
    return sys.stdin.isatty()
