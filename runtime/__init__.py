"""mamba-cli's runtime: turn a model on disk into streamed tokens.

Public API (stable; tests and benchmarks use it):

    m = load_model(source, device="auto", dtype=None, gpu_layers=None)   # folder, .gguf, repo id or alias
    m.config, m.arch, m.tokenizer
    logits = m.forward(tokens)             # LongTensor [B, T] -> FloatTensor [B, T, vocab], no cache
    cache = m.make_cache(batch=1)
    logits = m.forward(tokens, cache)      # advances the cache
    for tok in generate(m, prompt_ids, max_new_tokens=64, temperature=0.0, ...): ...

The way in: load_model -> registry -> runtime/models/<arch>.py -> runtime/generate.py.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime import registry
from runtime.device import check_fits, layer_devices, place, resolve_device
from runtime.errors import MambaCliError, ModelFormatError
from runtime.generate import generate
from runtime.layers import MoE, fuse_projections
from runtime.weights import iter_safetensors, read_json, safetensors_files

__all__ = ["load_model", "generate", "LoadedModel", "MambaCliError"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class LoadedModel:
    """A model ready to run: the nn.Module plus its config, tokenizer and generation defaults."""

    def __init__(self, module: nn.Module, arch: str, config: dict[str, Any], tokenizer, source: str,
                 generation: dict[str, Any] | None = None):
        self.module = module
        self.arch = arch
        self.config = config
        self.tokenizer = tokenizer
        self.source = source
        self.generation = generation or {}
        self.load_seconds = 0.0
        self.compile_seconds = 0.0  # time the last compile() spent compiling (with warm_up)
        self.eos_ids: set[int] = set(_ids(config.get("eos_token_id")) + _ids(self.generation.get("eos_token_id")))
        if tokenizer is not None:
            self.eos_ids |= set(tokenizer.eos_ids)

    @property
    def args(self):
        return self.module.args

    @property
    def input_device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def context_length(self) -> int | None:
        return getattr(self.module.args, "context_length", None)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: list | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (float32), or [B, 1, V] for the last position only when last_only."""
        return self.module(tokens.to(self.input_device), cache, last_only=last_only)

    def make_cache(self, batch: int = 1) -> list:
        return self.module.make_cache(batch)

    def compile(self, on: bool = True, warm_up: bool = True) -> str | None:
        """Run one-token decode steps of the CPU layers through compiled graphs (runtime/compile.py).

        With warm_up, compiles now (a decode step on a scratch cache) rather than at the first token.
        Returns why compilation is off or failed (None when compiled code runs).
        """
        from runtime import compile as comp

        self.compile_seconds = 0.0
        why = comp.unavailable() if on else "turned off"
        if not comp.enable(self.module, on and why is None):
            return why or "no layer on the CPU"
        if warm_up:
            t0 = time.perf_counter()
            from runtime.cache import KVCache

            cache = self.make_cache(1)
            one = torch.zeros(1, 1, dtype=torch.long)
            self.forward(torch.zeros(1, 2, dtype=torch.long), cache)  # a KV length of 1 would be specialized
            self.forward(one, cache)
            with torch.inference_mode():  # as forward() allocates: the graphs guard on tensor kind
                for c in cache:  # a second KV capacity, so the graphs generalize over it now, not mid-chat
                    if isinstance(c, KVCache):
                        c._reserve(c.k.shape[2] + 1)
            self.forward(one, cache)
            self.compile_seconds = time.perf_counter() - t0
        if comp.failures:
            return "; ".join(f"{k}: {v}" for k, v in comp.failures.items())
        return None

    def layer_devices(self) -> list[torch.device]:
        return layer_devices(self.module)

    def nbytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def _ids(x) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in x] if isinstance(x, list) else [int(x)]


def _resolve(source: str | os.PathLike) -> Path:
    p = Path(source).expanduser()
    if p.exists():
        return p
    text = str(source)
    if text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1:
        raise MambaCliError(f"{text}: no such file or folder")
    from runtime.hub import resolve_model

    return resolve_model(str(source))


def load_model(source: str | os.PathLike, device: str = "auto", dtype: str | torch.dtype | None = None,
               gpu_layers: int | None = None) -> LoadedModel:
    """Load a model folder (HF or mistral-inference layout), a .gguf file, a Hub repo id or an alias."""
    t0 = time.perf_counter()
    path = _resolve(source)
    device = resolve_device(device)
    if isinstance(dtype, str):
        if dtype == "auto":
            dtype = None
        elif dtype not in DTYPES:
            raise MambaCliError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        else:
            dtype = DTYPES[dtype]
    if path.is_file() and path.suffix == ".gguf":
        m = _load_gguf(path, device, dtype, gpu_layers)
    elif path.is_dir():
        m = _load_folder(path, device, dtype, gpu_layers)
    else:
        raise MambaCliError(f"{path}: not a model folder or .gguf file")
    m.load_seconds = time.perf_counter() - t0
    return m


