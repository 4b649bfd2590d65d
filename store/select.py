"""Which files of a Hub repo a model needs: config, tokenizer, generation config and the weights.

    gguf_quant(name)                 the quant tag in a GGUF file name
    gguf_variants(names)             quant tag -> its file(s), split GGUFs in order
    select_files(names, quant, repo) -> Selection (never pickle, never a blind download of everything)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import MambaCliError, ModelFormatError
from store.refs import DEFAULT_QUANT

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json",
                   "merges.txt", "tekken.json")
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
QUANT_RE = re.compile(r"(?:I?Q\d+(?:_[A-Z0-9]+)*|TQ\d_\d|B?F16|F32|FP16)", re.IGNORECASE)


def gguf_quant(name: str) -> str | None:
    """The quant tag in a GGUF file name: `Mistral-7B-Instruct-v0.3-Q4_K_M.gguf` -> Q4_K_M."""
    stem = SPLIT_RE.sub("", Path(name).name)
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    for token in reversed(re.split(r"[-.]", stem)):
        if QUANT_RE.fullmatch(token):
            return token.upper()
    return None


def gguf_variants(names: list[str]) -> dict[str, list[str]]:
    """quant tag -> its file(s): all parts of a split GGUF, in order; incomplete splits are skipped."""
    groups: dict[tuple[str, str], dict[int, str]] = {}  # (quant, name without -0000k-of-0000n) -> parts
    counts: dict[tuple[str, str], int] = {}
    for n in sorted(names):
        base = Path(n).name.lower()
        quant = gguf_quant(n)
        if not base.endswith(".gguf") or base.startswith("mmproj") or quant is None:
            continue
        m = SPLIT_RE.search(n)
        key = (quant, SPLIT_RE.sub("", n))
        groups.setdefault(key, {})[int(m.group(1)) if m else 1] = n
        counts[key] = int(m.group(2)) if m else 1
    out: dict[str, list[str]] = {}
    for (quant, base), parts in groups.items():
        if sorted(parts) == list(range(1, counts[quant, base] + 1)) and quant not in out:
            out[quant] = [parts[i] for i in sorted(parts)]
    return out


def default_quant(variants: dict[str, list[str]]) -> str:
    """Q4_K_M, or the only quant a repo has."""
    return next(iter(variants)) if len(variants) == 1 else DEFAULT_QUANT


@dataclass
class Selection:
    """The files a model needs; `target` is what load_model opens ("" = the snapshot folder)."""

    kind: str  # "hf" | "mistral" | "gguf"
    files: list[str]
    target: str = ""
    quant: str | None = None


def select_files(names: list[str], quant: str | None, repo: str) -> Selection:
    """Pick a model's files from a repo listing: config, tokenizer, generation config and the weights."""
    top = [n for n in names if "/" not in n]
    ggufs = gguf_variants(names)
    safetensors = [n for n in top if n.endswith(".safetensors")]
    if quant is None and not safetensors and ggufs:
        quant = default_quant(ggufs)
    if quant is not None:
        if not ggufs:
            raise MambaCliError(f"{repo} has no GGUF files; drop the :{quant} tag to pull its safetensors "
                                f"weights, or make and keep a 4-bit copy of them with `mamba-cli pull {repo} "
                                f"--quantize {quant.lower()}`")
        if quant not in ggufs:
            raise MambaCliError(f"{repo} has no {quant} GGUF file; available: {', '.join(sorted(ggufs))} "
                                f"(pull one with {repo}:TAG)")
        return Selection("gguf", ggufs[quant], ggufs[quant][0], quant)
    if not safetensors:
        pickles = [n for n in top if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ModelFormatError(f"{repo} has only pickle weights ({pickles[0]}), which mamba-cli never "
                                   "loads; use a safetensors or GGUF version of this model")
        raise ModelFormatError(f"{repo} has no safetensors or GGUF weights")
    tokenizer = [n for n in top if n in TOKENIZER_FILES or n.startswith("tokenizer.model")]
    transformers = [n for n in safetensors if not n.startswith("consolidated")]
    if transformers and "config.json" in top:
        index = [n for n in top if n.endswith(".safetensors.index.json") and not n.startswith("consolidated")]
        meta = [n for n in CONFIG_FILES if n in top]
        return Selection("hf", meta + tokenizer + index + transformers)
    consolidated = [n for n in safetensors if n.startswith("consolidated")]
    if consolidated and "params.json" in top:
        return Selection("mistral", ["params.json"] + tokenizer + consolidated)
    raise ModelFormatError(f"{repo} has safetensors weights but no config.json (or params.json with "
                           "consolidated.safetensors)")
