"""From a model on disk to a LoadedModel: folder / .gguf -> registry -> module, placement, tokenizer.

    load_model(source, device, dtype, gpu_layers)   a folder (HF or mistral-inference), a .gguf file, or a
                                                    name the registered resolver maps to one (repo id, alias)
    local_path(source, resolve)                     source as a local path; other names go to the resolver
    set_resolver(fn)                                who maps names to local paths (the store, once imported);
                                                    the runtime never talks to the network itself
    check_config(args, shapes, where)               config values against the tensors, before anything is built
    build_module(arch_mod, args, weights, ...)      instantiate on the meta device, assign checked tensors
    LoadedModel                                     the module plus config, tokenizer, generation defaults

A GGUF file's Q4_0 / Q4_1 / Q4_K matrices stay 4-bit (quant/swap.py puts QuantLinear in their place);
its names map onto ours through the architecture's GGUF_NAMES table (runtime/gguf_names.py).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant import native, swap
from quant.formats import INT4_TYPES, to_int4
from quant.linear import Blocks
from runtime import compile, graphs, registry
from runtime.cache import StaticCache, cache_offset, make_static
from runtime.device import (
    check_fits,
    default_dtype,
    destination,
    keep_freed_memory,
    layer_devices,
    module_device,
    place,
    release_free_memory,
    resolve_device,
)
from runtime.errors import MambaCliError, ModelFormatError
from runtime.layers import MoE, fuse_projections
from runtime.models.base import hooks
from runtime.tokenizer import Tokenizer
from runtime.weights import iter_safetensors, read_gguf, read_json, read_safetensors_header, safetensors_files

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
FLOAT_TYPES = (0, 1, 30)  # ggml F32, F16, BF16
# Positions a captured decode step's caches hold by default (7B GQA: 1 GiB of bf16 keys and values)
STATIC_CAPACITY = 8192

Resolver = Callable[[str], Path]
_resolver: Resolver | None = None


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
        self.static: tuple[int, type] | None = None  # (capacity, graph kind) while decode steps are captured
        self.eos_ids: set[int] = set(_ids(config.get("eos_token_id")) + _ids(self.generation.get("eos_token_id")))
        if tokenizer is not None:
            self.eos_ids |= set(tokenizer.eos_ids)

    @property
    def args(self):
        return self.module.args

    @property
    def input_device(self) -> torch.device:
        """Where token ids go: the embedding's device (a 4-bit embedding holds only buffers)."""
        return module_device(self.module.input_embedding())

    @property
    def context_length(self) -> int | None:
        """Positions the model takes; while decode steps are captured, at most the static cache's capacity."""
        limit = getattr(self.module.args, "context_length", None)
        if self.static is not None and limit is not None:
            return min(limit, self.static[0])
        return limit

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: list | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (float32), or [B, 1, V] for the last position only when last_only.

        With a StaticCache (capture_decode), one-token steps replay a captured graph (runtime/graphs.py)."""
        tokens = tokens.to(self.input_device)
        if isinstance(cache, StaticCache):
            if tokens.shape[1] == 1 and self.static is not None:
                if cache.runner is None:
                    cache.runner = graphs.DecodeRunner(self.module, cache, self.static[1])
                return cache.runner.step(tokens)
            cache.cursor.fill_(cache_offset(cache))
        return self.module(tokens, cache, last_only=last_only)

    def make_cache(self, batch: int = 1) -> list:
        """A fresh cache (a StaticCache while decode steps are captured)."""
        return self.adopt_cache(self.module.make_cache(batch))

    def adopt_cache(self, cache: list) -> list:
        """`cache` in the form this model's steps take (a StaticCache while decode steps are captured)."""
        if self.static is None or isinstance(cache, StaticCache):
            return cache
        return make_static(cache, self.static[0])

    def capture_decode(self, on: bool = True, capacity: int | None = None, graph: type | None = None
                       ) -> str | None:
        """Replay one-token steps as captured CUDA graphs over preallocated caches (runtime/graphs.py);
        caches made from now on are StaticCaches of `capacity` positions (default: the context, at most
        STATIC_CAPACITY). graph=graphs.EagerGraph runs the same bookkeeping eagerly (CPU dry runs).
        Returns why decode steps are not captured (None when they are)."""
        self.static = None
        if not on:
            return "turned off"
        if graph is None:
            if os.environ.get("MAMBA_CLI_NO_CUDA_GRAPHS"):
                return "MAMBA_CLI_NO_CUDA_GRAPHS is set"
            if not self.on_one_gpu():
                return "CUDA graphs need the whole model on one GPU"
            graph = graphs.CudaGraph
        elif len({*self.layer_devices(), self.input_device}) != 1:
            return "a static cache needs the whole model on one device"
        limit = getattr(self.module.args, "context_length", None)
        self.static = (capacity or min(limit or STATIC_CAPACITY, STATIC_CAPACITY), graph)
        return None

    def compile(self, on: bool = True, warm_up: bool = True) -> str | None:
        """Run one-token decode steps of the CPU layers through compiled graphs (runtime/compile.py).

        With warm_up, compiles now (a decode step on a scratch cache) rather than at the first token.
        A model wholly on one GPU captures its decode steps as CUDA graphs instead (capture_decode: caches
        made from now on are static; each graph is captured at its first step, in milliseconds).
        Returns why compilation is off or failed (None when compiled code runs).
        """
        if self.on_one_gpu():
            self.compile_seconds = 0.0
            return self.capture_decode(on)
        why, self.compile_seconds = compile.compile_model(self, on, warm_up)
        return why

    def on_one_gpu(self) -> bool:
        """Whether every layer and the embedding sit on the same CUDA device."""
        devices = {*self.layer_devices(), self.input_device}
        return len(devices) == 1 and next(iter(devices)).type == "cuda"

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


