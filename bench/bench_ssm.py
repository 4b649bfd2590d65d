"""Mamba-1 and Mamba-2 on the CPU: our runtime against transformers' PyTorch path, same random weights.

    python -m bench.bench_ssm [--threads 1] [--sizes 512,2048,8192] [--hf-sizes-mamba 512,2048]

Two mamba-130m-shaped models (d_model 768, 24 layers, vocab 50280; Mamba-2 with d_state 128, head dim
64) are saved once with transformers' save_pretrained under bench/.cache/. For each model it prints:

    prefill   prompt -> next-token logits. Ours: Session.prepare (the path `run`/`chat` take: 512-token
              pieces, the head on the last position only). transformers: one forward with logits_to_keep=1.
    decode    tokens/s of greedy decoding after a 128-token prompt. Ours: generate() with a Session;
              transformers: generate(), timed as (33 new tokens - 1 new token) / 32.
    ctx       our decode tokens/s after an 8192-token prompt, against after a 128-token one.
    RSS       peak resident memory of this process after our runs (before transformers runs).

transformers' Mamba-1 fallback is a Python loop over tokens: at 8192 tokens it takes minutes, so it is
measured at --hf-sizes-mamba only. Results also go to bench/results/bench_ssm.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from runtime import load_model
from runtime.generate import Session, Stats, generate
from tests.fixtures import tiny_tokenizer_files

ROOT = Path(__file__).resolve().parent.parent

CACHE = ROOT / "bench" / ".cache"
MODELS = {
    "mamba-130m-shape": ("MambaForCausalLM", dict(hidden_size=768, num_hidden_layers=24, vocab_size=50280,
                                                  state_size=16, expand=2, conv_kernel=4)),
    "mamba2-130m-shape": ("Mamba2ForCausalLM", dict(hidden_size=768, num_hidden_layers=24, vocab_size=50280,
                                                    state_size=128, expand=2, head_dim=64, num_heads=24,
                                                    n_groups=1, conv_kernel=4, chunk_size=256)),
}


def build(name: str) -> Path:
    import transformers

    cls, cfg = MODELS[name]
    folder = CACHE / name
    if (folder / "done").exists():
        return folder
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cls.replace("ForCausalLM", "Config"))(**cfg))
    model.eval().save_pretrained(folder)
    tiny_tokenizer_files(folder, 320)
    (folder / "done").write_text("ok")
    return folder


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(folder: Path, sizes: list[int], new: int, compile: bool) -> dict:
    m = load_model(folder, device="cpu")
    if compile:
        assert m.compile() is None
    out: dict = {"prefill_s": {}}
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        ids = torch.randint(0, 50000, (n,), generator=g).tolist()
        s = Session(m)
        t0 = time.perf_counter()
        s.prepare(ids)
        out["prefill_s"][n] = time.perf_counter() - t0
        if n == max(sizes):
            st = Stats()
            list(generate(m, ids, max_new_tokens=new, stop_ids=[], session=s, stats=st))
            out["decode_tps_long"] = st.gen_tps
    st = Stats()
    list(generate(m, torch.randint(0, 50000, (128,), generator=g).tolist(), max_new_tokens=new, stop_ids=[],
                  stats=st))
    out["decode_tps"] = st.gen_tps
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def theirs(folder: Path, sizes: list[int], new: int) -> dict:
    import transformers

    hf = getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])
    hf = hf.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    out: dict = {"prefill_s": {}}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in sizes:
            ids = torch.randint(0, 50000, (1, n), generator=g)
            t0 = time.perf_counter()
            hf(ids, logits_to_keep=1)
            out["prefill_s"][n] = time.perf_counter() - t0
        ids = torch.randint(0, 50000, (1, 128), generator=g)
        times = []
        for k in (1, new + 1):
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=k, do_sample=False, pad_token_id=0)
            times.append(time.perf_counter() - t0)
        out["decode_tps"] = new / (times[1] - times[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no stalls on a shared machine)")
    ap.add_argument("--sizes", default="512,2048,8192")
    ap.add_argument("--hf-sizes-mamba", default="512,2048", help="transformers' Mamba-1 prefill sizes")
    ap.add_argument("--hf-sizes-mamba2", default="512,2048,8192")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true", help="ours without compiled decode steps")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sizes = [int(s) for s in a.sizes.split(",")]
    hf_sizes = {"mamba-130m-shape": [int(s) for s in a.hf_sizes_mamba.split(",") if s],
                "mamba2-130m-shape": [int(s) for s in a.hf_sizes_mamba2.split(",") if s]}
    results = {}
    folders = {name: build(name) for name in MODELS}
    for name, folder in folders.items():
        results[name] = {"ours": ours(folder, sizes, a.new_tokens, not a.no_compile)}
        print(name, "ours", results[name]["ours"], flush=True)
    for name, folder in folders.items():
        results[name]["transformers"] = theirs(folder, hf_sizes[name], a.new_tokens)
        print(name, "transformers", results[name]["transformers"], flush=True)
    print(f"\nCPU, {a.threads} thread(s), fp32, batch 1, ours {'eager' if a.no_compile else 'compiled'}\n")
    print("| model | prefill tokens | ours s | transformers s | speed-up |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        for n in sizes:
            o, t = r["ours"]["prefill_s"][n], r["transformers"]["prefill_s"].get(n)
            ratio = f"{t / o:.1f}x" if t else "not measured"
            print(f"| {name} | {n} | {o:.2f} | {f'{t:.2f}' if t else '-'} | {ratio} |")
    print(f"\n| model | decode tok/s ours @128 | transformers @128 | speed-up "
          f"| ours @{max(sizes)} / ours @128 | peak RSS so far (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        o, t = r["ours"], r["transformers"]
        speed = o["decode_tps"] / t["decode_tps"]
        print(f"| {name} | {o['decode_tps']:.1f} | {t['decode_tps']:.1f} | {speed:.1f}x "
              f"| {o['decode_tps_long'] / o['decode_tps']:.2f} | {o['peak_rss_mib']:.0f} |")
    res = ROOT / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "bench_ssm.json").write_text(json.dumps({"threads": a.threads, **results}, indent=1))


if __name__ == "__main__":
    main()
