"""Ours vs llama.cpp (llama-cpp-python) on the same GGUF files, alternating, in one process.

    python -m bench.bench_llamacpp FILE.gguf [FILE.gguf ...] [-p 512] [-n 128] [--threads 2] [--reps 3]
    python -m bench.bench_llamacpp --memory FILE.gguf [...]   # load time and memory, each in a fresh process

For each file: load time (to a usable model; ours plus the time to compile the decode step, see
runtime/compile.py, unless --no-compile), prefill tokens/s for -p tokens (next-token logits only, as
`run` and `chat` do; llama.cpp with logits_all=False) and decode tokens/s for -n tokens (greedy, fed
one at a time), median of --reps alternating runs, and the ratio ours/llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from runtime import load_model
from runtime.generate import greedy


def ours_run(m, ids: list[int], n: int) -> tuple[float, float]:
    cache = m.make_cache(1)
    t0 = time.perf_counter()
    logits = m.forward(torch.tensor([ids]), cache, last_only=True)
    t1 = time.perf_counter()
    tok = greedy(logits[0, -1])
    for _ in range(n):  # greedy as `run` picks (numpy's argmax, as llama.cpp's side below)
        tok = greedy(m.forward(torch.tensor([[tok]]), cache)[0, -1])
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), n / (t2 - t1)


def cpp_run(llm, ids: list[int], n: int) -> tuple[float, float]:
    import numpy as np

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for _ in range(n):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), n / (t2 - t1)


def rss_mib() -> tuple[float, float]:
    """(resident now, peak resident) of this process in MiB."""
    import resource

    now = 0.0
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            now = int(line.split()[1]) / 1024
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


SETTLE_S = 0.5  # seconds before each timed load (main(): the other engine's threads go idle)


def read_through(f: str) -> None:
    """Read the file once (16 MiB at a time), so that its pages are in the page cache."""
    with open(f, "rb", buffering=0) as fh:
        buf = bytearray(16 << 20)
        while fh.readinto(buf):
            pass


def child(engine: str, f: str, threads: int) -> None:
    """One engine in this (fresh) process: load, a 64-token prefill and 16 decode steps; JSON to stdout."""
    torch.set_num_threads(threads)
    if engine != "ours":
        from llama_cpp import Llama
    base = rss_mib()[0]
    t0 = time.perf_counter()
    if engine == "ours":
        m = load_model(f, device="cpu")
        load = time.perf_counter() - t0
        after_load = rss_mib()[0]
        ours_run(m, list(range(10, 74)), 16)
    else:
        llm = Llama(model_path=f, n_ctx=128, n_batch=128, n_threads=threads, logits_all=False, verbose=False)
        load = time.perf_counter() - t0
        after_load = rss_mib()[0]
        cpp_run(llm, list(range(10, 74)), 16)
    now, peak = rss_mib()
    print(json.dumps(dict(load_s=load, base_mib=base, after_load_mib=after_load, rss_mib=now, peak_mib=peak)))


def memory(files: list[str], threads: int) -> None:
    import subprocess

    print("| file | file MiB | load s ours / llama.cpp | RSS after run MiB ours / llama.cpp | peak RSS MiB ours / "
          "llama.cpp | peak / file, ours |")
    print("|---|---:|---:|---:|---:|---:|")
    for f in files:
        r = {}
        for engine in ("ours", "llama.cpp"):
            read_through(f)  # each from the page cache (main())
            out = subprocess.run([sys.executable, "-m", "bench.bench_llamacpp", "--child", engine, f, "--threads",
                                  str(threads)], capture_output=True, text=True, check=True,
                                 cwd=Path(__file__).resolve().parents[1])
            r[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        size = Path(f).stat().st_size / 2**20
        o, c = r["ours"], r["llama.cpp"]
        print(f"| {Path(f).name} | {size:.0f} | {o['load_s']:.2f} / {c['load_s']:.2f} | {o['rss_mib']:.0f} / "
              f"{c['rss_mib']:.0f} | {o['peak_mib']:.0f} / {c['peak_mib']:.0f} | "
              f"{(o['peak_mib'] - o['base_mib']) / size:.2f} (+{o['base_mib']:.0f} MiB torch) |")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], int(sys.argv[5]) if len(sys.argv) > 5 else 2)
        return
    if sys.argv[1:2] == ["--memory"]:
        rest = [x for x in sys.argv[2:] if not x.startswith("--threads")]
        memory([x for x in rest if x.endswith(".gguf")], 2)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="ours without compiled decode steps")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from llama_cpp import Llama  # the peer; optional, so only a run needs it

    rows = []
    for f in a.files:
        # Both engines load from the page cache: ours loads first, and had paid for reading whatever of the
        # file the system had evicted since (mamba-130m: 24 tiny tensors taking ~2 ms each to first touch).
        read_through(f)
        # Each load is timed once the other engine's threads have gone idle: llama.cpp's pool and libgomp's
        # spin-wait a while after a run, and a load timed right after the previous file's llama.cpp run
        # paid for that on 2 cores (mamba-130m 0.66 vs 0.32 s: each small parallel op of the load waited
        # for a time slice, e.g. 10 ms for each of 24 F16 -> float32 conversions).
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        m = load_model(f, device="cpu")
        ours_load = time.perf_counter() - t0
        m.compile(not a.no_compile)
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        llm = Llama(model_path=f, n_ctx=a.p + a.n + 8, n_batch=a.p + a.n + 8, n_threads=a.threads,
                    logits_all=False, verbose=False)
        cpp_load = time.perf_counter() - t0
        vocab = m.tokenizer.vocab_size
        ids = torch.randint(10, vocab, (a.p,), generator=torch.Generator().manual_seed(0)).tolist()
        ours_run(m, ids[:32], 4)
        cpp_run(llm, ids[:32], 4)
        ours, cpp = [], []
        for _ in range(a.reps):
            ours.append(ours_run(m, ids, a.n))
            cpp.append(cpp_run(llm, ids, a.n))
        op, od = (statistics.median(x) for x in zip(*ours, strict=True))
        cp, cd = (statistics.median(x) for x in zip(*cpp, strict=True))
        rows.append(dict(file=Path(f).name, ours_load_s=ours_load, ours_compile_s=m.compile_seconds,
                         cpp_load_s=cpp_load, ours_pp=op, cpp_pp=cp,
                         pp_ratio=op / cp, ours_tg=od, cpp_tg=cd, tg_ratio=od / cd))
        del llm, m
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"threads {a.threads}, prefill {a.p} tokens, decode {a.n} tokens, median of {a.reps}")
    print("| file | load s (ours + compile / llama.cpp) | prefill tok/s ours | llama.cpp | ratio | decode tok/s ours "
          "| llama.cpp | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['file']} | {r['ours_load_s']:.2f} + {r['ours_compile_s']:.1f} / {r['cpp_load_s']:.2f} | "
              f"{r['ours_pp']:.1f} | "
              f"{r['cpp_pp']:.1f} | {r['pp_ratio']:.2f}x | {r['ours_tg']:.1f} | {r['cpp_tg']:.1f} | "
              f"{r['tg_ratio']:.2f}x |")


if __name__ == "__main__":
    main()
