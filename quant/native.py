"""The native 4-bit CPU kernels (quant/kernels/ggml_cpu.cpp) and K-quant packers (ggml_quantize.cpp) as torch
custom ops: built once, loaded, called.

The C++ files are compiled with torch's extension tooling (ninja) for this machine's CPU (-march=native:
AVX2 here, AVX-512 or NEON elsewhere, plain C++ where the compiler finds no SIMD it knows) into
~/.cache/mamba-cli/kernels/<key>/, where key covers the source, the torch version and the CPU. Later
processes load the built library directly (a few milliseconds). Without a compiler, or with
MAMBA_CLI_NO_NATIVE=1, `load()` returns why, and 4-bit layers use torch's int4 kernels instead.

Ops (namespace mamba_cli, CPU):
    ggml_mm(x, w, type, k, rows=None)  x (M, K) float32 @ blocks w (N, row_bytes) uint8 -> (M, N) float32;
                                       output column j reads weight row rows[j] when rows is given
    ggml_mm_cat(x, ws, types, k, rows) several ggml_mm of one x side by side -> (M, sum of N) float32, the
                                       activations quantized once per format, one parallel region
    ggml_mm_id(x, ws, type, k, ids)    row r of x (R, K) times blocks ws[ids[r]] (each (N, row_bytes), one type)
                                       -> (R, N) float32: a MoE layer's chosen experts, ids on the device
    ggml_dequant(w, type, k)           blocks (N, row_bytes) -> (N, K) float32
    ggml_quantize(x, type)             blocks (B, 32 or 256) float32 -> (B, bytes) uint8, Q4_0 / Q4_1 / Q8_0 /
                                       Q4_K / Q6_K, as llama.cpp's reference packers (quant/formats.py is
                                       their torch port)
    simd()                             which path was compiled: "avx2", "avx2+vnni", "neon+dotprod" or
                                       "generic"
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name("kernels") / name for name in ("ggml_cpu.cpp", "ggml_quantize.cpp")]
# ggml type ids the kernels take (gguf's GGMLQuantizationType values)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K = 2, 3, 6, 7, 8, 12, 14
KERNEL_TYPES = frozenset({Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K})
PACK_TYPES = frozenset({Q4_0, Q4_1, Q8_0, Q4_K, Q6_K})  # the types ggml_quantize packs

_state: dict[str, str | bool | None] = {}  # "error": why the kernels are unavailable (None once loaded); "fakes"


def _cflags() -> list[str]:
    """-march=native picks this CPU's SIMD; MAMBA_CLI_NATIVE_SIMD=generic builds the plain C++ path."""
    # -fopenmp: at::parallel_for is a header template over OpenMP in torch's CPU builds; without it the
    # kernels run on one thread. The OpenMP runtime is the one torch already loaded (same soname).
    base = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp"]
    if os.environ.get("MAMBA_CLI_NATIVE_SIMD") == "generic":
        return base
    arch = platform.machine().lower()
    return [*base, "-mcpu=native" if arch in ("aarch64", "arm64") else "-march=native"]