def build_module(arch_mod, args, weights: dict[str, torch.Tensor], dtype: torch.dtype | None,
                 where: str, int4: dict[str, Callable[[], tuple[torch.Tensor, ...]]] | None = None
                 ) -> nn.Module:
    """Instantiate an architecture on the meta device and assign checkpoint tensors, checking every shape.

    int4 maps module paths (an nn.Linear or nn.Embedding) to a function returning (q, scales, zeros) or
    Blocks: those modules become QuantLinear / QuantEmbedding (torch's int4 kernels) or BlockLinear /
    BlockEmbedding (GGUF blocks in place, native kernels) and keep their weights in 4 bits. The functions
    run one at a time, so only one matrix is ever held unpacked (1 byte per weight) during a load.
    """
    with torch.device("meta"):
        module = arch_mod.Model(args)
    for path, parts in (int4 or {}).items():
        _swap_int4(module, path, parts(), dtype or torch.float32, where)
    weights = arch_mod.Model.sanitize(weights, args)
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing:
        raise ModelFormatError(f"{where}: weights missing {len(missing)} tensors, e.g. {missing[0]}")
    if unexpected:
        raise ModelFormatError(f"{where}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
    for k, t in weights.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ModelFormatError(f"{where}: tensor {k} has shape {list(t.shape)}, the config implies "
                                   f"{list(expected[k].shape)}")
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            weights[k] = t.to(dtype)
    module.load_state_dict(weights, assign=True, strict=True)
    module.eval()
    fuse_projections(module)
    return module


def release_free_memory() -> None:
    """Hand the heap that loading freed (dequantization and packing scratch) back to the OS (glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _swap_int4(module: nn.Module, path: str, parts, dtype: torch.dtype, where: str) -> None:
    """Replace the Linear/Embedding (or stacked experts) at path by its 4-bit form: parts is (q, scales,
    zeros) for torch's int4 kernels, or Blocks (GGUF blocks read in place by the native kernels)."""
    from quant.linear import BlockEmbedding, BlockLinear, Blocks, QuantEmbedding, QuantLinear

    parent_path, _, child = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    old = getattr(parent, child, None)
    blocks = parts if isinstance(parts, Blocks) else None
    shape = (blocks.n, blocks.k) if blocks else tuple(parts[0].shape)
    if isinstance(parent, MoE) and child in MoE.EXPERT_WEIGHTS:  # stacked experts (X, rows, cols)
        x, rows, cols = old.shape
        if shape != (x * rows, cols):
            raise ModelFormatError(f"{where}: tensor {path} has {list(shape)} as rows x columns, the config "
                                   f"implies {[x * rows, cols]}")
        if blocks:
            experts = [BlockLinear(b, blocks.ggml_type, cols) for b in blocks.data.split(rows)]
        else:
            experts = [QuantLinear(*p) for p in zip(*(t.split(rows) for t in parts), strict=True)]
        parent.set_int4(child, experts)
        return
    if isinstance(old, nn.Embedding):
        if blocks:
            new: nn.Module = BlockEmbedding(blocks.data, blocks.ggml_type, blocks.k, dtype)
        else:
            new = QuantEmbedding(*parts, dtype)
    elif isinstance(old, nn.Linear):
        if shape != (old.out_features, old.in_features):
            raise ModelFormatError(f"{where}: tensor {path}.weight has shape {list(shape)}, the config implies "
                                   f"{[old.out_features, old.in_features]}")
        bias = torch.empty(old.out_features) if old.bias is not None else None
        if blocks:
            new = BlockLinear(blocks.data, blocks.ggml_type, blocks.k, bias, blocks.rows)
        else:
            new = QuantLinear(*parts, bias)
    else:
        raise ModelFormatError(f"{where}: {path} is 4-bit but is not a linear layer or embedding here")
    setattr(parent, child, new)


FLOAT_TYPES = (0, 1, 30)  # ggml F32, F16, BF16


def _narrow_modules(module: nn.Module) -> None:
    """Linear/Embedding layers whose weights were kept in bf16 compute in bf16 and return float32."""
    from quant.linear import CastEmbedding, CastLinear

    for mod in module.modules():
        if type(mod) is nn.Linear and mod.weight.dtype == torch.bfloat16:
            mod.__class__ = CastLinear
        elif type(mod) is nn.Embedding and mod.weight.dtype == torch.bfloat16:
            mod.__class__ = CastEmbedding


def _load_gguf(path: Path, device: str, dtype: torch.dtype | None, gpu_layers: int | None) -> LoadedModel:
    """A GGUF file: llama.cpp names and layouts -> our modules; Q4_0/Q4_1/Q4_K linears stay 4-bit."""
    import re

    from quant import native
    from quant.formats import INT4_TYPES, to_int4
    from quant.linear import Blocks
    from runtime.tokenizer import Tokenizer
    from runtime.weights import read_gguf

    gf = read_gguf(path)
    where = str(path)
    check_fits(int(path.stat().st_size * 1.25), "cpu", path.name)
    arch_mod = registry.arch_for_gguf(gf.architecture, where)
    embd = gf.tensors.get("token_embd.weight")
    if embd is None:
        raise ModelFormatError(f"{where}: no token_embd.weight tensor")
    try:
        cfg = arch_mod.config_from_gguf(gf.metadata, int(embd.shape[1]))
        cfg.update(getattr(arch_mod, "config_from_gguf_tensors", lambda _names: {})(set(gf.tensors)))
        cfg["tie_word_embeddings"] = "output.weight" not in gf.tensors
        args = arch_mod.Args.from_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{where}: missing or invalid metadata {e}") from None
    patterns = [(re.compile(re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in arch_mod.GGUF_NAMES.items()]
    with torch.device("meta"):
        mods = dict(arch_mod.Model(args).named_modules())
    linears = {n for n, mod in mods.items() if isinstance(mod, (nn.Linear, nn.Embedding))}
    moes = {n for n, mod in mods.items() if isinstance(mod, MoE)}
    row_fn = getattr(arch_mod, "gguf_row_transform", lambda _n, _a: None)
    tensor_fn = getattr(arch_mod, "gguf_tensor_transform", lambda _n, t, _a: t)
    weights: dict[str, torch.Tensor] = {}
    int4: dict[str, Callable[[], tuple[torch.Tensor, ...]]] = {}
    # On the CPU the native kernels read every block type they know in place from the mapped file.
    in_place = device == "cpu" and native.load() is None
    for name, info in gf.tensors.items():
        hf = next((h.replace("{i}", m[1]) if "{i}" in h else h for p, h in patterns if (m := p.match(name))), None)
        if hf is None:
            raise ModelFormatError(f"{where}: unexpected tensor {name} for architecture {gf.architecture}")
        rows = row_fn(hf, args)
        owner = hf.rsplit(".", 1)[0]
        matrix = hf.endswith(".weight") and owner in linears and len(info.shape) == 2
        experts = owner in moes and hf.rsplit(".", 1)[1] in MoE.EXPERT_WEIGHTS and len(info.shape) == 3
        if in_place and info.ggml_type in native.KERNEL_TYPES and (matrix or experts):
            data = gf.mapped(name).view(math.prod(info.shape[1:]), -1)  # the file's pages, in place
            order = rows(torch.arange(data.shape[0])) if rows else None
            int4[owner if matrix else hf] = functools.partial(Blocks, data, info.ggml_type, int(info.shape[0]), order)
            continue
        if info.ggml_type in INT4_TYPES and (matrix or experts):
            def parts(name=name, info=info, rows=rows):
                blocks = torch.from_numpy(gf.raw(name).copy()).view(math.prod(info.shape[1:]), -1)
                out = to_int4(blocks, info.ggml_type)
                return tuple(rows(t) for t in out) if rows else out

            int4[owner if matrix else hf] = parts
            continue
        # Other block-quantized matrices (Q8_0, Q6_K, Q5_x) are kept in bf16 rather than float32:
        # their own quantization error is larger than bf16's rounding, and it halves their memory.
        narrow = dtype is None and owner in linears and info.ggml_type not in FLOAT_TYPES
        t = gf.tensor(name, torch.bfloat16 if narrow else torch.float32)
        weights[hf] = tensor_fn(hf, rows(t) if rows else t, args)
    if args.tie_word_embeddings and "model.embed_tokens" in int4:
        int4["lm_head"] = int4["model.embed_tokens"]
    module = build_module(arch_mod, args, weights, dtype, where, int4)
    del weights, int4
    _narrow_modules(module)
    place(module, device, gpu_layers)
    tokenizer = Tokenizer.from_gguf_metadata(gf.metadata, where)
    release_free_memory()
    return LoadedModel(module, arch_mod.__name__.rsplit(".", 1)[1], cfg, tokenizer, str(path))


def _load_folder(folder: Path, device: str, dtype: torch.dtype | None, gpu_layers: int | None) -> LoadedModel:
    from runtime.tokenizer import Tokenizer

    cfg, _, arch_mod, args = registry.arch_for_folder(folder)
    files = safetensors_files(folder)
    size = sum(f.stat().st_size for f in files)
    check_fits(int(size * 1.05) if gpu_layers is None or device == "cpu" else 0, "cpu", f"{folder.name}")
    if dtype is None:
        dtype = DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or ""), None)
    weights = dict(iter_safetensors(files))
    module = build_module(arch_mod, args, weights, dtype, str(folder))
    del weights
    if device != "cpu":
        check_fits(size if gpu_layers is None else 0, device, folder.name)
    place(module, device, gpu_layers)
    gen_path = folder / "generation_config.json"
    generation = read_json(gen_path) if gen_path.is_file() else {}
    tokenizer = Tokenizer.from_dir(folder)
    release_free_memory()
    return LoadedModel(module, arch_mod.__name__.rsplit(".", 1)[1], cfg, tokenizer, str(folder), generation)