# ---------------------------------------------------------------------------------------------- sources


def set_resolver(resolve: Resolver | None) -> None:
    """Register the function load_model asks for the local path of a name that is not a local file
    (a repo id or alias); `import store` registers store.resolve_model."""
    global _resolver
    _resolver = resolve


def local_path(source: str | os.PathLike, resolve: Resolver | None = None) -> Path:
    """source itself when it exists; a name that looks like a path but is not there is an error; any
    other name goes to `resolve` (default: the registered resolver)."""
    p = Path(source).expanduser()
    if p.exists():
        return p
    text = str(source)
    if text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1:
        raise MambaCliError(f"{text}: no such file or folder")
    resolve = resolve or _resolver
    if resolve is None:
        raise MambaCliError(f"{text}: no such file or folder (repo ids and aliases are resolved by the model "
                            "store: `import store` first, as the CLI does)")
    return resolve(text)


def load_model(source: str | os.PathLike, device: str = "auto", dtype: str | torch.dtype | None = None,
               gpu_layers: int | None = None) -> LoadedModel:
    """Load a model folder (HF or mistral-inference layout), a .gguf file, a Hub repo id or an alias."""
    t0 = time.perf_counter()
    path = local_path(source)
    device = resolve_device(device)
    if isinstance(dtype, str):
        if dtype == "auto":
            dtype = None
        elif dtype not in DTYPES:
            raise MambaCliError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        else:
            dtype = DTYPES[dtype]
    if dtype is None:
        dtype = default_dtype(device)
    keep_freed_memory()
    if not (path.is_dir() or path.is_file() and path.suffix == ".gguf"):
        raise MambaCliError(f"{path}: not a model folder or .gguf file")
    # No cyclic garbage collection while the model is built: the thousands of objects it makes (modules,
    # tensors, vocabulary strings) set off collections that each walk the whole heap torch's import left,
    # ~0.2 s of a small model's 0.4 s first load (mamba-130m Q4_0, fresh process: 0.40-0.42 -> 0.20-0.25 s)
    collect = gc.isenabled()
    gc.disable()
    try:
        m = (_load_gguf if path.is_file() else _load_folder)(path, device, dtype, gpu_layers)
    finally:
        if collect:
            gc.enable()
    m.load_seconds = time.perf_counter() - t0
    return m


