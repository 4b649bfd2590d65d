"""What a model is called: aliases, `owner/repo[:QUANT]` references, and where the Hub cache keeps them.

    ALIASES, parse_ref(source)    alias | owner/repo, with an optional :QUANT tag for GGUF repos
    cache_dir(), repo_dir(repo)   the standard Hugging Face cache, read from the environment at call time
    endpoint(), offline()         HF_ENDPOINT and HF_HUB_OFFLINE
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import MambaCliError

DEFAULT_QUANT = "Q4_K_M"


@dataclass(frozen=True)
class Alias:
    """A short name for a repo; `gguf`, when set, is a community 4-bit repo: the better CPU default."""

    name: str
    repo: str
    gguf: str | None = None


ALIASES: dict[str, Alias] = {a.name: a for a in [
    Alias("mistral-7b-instruct", "mistralai/Mistral-7B-Instruct-v0.3",
          "bartowski/Mistral-7B-Instruct-v0.3-GGUF"),
    Alias("mistral-7b-v0.1", "mistralai/Mistral-7B-v0.1", "TheBloke/Mistral-7B-v0.1-GGUF"),
    Alias("mixtral-8x7b-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1",
          "TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF"),
    Alias("codestral-mamba", "mistralai/Mamba-Codestral-7B-v0.1"),
    Alias("mamba-130m", "state-spaces/mamba-130m-hf"),
    Alias("mamba-370m", "state-spaces/mamba-370m-hf"),
    Alias("mamba-790m", "state-spaces/mamba-790m-hf"),
    Alias("mamba-1.4b", "state-spaces/mamba-1.4b-hf"),
    Alias("mamba-2.8b", "state-spaces/mamba-2.8b-hf"),
    Alias("falcon-mamba-7b", "tiiuae/falcon-mamba-7b", "tiiuae/falcon-mamba-7b-Q4_K_M-GGUF"),
    Alias("falcon-mamba-7b-instruct", "tiiuae/falcon-mamba-7b-instruct",
          "tiiuae/falcon-mamba-7b-instruct-Q4_K_M-GGUF"),
    Alias("jamba-reasoning-3b", "ai21labs/AI21-Jamba-Reasoning-3B", "ai21labs/AI21-Jamba-Reasoning-3B-GGUF"),
    Alias("jamba-mini", "ai21labs/AI21-Jamba-Mini-1.7"),
    Alias("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
          "bartowski/SmolLM2-135M-Instruct-GGUF"),
]}

REPO_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelRef:
    """What to pull: a repo id and, for GGUF repos, a quant tag (upper case)."""

    repo: str
    quant: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant else self.repo


def parse_ref(source: str) -> ModelRef:
    """`alias[:QUANT]` or `owner/repo[:QUANT]`; an alias with a GGUF repo defaults to its Q4_K_M file."""
    name, _, tag = source.strip().partition(":")
    quant = tag.strip().upper() or None
    alias = ALIASES.get(name.lower())
    if alias is not None:
        if alias.gguf:
            return ModelRef(alias.gguf, quant or DEFAULT_QUANT, alias.name)
        return ModelRef(alias.repo, quant, alias.name)
    if not REPO_RE.fullmatch(name) or ".." in name:
        raise MambaCliError(f"{source!r} is not a file, a known alias (see `mamba-cli aliases`) "
                            "or a Hub repo id like owner/name")
    return ModelRef(name, quant)


def alias_of(repo: str, quant: str | None) -> str | None:
    """The alias that resolves to `repo` (at `quant`), if any."""
    for a in ALIASES.values():
        if (a.gguf or a.repo) == repo and quant == (DEFAULT_QUANT if a.gguf else None):
            return a.name
    return None


# ---------------------------------------------------------------------------------------- environment


def cache_dir() -> Path:
    """The Hub cache, read from the environment at call time (HF_HUB_CACHE > HF_HOME/hub > ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def repo_dir(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def repo_of_dir(folder: Path) -> str:
    return folder.name.removeprefix("models--").replace("--", "/", 1)


def read_small(path: Path, limit: int = 256) -> str:
    """The stripped text of a small store file (a ref); a longer one (or /dev/zero behind a link) is cut."""
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", "replace").strip()


def read_ref(folder: Path, revision: str) -> str | None:
    """The commit a repo folder's branch or tag points at (a commit names itself), or None."""
    if (folder / "snapshots" / revision).is_dir():
        return revision
    ref = folder / "refs" / revision
    try:
        return read_small(ref) if ref.is_file() else None
    except OSError:
        return None

