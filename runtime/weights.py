"""Weight and config readers. Never unpickles; never runs code shipped with a model.

    read_config(dir)          config.json (HF) or params.json (mistral-inference), validated JSON
    safetensors_files(dir)    model.safetensors | sharded files from the index | consolidated.safetensors
    iter_safetensors(files)   (name, tensor) pairs, one tensor in memory at a time, errors name the file
    read_safetensors_header(path)  {name: (dtype, shape)} from a bounds-checked header; no data read
    safetensors_entries(files) name -> StEntry (file, dtype, shape, byte span): read() reads that one
                              tensor into memory of its own, for streaming one tensor at a time
    read_gguf(path)           GGUFFile: metadata, tensor table, raw(name), tensor(name, dtype);
                              the header is validated whole before any tensor is mapped
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quant.formats import DEQUANTIZABLE, GGML_BLOCKS, GGMLType, dequantize
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
    """Yield every tensor of the files (by name within a file); a malformed file raises ModelFormatError
    naming it.

    Each tensor is read into its own anonymous mapping with a plain read, not through a map of the file:
    a file map keeps every page it touched resident in this process until it closes, and a heap block,
    once freed, stays resident (the small allocations made in between fragment the heap), so a load
    streaming tensors to a GPU (runtime/loader.py) would hold about the whole file either way. A mapping
    of its own is unmapped as soon as the last tensor over it goes: the stream holds one tensor.
    """
    seen: set[str] = set()
    for path in files:
        header, start = _check_safetensors_header(path)
        with open(path, "rb") as f:
            for name in sorted(header):
                if name in seen:
                    raise ModelFormatError(f"{path}: tensor {name} appears in more than one shard")
                seen.add(name)
                dtype, shape, begin, end = header[name]
                buf = _own_mapping(end - begin)
                f.seek(start + begin)
                if f.readinto(buf.numpy()) != end - begin:
                    raise ModelFormatError(f"{path}: tensor {name!r} could not be read whole (truncated file?)")
                yield name, buf.view(_ST_DTYPES[dtype]).reshape(shape)


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """The tensors a safetensors file holds, {name: (dtype, shape)}, from its checked header alone."""
    tensors, _ = _check_safetensors_header(Path(path))
    return {name: (dtype, shape) for name, (dtype, shape, _, _) in tensors.items()}


@dataclass(frozen=True)
class StEntry:
    """One tensor of a safetensors file, located by the checked header."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    def read(self) -> torch.Tensor:
        """The tensor, read (not mapped) into a mapping of its own: freed when dropped."""
        buf = _own_mapping(self.end - self.begin)
        with open(self.path, "rb") as f:
            f.seek(self.begin)
            if self.end > self.begin and f.readinto(buf.numpy()) != self.end - self.begin:
                raise ModelFormatError(f"{self.path}: a tensor could not be read whole (truncated file?)")
        return buf.view(self.dtype).reshape(self.shape)


def safetensors_entries(files: list[Path]) -> dict[str, StEntry]:
    """Every tensor of the files, located (headers checked as iter_safetensors does), none read."""
    out: dict[str, StEntry] = {}
    for path in files:
        header, start = _check_safetensors_header(path)
        for name, (dtype, shape, begin, end) in header.items():
            if name in out:
                raise ModelFormatError(f"{path}: tensor {name} appears in more than one shard")
            out[name] = StEntry(path, _ST_DTYPES[dtype], tuple(shape), start + begin, start + end)
    return out


def _own_mapping(n: int) -> torch.Tensor:
    """n bytes (uint8) in an anonymous mapping of their own, unmapped when the last tensor over them goes."""
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, n), dtype=torch.uint8)


