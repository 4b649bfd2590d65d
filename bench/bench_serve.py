"""`mamba-cli serve` under concurrent clients vs the model alone and vs llama-cpp-python's server.

    python -m bench.bench_serve FILE.gguf [--clients 1,4,8] [-n 128] [--threads 2] [--reps 2] [--no-llama-cpp]

For each server (ours: `mamba-cli serve`; llama.cpp: `python -m llama_cpp.server`, which needs
llama-cpp-python's `server` extra: fastapi, uvicorn, sse-starlette, starlette-context, pydantic-settings),
started in a fresh process with the same threads on the same GGUF: for each client count c, c threads send
one /v1/completions request each at once (distinct short prompts, greedy, -n tokens, end-of-sequence
ignored: `ignore_eos` for ours, an EOS logit bias of -100 for llama.cpp), and the aggregate throughput is
the completion tokens of all of them over the wall time until the last one ends (best of --reps).
"alone" is runtime.generate in this process, no server: the same model's single-stream decode speed.

Prompts are ~10 tokens, so the time is nearly all decoding. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The history of the printing press", "A recipe for bread:", "Rivers of Europe include",
           "def fibonacci(n):", "The weather today is", "Once upon a time, in a small village,",
           "The three laws of motion are", "My favourite programming language is", "In 1969, the first",
           "To be or not to be,", "The capital of France is", "A list of prime numbers: 2, 3, 5,"]


class Server:
    def __init__(self, engine: str, gguf: str, threads: int, port: int):
        self.engine, self.url = engine, f"http://127.0.0.1:{port}"
        if engine == "ours":
            cmd = [sys.executable, "-m", "cli", "serve", gguf, "--port", str(port), "--threads", str(threads),
                   "--max-seqs", "16"]
        else:
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--n_threads",
                   str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048", "--verbose", "false"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        end = time.monotonic() + 600
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{engine} server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{engine} server did not start")

    def request(self, prompt: str, n: int, eos: int | None) -> int:
        body: dict = {"prompt": prompt, "max_tokens": n, "temperature": 0}
        if self.engine == "ours":
            body["ignore_eos"] = True
        elif eos is not None:
            body["logit_bias"] = {str(eos): -100}
        r = httpx.post(self.url + "/v1/completions", json=body, timeout=3600)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    def round(self, clients: int, n: int, eos: int | None) -> tuple[float, int]:
        """(aggregate tokens/s, tokens) of `clients` simultaneous requests."""
        counts = [0] * clients
        start = threading.Barrier(clients + 1)

        def client(i: int) -> None:
            start.wait()
            counts[i] = self.request(PROMPTS[i % len(PROMPTS)], n, eos)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - t0), sum(counts)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def alone(gguf: str, n: int, threads: int) -> float:
    """Single-stream greedy decode tokens/s of runtime.generate on the same file, in this process."""
    import torch

    from runtime import load_model
    from runtime.generate import generate

    torch.set_num_threads(threads)
    m = load_model(gguf, device="cpu")
    ids = m.tokenizer.encode_prompt(PROMPTS[0])
    list(generate(m, ids, max_new_tokens=4, stop_ids=[]))  # warm-up
    t0 = time.perf_counter()
    got = len(list(generate(m, ids, max_new_tokens=n, stop_ids=[])))
    return got / (time.perf_counter() - t0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--clients", default="1,4,8", help="comma-separated client counts")
    ap.add_argument("-n", type=int, default=128, help="tokens per request")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="rounds per client count (the best is reported)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="only ours")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    engines = ["ours"] if args.no_llama_cpp else ["ours", "llama.cpp"]
    from runtime import load_model

    eos = min(load_model(args.gguf, device="cpu").eos_ids, default=None)
    base = alone(args.gguf, args.n, args.threads)
    print(f"{Path(args.gguf).name}, {args.threads} threads, {args.n} tokens per request")
    print(f"alone (runtime.generate, no server): {base:.1f} tok/s")
    table: dict[str, dict[int, float]] = {}
    for engine in engines:
        server = Server(engine, args.gguf, args.threads, free_port())
        try:
            server.round(1, 4, eos)  # warm-up
            table[engine] = {c: max(server.round(c, args.n, eos)[0] for _ in range(args.reps)) for c in counts}
        finally:
            server.close()
    print(f"{'clients':>8}" + "".join(f"{e + ' tok/s':>18}{'x alone':>9}" for e in engines)
          + (f"{'ours/llama.cpp':>16}" if len(engines) > 1 else ""))
    for c in counts:
        row = f"{c:>8}" + "".join(f"{table[e][c]:>18.1f}{table[e][c] / base:>9.2f}" for e in engines)
        if len(engines) > 1:
            row += f"{table['ours'][c] / table['llama.cpp'][c]:>16.2f}"
        print(row)
    print(json.dumps({"alone": base, **{e: table[e] for e in engines}}))


if __name__ == "__main__":
    sys.exit(main())