# ---------------------------------------------------------------------------------------------- building

# Config fields that count or size something: each must be at least 1 and at most MAX_CONFIG_VALUE (no
# real model comes near: the widest vocabularies have ~262k entries); contexts may be longer.
POSITIVE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "state_size", "time_step_rank", "conv_kernel", "num_heads",
                   "n_groups", "chunk_size", "attn_layer_period", "expert_layer_period", "num_experts",
                   "num_experts_per_tok", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank")
MAX_CONFIG_VALUE = 1 << 22
MAX_CONTEXT = 1 << 30
LAYER_RE = re.compile(r"(?:^|\.)(?:blk|layers)\.(\d+)\.")
EMBEDDING_NAMES = ("token_embd.weight", "model.embed_tokens.weight", "backbone.embeddings.weight",
                   "backbone.embedding.weight", "embed_tokens.weight", "tok_embeddings.weight")


def check_config(args, shapes: dict[str, tuple[int, ...]], where: str, gguf: bool = False) -> None:
    """Config values checked against each other and the tensors (name -> shape, PyTorch order; GGUF order
    when `gguf`) before any module is built: sizes positive and bounded, as many layers as the tensors have
    blocks, the embedding as wide as hidden_size. ModelFormatError (one line) otherwise."""
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        if isinstance(v, bool) or not isinstance(v, int):
            continue
        low = 1 if f.name in POSITIVE_FIELDS else 0
        high = MAX_CONTEXT if f.name in ("max_position_embeddings", "sliding_window") else MAX_CONFIG_VALUE
        if not low <= v <= high:
            raise ModelFormatError(f"{where}: config value {f.name} = {v} is out of range ({low}..{high})")
    blocks = {int(m[1]) for n in shapes if (m := LAYER_RE.search(n))}
    n_blocks = max(blocks) + 1 if blocks else 0
    if args.num_hidden_layers != n_blocks:
        raise ModelFormatError(f"{where}: the config says {args.num_hidden_layers} layers but the tensors hold "
                               f"{n_blocks}")
    embd = next((shapes[n] for n in EMBEDDING_NAMES if n in shapes), None)
    if embd is not None and len(embd) == 2:
        width = embd[0] if gguf else embd[1]
        if width != args.hidden_size:
            raise ModelFormatError(f"{where}: the config says hidden size {args.hidden_size} but the embedding "
                                   f"is {width} wide")


