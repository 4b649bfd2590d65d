"""Device choice, memory checks, and the --gpu-layers split (first N layers on CUDA, the rest on CPU)."""

from __future__ import annotations

import os
import resource

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
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_cuda_bytes() -> int:
    """Peak CUDA memory torch allocated so far (0 without a GPU)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _to_device(x, dev: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(dev, non_blocking=True)
    if isinstance(x, tuple):
        return tuple(_to_device(v, dev) for v in x)
    return x


def place(model: nn.Module, device: str, gpu_layers: int | None) -> None:
    """Move `model` to `device`, or split it: layers [0, N) on CUDA, the rest, embeddings and head on CPU.

    Activations follow through forward pre-hooks that move a block's inputs to its device, so the
    architecture files stay device-agnostic.
    """
    _place(model, device, gpu_layers)
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


def _place(model: nn.Module, device: str, gpu_layers: int | None) -> None:
    layers = model.layers
    if gpu_layers is None or device == "cpu":
        model.to(device)
        return
    n = max(0, min(gpu_layers, len(layers)))
    model.to("cpu")
    for i, layer in enumerate(layers):
        dev = torch.device(device if i < n else "cpu")
        layer.to(dev)
        layer.register_forward_pre_hook(lambda _m, args, dev=dev: _to_device(args, dev))
    inside = {id(m) for layer in layers for m in layer.modules()}
    cpu = torch.device("cpu")
    for m in model.modules():
        if id(m) not in inside and any(True for _ in m.parameters(recurse=False)):
            m.register_forward_pre_hook(lambda _m, args: _to_device(args, cpu))


def layer_devices(model: nn.Module) -> list[torch.device]:
    return [next(layer.parameters()).device for layer in model.layers]


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
