"""Device choice, memory checks, and the --gpu-layers split (first N layers on CUDA, the rest on CPU).

    resolve_device / default_dtype       'auto' -> cuda or cpu; bf16 on GPUs that have it
    check_fits                           refuse a load that cannot fit, per device
    place / split / split_plan           put a model on one device, or split it by layers
    destination                          where place() will put each state_dict tensor (the loader
                                         streams every tensor straight there)
    to_device                            the copies between split layers (a copy to the CPU is blocking)
    keep_freed_memory                    glibc's malloc told to keep freed activations for the next pass
    release_free_memory                  ... and to hand back what loading freed
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
from collections.abc import Callable

import torch
from torch import nn

from runtime.errors import MambaCliError, ResourceError


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'. 'cuda' without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MambaCliError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MambaCliError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


def default_dtype(device: str) -> torch.dtype | None:
    """The weights' dtype when none is asked for: bf16 on a GPU that supports it, else the checkpoint's (None)."""
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        topo = f"/sys/devices/system/cpu/cpu{c}/topology"
        try:
            with open(f"{topo}/physical_package_id") as pkg, open(f"{topo}/core_id") as core:
                cores.add((pkg.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def set_threads(threads: int | None = None) -> int:
    """torch's CPU threads: `threads`, else OMP_NUM_THREADS if set, else the physical cores; returns it."""
    if threads:
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(physical_cores())
    return torch.get_num_threads()


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_MMAP_BYTES, KEEP_TRIM_BYTES = 64 << 20, 128 << 20
_malloc_kept: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (whose malloc the two functions below tune), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to 64 MiB in the process (up to 128 MiB of them at the
    heap's top) instead of returning each to the system, once per process; True when it was set.

    A forward pass allocates and frees the same activation sizes layer after layer. glibc serves blocks above
    its mmap threshold (128 KiB, raised as it sees larger ones, at most 32 MiB) with fresh mappings and
    returns them on free, and trims the heap's top beyond twice that, so the next layer page-faults its
    memory in again, zeroed: 270-540k minor faults (1-2 GB) in mamba2-130m's 2,048-token prefill, ~1.8 us
    each. With these settings ~0: the prefill's median 445 / 515 / 548 / 552 / 411 / 536 -> 549 / 591 / 659
    / 560 / 662 / 675 tok/s (six pairs of fresh processes, alternating). The 64 MiB covers the 7B shapes'
    activations at 512 tokens (Mistral's gate/up output is 58 MiB). The peak is what a pass needs, as
    before; what loading freed is still handed back (release_free_memory). Left alone where the user set
    glibc's malloc variables (MALLOC_*_, GLIBC_TUNABLES) and off glibc."""
    global _malloc_kept
    if _malloc_kept is None:
        _malloc_kept = False
        user = any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ) or "GLIBC_TUNABLES" in os.environ
        libc = None if user else _glibc()
        if libc is not None:
            _malloc_kept = bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_BYTES)) and bool(
                libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_BYTES))
    return _malloc_kept


def release_free_memory() -> None:
    """Hand the heap that loading freed (dequantization and packing scratch) back to the system (glibc)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def available_ram() -> int:
    """Bytes of RAM this process can still take (MemAvailable, or cgroup limit minus usage)."""
    if os.environ.get("MAMBA_CLI_FAKE_FREE_RAM"):  # lets tests exercise the refusal
        return int(os.environ["MAMBA_CLI_FAKE_FREE_RAM"])
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = int(open("/sys/fs/cgroup/memory.max").read().strip())
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
        avail = min(avail or limit, limit - used)
    except (OSError, ValueError):
        pass
    return avail if avail is not None else 1 << 62


def check_fits(nbytes: int, device: str, what: str) -> None:
    """Refuse before loading when the weights cannot fit, with the numbers."""
    if os.environ.get("MAMBA_CLI_SKIP_MEMCHECK"):
        return
    if device == "cpu":
        have = available_ram()
    else:
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        have = free
    if nbytes > have:
        raise ResourceError(f"{what} needs {gib(nbytes)} but only {gib(have)} is free on {device}; "
                            "try a 4-bit copy (--quantize q4_k_m, or mamba-cli quantize), --gpu-layers, or "
                            "--device cpu")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: VmHWM, the high-water mark of its own memory map.

    getrusage's ru_maxrss is only the fallback: Linux carries it across exec, so a process started by a
    big one (a test runner) reports its parent's peak until it exceeds it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_cuda_bytes() -> int:
    """Peak CUDA memory torch allocated so far (0 without a GPU)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def to_device(x, dev: torch.device):
    """x (a tensor, or a tuple of them and other things) on `dev`, ready to read when this returns.

    A copy to the CPU is blocking: PyTorch returns from a non_blocking GPU -> CPU copy before the bytes
    have arrived, and the CPU layers or head would read stale memory. Copies to a GPU may be
    non_blocking: they are ordered on that GPU's stream before the kernels that read them.
    """
    if isinstance(x, torch.Tensor):
        if x.device == dev:
            return x
        return x.to(dev, non_blocking=dev.type != "cpu")
    if isinstance(x, tuple):
        return tuple(to_device(v, dev) for v in x)
    return x


