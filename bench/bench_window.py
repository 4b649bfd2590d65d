"""Sliding-window decode: tokens/s at context 256 and 8192, and KV-cache memory, ours vs transformers.

A Mistral-shaped random model (window 4096, as Mistral 7B v0.1) is saved with transformers, then both
runtimes prefill to each context depth and decode N tokens, alternating, in one process, on the CPU.
Our cache memory is read from the cache objects; transformers' from its DynamicCache tensors.

    python -m bench.bench_window [--hidden 512 --layers 8 --window 4096 --decode 32 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from runtime import load_model
from runtime.cache import cache_nbytes
from tests.fixtures import build_tiny, hf_model


def hf_cache_bytes(pkv) -> int:
    total = 0
    for layer in getattr(pkv, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def bench_ours(m, ids: torch.Tensor, n: int) -> tuple[float, int]:
    cache = m.make_cache()
    for i in range(0, ids.shape[1], 512):
        logits = m.forward(ids[:, i : i + 512], cache)
    tok = logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(n):
        tok = m.forward(tok, cache)[:, -1:].argmax(-1)
    return n / (time.perf_counter() - t0), cache_nbytes(cache)


@torch.inference_mode()
def bench_hf(ref, ids: torch.Tensor, n: int) -> tuple[float, int]:
    out = ref(ids, use_cache=True)
    pkv = out.past_key_values
    tok = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(n):
        out = ref(tok, past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
    return n / (time.perf_counter() - t0), hf_cache_bytes(pkv)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--contexts", default="256,8192")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = dict(hidden_size=a.hidden, intermediate_size=a.hidden * 7 // 2, num_hidden_layers=a.layers,
               num_attention_heads=a.hidden // 64, num_key_value_heads=max(1, a.hidden // 256),
               sliding_window=a.window, max_position_embeddings=32768)
    folder = build_tiny("MistralForCausalLM", cfg, vocab_size=32000)
    ours, ref = load_model(folder, device="cpu"), hf_model(folder)
    rows = []
    for ctx in (int(c) for c in a.contexts.split(",")):
        ids = torch.randint(5, 32000, (1, ctx), generator=torch.Generator().manual_seed(ctx))
        o_tps, o_mem = bench_ours(ours, ids, a.decode)
        h_tps, h_mem = bench_hf(ref, ids, a.decode)
        rows.append(dict(context=ctx, ours_tps=o_tps, hf_tps=h_tps, ratio=o_tps / h_tps,
                         ours_cache_mib=o_mem / 2**20, hf_cache_mib=h_mem / 2**20))
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"Mistral-shaped: hidden {a.hidden}, {a.layers} layers, window {a.window}, threads {a.threads}")
    print("| context | ours tok/s | transformers tok/s | ratio | our KV cache MiB | transformers KV MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['ours_tps']:.1f} | {r['hf_tps']:.1f} | {r['ratio']:.2f}x | "
              f"{r['ours_cache_mib']:.1f} | {r['hf_cache_mib']:.1f} |")


if __name__ == "__main__":
    main()
