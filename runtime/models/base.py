"""The contract every architecture file in runtime/models/ meets, and the defaults of its optional hooks.

An architecture is one module (registered in runtime/registry.py) with:

    Args                          a dataclass; Args.from_config(cfg) reads an HF-style config dict
                                  (KeyError / TypeError / ValueError when a field is missing or bad;
                                  require() checks the mandatory keys) and
                                  has vocab_size, num_hidden_layers, tie_word_embeddings, context_length
                                  (None: unlimited, a recurrent state)
    Model(LanguageModel)          built from Args on the meta device, then loaded over:
        forward(tokens, cache=None, last_only=False) -> float32 logits (B, T, V); a cache advances
        make_cache(batch, max_len=None) -> one typed cache per layer (runtime/cache.py)
        make_chain(cache)         optional: a compiled decode step's blocks as one Chain (through_blocks)
        sanitize(weights, args)   checkpoint quirks -> exactly the module's state_dict names
        layers                    the blocks (placement and compile work per block)
        input_embedding()         the token embedding module
    GGUF_NAMES                    a runtime.gguf_names.NameTable: llama.cpp's names <-> ours
    config_from_gguf(meta, n_vocab)   llama.cpp `{arch}.*` metadata -> an HF-style config dict
    gguf_metadata(args)           the `{arch}.*` keys the GGUF writer puts in a file

and, optionally (hooks() fills in the defaults below):

    config_from_gguf_tensors(names)        config fields only the tensor list tells      default {}
    gguf_row_transform(name, args)         a function on the rows of a tensor (and of its int4 scales
                                           and zeros), e.g. llama.cpp's q/k permutation   default None
    gguf_tensor_transform(name, t, args)   a GGUF tensor -> our layout                    default t
    gguf_write_transform(name, t, args)    our tensor -> llama.cpp's layout (the inverse) default t
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from runtime.compile import MISS
from runtime.layers import chainable, chained_step, embed_step, final_logits, norm_head_step

REQUIRED = ("Args", "Model", "GGUF_NAMES", "config_from_gguf", "gguf_metadata")


class LanguageModel(nn.Module):
    """What the loader, placement, compile and generation use of an architecture's Model."""

    args: Any

    def __init__(self):
        super().__init__()
        # a compiled decode step's blocks as one Chain (make_chain), keyed by the first layer's cache (dropped
        # with it)
        self._chains: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, cache: list | None = None, last_only: bool = False) -> torch.Tensor:
        # tokens : (B, T)  ->  logits : (B, T, V) float32, or (B, 1, V) when last_only
        raise NotImplementedError

    def make_cache(self, batch: int = 1, max_len: int | None = None) -> list:
        raise NotImplementedError

    # The dtype of the attention layers' keys and values on the CPU; None: the layer's compute dtype. The loader
    # sets float16 for 4-bit GGUF files (runtime/loader.py chosen_kv_dtype), as llama.cpp keeps its cache.
    kv_dtype: torch.dtype | None = None

    def kv_cache_dtype(self, weight: torch.Tensor) -> torch.dtype:
        """The dtype of the keys and values of a layer whose compute dtype and device `weight` has."""
        return self.kv_dtype if self.kv_dtype is not None and weight.device.type == "cpu" else weight.dtype

    def through_blocks(self, h: torch.Tensor, cache: list | None, call: Callable, rope=None) -> torch.Tensor:
        """h through the blocks, call(block, h, its cache entry) each; a compiled one-token step through one
        Chain instead once make_chain has made one for these caches (runtime/layers.py chained_step)."""
        one = cache is not None and h.shape[1] == 1 and len(cache) > 0
        out = chained_step(self._chains.get(cache[0]), h, cache, rope) if one else MISS
        if out is not MISS:
            return out
        for i, layer in enumerate(self.layers):
            h = call(layer, h, cache[i] if cache is not None else None)
        if one:
            self._chains.pop(cache[0], None)
            entry = self.make_chain(cache)
            if entry is not None and chainable(self.layers):
                self._chains[cache[0]] = entry
        return h

    def make_chain(self, cache: list) -> tuple | None:
        """After a one-token step through the blocks: (a Chain of their compiled calls, each attention layer's
        modules as attn_kv_ffn_step takes them, the blocks) for chained_step, or None."""
        return None

    compiled_head = False  # runtime/compile.py: a one-token step's final norm and head as one compiled graph
    compiled_embed = False  # and its embedding lookup

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input embedding of tokens; one compiled graph in a compiled one-token step of one sequence
        (head_logits; batched steps stay eager: a graph of static shapes would compile once per batch size)."""
        if self.compiled_embed and tokens.numel() == 1:
            return embed_step(self.input_embedding(), tokens)
        return self.input_embedding()(tokens)

    def head_logits(self, norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """float32 logits of lm_head(norm(h)) (norm's output in its weight's dtype), as one compiled graph in
        a compiled one-token step: eager, its ~10 ops ran after a step's weight stream had evicted their
        code and data (~150-250 us a step measured, against ~25 us warm)."""
        # a decode step's h, not a prefill's last position (a view whose batch stride would make a new graph)
        if self.compiled_head and h.shape[:2] == (1, 1) and h.is_contiguous() and h.stride(0) == h.shape[-1]:
            return norm_head_step(norm, self.lm_head, h)
        return final_logits(norm, self.lm_head, h)

    def input_embedding(self) -> nn.Module:
        """The token embedding (placement puts it, and the ids, with the first layer)."""
        raise NotImplementedError

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], args: Any) -> dict[str, torch.Tensor]:
        """Checkpoint tensors -> the module's names and shapes (default: as they are)."""
        return weights


def require(cfg: dict[str, Any], keys: list[str], silu: bool = False) -> None:
    """For Args.from_config: KeyError naming the missing keys; ValueError for an activation other than
    silu when `silu` (the SSM and hybrid blocks hard-wire it)."""
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise KeyError(", ".join(missing))
    if silu and cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} (only silu is supported)")


def _no_tensor_config(names: set[str]) -> dict[str, Any]:
    return {}


def _no_row_transform(name: str, args: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    return None


def _same(name: str, t: torch.Tensor, args: Any) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Hooks:
    """An architecture's optional GGUF hooks, its own where it defines them, else the defaults."""

    config_from_gguf_tensors: Callable[[set[str]], dict[str, Any]] = _no_tensor_config
    gguf_row_transform: Callable[[str, Any], Callable[[torch.Tensor], torch.Tensor] | None] = _no_row_transform
    gguf_tensor_transform: Callable[[str, torch.Tensor, Any], torch.Tensor] = _same
    gguf_write_transform: Callable[[str, torch.Tensor, Any], torch.Tensor] = _same


def hooks(arch_mod: ModuleType) -> Hooks:
    return Hooks(**{name: getattr(arch_mod, name) for name in Hooks.__dataclass_fields__ if hasattr(arch_mod, name)})


def check(arch_mod: ModuleType) -> ModuleType:
    """arch_mod, after checking it has the required members (a new architecture file fails here, early)."""
    missing = [name for name in REQUIRED if not hasattr(arch_mod, name)]
    if missing:
        raise TypeError(f"{arch_mod.__name__} lacks {', '.join(missing)} (see runtime/models/base.py)")
    if not issubclass(arch_mod.Model, LanguageModel):
        raise TypeError(f"{arch_mod.__name__}.Model is not a runtime.models.base.LanguageModel")
    return arch_mod