def _cpu_id() -> str:
    """What the compiled code depends on besides the source: the CPU's model and features."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def build_key() -> str:
    h = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES))
    for part in (torch.__version__, platform.machine(), _cpu_id(), " ".join(_cflags())):
        h.update(part.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    if root := os.environ.get("MAMBA_CLI_KERNEL_DIR"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mamba-cli" / "kernels"


def register_fakes() -> None:
    """Shapes for torch.compile's fake tensors, so compiled graphs call the ops without a break. Called by
    runtime/compile.py's setup() rather than at load: five registrations cost ~20 ms, a tenth of a small
    model's load, and only compiling needs them."""
    if _state.get("fakes") or load() is not None:
        return
    _state["fakes"] = True

    @torch.library.register_fake("mamba_cli::ggml_mm")
    def _(x, w, type, k, rows=None):
        return x.new_empty(x.shape[0], w.shape[0] if rows is None else rows.shape[0], dtype=torch.float32)

    @torch.library.register_fake("mamba_cli::ggml_mm_cat")
    def _(x, ws, types, k, rows):
        n = sum(w.shape[0] if r is None else r.shape[0] for w, r in zip(ws, rows, strict=True))
        return x.new_empty(x.shape[0], n, dtype=torch.float32)

    @torch.library.register_fake("mamba_cli::ggml_mm_id")
    def _(x, ws, type, k, ids):
        return x.new_empty(x.shape[0], ws[0].shape[0], dtype=torch.float32)

    @torch.library.register_fake("mamba_cli::ggml_dequant")
    def _(w, type, k):
        return w.new_empty(w.shape[0], k, dtype=torch.float32)

    @torch.library.register_fake("mamba_cli::ggml_quantize")
    def _(x, type):
        return x.new_empty(x.shape[0], {Q4_0: 18, Q4_1: 20, Q8_0: 34, Q4_K: 144}.get(type, 210), dtype=torch.uint8)


def load(on_build: Callable[[], AbstractContextManager] | None = None) -> str | None:
    """Load the kernels, building them first if this machine has no build yet. Returns None when loaded,
    else why not (no compiler, turned off, a failed build). on_build wraps a build (a spinner)."""
    if os.environ.get("MAMBA_CLI_NO_NATIVE"):  # checked on every call: a test or a caller may set it late
        return "turned off (MAMBA_CLI_NO_NATIVE)"
    if "error" in _state:
        return _state["error"]
    _state["error"] = why = _load(on_build)
    return why


def _library() -> tuple[str, Path, Path]:
    """(extension name, its build folder, the built library) for this source, torch and CPU."""
    name = f"mamba_cli_kernels_{build_key()}"
    folder = cache_dir() / name
    return name, folder, folder / f"{name}.so"


def _load(on_build: Callable[[], AbstractContextManager] | None) -> str | None:
    name, folder, lib = _library()
    try:
        if not lib.is_file():
            if shutil.which(os.environ.get("CXX", "c++")) is None:
                return "no C++ compiler found (install g++ or clang to build the native kernels)"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder.parent / f"{name}.lock", "w") as lock, (on_build or contextlib.nullcontext)():
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
                if not lib.is_file():
                    _build(name, folder)
        torch.ops.load_library(str(lib))
    except Exception as e:  # a compiler error, a broken cache entry: fall back, keep the reason
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return f"native kernels unavailable: {last} (delete {folder} to rebuild them)"
    return None


def _build(name: str, folder: Path) -> None:
    from torch.utils import cpp_extension  # imported only to build: it pulls in setuptools

    cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=_cflags(), extra_ldflags=["-fopenmp"],
                       build_directory=str(folder), is_python_module=False, verbose=False)


def built() -> bool:
    """Whether load() needs no build (already loaded or failed, built before, or turned off)."""
    if "error" in _state or os.environ.get("MAMBA_CLI_NO_NATIVE"):
        return True
    return _library()[2].is_file()


def available() -> bool:
    return load() is None


def describe() -> str:
    """One line for -v: which 4-bit CPU path runs."""
    why = load()
    if why is None:
        return f"native 4-bit kernels ({torch.ops.mamba_cli.simd()})"
    return f"torch int4 kernels ({why})"


def _ops():
    if (why := load()) is not None:
        raise RuntimeError(why)
    return torch.ops.mamba_cli


def mm(x: torch.Tensor, w: torch.Tensor, ggml_type: int, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    return _ops().ggml_mm(x, w, ggml_type, k, rows)


def dequant(w: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor:
    return _ops().ggml_dequant(w, ggml_type, k)


def quantize(x: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Blocks (B, 32 or 256) float32 -> (B, bytes per block) uint8 in ggml_type (PACK_TYPES), on torch's
    CPU threads."""
    return _ops().ggml_quantize(x, ggml_type)
