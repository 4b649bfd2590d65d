"""Cache memory of a Jamba-shaped hybrid against an all-attention model of the same width, by context.

    python -m bench.bench_jamba_memory [--contexts 1024,16384,65536] [--dtype bf16] [--materialize-gib 3]

Both models are Jamba-v0.1-shaped (hidden 4096, 32 layers, 32 query / 8 kv heads of 128, bf16); the
hybrid has attention at 1 layer in 8 and Mamba (d_inner 8192, d_state 16, kernel 4) elsewhere. The
modules are built on the meta device (no weights), the caches come from each model's own make_cache()
and are filled to the context through KVCache.update / the SSM forward path, and the bytes are read
from the resulting cache tensors (cache_nbytes), not from a formula. Caches up to --materialize-gib
are then allocated for real on the CPU and the RSS growth printed next to them as a check.
"""

from __future__ import annotations

import argparse

import torch

from runtime.cache import KVCache, SSMState, cache_nbytes
from runtime.models import jamba, llama

WIDTH = dict(vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8)
JAMBA = dict(WIDTH, model_type="jamba", attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
             expert_layer_offset=1, num_experts=16, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4,
             mamba_expand=2, mamba_dt_rank=256)
ATTENTION = dict(WIDTH, model_type="llama", head_dim=128)


def filled_cache(arch, cfg: dict, context: int, dtype: torch.dtype) -> list:
    """The model's own cache after `context` tokens, on the meta device."""
    with torch.device("meta"):
        model = arch.Model(arch.Args.from_config(cfg)).to(dtype)
    cache = model.make_cache(1)
    for c in cache:
        if isinstance(c, KVCache):
            b, h, d = c.shape
            kv = torch.empty(b, h, context, d, dtype=c.dtype, device="meta")
            c.update(kv, kv)
        else:
            c.offset = context  # an SSM state does not grow: its tensors are the same after any context
    return cache


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def materialize(cache: list) -> tuple[list, int]:
    """Allocate (and touch) CPU copies of every cache tensor; return them and the RSS growth."""
    before = rss_bytes()
    held = []
    for c in cache:
        tensors = {"k": c.k, "v": c.v} if isinstance(c, KVCache) else {"conv": c.conv, "ssm": c.ssm}
        held += [torch.zeros(t.shape, dtype=t.dtype) for t in tensors.values()]
    return held, rss_bytes() - before


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1024,16384,65536")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--materialize-gib", type=float, default=3.0, help="allocate caches up to this for real")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    rows = []
    for ctx in (int(c) for c in a.contexts.split(",")):
        hybrid = filled_cache(jamba, JAMBA, ctx, dtype)
        dense = filled_cache(llama, ATTENTION, ctx, dtype)
        kv = sum(c.nbytes for c in hybrid if isinstance(c, KVCache))
        ssm = sum(c.nbytes for c in hybrid if isinstance(c, SSMState))
        checks = []
        for cache in (hybrid, dense):
            if cache_nbytes(cache) <= a.materialize_gib * 2**30:
                held, grown = materialize(cache)
                checks.append(mib(grown))
                del held
            else:
                checks.append("-")
        rows.append((ctx, kv, ssm, cache_nbytes(hybrid), cache_nbytes(dense), checks))
    n_attn = sum(jamba.Args.from_config(JAMBA).is_attention(i) for i in range(32))
    print(f"Jamba-v0.1 shape: {n_attn} attention + {32 - n_attn} Mamba layers; all-attention: 32 layers; "
          f"KV {a.dtype}, SSM state fp32; batch 1. MiB.\n")
    print("| context | Jamba KV | Jamba SSM state | Jamba total | all-attention total | ratio "
          "| RSS check Jamba / all-attention |")
    print("|---|---|---|---|---|---|---|")
    for ctx, kv, ssm, total, dense, checks in rows:
        print(f"| {ctx:,} | {mib(kv)} | {mib(ssm)} | {mib(total)} | {mib(dense)} | {dense / total:.1f}x "
              f"| {' / '.join(checks)} |")


if __name__ == "__main__":
    main()
