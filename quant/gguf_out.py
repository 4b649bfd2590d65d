"""llama.cpp-compatible GGUF writer: names, layouts, metadata and tokenizer, written atomically.

    plan_from_source(source)        a model folder (HF or mistral-inference) or a .gguf -> Plan: the
                                    GGUF architecture, metadata and tensors (read lazily, llama.cpp layout)
    write_gguf(plan, dest, qtype)   quantize per quant/recipe.py and write; returns [Written]
    tokenizer_metadata(folder, n)   tokenizer.ggml.* keys for a folder's tokenizer

Names come from each architecture's GGUF_NAMES table (runtime/gguf_names.py), which the loader reads
with too; layouts and `{arch}.*` keys from its gguf_write_transform and gguf_metadata. The file is written to a
temp file beside the destination, re-read with runtime.weights.read_gguf and checked (every tensor's
name, type and shape, the architecture's config, the tokenizer) before it is fsynced and renamed:
Ctrl-C, a full disk or a failed check leave no partial file and the destination untouched.

Tokenizers: a SentencePiece tokenizer.model becomes `llama` (pieces, scores, types as llama.cpp's
converter writes them); a tokenizer.json BPE becomes `gpt2` when byte-level (merges, and the
tokenizer.ggml.pre whose pre-tokenizer reproduces the original's encoding of a probe text) or `llama`
when SentencePiece-like (metaspace; scores from merge ranks, so that llama.cpp's score-ordered merging
replays the merges). A .gguf source keeps its tokenizer keys as they are.
"""

from __future__ import annotations

import functools
import json
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from quant import formats, native
from quant.formats import GGML_BLOCKS, GGMLType
from quant.recipe import QUANT_TYPES, tensor_types
from runtime import registry
from runtime.errors import MambaCliError, ModelFormatError
from runtime.fileio import atomic_path
from runtime.loader import gguf_config, local_path
from runtime.models.base import hooks
from runtime.tokenizer import (
    BYTE,
    CONTROL,
    GGUF_PRE,
    NORMAL,
    SPM_FILES,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Tokenizer,
    read_spm_model,
)
from runtime.weights import read_gguf, safetensors_entries, safetensors_files

QUANTIZATION_VERSION = 2
# keys a .gguf source's metadata does not pass on: the writer sets them (or they describe the old file)
_OWN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")
# a text that tells pre-tokenizers apart: contractions, digit runs, punctuation runs, whitespace runs
PROBE = ("Hello world! It's 2024: the year's 1234567 tokens... don't   stop\n\n  'quoted'  "
         "x+=y**2; f(a,b) -> {c: [1, 22, 333]} # comment\tTab.  Zażółć gęślą jaźń. 你好 🙂 A.B.C.D\n")


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # PyTorch order (GGUF's ne reversed)
    load: Callable[[], torch.Tensor]  # the tensor in llama.cpp's layout (float32, bf16 or f16)
    source_type: GGMLType | None = None  # a .gguf source's stored type (copied raw when unchanged)
    raw: Callable[[], np.ndarray] | None = None


@dataclass
class Plan:
    arch: str  # general.architecture
    metadata: dict[str, Any]
    tensors: list[PlannedTensor]
    n_layers: int
    n_experts: int = 0
    tokenizer: Any = None  # runtime.tokenizer.Tokenizer the written file must reproduce
    source_bytes: int = 0
    name: str = ""
    path: Path = Path()
    keep: list[Any] = field(default_factory=list)  # objects the loaders need alive (a mapped .gguf)


@dataclass
class Written:
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    nbytes: int


# ---------------------------------------------------------------------------------------------
# sources


def plan_from_source(source: str | Path) -> Plan:
    """A model folder or .gguf file (or a repo id / alias, resolved as load_model does) -> Plan."""
    path = local_path(source)
    if path.is_file() and path.suffix == ".gguf":
        return plan_from_gguf(path)
    if path.is_dir():
        return plan_from_folder(path)
    raise MambaCliError(f"{path}: not a model folder or .gguf file")