class _NoRandomInit(torch.overrides.TorchFunctionMode):
    """nn.init's random initializers as no-ops (each returns its tensor): a meta-device skeleton's values are
    never read, every one is assigned from the checkpoint (build_module checks that none is missing), and
    kaiming_uniform_'s Python on 211 meta linears was ~40% of SmolLM2's skeleton (30 -> 17 ms a build).
    A torch-function mode, so other threads building modules meanwhile keep their initializers."""

    INITS = frozenset((nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.xavier_uniform_,
                       nn.init.xavier_normal_, nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.INITS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def meta_module(arch_mod, args, where: str) -> nn.Module:
    """The architecture instantiated on the meta device (no memory); config values it cannot build from
    are a model-format error."""
    try:
        with torch.device("meta"), _NoRandomInit():
            return arch_mod.Model(args)
    except (RuntimeError, ValueError, ZeroDivisionError, OverflowError, TypeError) as e:
        raise ModelFormatError(f"{where}: the config values do not describe a buildable model "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def build_module(arch_mod, args, weights: dict[str, torch.Tensor], dtype: torch.dtype | None,
                 where: str, int4: dict[str, Callable[[], tuple[torch.Tensor, ...] | Blocks]] | None = None,
                 module: nn.Module | None = None) -> nn.Module:
    """Instantiate an architecture on the meta device and assign checkpoint tensors, checking every shape.

    int4 maps module paths (an nn.Linear or nn.Embedding) to a function returning (q, scales, zeros) or
    Blocks: those modules become QuantLinear / QuantEmbedding (torch's int4 kernels) or BlockLinear /
    BlockEmbedding (GGUF blocks read in place by the native kernels) and stay 4-bit. The functions
    run one at a time, so only one matrix is ever held unpacked (1 byte per weight) during a load.
    `module`: the meta-device instance to fill, when the caller has built one already.
    """
    module = module if module is not None else meta_module(arch_mod, args, where)
    for path, parts in (int4 or {}).items():
        swap.swap_int4(module, path, parts(), dtype or torch.float32, where)
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
    del weights
    module.eval()
    fuse_projections(module, swap.fuse_linears)  # on the weights' devices: fused where they will run
    return module


KV_CACHE_ENV = "MAMBA_CLI_KV_CACHE"  # f16, f32 or auto (the default: f16 for 4-bit GGUF files, else f32)


def chosen_kv_dtype(four_bit: bool) -> torch.dtype | None:
    """The dtype of the attention layers' keys and values on the CPU (LanguageModel.kv_dtype; None: the compute
    dtype). float16 for 4-bit GGUF files, as llama.cpp keeps its cache: half the memory a position, and the
    one-query attention loops of a decode step read half the bytes (a layer of Mistral's 32/8 heads of 128 at
    2,048 positions, 32 layers' caches in turn: 1.1-1.35 -> 0.83-0.91 ms; SmolLM2's 9/3 of 64 at 550: 173 ->
    129 us). The outputs move by the rounding of keys and values through the attention (SmolLM2 Q4_1: logits
    ~3% apart, the text's next-token loss 0.002 apart; agreement with llama.cpp unchanged or closer).
    MAMBA_CLI_KV_CACHE=f32 keeps float32, =f16 asks for float16 for every model."""
    want = os.environ.get(KV_CACHE_ENV, "auto").strip().lower() or "auto"
    if want not in ("auto", "f16", "f32"):
        raise MambaCliError(f"{KV_CACHE_ENV}={want!r}: use f16, f32 or auto")
    return torch.float16 if want == "f16" or want == "auto" and four_bit else None


def gguf_config(gf, arch_mod) -> dict[str, Any]:
    """The HF-style config of a GGUF file: its `{arch}.*` metadata and what only the tensor list tells.
    KeyError / TypeError / ValueError when the metadata is missing or invalid."""
    embd = gf.tensors.get("token_embd.weight")
    if embd is None:
        raise ModelFormatError(f"{gf.path}: no token_embd.weight tensor")
    cfg = arch_mod.config_from_gguf(gf.metadata, int(embd.shape[1]))
    cfg.update(hooks(arch_mod).config_from_gguf_tensors(set(gf.tensors)))
    cfg["tie_word_embeddings"] = "output.weight" not in gf.tensors
    return cfg


def _load_gguf(path: Path, device: str, dtype: torch.dtype | None, gpu_layers: int | None) -> LoadedModel:
    """A GGUF file: llama.cpp names and layouts -> our modules; Q4_0/Q4_1/Q4_K linears stay 4-bit."""
    gf = read_gguf(path)
    where = str(path)
    if device == "cpu":
        check_fits(int(path.stat().st_size * 1.25), "cpu", path.name)
    arch_mod = registry.arch_for_gguf(gf.architecture, where)
    h = hooks(arch_mod)
    try:
        cfg = gguf_config(gf, arch_mod)
        args = arch_mod.Args.from_config(cfg)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        why = f"a count of 0 ({e})" if isinstance(e, ZeroDivisionError) else e
        raise ModelFormatError(f"{where}: missing or invalid metadata {why}") from None
    check_config(args, {n: t.shape for n, t in gf.tensors.items()}, where, gguf=True)
    names = arch_mod.GGUF_NAMES
    skeleton = meta_module(arch_mod, args, where)
    mods = dict(skeleton.named_modules())
    _check_gguf_sizes(gf, names, skeleton, where)
    dest = destination(skeleton, device, gpu_layers)  # where each tensor will live: it goes there at once
    need: dict[torch.device, int] = {}  # bytes each device will hold
    linears = {n for n, mod in mods.items() if isinstance(mod, (nn.Linear, nn.Embedding))}
    moes = {n for n, mod in mods.items() if isinstance(mod, MoE)}
    weights: dict[str, torch.Tensor] = {}
    int4: dict[str, Callable[[], tuple[torch.Tensor, ...] | Blocks]] = {}
    # On the CPU the native kernels read every block type they know in place from the mapped file.
    in_place = device == "cpu" and native.load() is None

    def classify(name: str, info) -> tuple[str, str, bool, bool]:
        """(our name, its module's name, a 2-D matrix of a linear, stacked experts)."""
        hf = names.to_ours(name)
        if hf is None:
            raise ModelFormatError(f"{where}: unexpected tensor {name} for architecture {gf.architecture}")
        owner = hf.rsplit(".", 1)[0]
        matrix = hf.endswith(".weight") and owner in linears and len(info.shape) == 2
        experts = owner in moes and hf.rsplit(".", 1)[1] in MoE.EXPERT_WEIGHTS and len(info.shape) == 3
        return hf, owner, matrix, experts

    if device != "cpu":  # what each device will hold, checked before any tensor moves (they do not come back)
        for name, info in gf.tensors.items():
            hf, owner, matrix, experts = classify(name, info)
            numel, d = math.prod(info.shape), dest(hf)
            if info.ggml_type in INT4_TYPES and (matrix or experts):
                nbytes = numel // 2 + numel // 32 * 8  # nibbles, float32 scales and zeros
            else:
                narrow = dtype is None and owner in linears and info.ggml_type not in FLOAT_TYPES
                nbytes = numel * (dtype.itemsize if dtype else 2 if narrow else 4)
            need[d] = need.get(d, 0) + nbytes
        check_placement(need, path.name)
    for name, info in gf.tensors.items():
        hf, owner, matrix, experts = classify(name, info)
        rows = h.gguf_row_transform(hf, args)
        if in_place and info.ggml_type in native.KERNEL_TYPES and (matrix or experts):
            data = gf.mapped(name).view(math.prod(info.shape[1:]), -1)  # the file's pages, in place
            order = rows(torch.arange(data.shape[0])) if rows else None
            int4[owner if matrix else hf] = functools.partial(Blocks, data, info.ggml_type, int(info.shape[0]),
                                                              order)
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
        # Mamba's dt_proj stays F16 when stored so (llama.cpp's converters write it so): every decode step reads it,
        # and runtime/ssm.py widens it where it is used, exactly (the same logits bit for bit; a float32 copy
        # read twice the bytes: mamba-130m's step p25 6.67 -> 6.15 ms, in-process A/B)
        keep16 = dtype is None and info.ggml_type == 1 and hf.endswith(".dt_proj.weight")
        t = gf.tensor(name, torch.float16 if keep16 else torch.bfloat16 if narrow else torch.float32)
        weights[hf] = h.gguf_tensor_transform(hf, rows(t) if rows else t, args).to(dest(hf))
    embeds = [k for k in int4 if isinstance(mods.get(k), nn.Embedding)]
    if args.tie_word_embeddings and embeds and "lm_head" in linears:  # the head reads the embedding's blocks
        int4["lm_head"] = int4[embeds[0]]
    if device != "cpu":
        int4 = {k: _moved(f, dest(k + ".weight" if k in linears else k)) for k, f in int4.items()}
    module = build_module(arch_mod, args, weights, dtype, where, int4, module=skeleton)
    module.kv_dtype = chosen_kv_dtype(four_bit=bool(int4))
    del weights, int4, skeleton, mods
    swap.narrow_modules(module)
    place(module, device, gpu_layers)
    tokenizer = Tokenizer.from_gguf_metadata(gf.metadata, where)
    release_free_memory()
    return LoadedModel(module, registry.short_name(arch_mod), cfg, tokenizer, str(path))


def _check_gguf_sizes(gf, names, meta: nn.Module, where: str) -> None:
    """Every GGUF tensor the module has a place for holds that place's element count: checked from the
    header, before any tensor is read (layouts differ, element counts do not)."""
    expected = {k: v.numel() for k, v in meta.state_dict().items()}
    for name, info in gf.tensors.items():
        hf = names.to_ours(name)
        want = expected.get(hf) if hf else None
        if want is not None and math.prod(info.shape) != want:
            raise ModelFormatError(f"{where}: tensor {name} has {math.prod(info.shape)} elements {list(info.shape)}, "
                                   f"the config implies {want}")


def _moved(parts: Callable[[], tuple[torch.Tensor, ...]], device: torch.device
           ) -> Callable[[], tuple[torch.Tensor, ...]]:
    """parts, its (q, scales, zeros) moved to device as soon as they are unpacked (one matrix at a time)."""
    return lambda: tuple(t.to(device) for t in parts())


def stream_weights(files: list[Path], dtype: torch.dtype | None, where: Callable[[str], torch.device]
                   ) -> dict[str, torch.Tensor]:
    """Every tensor of the files, read one at a time, cast to dtype and moved at once to where(name): host
    memory holds about one tensor at a time, whatever the destination (a GPU: the model never sits
    whole in host memory; "meta": nothing is kept, which is how tests measure the stream)."""
    weights = {}
    for name, t in iter_safetensors(files):
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        weights[name] = t.to(where(name))
        del t
    return weights


def bytes_by_device(module: nn.Module, where: Callable[[str], torch.device], itemsize: float | None = None
                    ) -> dict[torch.device, int]:
    """The bytes `module`'s parameters and buffers take on each device where(name) sends them; itemsize
    overrides the element size (a module built on the meta device in float32 for a bf16 checkpoint)."""
    out: dict[torch.device, int] = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        dev = where(name)
        out[dev] = out.get(dev, 0) + int(t.numel() * (itemsize or t.element_size()))
    return out


def check_placement(need: dict[torch.device, int], what: str, host_overhead: float = 1.05) -> None:
    """check_fits for every device: GPU memory for the GPU layers, host memory for the rest."""
    for dev, n in need.items():
        if dev.type == "cpu":
            check_fits(int(n * host_overhead), "cpu", what)
        elif dev.type == "cuda":
            check_fits(n, str(dev), what)


def _load_folder(folder: Path, device: str, dtype: torch.dtype | None, gpu_layers: int | None) -> LoadedModel:
    """A safetensors folder, streamed tensor by tensor to where each tensor will live (destination())."""
    cfg, _, arch_mod, args = registry.arch_for_folder(folder)
    files = safetensors_files(folder)
    shapes = {n: tuple(shape) for f in files for n, (_, shape) in read_safetensors_header(f).items()}
    check_config(args, shapes, str(folder))
    size = sum(f.stat().st_size for f in files)
    if dtype is None:
        dtype = DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or ""), None)
    skeleton = meta_module(arch_mod, args, str(folder))
    where = destination(skeleton, device, gpu_layers)
    numel = sum(p.numel() for p in skeleton.parameters())
    itemsize = dtype.itemsize if dtype is not None else size / max(1, numel)
    check_placement(bytes_by_device(skeleton, where, itemsize), folder.name)
    module = build_module(arch_mod, args, stream_weights(files, dtype, where), dtype, str(folder), module=skeleton)
    module.kv_dtype = chosen_kv_dtype(four_bit=False)
    del skeleton
    place(module, device, gpu_layers)
    gen_path = folder / "generation_config.json"
    generation = read_json(gen_path) if gen_path.is_file() else {}
    tokenizer = Tokenizer.from_dir(folder)
    release_free_memory()
    return LoadedModel(module, registry.short_name(arch_mod), cfg, tokenizer, str(folder), generation)
