"""llama.cpp's own ggml, as compiled inside llama-cpp-python, called through ctypes: the oracle for
block quantization (ggml_quantize_chunk), the type table and GGUF acceptance (gguf_init_from_file).
Tests that use it are marked `llamacpp`; without llama-cpp-python they skip, or fail under CI=true
(tests.fixtures.missing_oracle)."""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import numpy as np

from tests.fixtures import llama_cpp, missing_oracle


@functools.cache
def _lib() -> ctypes.CDLL | None:
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    path = Path(llama_cpp().__file__).parent / "lib" / f"libggml-base{suffix}"
    if not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    return lib


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def ggml() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        missing_oracle("llama-cpp-python is installed without lib/libggml-base (llama.cpp's ggml is the oracle)")
    return lib


def quantize(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """llama.cpp's quantization of float32 rows [R, K] (no importance matrix): uint8 [R, K/block*size]."""
    lib = ggml()
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    out = np.zeros((rows, n // lib.ggml_blck_size(ggml_type) * lib.ggml_type_size(ggml_type)), np.uint8)
    lib.ggml_quantize_init(ggml_type)
    written = lib.ggml_quantize_chunk(ggml_type, x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    assert written == out.nbytes
    return out


def type_traits(ggml_type: int) -> tuple[int, int]:
    lib = ggml()
    return lib.ggml_blck_size(ggml_type), lib.ggml_type_size(ggml_type)


def gguf_loads(path: Path, read_data: bool) -> bool:
    """Whether llama.cpp's gguf_init_from_file accepts the file (reading the tensor data if asked)."""
    lib = ggml()
    ctx = ctypes.c_void_p()
    params = _InitParams(False, ctypes.pointer(ctx) if read_data else None)
    g = lib.gguf_init_from_file(str(path).encode(), params)
    if ctx.value:
        lib.ggml_free(ctx)
    if g:
        lib.gguf_free(g)
    return bool(g)