class Deferred(torch.Tensor):
    """A meta tensor that knows how to make its value. An architecture's sanitize() runs on these, so its
    renames, expert stacks and splits are recorded, not done: the writer then makes one tensor at a time,
    reading only the checkpoint tensors that one is made of (a Mixtral expert stack: its 8 experts)."""

    make: Callable[[], torch.Tensor]

    @staticmethod
    def __new__(cls, meta: torch.Tensor, make: Callable[[], torch.Tensor]) -> Deferred:
        t = torch.Tensor._make_subclass(cls, meta)
        t.make = make
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)  # on the meta tensors: shapes and dtypes only

        def real():
            with torch._C.DisableTorchFunctionSubclass():
                return func(*_real(args), **_real(kwargs))

        if func is torch.stack and len(args) == 1 and kwargs.get("dim", 0) == 0 and isinstance(out, torch.Tensor):
            real = functools.partial(_stack, args[0], out)
        return _deferred(out, real)


def _stack(parts: list, meta: torch.Tensor) -> torch.Tensor:
    """torch.stack(parts) made part by part into its place: an expert stack never held twice."""
    out = torch.empty(meta.shape, dtype=meta.dtype)
    for i, p in enumerate(parts):
        out[i] = _real(p)
    return out


def _real(x: Any) -> Any:
    if isinstance(x, Deferred):
        return x.make()
    if isinstance(x, (list, tuple)):
        return type(x)(_real(v) for v in x)
    if isinstance(x, dict):
        return {k: _real(v) for k, v in x.items()}
    return x


def _deferred(out: Any, make: Callable[[], Any]) -> Any:
    if isinstance(out, torch.Tensor) and not isinstance(out, Deferred):
        return Deferred(out, make)
    if isinstance(out, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in out):
        return type(out)(_deferred(v, lambda i=i: make()[i]) for i, v in enumerate(out))
    return out


def plan_from_folder(folder: Path) -> Plan:
    """HF (config.json + safetensors) or mistral-inference (params.json) folder -> Plan. Nothing is read
    here: each planned tensor reads its checkpoint tensors when the writer asks for it."""
    cfg, cfg_path, arch_mod, args = registry.arch_for_folder(folder)
    files = safetensors_files(folder)
    entries = safetensors_entries(files)
    leaves = {name: Deferred(torch.empty(e.shape, dtype=e.dtype, device="meta"), e.read)
              for name, e in entries.items()}
    weights = arch_mod.Model.sanitize(leaves, args)
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    names = arch_mod.GGUF_NAMES
    transform = hooks(arch_mod).gguf_write_transform
    tensors = []
    for hf, t in weights.items():
        name = names.to_gguf(hf)
        if name is None:
            raise ModelFormatError(f"{folder}: tensor {hf} has no GGUF name for {registry.gguf_architecture(arch_mod)}")
        shape = tuple(transform(hf, torch.empty(t.shape, dtype=t.dtype, device="meta"), args).shape)
        make = t.make if isinstance(t, Deferred) else (lambda t=t: t)
        # in the checkpoint's dtype (a row permutation or a reshape is exact in any): the writer converts
        # to float32 a slice of rows at a time
        tensors.append(PlannedTensor(name, shape, lambda hf=hf, make=make: transform(hf, make(), args)))
    tensors.sort(key=lambda p: names.sort_key(p.name))
    try:
        meta = arch_mod.gguf_metadata(args)
    except ValueError as e:
        raise MambaCliError(f"{cfg_path}: {e}") from None
    tokenizer = Tokenizer.from_dir(folder)
    meta = {"general.name": folder.name, **meta, **tokenizer_metadata(folder, args.vocab_size, cfg, tokenizer)}
    experts = getattr(args, "num_local_experts", 0) or getattr(args, "num_experts", 0)
    return Plan(registry.gguf_architecture(arch_mod), meta, tensors, args.num_hidden_layers,
                experts if experts > 1 else 0, tokenizer, sum(f.stat().st_size for f in files), folder.name, folder)


