"""Options and helpers shared by the commands: model loading with a status line, progress that works
in a terminal and in a log (Steps, DownloadBars), sampling flags, stats."""

from __future__ import annotations

import os
import sys
import threading
import time
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
from runtime.device import (
    available_ram,
    cpu_has_fast_bf16,
    gib,
    peak_cuda_bytes,
    peak_rss_bytes,
    resolve_device,
    set_threads,
)
from runtime.errors import MambaCliError
from runtime.loader import local_path
from runtime.weights import safetensors_entries, safetensors_files

err = Console(stderr=True, highlight=False)

MODEL_ARG = typer.Argument(..., help="Model folder, .gguf file, Hub repo id (owner/name[:QUANT]) or alias.")
DEVICE_OPT = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda.")
DTYPE_OPT = typer.Option(None, "--dtype", help="Weights dtype: float32, bfloat16, float16 (default: checkpoint's).")
GPU_LAYERS_OPT = typer.Option(None, "--gpu-layers", help="Put the first N layers on the GPU, the rest on the CPU.")
THREADS_OPT = typer.Option(None, "--threads", help="CPU threads (default: the physical cores).")
QUANTIZE_OPT = typer.Option(None, "--quantize", "-q", help="Run a float model from a 4-bit copy of this type "
                            "(q4_k_m, q4_0, ...; auto: choose), made once and kept beside the model (the store "
                            "lists it as MODEL:TYPE).")
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


def plain_every() -> float:
    """Seconds between plain progress lines when the output is not a terminal (MAMBA_CLI_PROGRESS_EVERY)."""
    try:
        return float(os.environ.get("MAMBA_CLI_PROGRESS_EVERY", "10"))
    except ValueError:
        return 10.0


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def amount(n: float, unit: str) -> str:
    """1234567 'B' -> '1.2 MB'; other units: 1.2 M weights, 812 tokens."""
    if unit == "B":
        return store.format_size(n)
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {suffix} {unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip()


class Steps:
    """Progress of one long step: a rich bar (percent, rate, ETA) when `console` is a terminal, else a
    plain line every plain_every() seconds and one at the end, e.g.
        quantizing to q4_k_m: 42% (3.1 G of 7.2 G weights), 25.3 M weights/s, ETA 2m41s
    Use as a context manager; update(done, total) as the work advances."""

    def __init__(self, console: Console, what: str, unit: str = ""):
        self.console, self.what, self.unit = console, what, unit
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.done, self.total, self.detail = 0, 0, ""
        self.bar = None
        if console.is_terminal:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                TimeRemainingColumn(), console=console, transient=True)
            self.task = self.bar.add_task(what, total=None)

    def __enter__(self) -> Steps:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif exc[0] is None and self.total:
            self.line(final=True)

    def update(self, done: int, total: int, detail: str = "") -> None:
        self.done, self.total, self.detail = done, total, detail
        if self.bar is not None:
            desc = f"{self.what} {detail}".rstrip()
            self.bar.update(self.task, completed=done, total=total, description=desc)
            return
        now = time.perf_counter()
        if now - self.last >= plain_every() and done < total:
            self.last = now
            self.line()

    def line(self, final: bool = False) -> None:
        spent = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / spent
        pct = 100 * self.done / max(self.total, 1)
        text = f"{self.what}: {pct:.0f}% ({amount(self.done, self.unit)} of {amount(self.total, self.unit)})"
        if self.unit:
            text += f", {amount(rate, self.unit)}/s"
        if final:
            text += f", done in {duration(spent)}"
        elif rate > 0:
            text += f", ETA {duration((self.total - self.done) / rate)}"
        self.console.print(text, soft_wrap=True, highlight=False, markup=False)