def _check_safetensors_header(path: Path) -> tuple[dict[str, tuple[str, list[int], int, int]], int]:
    """Bounds-check the header ourselves so errors are ours, one line, naming the file. Returns each
    tensor's (dtype, shape, begin, end) by name, offsets within the data, and where the data starts."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot open ({e.strerror})") from None
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, SAFETENSORS_MAX_HEADER):
            raise ModelFormatError(f"{path}: safetensors header of {n} bytes does not fit the file (or is over "
                                   f"the {SAFETENSORS_MAX_HEADER >> 20} MB limit)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ModelFormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    spans = []
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            if len(info["shape"]) > 8:
                raise ValueError("too many dimensions")
            shape = [int(d) for d in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError, OverflowError):  # Overflow: an Infinity from the JSON
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
        tensors[name] = (dtype, shape, begin, end)
    spans.sort()
    for (_, e1, n1), (b2, _, n2) in zip(spans, spans[1:], strict=False):
        if b2 < e1:
            raise ModelFormatError(f"{path}: tensors {n1!r} and {n2!r} overlap")
    return tensors, 8 + n


SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
              "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
_ST_SIZES = {name: dt.itemsize for name, dt in _ST_DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# GGUF: the whole header is parsed and checked against the file's size before any tensor is
# mapped, so a truncated or hostile file fails fast with one line naming what is wrong. The
# rules are llama.cpp's (ggml/src/gguf.cpp, gguf_init_from_reader), listed in docs/formats.md.

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # ggml keeps a tensor name in char[64], the terminating NUL included
INT64_MAX = 2**63 - 1
_MAX_ARRAY_DEPTH = 4  # GGUF allows arrays of arrays; llama.cpp reads none, real files use none
# Limits beyond llama.cpp's, so that parsing costs seconds and megabytes whatever the file claims; each is
# many times what real files hold (the largest vocabularies have ~262k tokens and ~500k merges, big MoE
# files a few thousand tensors and ~60 keys; no real token is longer than a few hundred bytes).
MAX_TENSORS = 65_536
MAX_KV = 16_384
MAX_ARRAY_LEN = 1 << 22  # elements in one metadata array
MAX_ARRAY_TOTAL = 1 << 23  # elements in all metadata arrays together (each costs a Python object)
MAX_NESTED_ARRAY_LEN = 4_096  # elements in an array of arrays (real files have none)
MAX_ARRAY_STRING = 1 << 16  # bytes in one string inside an array (a vocabulary token, a merge)
_U64 = struct.Struct("<Q")
SHORT_STRINGS_SPAN = 16 << 20  # short_strings' bytes at most (a 262k vocabulary: ~4 MB); past it, the loop
MAX_KEY = 1 << 16  # bytes in a metadata key

# GGUF metadata value types: id -> (name, little-endian numpy dtype); 8 is string, 9 is array
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4
_GGUF_SCALARS: dict[int, tuple[str, str]] = {
    0: ("UINT8", "<u1"), 1: ("INT8", "<i1"), 2: ("UINT16", "<u2"), 3: ("INT16", "<i2"),
    4: ("UINT32", "<u4"), 5: ("INT32", "<i4"), 6: ("FLOAT32", "<f4"), 7: ("BOOL", "<u1"),
    10: ("UINT64", "<u8"), 11: ("INT64", "<i8"), 12: ("FLOAT64", "<f8"),
}
# fewest bytes one value of a type can occupy: bounds every count before anything is read
_MIN_VALUE_BYTES = {**{t: np.dtype(d).itemsize for t, (_, d) in _GGUF_SCALARS.items()},
                    _GGUF_STRING: 8, _GGUF_ARRAY: 12}
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. shape is in GGUF order (ne0, the contiguous axis, first)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


class GGUFFile:
    """A validated GGUF file: metadata and tensor table in memory, tensor data mapped on demand."""

    def __init__(self, path: Path, version: int, metadata: dict[str, Any], tensors: dict[str, TensorInfo],
                 alignment: int, data_offset: int) -> None:
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.alignment = alignment
        self.data_offset = data_offset
        self._map: np.memmap | None = None

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise ModelFormatError(f"{self.path}: no general.architecture string in the GGUF metadata")
        return arch

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path}: no tensor named {name!r}")
        return info

    def _bytes(self, info: TensorInfo) -> np.ndarray:
        if self._map is None:
            # copy-on-write: the arrays are writable (torch.from_numpy wants that), the file never is
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        return self._map[info.offset:info.offset + info.nbytes]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (uint8, read-only view of the mapped file)."""
        view = self._bytes(self._info(name)).view()
        view.flags.writeable = False
        return view

    def read(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (uint8), read into memory of its own rather than mapped: nothing
        stays resident once it is dropped (the writer streams a .gguf source this way)."""
        info = self._info(name)
        buf = np.empty(info.nbytes, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(info.offset)
            view, done = memoryview(buf), 0
            while done < info.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise ModelFormatError(f"{self.path}: truncated while reading tensor {name}")
                done += n
        return buf

    def mapped(self, name: str) -> torch.Tensor:
        """The tensor's bytes as stored, as a uint8 tensor over the file's copy-on-write mapping: pages are
        read on first use and shared with every process mapping the file (the native kernels' input)."""
        return torch.from_numpy(self._bytes(self._info(name)))

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized to dtype, in PyTorch order (GGUF's ne reversed). Stored F32 read as
        float32 is a view of the file's copy-on-write mapping (paged in lazily, never written back)."""
        info = self._info(name)
        t = GGMLType(info.ggml_type)
        if t not in DEQUANTIZABLE:
            known = ", ".join(sorted(x.name for x in DEQUANTIZABLE))
            raise ModelFormatError(f"{self.path}: tensor {name} is stored as {t.name}, which mamba-cli "
                                   f"cannot read (it reads {known})")
        shape = tuple(reversed(info.shape))
        if info.nbytes == 0:
            return torch.zeros(shape, dtype=dtype)
        data = self._bytes(info)
        if data.ctypes.data % 16:  # an odd custom general.alignment: give the kernels aligned memory
            data = data.copy()
        block, size = GGML_BLOCKS[t]
        row = info.shape[0] if info.shape else 1  # a 0-dimensional tensor is one element
        rows = torch.from_numpy(data).view(-1, row // block * size)
        if t == GGMLType.F32:
            return dequantize(rows, t).reshape(shape).to(dtype)
        # In pieces of ~8 MB of blocks: a whole-matrix dequantization would hold several float32 copies
        # of it at once (a 49k-vocabulary embedding: ~450 MB of scratch for a 56 MB bf16 result).
        out = torch.empty(rows.shape[0], row, dtype=dtype)
        step = max(1, (8 << 20) // rows.shape[1])
        for i in range(0, rows.shape[0], step):
            out[i : i + step] = dequantize(rows[i : i + step], t)
        return out.reshape(shape)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate a GGUF file's header; ModelFormatError (one line, naming the file) if malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        if size < 4:
            raise ModelFormatError(f"{path}: not a GGUF file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _parse_gguf(path, view, size)
            finally:
                view.release()


class _Cursor:
    """Reads little-endian fields from the header, checking every length against the bytes left."""

    def __init__(self, path: Path, buf: memoryview) -> None:
        self.path, self.buf, self.pos = path, buf, 0
        self.array_total = 0  # array elements read so far (MAX_ARRAY_TOTAL)

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: malformed GGUF: {what}")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def short(self, what: str, n: int, pos: int) -> ModelFormatError:
        self.pos = pos
        return self.fail(f"{what} needs {n} bytes at offset {pos} but only {self.left()} remain "
                         "(truncated or corrupt file)")

    def take(self, n: int, what: str) -> memoryview:
        if n > self.left():
            raise self.short(what, n, self.pos)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, max_len: int | None = None) -> str:
        n = self.unpack("<Q", f"{what} length")
        if max_len is not None and n >= max_len:
            raise self.fail(f"{what} is {n} bytes long; at most {max_len - 1} are allowed")
        return bytes(self.take(n, what)).decode("utf-8", errors="surrogateescape")

    def count(self, vtype: int, what: str) -> int:
        n = self.unpack("<Q", f"{what} length")
        if n * _MIN_VALUE_BYTES[vtype] > self.left():
            raise self.fail(f"{what} claims {n} elements, more than the {self.left()} bytes left can hold")
        limit = MAX_NESTED_ARRAY_LEN if vtype == _GGUF_ARRAY else MAX_ARRAY_LEN
        if n > limit:
            raise self.fail(f"{what} has {n} elements, over the limit of {limit}")
        self.array_total += n
        if self.array_total > MAX_ARRAY_TOTAL:
            raise self.fail(f"{what}: the metadata arrays hold over {MAX_ARRAY_TOTAL} elements in all, over "
                            "the limit")
        return n

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _GGUF_SCALARS:
            name, dt = _GGUF_SCALARS[vtype]
            v = np.frombuffer(self.take(np.dtype(dt).itemsize, what), dtype=dt)[0].item()
            return bool(v) if name == "BOOL" else v
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype != _GGUF_ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype}")
        etype = self.unpack("<I", f"{what} element type")
        if etype not in _MIN_VALUE_BYTES:
            raise self.fail(f"{what} has unknown element type {etype}")
        if etype == _GGUF_ARRAY and depth + 1 >= _MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays deeper than {_MAX_ARRAY_DEPTH} levels")
        n = self.count(etype, what)
        if etype in _GGUF_SCALARS:
            name, dt = _GGUF_SCALARS[etype]
            arr = np.frombuffer(self.take(n * np.dtype(dt).itemsize, what), dtype=dt)
            return (arr != 0).tolist() if name == "BOOL" else arr.tolist()
        if etype == _GGUF_STRING:
            return self.strings(n, what)
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(n)]

    def strings(self, n: int, what: str) -> list[str]:
        """n strings in a row (vocabularies: ~100k of them). Found and decoded as one block where the
        layout is proven (short_strings), else a loop without take()'s checks (SmolLM2's 49k: 45 -> 25 ms);
        where that meets something wrong, the checked loop reads them again and says what."""
        if n > 64 and (found := short_strings(self.buf, self.pos, n)) is not None:
            out, self.pos = found
            return out
        buf, pos, end = self.buf, self.pos, len(self.buf)
        out: list[str] = []
        append, length = out.append, _U64.unpack_from
        try:
            for _ in range(n):
                (k,) = length(buf, pos)  # struct.error past the end
                if k > MAX_ARRAY_STRING:
                    break
                pos += 8 + k
                append(str(buf[pos - k:pos], "utf-8", "surrogateescape"))  # decoded from the mapped bytes
        except struct.error:
            pass
        if len(out) == n and pos <= end:  # a string cut off by the end decoded short: pos tells
            self.pos = pos
            return out
        return self.checked_strings(n, what)

    def checked_strings(self, n: int, what: str) -> list[str]:
        buf, pos, end = self.buf, self.pos, len(self.buf)
        out: list[str] = []
        for i in range(n):
            if 8 > end - pos:
                raise self.short(f"{what}[{i}] length", 8, pos)
            (k,) = _U64.unpack_from(buf, pos)
            pos += 8
            if k > MAX_ARRAY_STRING:
                self.pos = pos - 8
                raise self.fail(f"{what}[{i}] is {k} bytes long, over the limit of {MAX_ARRAY_STRING}")
            if k > end - pos:
                raise self.short(f"{what}[{i}]", k, pos)
            out.append(str(buf[pos:pos + k], "utf-8", "surrogateescape"))
            pos += k
        self.pos = pos
        return out


def short_strings(buf: memoryview, pos: int, n: int) -> tuple[list[str], int] | None:
    """The n strings at pos when each is 1-255 bytes long with no zero byte in it (a vocabulary's tokens, its
    merges), and the position after them; None when that is not so. Done over the bytes at once (SmolLM2's
    49k tokens or merges: 25-28 -> ~10 ms of a ~200 ms load): a length under 256 is a nonzero-free run of 7
    bytes after its first, so the candidates are where such runs start; the first n of them are the strings'
    lengths exactly when each is the previous one's end (checked for all). Then each length's first seven
    bytes are dropped and its eighth (a zero) stays between the strings as a separator that none of them
    holds (checked: n + 1 pieces), and all are decoded at once."""
    end = min(len(buf), pos + SHORT_STRINGS_SPAN)  # the bytes looked at (then ~3x that in scratch) at most
    if n < 1 or end - pos < 8:
        return None
    w = min(end - pos, 16 * n + 64)  # a guess at the strings' extent, doubled until n candidates are in it
    while True:
        a = np.frombuffer(buf, np.uint8, w, pos)
        z = a == 0
        run = z[1:w - 6].copy()
        for j in range(2, 8):
            run &= z[j:w - 7 + j]
        cand = np.flatnonzero(run)
        if w == end - pos or len(cand) >= n and cand[n - 1] + 8 + 255 <= w:  # the n-th string's end is in too
            break
        w = min(end - pos, 2 * w)
    if len(cand) < n or cand[0] != 0:
        return None
    cand = cand[:n]
    lens = a[cand].astype(np.int64)
    stop = int(cand[-1] + 8 + lens[-1])
    if stop > w or not np.array_equal(cand[1:], cand[:-1] + 8 + lens[:-1]):
        return None
    keep = np.ones(stop, dtype=bool)
    keep[(cand[:, None] + np.arange(7)).ravel()] = False
    out = a[:stop][keep].tobytes().decode("utf-8", "surrogateescape").split("\x00")
    if len(out) != n + 1:
        return None
    del out[0]
    return out, pos + stop


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _parse_gguf(path: Path, buf: memoryview, size: int) -> GGUFFile:
    cur = _Cursor(path, buf)
    magic = bytes(cur.take(4, "magic"))
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    version = cur.unpack("<I", "version")
    if version and not version & 0xFFFF:
        raise cur.fail(f"version field reads {version:#x}: a big-endian GGUF, which is not supported")
    if version not in GGUF_VERSIONS:
        hint = "; v1 files must be re-converted" if version == 1 else ""
        raise cur.fail(f"version {version}, only versions 2 and 3 are supported{hint}")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "metadata count")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left():
        raise cur.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than the "
                       f"{cur.left()} bytes left in the file can hold")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise cur.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, over the limits of "
                       f"{MAX_KV} and {MAX_TENSORS}")

    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if not key:
            raise cur.fail(f"metadata key #{i} is empty")
        if len(key) > MAX_KEY:
            raise cur.fail(f"metadata key #{i} is {len(key)} bytes long, over the limit of {MAX_KEY}")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        vtype = cur.unpack("<I", f"type of {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")
        types[key] = vtype

    alignment = GGUF_DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        if types["general.alignment"] != _GGUF_UINT32:
            raise cur.fail(f"general.alignment must be a UINT32, not type {types['general.alignment']}")
        alignment = metadata["general.alignment"]
        if alignment == 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment {alignment} is not a power of two")

    tensors: dict[str, TensorInfo] = {}
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}", max_len=GGML_MAX_NAME)
        if name in tensors:
            raise cur.fail(f"tensor name {name!r} appears twice")
        n_dims = cur.unpack("<I", f"dimension count of {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions; at most {GGML_MAX_DIMS} are allowed")
        shape = tuple(cur.unpack("<q", f"shape of {name!r}") for _ in range(n_dims))
        if any(d < 0 for d in shape):
            raise cur.fail(f"tensor {name!r} has a negative dimension {shape}")
        n_elems = 1
        for d in shape:
            n_elems *= d
        if n_elems > INT64_MAX:
            raise cur.fail(f"tensor {name!r} shape {shape} has more than 2^63 elements")
        ttype = cur.unpack("<i", f"type of {name!r}")
        if ttype not in GGML_BLOCKS:
            raise cur.fail(f"tensor {name!r} has unknown ggml type {ttype}")
        block, bsize = GGML_BLOCKS[GGMLType(ttype)]
        row = shape[0] if shape else 1
        if row % block:
            raise cur.fail(f"tensor {name!r} rows of {row} elements are not a multiple of the "
                           f"{GGMLType(ttype).name} block size {block}")
        offset = cur.unpack("<Q", f"data offset of {name!r}")
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} data offset {offset} is not a multiple of "
                           f"the alignment {alignment}")
        tensors[name] = TensorInfo(name, ttype, shape, offset, n_elems // block * bsize)

    # the table is sound; now every tensor must lie inside the file, padding after the last included
    data_offset = _pad(cur.pos, alignment)
    data_end = data_offset
    for info in tensors.values():
        kind = f"{GGMLType(info.ggml_type).name} {info.shape}"
        if info.nbytes > size:
            raise cur.fail(f"tensor {info.name!r} {kind} needs {info.nbytes} bytes, more than the whole file "
                           f"({size} bytes)")
        end = data_offset + info.offset + info.nbytes
        if end > size:
            raise cur.fail(f"tensor {info.name!r} ({info.nbytes} bytes at data offset {info.offset}) runs "
                           f"past the end of the file ({size} bytes); is the download complete?")
        data_end = max(data_end, _pad(end, alignment))
    if data_end > size:
        raise cur.fail(f"the data section ends {data_end - size} bytes short of its final alignment padding "
                       f"({size} of {data_end} bytes); is the download complete?")
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end1, n1), (start2, _, n2) in zip(spans, spans[1:], strict=False):
        if start2 < end1:
            raise cur.fail(f"tensors {n1!r} and {n2!r} overlap")
    tensors = {n: TensorInfo(n, t.ggml_type, t.shape, data_offset + t.offset, t.nbytes)
               for n, t in tensors.items()}
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset)