def plan_from_gguf(path: Path) -> Plan:
    """A .gguf file -> Plan: its names, layouts and metadata as they are; tensors dequantized on demand."""
    gf = read_gguf(path)
    arch = gf.architecture
    registry.arch_for_gguf(arch, str(path))
    meta = {k: v for k, v in gf.metadata.items() if k not in _OWN_KEYS and not k.startswith("split.")}
    tensors = [PlannedTensor(n, tuple(reversed(info.shape)), functools.partial(_gguf_tensor, gf, n),
                             GGMLType(info.ggml_type), functools.partial(gf.read, n))
               for n, info in gf.tensors.items()]
    experts = int(gf.metadata.get(f"{arch}.expert_count", 0) or 0)
    return Plan(arch, meta, tensors, int(gf.metadata.get(f"{arch}.block_count", 0)), experts if experts > 1 else 0,
                Tokenizer.from_gguf_metadata(gf.metadata, str(path)), path.stat().st_size, path.stem, path, [gf])


_FLOAT_DTYPES = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


def _gguf_tensor(gf, name: str) -> torch.Tensor:
    """A .gguf source's tensor, read (not mapped); float types as stored (the writer converts slices),
    block types dequantized to float32."""
    info = gf.tensors[name]
    t, shape = GGMLType(info.ggml_type), tuple(reversed(info.shape))
    if t in _FLOAT_DTYPES and info.nbytes:
        return torch.from_numpy(gf.read(name)).view(_FLOAT_DTYPES[t]).reshape(shape)
    if t in formats.DEQUANTIZABLE and info.nbytes:
        return formats.dequantize(torch.from_numpy(gf.read(name)).reshape(-1, GGML_BLOCKS[t][1]), t).reshape(shape)
    return gf.tensor(name, torch.float32)  # empty, or a type it cannot read (its error)


# ---------------------------------------------------------------------------------------------
# tokenizer


