"""`mamba-cli chat MODEL`: an interactive conversation that keeps the model's cache between turns.

Each turn renders the whole conversation with the chat template (runtime.chat.chat_prompt) and hands
it to a Session, which prefills only the tokens past what the cache already holds. /save writes the
session's cache itself (Session.save), so `--resume FILE` continues a conversation without re-reading
its history.
"""

from __future__ import annotations

import signal
from pathlib import Path

import typer
from rich.console import Console

from cli.common import (
    COMPILE_HELP,
    DEVICE_OPT,
    DTYPE_OPT,
    GPU_LAYERS_OPT,
    MODEL_ARG,
    QUANTIZE_OPT,
    THREADS_OPT,
    CompileInBackground,
    Sampling,
    cpu_threads,
    decode_path,
    err,
    load,
    quant_path,
    stats_line,
)
from runtime.chat import chat_prompt, check_messages
from runtime.errors import MambaCliError
from runtime.generate import Session, Stats, stream_text
from runtime.loader import LoadedModel

HELP = """[bold]Commands[/]
  /help               this help
  /clear              forget the conversation (keeps the system prompt)
  /system TEXT        set the system prompt (empty TEXT removes it)
  /set PARAM VALUE    temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens
  /save FILE          save the conversation and the model state (resume with --resume FILE)
  /load FILE          load a conversation saved with /save
  /exit               quit (also Ctrl-D)
Multi-line input: end a line with \\ to continue, or wrap the text in triple quotes \"\"\".
Ctrl-C stops a reply in progress and keeps the conversation."""


class Interrupt:
    """While active, the first Ctrl-C only sets a flag (polled between model calls); a second one aborts."""

    def __init__(self):
        self.hit = False

    def __call__(self) -> bool:
        return self.hit

    def _handler(self, *_):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


class Chat:
    def __init__(self, m: LoadedModel, sampling: Sampling, system: str | None, console: Console, verbose: bool):
        self.m, self.sampling, self.console, self.verbose = m, sampling, console, verbose
        self.system = system
        self.messages: list[dict] = []
        self.session = Session(m)
        self.stop_ids: list[int] | None = None  # None: the model's EOS ids
        self.compiling: CompileInBackground | None = None  # joined before the model first runs

    def ids(self) -> list[int]:
        return chat_prompt(self.m, self.messages, self.system)[0]

    def reply(self, text: str) -> None:
        if (compiling := self.compiling) is not None:
            try:
                compiling.wait()
            except KeyboardInterrupt:  # as Ctrl-C in a reply: the conversation stays (and the compile goes on)
                self.console.print("[dim]stopped (Ctrl-C) before the reply began[/]")
                return
            finally:
                if compiling.thread is None:
                    self.compiling = None
        self.messages.append({"role": "user", "content": text})
        stats = Stats()
        pieces: list[str] = []
        interrupt = Interrupt()
        try:
            ids, stop = chat_prompt(self.m, self.messages, self.system)
            with interrupt:
                for piece in stream_text(self.m, ids, stats=stats, session=self.session, stop=stop,
                                         stop_ids=self.stop_ids, should_stop=interrupt, **self.sampling.kwargs()):
                    pieces.append(piece)
                    self.console.print(piece, end="", style="cyan", markup=False, highlight=False)
        except MambaCliError as e:
            self.messages.pop()
            self.console.print(f"[red]error:[/] {e}")
            return
        self.console.print()
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        notes = {"interrupted": " · stopped (Ctrl-C)", "context": " · stopped: context full",
                 "length": " · stopped: max tokens"}.get(stats.stop_reason, "")
        self.console.print(f"[dim]{stats.gen_tokens} tokens · {stats.gen_tps:.1f} tok/s{notes}[/]")
        if self.verbose:
            self.console.print(f"[dim]{stats_line(stats)}[/]")

    # ------------------------------------------------------------ state files

    def save(self, path: str) -> None:
        saved = self.session.save(path, {"messages": self.messages, "system": self.system})
        size = Path(path).stat().st_size
        self.console.print(f"[dim]saved {len(self.messages)} messages and the model state "
                           f"({saved} tokens, {size / 2**20:.1f} MiB) to {path}[/]")

    def load(self, path: str) -> None:
        def check(meta: dict) -> None:  # before the session changes: a bad file leaves the chat as it was
            if not isinstance(meta.get("system"), (str, type(None))):
                raise MambaCliError(f"{path}: its system prompt is not text")
            try:
                check_messages(meta.get("messages"))
            except MambaCliError as e:
                raise MambaCliError(f"{path}: {e}") from None

        meta = self.session.load(path, check)
        self.messages, self.system = list(meta["messages"]), meta.get("system")
        self.console.print(f"[dim]resumed {len(self.messages)} messages ({len(self.session.tokens)} tokens "
                           "in the model state, nothing re-read)[/]")

    # ------------------------------------------------------------ commands

    def command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        name, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        if name in ("exit", "quit", "bye"):
            return False
        if name == "help":
            self.console.print(HELP)
        elif name == "clear":
            self.messages = []
            self.session.reset()
            self.console.print("[dim]conversation cleared[/]")
        elif name == "system":
            self.system = rest or None
            self.console.print(f"[dim]system prompt {'set' if rest else 'removed'}[/]")
        elif name == "set":
            param, _, value = rest.partition(" ")
            try:
                self.sampling.set(param, value.strip())
            except ValueError as e:
                self.console.print(f"[red]{e}[/]")
            else:
                self.console.print(f"[dim]{self.sampling}[/]")
        elif name in ("save", "load"):
            if not rest:
                self.console.print(f"[red]usage: /{name} FILE[/]")
            else:
                try:
                    self.save(rest) if name == "save" else self.load(rest)
                except (MambaCliError, ValueError, OSError) as e:
                    self.console.print(f"[red]error:[/] {e}")
        else:
            self.console.print(f"[red]unknown command /{name}[/]; /help lists them")
        return True


