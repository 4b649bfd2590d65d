"""Options and helpers shared by the commands: model loading with a status line, download bars,
sampling flags, stats."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

import store
from quant import native
from quant.linear import BlockLinear, QuantLinear, gpu_path
from runtime import LoadedModel, load_model
from runtime.device import peak_cuda_bytes, peak_rss_bytes, set_threads
from runtime.loader import local_path

err = Console(stderr=True, highlight=False)

MODEL_ARG = typer.Argument(..., help="Model folder, .gguf file, Hub repo id (owner/name[:QUANT]) or alias.")
DEVICE_OPT = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda.")
DTYPE_OPT = typer.Option(None, "--dtype", help="Weights dtype: float32, bfloat16, float16 (default: checkpoint's).")
GPU_LAYERS_OPT = typer.Option(None, "--gpu-layers", help="Put the first N layers on the GPU, the rest on the CPU.")
THREADS_OPT = typer.Option(None, "--threads", help="CPU threads (default: the physical cores).")
COMPILE_HELP = ("Compile the CPU decode step with torch.compile (on a GPU: capture it as CUDA graphs): faster "
                "tokens after a few seconds of start-up "
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


class DownloadBars:
    """store.download's progress as rich bars: one per file and a total (bytes, rate, ETA); silent
    unless the console is a terminal. Use as a context manager; the object is the progress callback."""

    def __init__(self, console: Console):
        self.progress = None
        self.tasks: dict[str, tuple[object, int]] = {}  # file name -> (its bar, bytes it held last)
        if console.is_terminal:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=console)
            self.total = self.progress.add_task("[bold]total", total=0)

    def __enter__(self) -> DownloadBars:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def __call__(self, name: str, done: int, size: int) -> None:
        if self.progress is None:
            return
        if name not in self.tasks:
            self.tasks[name] = (self.progress.add_task(name, total=size, completed=done), done)
            self.progress.update(self.total, total=self.progress.tasks[self.total].total + size)
            self.progress.advance(self.total, done)
            return
        task, before = self.tasks[name]
        self.progress.update(task, completed=done)
        self.progress.advance(self.total, done - before)
        self.tasks[name] = (task, done)


def resolve(model: str) -> Path:
    """A model argument -> a local folder or .gguf: a local path as it is, else through the store (a
    first use pulls, with download bars on stderr)."""
    def pull_with_bars(name: str) -> Path:
        with DownloadBars(err) as bars:
            return store.resolve_model(name, progress=bars)

    return local_path(model, resolve=pull_with_bars)


def load(model: str, device: str, dtype: str | None, gpu_layers: int | None, compile: bool | None = False,
         threads: int | None = None) -> LoadedModel:
    """Load with a status line; compile (None: only on a GPU, where capturing the decode steps costs
    milliseconds) compiles the CPU decode step or captures the GPU's (LoadedModel.compile)."""
    set_threads(threads)
    path = resolve(model)
    # a GGUF on the CPU runs the native kernels; their one-time build is announced (float models skip it)
    if path.suffix == ".gguf" and device in ("auto", "cpu") and not native.built():
        err.print("[dim]building mamba-cli's native 4-bit kernels for this CPU (once per machine and torch version)[/]")
        with err.status("compiling quant/kernels/ggml_cpu.cpp (~30 s)…", spinner="dots"):
            why = native.load()
        if why:
            err.print(f"[dim]{why}; 4-bit layers use torch's int4 kernels[/]")
    with err.status(f"loading {model}…", spinner="dots"):
        m = load_model(path, device=device, dtype=dtype, gpu_layers=gpu_layers)
    if compile is None:
        compile = m.on_one_gpu()
    if compile and m.on_one_gpu():
        why = m.compile()
        if why and "MAMBA_CLI" not in why:
            err.print(f"[dim]decode steps not captured ({why}); running eagerly[/]")
    elif compile:
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
    kinds = {type(mod) for mod in m.module.modules()} & {BlockLinear, QuantLinear}
    if BlockLinear in kinds:
        return f"; 4-bit: {native.describe()}, GGUF blocks read in place"
    if QuantLinear in kinds:
        cuda = [d for d in m.layer_devices() if d.type == "cuda"]
        if cuda:
            return f"; 4-bit: {gpu_path(cuda[0])}"
        why = native.load()
        return f"; 4-bit: torch int4 kernels{f' ({why})' if why else ''}"
    return ""


def decode_path(m) -> str:
    """'; decode: CUDA graphs' when the decode steps replay captured graphs, for -v."""
    return "; decode: captured CUDA graphs" if m.static is not None else ""


def peak_memory() -> str:
    out = f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB"
    if peak_cuda_bytes():
        out += f", peak CUDA {peak_cuda_bytes() / 2**20:.0f} MiB"
    return out


def stats_line(stats) -> str:
    cached = f" ({stats.cached_tokens} cached)" if stats.cached_tokens else ""
    return (f"prompt: {stats.prompt_tokens} new tokens{cached}, {stats.prompt_tps:.1f} tok/s · "
            f"generation: {stats.gen_tokens} tokens, {stats.gen_tps:.1f} tok/s · {peak_memory()}")


def is_tty() -> bool:
    return sys.stdin.isatty()