def tokenizer_metadata(folder: Path, n_vocab: int, cfg: dict[str, Any], tok) -> dict[str, Any]:
    """tokenizer.ggml.* keys for a folder's tokenizer, padded to the model's n_vocab rows."""
    spm = next((folder / n for n in SPM_FILES if (folder / n).is_file()), None)
    if spm is not None:
        proto = read_spm_model(spm)
        tokens, scores, types = list(proto.pieces), list(proto.scores), list(proto.types)
        meta: dict[str, Any] = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                                "tokenizer.ggml.add_space_prefix": proto.add_dummy_prefix,
                                "tokenizer.ggml.remove_extra_whitespaces": proto.remove_extra_whitespaces}
        ids = {"bos": proto.bos_id, "eos": proto.eos_id, "unknown": proto.unk_id}
    else:
        meta, tokens, scores, types, ids = _tokenizer_json_metadata(folder, tok)
    if len(tokens) > n_vocab:
        raise ModelFormatError(f"{folder}: the tokenizer has {len(tokens)} tokens, the model only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):  # as llama.cpp's converter pads
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    meta["tokenizer.ggml.tokens"] = tokens
    if scores:
        meta["tokenizer.ggml.scores"] = [float(s) for s in scores]
    meta["tokenizer.ggml.token_type"] = [int(t) for t in types]
    if meta["tokenizer.ggml.model"] == "gpt2":
        meta.pop("tokenizer.ggml.scores", None)
    if tok.bos_id is not None:
        ids["bos"] = tok.bos_id
    if tok.eos_ids:
        ids["eos"] = tok.eos_ids[0]
    pad = cfg.get("pad_token_id")
    if isinstance(pad, int) and 0 <= pad < n_vocab:
        ids["padding"] = pad
    for key, i in ids.items():
        if isinstance(i, int) and 0 <= i < n_vocab:
            meta[f"tokenizer.ggml.{key}_token_id"] = i
    meta["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = False
    if isinstance(tok.chat_template, str):
        meta["tokenizer.chat_template"] = tok.chat_template
    meta = _with_gpt2_pre(meta, tok, folder) if meta["tokenizer.ggml.model"] == "gpt2" else meta
    return meta


def _components(node: Any, kind: str) -> bool:
    """Does a tokenizer.json normalizer/pre-tokenizer/decoder (possibly a Sequence) contain `kind`?"""
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    parts = [n for key in ("pretokenizers", "normalizers", "decoders") for n in node.get(key) or []]
    return any(_components(n, kind) for n in parts)


def _tokenizer_json_metadata(folder: Path, tok) -> tuple[dict, list[str], list[float], list[int], dict]:
    data = json.loads(tok.tok.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise MambaCliError(f"{folder}/tokenizer.json: a {model.get('type')} tokenizer has no GGUF form "
                            "mamba-cli writes (BPE only)")
    vocab: dict[str, int] = model["vocab"]
    added = {a["id"]: a for a in data.get("added_tokens") or []}
    n = max([*vocab.values(), *added]) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    byte_level = _components(data.get("pre_tokenizer"), "ByteLevel") or _components(data.get("decoder"), "ByteLevel")
    if not byte_level and model.get("byte_fallback"):
        for t, i in vocab.items():
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
                types[i] = BYTE
    for i, a in added.items():
        tokens[i], types[i] = a["content"], CONTROL if a.get("special") else USER_DEFINED
    unk = model.get("unk_token")
    ids: dict[str, int] = {}
    if unk in vocab:
        ids["unknown"] = vocab[unk]
        types[vocab[unk]] = UNKNOWN
    if byte_level:
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": merges}
        return meta, tokens, [], types, ids
    pre, norm = data.get("pre_tokenizer"), data.get("normalizer")
    if not (_components(pre, "Metaspace") or _components(norm, "Prepend") or _components(norm, "Replace")):
        raise MambaCliError(f"{folder}/tokenizer.json: neither byte-level nor SentencePiece-like; no GGUF form "
                            "mamba-cli writes")
    scores = [0.0] * n
    for rank, m in enumerate(merges):  # llama.cpp merges the best-scoring pair first: score = -rank
        made = vocab.get(m.replace(" ", "", 1))
        if made is not None and scores[made] == 0.0:
            scores[made] = -float(rank)
    prepend = _metaspace_prepend(pre) or ("always" if _components(norm, "Prepend") else "never")
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.add_space_prefix": prepend != "never",
            "tokenizer.ggml.remove_extra_whitespaces": False}
    return meta, tokens, scores, types, ids


def _metaspace_prepend(node: Any) -> str | None:
    if not isinstance(node, dict):
        return None
    if node.get("type") == "Metaspace":
        if "prepend_scheme" in node:
            return str(node["prepend_scheme"])
        return "always" if node.get("add_prefix_space", True) else "never"
    return next((p for n in node.get("pretokenizers") or [] if (p := _metaspace_prepend(n))), None)


def _with_gpt2_pre(meta: dict[str, Any], tok, folder: Path) -> dict[str, Any]:
    """Pick the tokenizer.ggml.pre whose pre-tokenizer reproduces the original tokenizer on PROBE."""
    want = tok.encode(PROBE)
    for pre in ("llama-bpe", "qwen2", "smollm", "gpt-2", "dbrx", "default", *GGUF_PRE):
        cand = {**meta, "tokenizer.ggml.pre": pre}
        if Tokenizer.from_gguf_metadata(cand, str(folder)).encode(PROBE) == want:
            return cand
    raise MambaCliError(f"{folder}/tokenizer.json: no llama.cpp pre-tokenizer (tokenizer.ggml.pre) reproduces "
                        "this tokenizer; it cannot be written to GGUF")


# ---------------------------------------------------------------------------------------------
# writing


def pack(t: torch.Tensor, ggml_type: GGMLType) -> np.ndarray:
    """float tensor [..., K] -> uint8 [..., bytes per row] in ggml_type. Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K go
    to the native packers when they are built (quant/kernels/ggml_quantize.cpp: the same bytes, many times
    faster), Q5_0 to the gguf package's packer, the rest to quant/formats.py."""
    if ggml_type in native.PACK_TYPES and native.load() is None:
        x = t.detach().to("cpu", torch.float32).contiguous()
        block = GGML_BLOCKS[ggml_type][0]
        return native.quantize(x.reshape(-1, block), int(ggml_type)).reshape(*x.shape[:-1], -1).numpy()
    if ggml_type in formats.QUANTIZABLE:
        return formats.quantize(t, ggml_type).numpy()
    if ggml_type == GGMLType.Q5_0:
        return gguf.quants.quantize(t.float().numpy(), gguf.GGMLQuantizationType.Q5_0)
    raise ValueError(f"cannot write {ggml_type.name}")


def _nbytes(shape: tuple[int, ...], t: GGMLType) -> int:
    block, size = GGML_BLOCKS[t]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block * size)


def _add_kv(w, key: str, value: Any) -> None:
    T = gguf.GGUFValueType
    if isinstance(value, bool):
        w.add_key_value(key, value, T.BOOL)
    elif isinstance(value, int):
        w.add_key_value(key, value, T.UINT32 if 0 <= value < 2**32 else T.INT64)
    elif isinstance(value, float):
        w.add_key_value(key, value, T.FLOAT32)
    elif isinstance(value, str):
        w.add_key_value(key, value, T.STRING)
    elif isinstance(value, list):
        sub = (T.STRING if value and isinstance(value[0], str) else T.FLOAT32 if value and isinstance(value[0], float)
               else T.BOOL if value and isinstance(value[0], bool) else T.INT32)
        w.add_key_value(key, value, T.ARRAY, sub_type=sub)
    else:
        raise TypeError(f"metadata {key}: cannot write a {type(value).__name__}")


SLICE_ELEMS = 1 << 24  # weights converted to float32 and packed per step: 64 MiB of float32 at a time
PREFETCH_ELEMS = 1 << 28  # the next tensor is read while this one is packed when both hold fewer weights


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _slices(p: PlannedTensor, t: GGMLType, x: torch.Tensor | None) -> Iterator[tuple[np.ndarray, int]]:
    """The tensor's bytes in the file, as (uint8 array, weights it holds) slices of whole rows."""
    if x is None:  # a .gguf source's tensor, kept in its type: copied as it is
        yield np.ascontiguousarray(p.raw()).reshape(-1).view(np.uint8), _numel(p.shape)
        return
    rows = x.reshape(-1, p.shape[-1] if p.shape else 1)
    step = max(1, SLICE_ELEMS // max(1, rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        part = rows[i:i + step]
        yield np.ascontiguousarray(pack(part, t)).reshape(-1).view(np.uint8), part.numel()


def write_gguf(plan: Plan, dest: str | Path, qtype: str,
               progress: Callable[[Written, int, int], None] | None = None) -> tuple[list[Written], list[str]]:
    """Write plan to dest as qtype (quant/recipe.py decides per tensor); atomic, validated before the rename.

    Three things overlap: reading the next tensor (a thread), packing this one (here, on torch's CPU
    threads), writing the packed bytes (a thread). Memory: the tensor being packed, the next one when
    both are small (PREFETCH_ELEMS), a float32 slice and two packed slices in flight.

    Returns the tensors written and warnings. progress(written, elements_done, elements_total) is
    called after each slice (a tensor's last call has its end)."""
    file_type = QUANT_TYPES[qtype][0]
    types = tensor_types([(p.name, p.shape) for p in plan.tensors], qtype, plan.n_layers, plan.n_experts)
    w = gguf.GGUFWriter(None, plan.arch)
    for key, value in plan.metadata.items():
        _add_kv(w, key, value)
    w.add_file_type(file_type)
    w.add_quantization_version(QUANTIZATION_VERSION)
    out = []
    for p in plan.tensors:
        t = types[p.name]
        if p.shape[-1] % GGML_BLOCKS[t][0]:
            raise ModelFormatError(f"tensor {p.name}: rows of {p.shape[-1]} do not split into {t.name} blocks")
        out.append(Written(p.name, t, p.shape, _nbytes(p.shape, t)))
        w.add_tensor_info(p.name, (*p.shape[:-1], out[-1].nbytes // max(1, _numel(p.shape[:-1]))),
                          np.dtype(np.uint8), out[-1].nbytes, raw_dtype=gguf.GGMLQuantizationType(int(t)))
    total = sum(_numel(p.shape) for p in plan.tensors) or 1

    def read(i: int) -> torch.Tensor | None:
        p = plan.tensors[i]
        return None if p.source_type == out[i].ggml_type and p.raw is not None else p.load()

    in_flight: deque = deque()
    with atomic_path(dest) as tmp, ThreadPoolExecutor(1, "gguf-read") as reader, \
            ThreadPoolExecutor(1, "gguf-write") as writer:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            fout = w.fout[0]

            def put(fn, *args) -> None:
                in_flight.append(writer.submit(fn, *args))
                while len(in_flight) > 2:
                    in_flight.popleft().result()

            done, ahead = 0, None
            for i, (p, o) in enumerate(zip(plan.tensors, out, strict=True)):
                x = ahead.result() if ahead is not None else read(i)
                ahead = None
                if i + 1 < len(plan.tensors) and _numel(p.shape) + _numel(plan.tensors[i + 1].shape) <= PREFETCH_ELEMS:
                    ahead = reader.submit(read, i + 1)
                put(_align, w, fout)
                for data, n in _slices(p, o.ggml_type, x):
                    put(fout.write, data)
                    done += n
                    if progress is not None:
                        progress(o, done, total)
                put(w.write_padding, fout, o.nbytes)
                del x
            while in_flight:
                in_flight.popleft().result()
        finally:
            wait(in_flight)  # a failure above: let the queued writes end before the file closes
            w.close()
        warnings = validate(tmp, plan, out)
    return out, warnings


def _align(w, fout) -> None:
    w.write_padding(fout, fout.tell())


def validate(path: Path, plan: Plan, written: list[Written]) -> list[str]:
    """Re-read a written file: every tensor as planned, the architecture's config parses, the tokenizer
    rebuilds. Returns a warning when the rebuilt tokenizer encodes PROBE differently from the source's
    (a tokenizer.json whose Metaspace pre-tokenizer splits words has no exact SentencePiece form)."""
    gf = read_gguf(path)
    fail = f"the GGUF written for {plan.name or path.name} does not read back:"
    if gf.architecture != plan.arch:
        raise MambaCliError(f"{fail} architecture {gf.architecture}")
    if list(gf.tensors) != [o.name for o in written]:
        raise MambaCliError(f"{fail} tensor list differs")
    for o in written:
        info = gf.tensors[o.name]
        if info.ggml_type != o.ggml_type or tuple(reversed(info.shape)) != o.shape or info.nbytes != o.nbytes:
            raise MambaCliError(f"{fail} tensor {o.name} is {GGMLType(info.ggml_type).name} {list(info.shape)}")
    arch_mod = registry.arch_for_gguf(gf.architecture, str(path))
    try:
        arch_mod.Args.from_config(gguf_config(gf, arch_mod))
    except (KeyError, TypeError, ValueError) as e:
        raise MambaCliError(f"{fail} metadata {e}") from None
    tok = Tokenizer.from_gguf_metadata(gf.metadata, str(path))
    if plan.tokenizer is not None and tok.encode(PROBE) != plan.tokenizer.encode(PROBE):
        return [f"the GGUF tokenizer ({gf.metadata.get('tokenizer.ggml.model')}) encodes some texts differently "
                "from the source's tokenizer"]
    return []
