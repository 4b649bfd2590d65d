"""Weight and config readers. Never unpickles; never runs code shipped with a model.

    read_config(dir)          config.json (HF) or params.json (mistral-inference), validated JSON
    safetensors_files(dir)    model.safetensors | sharded files from the index | consolidated.safetensors
    iter_safetensors(files)   (name, tensor) pairs, one tensor in memory at a time, errors name the file

GGUF reading (validated before any tensor is mapped) lives in the GGUF section below.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from runtime.errors import ModelFormatError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data


def read_config(folder: Path) -> tuple[dict[str, Any], Path]:
    """The model's config and the file it came from (config.json preferred over params.json)."""
    for name in ("config.json", "params.json"):
        p = folder / name
        if p.is_file():
            return read_json(p), p
    raise ModelFormatError(f"{folder}: no config.json or params.json; is this a model folder?")


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(f"{index}: missing or empty weight_map")
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            p = folder / shard  # a plain name in the folder; it may be a symlink (the Hub cache's blobs)
            if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                raise ModelFormatError(f"{index}: shard {shard!r} points outside the model folder")
            if not p.is_file():
                raise ModelFormatError(f"{index}: shard {shard} is missing; re-run `mamba-cli pull`")
            files.append(p)
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    consolidated = folder / "consolidated.safetensors"
    if consolidated.is_file():
        return [consolidated]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        raise ModelFormatError(f"{folder}: only pickle weights (.bin/.pt) found; they are never loaded. "
                               "Use a safetensors or GGUF version of this model")
    raise ModelFormatError(f"{folder}: no *.safetensors weights found")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of the files; a malformed file raises ModelFormatError naming it."""
    from safetensors import SafetensorError, safe_open

    seen: set[str] = set()
    for path in files:
        _check_safetensors_header(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name in seen:
                        raise ModelFormatError(f"{path}: tensor {name} appears in more than one shard")
                    seen.add(name)
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ModelFormatError(f"{path}: malformed safetensors file ({e})") from None


def _check_safetensors_header(path: Path) -> None:
    """Bounds-check the header ourselves so errors are ours, one line, naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100 * 1024 * 1024):
            raise ModelFormatError(f"{path}: safetensors header of {n} bytes does not fit the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not 0 <= begin <= end <= data_len:
            raise ModelFormatError(f"{path}: tensor {name!r} lies outside the file")
        itemsize = _ST_SIZES.get(dtype)
        if itemsize is None:
            raise ModelFormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        count = 1
        for d in shape:
            if d < 0:
                raise ModelFormatError(f"{path}: tensor {name!r} has a negative dimension")
            count *= d
        if count * itemsize != end - begin:
            raise ModelFormatError(f"{path}: tensor {name!r} shape {shape} does not match its byte size")
        spans.append((begin, end, name))
    spans.sort()
    for (_, e1, n1), (b2, _, n2) in zip(spans, spans[1:], strict=False):
        if b2 < e1:
            raise ModelFormatError(f"{path}: tensors {n1!r} and {n2!r} overlap")


_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