class Heartbeat:
    """A step with no measure of its progress (a model load): a spinner in a terminal, else a line when it
    starts and one every plain_every() seconds while it lasts."""

    def __init__(self, console: Console, what: str):
        self.console, self.what = console, what
        self.stop = threading.Event()
        self.thread = None
        self.status = console.status(f"{what}…", spinner="dots") if console.is_terminal else None

    def __enter__(self) -> Heartbeat:
        if self.status is not None:
            self.status.start()
            return self
        self.console.print(f"{self.what}…", soft_wrap=True, highlight=False, markup=False)
        t0 = time.perf_counter()

        def beat() -> None:
            while not self.stop.wait(max(plain_every(), 0.05)):
                self.console.print(f"{self.what}: {duration(time.perf_counter() - t0)} so far", soft_wrap=True,
                                   highlight=False, markup=False)

        self.thread = threading.Thread(target=beat, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.status is not None:
            self.status.stop()
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


class DownloadBars:
    """store.download's progress: in a terminal, rich bars, one per file and a total (bytes, rate, ETA);
    otherwise plain lines for the total (Steps). Use as a context manager; the object is the progress
    callback."""

    def __init__(self, console: Console):
        self.progress = None
        self.plain = None
        self.tasks: dict[str, tuple[object, int]] = {}  # file name -> (its bar, bytes it held last)
        self.sizes: dict[str, tuple[int, int]] = {}  # file name -> (bytes held, size), for the plain lines
        if console.is_terminal:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=console)
            self.total = self.progress.add_task("[bold]total", total=0)
        else:
            self.plain = Steps(console, "downloading", "B")

    def __enter__(self) -> DownloadBars:
        if self.progress:
            self.progress.start()
        elif self.plain is not None:
            self.plain.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()
        elif self.plain is not None:
            self.plain.__exit__(*exc)

    def __call__(self, name: str, done: int, size: int) -> None:
        if self.plain is not None:
            self.sizes[name] = (done, size)
            self.plain.update(sum(d for d, _ in self.sizes.values()), sum(s for _, s in self.sizes.values()))
            return
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


BIG_MODEL_BYTES = 1 << 30  # from this size on, a load reports itself in logs too (Heartbeat)


