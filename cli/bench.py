"""`mamba-cli bench MODEL`: llama-bench-style speed figures for our runtime.

Reports load time, prefill tokens/s (-p), decode tokens/s (-n) at a context depth (-d), peak memory,
and how close decode comes to the memory-bandwidth limit: bytes of weights read per token divided by
this machine's measured copy bandwidth.
"""

from __future__ import annotations

import json
import resource
import statistics
import time

import torch
import typer
from rich.console import Console
from rich.table import Table

from cli.common import COMPILE_HELP, DEVICE_OPT, DTYPE_OPT, GPU_LAYERS_OPT, MODEL_ARG


def copy_bandwidth(nbytes: int = 256 * 2**20, device: str = "cpu") -> float:
    """Bytes/s of a large tensor copy (read + write counted), best of 5."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bytes_per_token(m) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (only one row is read)."""
    embed = {id(t) for mod in m.module.modules() if isinstance(mod, torch.nn.Embedding) for t in mod.parameters()}
    seen, total = set(), 0
    for t in list(m.module.parameters()) + list(m.module.buffers()):
        if t.data_ptr() in seen or (id(t) in embed and not m.config.get("tie_word_embeddings")):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def measure(m, prompt: int, decode: int, depth: int, reps: int) -> dict:
    """Median prefill and decode tokens/s over reps runs; each run starts from a fresh cache."""
    dev = m.input_device
    vocab = m.tokenizer.vocab_size if m.tokenizer else 1000
    g = torch.Generator().manual_seed(0)
    pre_tps, dec_tps = [], []
    for _ in range(reps + 1):  # the first run warms up (kernel packing, allocator)
        cache = m.make_cache(1)
        if depth:
            for i in range(0, depth, 512):
                m.forward(torch.randint(0, vocab, (1, min(512, depth - i)), generator=g), cache)
        ids = torch.randint(0, vocab, (1, prompt), generator=g)
        _sync(dev)
        t0 = time.perf_counter()
        logits = m.forward(ids, cache, last_only=True) if prompt else None  # as llama-bench: next-token logits
        _sync(dev)
        t1 = time.perf_counter()
        tok = logits[:, -1:].argmax(-1) if logits is not None else torch.zeros(1, 1, dtype=torch.long)
        for _ in range(decode):
            tok = m.forward(tok, cache)[:, -1:].argmax(-1)
        _sync(dev)
        t2 = time.perf_counter()
        pre_tps.append(prompt / (t1 - t0) if prompt else 0.0)
        dec_tps.append(decode / (t2 - t1) if decode else 0.0)
    return {"prefill_tps": statistics.median(pre_tps[1:]), "decode_tps": statistics.median(dec_tps[1:])}


def bench(
    model: str = MODEL_ARG,
    prompt: int = typer.Option(512, "-p", "--prompt", help="Prompt tokens for the prefill figure."),
    decode: int = typer.Option(128, "-n", "--decode", help="Tokens for the decode figure."),
    depth: int = typer.Option(0, "-d", "--depth", help="Context already in the cache before measuring."),
    reps: int = typer.Option(3, "-r", "--repetitions", help="Runs to take the median of."),
    threads: int = typer.Option(None, "-t", "--threads", help="CPU threads (default: physical cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    gpu_layers: int = GPU_LAYERS_OPT,
    compile: bool = typer.Option(True, "--compile/--no-compile", help=COMPILE_HELP),
) -> None:
    """Measure load time, prefill and decode speed, memory and bandwidth use."""
    from runtime import load_model
    from runtime.device import set_threads

    set_threads(threads)
    m = load_model(model, device=device, dtype=dtype, gpu_layers=gpu_layers)
    why = m.compile() if compile else "off"
    r = measure(m, prompt, decode, depth, reps)
    dev = str(m.input_device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the copy probe's 512 MiB
    bw = copy_bandwidth(device=dev)
    per_tok = bytes_per_token(m)
    limit = bw / per_tok
    row = {"model": m.source, "arch": m.arch, "device": dev, "threads": torch.get_num_threads(),
           "load_s": round(m.load_seconds, 3),
           "compile_s": round(m.compile_seconds, 2) if why is None else why,
           f"pp{prompt}_tps": round(r["prefill_tps"], 1),
           f"tg{decode}_tps": round(r["decode_tps"], 1), "depth": depth,
           "weights_mib_per_token": round(per_tok / 2**20, 1), "copy_gbps": round(bw / 1e9, 2),
           "bandwidth_limit_tps": round(limit, 1), "of_limit": round(r["decode_tps"] / limit, 3),
           "peak_rss_mib": round(rss / 2**20)}
    if dev.startswith("cuda"):
        row["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if as_json:
        print(json.dumps(row))
        return
    t = Table(title=f"{m.source} ({m.arch}) on {dev}, {row['threads']} threads, depth {depth}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in row.items():
        if k not in ("model", "arch", "device", "threads", "depth"):
            t.add_row(k.replace("_", " "), str(v))
    Console().print(t)
