"""`mamba-cli quantize` against llama.cpp's own pipeline on the same checkpoint: wall time and peak RSS.

    python -m bench.bench_quantize [FOLDER] [--types q4_k_m,q4_0] [--threads 2]

FOLDER (default: bench/.cache/mistral-7b-4l, from `python -m bench.make_models --7b --layers 4`).
llama.cpp's pipeline is what its README prescribes: convert_hf_to_gguf.py to f16 (the converter from the
llama-cpp-python sdist, tests/fixtures.llama_cpp_source), then its quantizer (llama_model_quantize,
the same code as llama-quantize) with the same thread count. Each step runs in its own process; peak
RSS is that process's (wait4). Prints one line per step and the ratio ours / llama.cpp per type.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15}
QUANTIZE = ("import ctypes, sys, llama_cpp\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            "p.ftype, p.nthread = int(sys.argv[3]), int(sys.argv[4])\n"
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n")


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    from tests.fixtures import llama_cpp_source

    args = sys.argv[1:]
    opts = {"--types": "q4_k_m,q4_0", "--threads": "2"}
    for key in opts:
        if key in args:
            i = args.index(key)
            opts[key] = args[i + 1]
            del args[i:i + 2]
    folder = Path(args[0]) if args else ROOT / "bench" / ".cache" / "mistral-7b-4l"
    threads = opts["--threads"]
    src = llama_cpp_source()
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / ".cache") as tmp:
        f16 = Path(tmp) / "f16.gguf"
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py"), "OMP_NUM_THREADS": threads}
        conv = timed([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(f16),
                      "--outtype", "f16"], env)
        print(f"llama.cpp convert_hf_to_gguf.py -> f16: {conv[0]:.1f} s, peak RSS {conv[1] / 2**30:.2f} GiB",
              flush=True)
        for qtype in opts["--types"].split(","):
            theirs = timed([sys.executable, "-c", QUANTIZE, str(f16), str(Path(tmp) / f"llama-{qtype}.gguf"),
                            str(FTYPES[qtype]), threads])
            ours = timed([sys.executable, "-m", "cli", "quantize", str(folder), "-t", qtype, "-o",
                          str(Path(tmp) / f"ours-{qtype}.gguf"), "--no-eval", "--threads", threads])
            total = conv[0] + theirs[0]
            print(f"{qtype}: llama.cpp quantize {theirs[0]:.1f} s (peak RSS {theirs[1] / 2**30:.2f} GiB), "
                  f"convert + quantize {total:.1f} s; mamba-cli quantize {ours[0]:.1f} s (peak RSS "
                  f"{ours[1] / 2**30:.2f} GiB); ours / llama.cpp {ours[0] / total:.2f}", flush=True)


if __name__ == "__main__":
    main()