def weights_bytes(path: Path) -> int:
    """Bytes of a model's weights on disk: the .gguf, or a folder's safetensors files."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _float_dtype(folder: Path) -> str:
    """The dtype most of a folder's weights are stored in, from the safetensors headers."""
    by_dtype: dict[str, int] = {}
    for e in safetensors_entries(safetensors_files(folder)).values():
        name = str(e.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + e.end - e.begin
    return max(by_dtype, key=by_dtype.get) if by_dtype else "float32"


def choose_quant(path: Path, device: str, dtype: str | None, asked: str | None) -> str | None:
    """The --quantize type for a float folder: `asked`, or for auto the choice (printed): q4_k_m on the CPU
    when the weights would not fit in memory or are bf16/f16 on a CPU without fast bf16, else none.
    Without --quantize, a big float model that will run slowly on the CPU gets a suggestion."""
    if path.suffix == ".gguf":
        return None if asked == "auto" else asked
    if asked not in (None, "auto"):
        return asked
    size = weights_bytes(path)
    on_cpu = resolve_device(device) == "cpu"
    half = (dtype or _float_dtype(path)) in ("bfloat16", "float16", "bf16", "fp16")
    why, slow = None, False
    if on_cpu and size * 1.05 > available_ram():  # without --quantize, the loader refuses it (and says so)
        why = f"its {gib(size)} of weights do not fit in the {gib(available_ram())} free"
    elif on_cpu and half and not cpu_has_fast_bf16() and size >= BIG_MODEL_BYTES:
        why, slow = "its weights are 16-bit and this CPU has no bf16 instructions (slow)", True
    if asked == "auto":
        choice = f"q4_k_m, as {why}" if why else "none, the float weights run as they are"
        err.print(f"[dim]--quantize auto: {choice}[/]")
        return "q4_k_m" if why else None
    if slow:
        err.print(f"[yellow]note:[/] {path.name} runs in float on the CPU, but {why}; --quantize q4_k_m makes a "
                  "4-bit copy once (about a quarter of the size) and runs that")
    return None


def stored_quantized(path: Path, qtype: str) -> Path:
    """The stored `qtype` copy of the float model at `path`: found, or made now (once) beside its weights."""
    from cli.quantize import write_quantized
    from quant.recipe import QUANT_TYPES

    qtype = qtype.lower()
    if qtype not in QUANT_TYPES:
        raise MambaCliError(f"--quantize {qtype}: unknown; use auto or one of {', '.join(QUANT_TYPES)}")
    if path.suffix == ".gguf":
        raise MambaCliError(f"{path.name} is a GGUF file already; --quantize makes 4-bit copies of safetensors models "
                            "(to requantize a GGUF, use `mamba-cli quantize`)")
    dest = store.quantized_path(path, qtype)
    if store.fresh_copy(path, dest):
        err.print(f"[dim]using the stored {qtype} copy {dest}[/]", soft_wrap=True)
        return dest
    in_store = store.within(store.cache_dir(), dest)
    err.print(f"quantizing {path.name} to {qtype} (once: the copy is kept at {dest}"
              + ("; `mamba-cli list` shows it, `mamba-cli rm` removes it)" if in_store else ")"), soft_wrap=True)
    t0 = time.perf_counter()
    write_quantized(path, dest, qtype)
    err.print(f"[dim]quantized in {time.perf_counter() - t0:.0f} s[/]")
    return dest


class CompileInBackground:
    """The CPU decode step's compile (LoadedModel.compile) in a thread, so that chat's prompt comes up as soon
    as the model is loaded and the compile runs while the first message is typed (SmolLM2: dynamo's and
    inductor's imports and a compile from the disk cache, ~4 s; a first compile up to ~15 s). wait() before
    the model runs: it joins the thread (a status line while it is still going) and says if compiled code
    will not run, once."""

    def __init__(self, m: LoadedModel) -> None:
        self.m, self.why, self.error = m, None, None
        self.thread: threading.Thread | None = threading.Thread(target=self._run, name="mamba-cli compile",
                                                               daemon=True)  # a quit does not wait for it
        self.thread.start()

    def _run(self) -> None:
        try:
            self.why = self.m.compile()
        except BaseException as e:  # raised where the model is next used, as a compile in the foreground
            self.error = e

    def wait(self) -> None:
        if self.thread is None:
            return
        if self.thread.is_alive():
            with err.status("finishing the decode step's compile…", spinner="dots"):
                self.thread.join()
        self.thread = None
        if self.error is not None:
            raise self.error
        if self.why and "MAMBA_CLI_NO_COMPILE" not in self.why and "no layer" not in self.why:
            err.print(f"[dim]decode step not compiled ({self.why}); running eagerly[/]")


def load(model: str, device: str, dtype: str | None, gpu_layers: int | None, compile: bool | None = False,
         threads: int | None = None, quantize: str | None = None) -> LoadedModel:
    """Load with a status line; compile (None: only on a GPU, where capturing the decode steps costs
    milliseconds) compiles the CPU decode step or captures the GPU's (LoadedModel.compile)."""
    set_threads(threads)
    path = resolve(model)
    qtype = choose_quant(path, device, dtype, quantize.lower() if quantize else None)
    if qtype is not None:
        path = stored_quantized(path, qtype)
    # a GGUF on the CPU runs the native kernels; their one-time build is announced (float models skip it)
    if path.suffix == ".gguf" and device in ("auto", "cpu") and not native.built():
        err.print("[dim]building mamba-cli's native 4-bit kernels for this CPU (once per machine and torch version)[/]")
        with err.status("compiling quant/kernels/ggml_cpu.cpp (~30 s)…", spinner="dots"):
            why = native.load()
        if why:
            err.print(f"[dim]{why}; 4-bit layers use torch's int4 kernels[/]")
    big = weights_bytes(path) >= BIG_MODEL_BYTES
    with Heartbeat(err, f"loading {model}") if big else err.status(f"loading {model}…", spinner="dots"):
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
