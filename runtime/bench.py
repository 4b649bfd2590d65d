"""llama-bench-style speed figures for a loaded model (what `mamba-cli bench` renders).

    measure(m, prompt, decode, depth, reps)   median prefill and decode tokens/s from fresh caches
    copy_bandwidth(nbytes, device)            bytes/s of a large tensor copy: the memory-bandwidth yardstick
    bytes_per_token(m)                        weight bytes one decode step reads
    state_bytes_per_token(m, positions)       cache bytes it moves besides: recurrent states read and
                                              written, keys and values read at that many positions
    bench(m, prompt, decode, depth, reps, compiled)   one row: load/compile time, pp/tg tokens/s, peak
                                              memory, and decode speed against the bandwidth limit
"""

from __future__ import annotations

import statistics
import time

import torch

from runtime.cache import KVCache, RollingKVCache, SSMState
from runtime.device import peak_cuda_bytes, peak_rss_bytes
from runtime.loader import LoadedModel


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


def bytes_per_token(m: LoadedModel) -> int:
    """Weight bytes one decode step reads: everything but the token embedding's table (one row of it is read),
    unless the head is tied to it (then read whole)."""
    skip = None if m.config.get("tie_word_embeddings") else m.module.input_embedding()
    seen, total = set(), 0
    for mod in m.module.modules():
        if mod is skip:
            continue
        for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def state_bytes_per_token(m: LoadedModel, positions: int) -> int:
    """Cache bytes one decode step moves at `positions` of context besides the weights: each Mamba layer
    reads and writes its whole state (Codestral-Mamba-7B: 64 layers x 4.1 MiB, each way: 13% on top of its
    weights), each attention layer reads its keys and values (llama.cpp moves the same)."""
    total = 0
    for c in m.module.make_cache(1):
        if isinstance(c, SSMState):
            total += 2 * c.nbytes
        elif isinstance(c, (KVCache, RollingKVCache)):
            seen = min(positions, c.window) if isinstance(c, RollingKVCache) else positions
            total += 2 * c.k.shape[0] * c.k.shape[1] * c.k.shape[3] * c.k.element_size() * seen
    return total


def measure(m: LoadedModel, prompt: int, decode: int, depth: int, reps: int) -> dict:
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


def bench(m: LoadedModel, prompt: int, decode: int, depth: int, reps: int, compiled: str | None) -> dict:
    """One row of figures; `compiled` is what m.compile() returned (None: compiled code ran), or why not."""
    r = measure(m, prompt, decode, depth, reps)
    dev = str(m.input_device)
    rss = peak_rss_bytes()  # before the copy probe's 512 MiB
    bw = copy_bandwidth(device=dev)
    per_tok = bytes_per_token(m)
    state = state_bytes_per_token(m, depth + prompt + decode // 2)  # the decode figure's middle step
    limit = bw / (per_tok + state)
    row = {"model": m.source, "arch": m.arch, "device": dev, "threads": torch.get_num_threads(),
           "load_s": round(m.load_seconds, 3),
           "compile_s": round(m.compile_seconds, 2) if compiled is None else compiled,
           f"pp{prompt}_tps": round(r["prefill_tps"], 1),
           f"tg{decode}_tps": round(r["decode_tps"], 1), "depth": depth,
           "weights_mib_per_token": round(per_tok / 2**20, 1), "state_mib_per_token": round(state / 2**20, 1),
           "copy_gbps": round(bw / 1e9, 2),
           "bandwidth_limit_tps": round(limit, 1), "of_limit": round(r["decode_tps"] / limit, 3),
           "peak_rss_mib": round(rss / 2**20)}
    if dev.startswith("cuda"):
        row["peak_cuda_mib"] = round(peak_cuda_bytes() / 2**20)
    return row