def place(model: nn.Module, device: str, gpu_layers: int | None) -> None:
    """Move `model` to `device`, or split it (--gpu-layers N): layers [0, N) on `device`, the rest on the CPU;
    the embedding goes with the first layer, the final norm and head with the last (split_plan).

    Activations follow through forward pre-hooks that move a block's inputs to its device, so the
    architecture files stay device-agnostic.
    """
    if gpu_layers is None or device == "cpu":
        model.to(device)
    else:
        split(model, device, gpu_layers)
    for mod in model.modules():
        if hasattr(mod, "prepare"):
            mod.prepare()
    gemv_layout(model)


def gemv_layout(model: nn.Module) -> int:
    """Store fp32 CPU projections with more outputs than inputs transposed in memory; how many were.

    The weight keeps its name, shape and values; only its strides change (a column-major view). torch's
    CPU matrix-vector product reads that layout 1.3-1.6x faster for such shapes (e.g. 3072 x 576:
    523 -> 334 us, 2 threads), and a decode step of an fp32 model is mostly these products; for
    bf16/fp16 weights the same layout is many times slower, so they are left alone. Tied heads are
    included: the embedding lookup gathers its few rows from the transposed storage.
    """
    done = 0
    for mod in model.modules():
        if type(mod) is not nn.Linear:  # exactly: not the int4 / cast subclasses
            continue
        w = mod.weight
        if w.dtype == torch.float32 and w.device.type == "cpu" and w.shape[0] > w.shape[1] and w.is_contiguous():
            w.data = w.data.t().contiguous().t()
            done += 1
    return done


def holds_tensors(mod: nn.Module) -> bool:
    """Whether a module has parameters or buffers of its own (a 4-bit embedding has only buffers)."""
    return any(True for _ in mod.parameters(recurse=False)) or any(b is not None for b in mod._buffers.values())


def layers_prefix(model: nn.Module) -> str:
    """The path of model.layers among the module names ("model.layers", "backbone.layers")."""
    return next(name for name, mod in model.named_modules() if mod is model.layers)


def split_plan(model: nn.Module, device: str | torch.device, gpu_layers: int,
               host: str | torch.device = "cpu") -> tuple[list[torch.device], dict[str, torch.device]]:
    """Where --gpu-layers puts things: (the device of each layer, the device of each module outside the
    layers that holds tensors, by name). Layers [0, N) go to `device`, the rest to `host`; the input
    embedding goes with the first layer, every other outer module (final norm, head) with the last one,
    as llama.cpp offloads its output layer with the last layer. An embedding whose weight the head shares
    (tied) goes with the head. Works on a model built on the meta device (nothing is moved)."""
    device, host = torch.device(device), torch.device(host)
    n = max(0, min(gpu_layers, len(model.layers)))
    devices = [device if i < n else host for i in range(len(model.layers))]
    prefix = layers_prefix(model) + "."
    emb = model.input_embedding()
    outer = {name: mod for name, mod in model.named_modules()
             if name and not name.startswith(prefix) and holds_tensors(mod)}
    plan = {name: devices[0] if mod is emb else devices[-1] for name, mod in outer.items()}
    emb_params = {id(p) for p in emb.parameters(recurse=False)}
    tied = any(id(p) in emb_params for mod in outer.values() if mod is not emb for p in mod.parameters(recurse=False))
    if tied:
        plan = {name: devices[-1] for name in plan}
    return devices, plan


def destination(model: nn.Module, device: str, gpu_layers: int | None) -> Callable[[str], torch.device]:
    """A function from a state_dict name of `model` to the device `place` will put that tensor on."""
    if gpu_layers is None or device == "cpu":
        dev = torch.device(device)
        return lambda name: dev
    devices, plan = split_plan(model, device, gpu_layers)
    prefix = layers_prefix(model) + "."
    owners = sorted(plan, key=len, reverse=True)

    def where(name: str) -> torch.device:
        if name.startswith(prefix):
            return devices[int(name[len(prefix):].split(".", 1)[0])]
        owner = next((o for o in owners if name.startswith(o + ".")), None)
        return plan[owner] if owner is not None else torch.device("cpu")

    return where


def split(model: nn.Module, device: str | torch.device, gpu_layers: int, host: str | torch.device = "cpu") -> None:
    """Place `model` as split_plan says and hook every placed module to move its inputs to its device.

    `device` may be the CPU itself (tests run the split with the CPU standing in for the GPU).
    """
    devices, plan = split_plan(model, device, gpu_layers, host)
    for layer, dev in zip(model.layers, devices, strict=True):
        layer.to(dev)
        layer.register_forward_pre_hook(lambda _m, args, dev=dev: to_device(args, dev))
    for name, dev in plan.items():
        mod = model.get_submodule(name)
        mod._apply(lambda t, dev=dev: t.to(dev), recurse=False)
        mod.register_forward_pre_hook(lambda _m, args, dev=dev: to_device(args, dev))


def module_device(mod: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU when it holds none)."""
    for t in mod.parameters():
        return t.device
    for t in mod.buffers():
        return t.device
    return torch.device("cpu")


def layer_devices(model: nn.Module) -> list[torch.device]:
    return [module_device(layer) for layer in model.layers]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512_BF16 / AMX-BF16, ARM BF16); without it
    torch's bf16 CPU matmuls convert in software and run several times slower than float32."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags |= set(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