def read_message(console: Console) -> str | None:
    """One user message; None at end of input. Handles '\\' continuations and \"\"\" blocks."""
    try:
        line = console.input("[bold green]>>> [/]")
    except EOFError:
        return None
    if line.strip().startswith('"""'):
        lines = [line.strip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            try:
                lines.append(console.input("[bold green]... [/]"))
            except EOFError:
                break
        lines[-1] = lines[-1].rstrip().removesuffix('"""')
        return "\n".join(lines).strip()
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(console.input("[bold green]... [/]"))
        except EOFError:
            break
    return "\n".join(lines)


def chat(
    model: str = MODEL_ARG,
    system: str = typer.Option(None, "--system", "-s", help="System prompt."),
    resume: str = typer.Option(None, "--resume", help="Continue a conversation saved with /save."),
    temperature: float = typer.Option(0.8, "--temperature", "-t"),
    top_k: int = typer.Option(40, "--top-k"),
    top_p: float = typer.Option(0.95, "--top-p"),
    min_p: float = typer.Option(0.05, "--min-p"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty"),
    seed: int = typer.Option(None, "--seed"),
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show prefill/decode speed and memory."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Replies run to --max-tokens (for testing)."),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    gpu_layers: int = GPU_LAYERS_OPT,
    threads: int = THREADS_OPT,
    quantize: str = QUANTIZE_OPT,
    compile: bool = typer.Option(True, "--compile/--no-compile", help=COMPILE_HELP),
) -> None:
    """Chat with a model in the terminal. /help inside lists the commands."""
    console = Console(highlight=False)
    # None: load() captures a GPU's decode steps (milliseconds); a CPU's compile runs below, in the background
    m = load(model, device, dtype, gpu_layers, None if compile else False, threads, quantize)
    c = Chat(m, Sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens), system,
             console, verbose)
    if ignore_eos:
        c.stop_ids = []
    if resume:
        c.load(resume)
    if compile and not m.on_one_gpu():
        c.compiling = CompileInBackground(m)  # while the first message is typed
    err.print(f"[dim]{Path(m.source).name} ({m.arch}) on {m.input_device}{cpu_threads(m)}"
              + (quant_path(m) + decode_path(m) if verbose else "") + ", "
              f"loaded in {m.load_seconds:.1f} s"
              + (" (compiling the decode step meanwhile)" if c.compiling else "") + ". "
              "/help for commands, /exit or Ctrl-D to quit.[/]")
    while True:
        try:
            text = read_message(console)
        except KeyboardInterrupt:
            console.print()
            break
        if text is None:
            console.print()
            break
        if not text.strip():
            continue
        if text.startswith("/"):
            if not c.command(text.strip()):
                break
            continue
        c.reply(text)
