"""The GPU check: correctness of every CUDA path, then speed and load memory, as one table.

    python -m bench.gpu_check                 on the first CUDA GPU (under 5 minutes on one GPU)
    DEV=cpu QUICK=1 python -m bench.gpu_check the CPU standing in for the GPU, checks only (CI runs this)
    DEV=cpu python -m bench.gpu_check         ... with the speed part on small shapes

Checks (tiny random models of every architecture, built here; no files, no oracle):
    fp32 / bf16          the whole model on DEV vs the CPU (logits of a forward, two prefill chunks, decode steps)
    split 1, N/2, N      --gpu-layers at 1, half and every layer vs the CPU; every cache tensor on its
                         layer's device; ids on the embedding's device
    int4 linear          QuantLinear at 1, 7, 80 and 512 rows vs its dequantized weights (which path: -v's words)
    int4 model / split   4-bit layers (and a 4-bit token embedding) on DEV, whole and split
    graph decode         64 captured decode steps (CUDA graphs; the eager stand-in on the CPU) == 64 eager ones
    resume               a conversation saved on DEV continues on the CPU exactly, and the other way round
Speed (not with QUICK=1): prefill and decode tokens/s of a 1B-shaped and a 7B-shaped random bf16 llama, eager
and captured, launches per token, the weights' read bandwidth; peak host and GPU memory loading a 1B folder.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from quant.linear import QuantLinear, cuda_int4_kernel, gpu_path
from quant.swap import fuse_linears as fuse_quant
from quant.swap import swap_int4
from runtime import graphs
from runtime.device import gemv_layout, peak_rss_bytes, place, split
from runtime.generate import Session
from runtime.layers import MoE, fuse_projections
from runtime.loader import LoadedModel
from runtime.models import jamba, llama, mamba, mamba2

DEV = os.environ.get("DEV", "cuda")
QUICK = bool(os.environ.get("QUICK"))
GRAPH = graphs.CudaGraph if DEV == "cuda" else graphs.EagerGraph
results: list[tuple[str, str, str]] = []

V = 320
CFGS = {
    "llama": (llama, dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)),
    "llama-tied": (llama, dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                               tie_word_embeddings=True)),
    "mistral-swa": (llama, dict(model_type="mistral", vocab_size=V, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, sliding_window=8)),
    "mixtral": (llama, dict(model_type="mixtral", vocab_size=V, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            num_local_experts=4, num_experts_per_tok=2)),
    "mamba": (mamba, dict(model_type="mamba", vocab_size=V, hidden_size=64, state_size=16, num_hidden_layers=4,
                          intermediate_size=128, time_step_rank=4)),
    "falcon-mamba": (mamba, dict(model_type="falcon_mamba", vocab_size=V, hidden_size=64, state_size=16,
                                 num_hidden_layers=4, intermediate_size=128, time_step_rank=4)),
    "mamba2": (mamba2, dict(model_type="mamba2", vocab_size=V, hidden_size=64, num_hidden_layers=4, num_heads=8,
                            head_dim=16, state_size=16, n_groups=2, chunk_size=64)),
    "jamba": (jamba, dict(model_type="jamba", vocab_size=V, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2,
                          attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
                          num_experts_per_tok=2, mamba_d_state=16, mamba_dt_rank=4)),
}
MOE = ("mixtral", "jamba")


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def check(name: str, fn) -> None:
    """Run one check, record PASS/FAIL and its note, print a line."""
    t0 = time.perf_counter()
    try:
        note = fn() or ""
        results.append((name, "PASS", str(note)))
    except Exception as e:  # a failed check is a row of the table, not the end of the run
        msg = str(e).strip().splitlines()[0][:240] if str(e).strip() else ""
        results.append((name, "FAIL", f"{type(e).__name__}: {msg}"))
    print(f"[{results[-1][1]}] {name} ({time.perf_counter() - t0:.1f}s) {results[-1][2]}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# ---------------------------------------------------------------- tiny models of every architecture


def init_(m: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that keep activations in range (A_log positive, norms 1)."""
    g = torch.Generator(device=next(m.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "A_log" in name:
                p.uniform_(0.0, 2.0, generator=g)
            elif p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5, generator=g)
            elif "norm" in name or name.endswith(".D"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.1, generator=g)
    return m


def build(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32, over: dict | None = None
          ) -> tuple[nn.Module, dict]:
    """A random model of CFGS[arch] (fields replaced by `over`) on device, q/k/v and gate/up unfused."""
    mod, cfg = CFGS[arch]
    cfg = {**cfg, **(over or {})}
    with torch.device("meta"):
        m = mod.Model(mod.Args.from_config(cfg)).to(dtype)  # built in dtype: a 7B never exists in float32
    m.to_empty(device=device)
    if m.args.tie_word_embeddings:
        m.lm_head.weight = m.input_embedding().weight
    init_(m)
    return m.eval(), cfg


def put(m: nn.Module, gpu_layers: int | None = None) -> nn.Module:
    """place() on DEV; a split on the CPU runs runtime.device.split itself (place() keeps a CPU model whole)."""
    if DEV == "cpu" and gpu_layers is not None:
        split(m, "cpu", gpu_layers)
        for mod in m.modules():
            if hasattr(mod, "prepare"):
                mod.prepare()
        gemv_layout(m)
    else:
        place(m, DEV, gpu_layers)
    return m


def run(lm: LoadedModel, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a no-cache forward, two prefill chunks and four decode steps (on the CPU), checking that
    every cache tensor sits on its layer's device and the ids go to the embedding's device."""
    outs = [lm.forward(tokens).float().cpu()]
    cache = lm.make_cache(1)
    outs.append(lm.forward(tokens[:, :20], cache, last_only=True).float().cpu())
    outs.append(lm.forward(tokens[:, 20:33], cache, last_only=True).float().cpu())
    for i in range(33, 37):
        outs.append(lm.forward(tokens[:, i : i + 1], cache).float().cpu())
    layers = lm.layer_devices()
    held = [(c.k if hasattr(c, "k") else c.conv).device for c in cache]
    assert layers == held, f"cache devices {held} != layer devices {layers}"
    emb = lm.module.input_embedding()
    assert lm.input_device == next(iter([*emb.parameters(), *emb.buffers()])).device
    return outs


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], tol: float) -> str:
    worst = max(rel(g, r) for g, r in zip(got, ref, strict=True))
    assert worst < tol, f"max rel diff {worst:.3g} >= {tol}"
    return f"max rel {worst:.2g}"


def loaded(m: nn.Module, arch: str, cfg: dict) -> LoadedModel:
    return LoadedModel(m, arch, cfg, None, arch)


def model_checks() -> None:
    tokens = torch.randint(5, V, (1, 37), generator=torch.Generator().manual_seed(1))
    for arch in CFGS:
        base, cfg = build(arch)
        fuse_projections(base)
        ref = run(loaded(place_cpu(copy.deepcopy(base)), arch, cfg), tokens)
        ref16 = run(loaded(place_cpu(copy.deepcopy(base).to(torch.bfloat16)), arch, cfg), tokens)
        n = len(base.layers)

        def variant(gpu_layers, dtype=torch.float32, tol=1e-3, reps=1, base=base, arch=arch, cfg=cfg, ref=ref,
                    ref16=ref16):
            def fn():
                note = ""
                for _ in range(reps):  # a racy hand-off between devices shows up as a difference between runs
                    m = put(copy.deepcopy(base).to(dtype), gpu_layers)
                    note = compare(ref16 if dtype == torch.bfloat16 else ref, run(loaded(m, arch, cfg), tokens), tol)
                return note
            return fn

        check(f"{arch}: all on {DEV}, fp32", variant(None))
        # bf16 against the CPU in bf16; MoE routing may flip on a rounding, so MoE models get a loose bound
        check(f"{arch}: all on {DEV}, bf16 vs CPU bf16", variant(None, torch.bfloat16, 0.3 if arch in MOE else 0.1))
        for k in sorted({1, n // 2, n}):
            check(f"{arch}: --gpu-layers {k} of {n}", variant(k, reps=3))


def place_cpu(m: nn.Module) -> nn.Module:
    place(m, "cpu", None)
    return m


# ---------------------------------------------------------------- int4


def int4_case(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random int4 levels, scales and zeros (n, k), and the float weights they mean."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    s = torch.rand(n, k // 32, generator=g) * 0.02 + 0.005
    z = torch.randn(n, k // 32, generator=g) * 0.01
    w = (q.float() - 8) * s.repeat_interleave(32, 1) + z.repeat_interleave(32, 1)
    return q, s, z, w


def int4_linear_checks() -> None:
    shapes = [(64, 128), (100, 96), (24, 32), (3352, 768)] + ([] if QUICK else [(4096, 4096), (14336, 4096)])
    for n, k in shapes:
        def fn(n=n, k=k):
            q, s, z, w = int4_case(n, k)
            m = QuantLinear(q, s, z).to(DEV)
            m.prepare()
            if DEV == "cuda" and not cuda_int4_kernel(torch.device(DEV)):
                assert m.dense is not None, "below capability 8.0 the weights must be dequantized to bf16"
            for rows in (1, 7, 80, 512):
                x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
                ref = (x.double() @ w.double().T).float()
                r = rel(m(x.to(DEV)).cpu(), ref)
                assert r < 2e-2, f"{rows} rows: rel {r:.3g}"
            kind = "int4 kernel" if m.packed is not None else "bf16" if m.dense is not None else "dequantized per call"
            return f"{kind}" + (f" ({gpu_path(torch.device(DEV))})" if DEV == "cuda" else "")
        check(f"QuantLinear {n}x{k} at 1/7/80/512 rows on {DEV}", fn)


def int4ify(ref: nn.Module, dev_m: nn.Module) -> None:
    """Random int4 weights for every plain Linear inside the layers: float in ref, QuantLinear in dev_m."""
    seed = 0
    for name, mod in list(ref.named_modules()):
        if (type(mod) is nn.Linear and ".layers." in f".{name}" and mod.in_features % 32 == 0
                and not name.endswith(".gate")):  # routers stay float: a flipped expert is not a kernel error
            q, s, z, w = int4_case(mod.out_features, mod.in_features, seed)
            seed += 1
            mod.weight.data = w
            swap_int4(dev_m, name, (q, s, z), torch.float32, "gpu_check")


def int4_model_checks() -> None:
    tokens = torch.randint(5, V, (1, 37), generator=torch.Generator().manual_seed(2))
    for arch in ("llama", "mixtral", "mamba", "mamba2", "jamba"):
        def fn(arch=arch, gpu_layers=None):
            base, cfg = build(arch)
            dev_m = copy.deepcopy(base)
            int4ify(base, dev_m)
            for mm in (base, dev_m):
                fuse_projections(mm, fuse_quant)
            got = run(loaded(put(dev_m, gpu_layers), arch, cfg), tokens)
            return compare(run(loaded(place_cpu(base), arch, cfg), tokens), got, 0.3 if arch in MOE else 5e-2)
        check(f"int4 {arch} on {DEV}", fn)
        check(f"int4 {arch} --gpu-layers 2", lambda arch=arch: fn(arch, 2))

    def embedding_split():  # a GGUF whose token_embd is 4-bit: QuantEmbedding holds buffers only
        base, cfg = build("llama")
        q, s, z, w = int4_case(V, 64)
        ref = copy.deepcopy(base)
        ref.model.embed_tokens.weight.data = w
        swap_int4(base, "model.embed_tokens", (q, s, z), torch.float32, "gpu_check")
        lm = loaded(put(base, 2), "llama", cfg)
        note = compare(run(loaded(place_cpu(ref), "llama", cfg), tokens), run(lm, tokens), 1e-3)
        return f"{note}; ids on {lm.input_device}"
    check("int4 token embedding, --gpu-layers 2", embedding_split)


# ---------------------------------------------------------------- captured decode, resume


def greedy(lm: LoadedModel, tokens: torch.Tensor, steps: int, cache=None) -> tuple[list[int], list[torch.Tensor]]:
    """Prefill, then `steps` greedy decode steps; the tokens and each step's logits (on the CPU)."""
    cache = cache if cache is not None else lm.make_cache(1)
    logits = lm.forward(tokens, cache, last_only=True)
    out, seen = [], []
    for _ in range(steps):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(tok))
        logits = lm.forward(tok, cache)
        seen.append(logits.float().cpu())
    return out, seen


def graph_checks() -> None:
    tokens = torch.randint(5, V, (1, 250), generator=torch.Generator().manual_seed(3))
    for arch in ("llama", "mistral-swa", "mixtral", "mamba", "mamba2", "jamba"):
        def fn(arch=arch):
            base, cfg = build(arch, dtype=torch.float32)
            fuse_projections(base)
            eager = loaded(put(copy.deepcopy(base)), arch, cfg)
            captured = loaded(put(copy.deepcopy(base)), arch, cfg)
            why = captured.capture_decode(capacity=1024, graph=GRAPH)
            assert why is None, why
            for mod in captured.module.modules():
                if isinstance(mod, MoE):
                    mod.device_routing = True  # as on a GPU (on a CPU, decode routing reads the ids on the host)
            # 250 prompt tokens + 64 steps cross the first span (256): two graphs for attention models
            a, la = greedy(eager, tokens, 64)
            cache = captured.make_cache(1)
            b, lb = greedy(captured, tokens, 64, cache)
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
            assert first is None, f"tokens differ from step {first}"
            worst = max(rel(y, x) for x, y in zip(la, lb, strict=True))
            assert worst < 1e-3, f"max rel {worst:.3g}"
            return f"64 steps identical, max rel {worst:.2g}, {len(cache.runner.graphs)} {cache.runner.kind} graph(s)"
        check(f"graph decode == eager, {arch} on {DEV}", fn)


def resume_checks() -> None:
    prompt = torch.randint(5, V, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    for arch in ("llama", "mamba2", "jamba"):
        def fn(arch=arch):
            base, cfg = build(arch)
            fuse_projections(base)
            on_dev = loaded(put(copy.deepcopy(base)), arch, cfg)
            assert on_dev.capture_decode(graph=GRAPH) is None  # a resumed cache becomes a static one there
            on_cpu = loaded(place_cpu(copy.deepcopy(base)), arch, cfg)
            whole = Session(on_cpu)
            whole.feed(prompt)
            notes = []
            for src, dst in ((on_dev, on_cpu), (on_cpu, on_dev)):
                s = Session(src)
                s.feed(prompt[:25])
                with tempfile.TemporaryDirectory() as d:
                    s.save(f"{d}/state.safetensors")
                    r = Session(dst)
                    r.load(f"{d}/state.safetensors")
                r.feed(prompt[25:])
                notes.append(rel(r.last_logits.cpu(), whole.last_logits))
                assert notes[-1] < 1e-3, f"resumed logits differ: rel {notes[-1]:.3g}"
            return f"{DEV}->cpu rel {notes[0]:.2g}, cpu->{DEV} rel {notes[1]:.2g}"
        check(f"save on one device, resume on the other: {arch}", fn)


# ---------------------------------------------------------------- speed and load memory

SHAPES = {
    "1B-shaped llama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096),
    "7B-shaped llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096),
}
SMALL = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2)


def launches(fn) -> tuple[int, int]:
    """(kernel launches and graph launches the host made, kernels that ran) during fn(), on CUDA."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    names = [e.name for e in prof.events()]
    host = sum(1 for n in names if "LaunchKernel" in n or "GraphLaunch" in n)
    kernels = sum(1 for e in prof.events() if str(e.device_type).endswith("CUDA"))
    return host, kernels


def speed_check(label: str, over: dict) -> str:
    over = {**over, **(SMALL if DEV == "cpu" else {})}
    m, cfg = build("llama", DEV, torch.bfloat16, over)
    fuse_projections(m)
    place(m, DEV, None)
    lm = loaded(m, "llama", cfg)
    nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
    ids = torch.randint(5, cfg["vocab_size"], (1, 512), device=DEV)
    notes = [f"{nbytes / 2**30:.2f} GiB"]
    for mode in ("eager", "graphs"):
        lm.capture_decode(mode == "graphs", capacity=1024, graph=GRAPH)
        cache = lm.make_cache(1)
        sync()
        t0 = time.perf_counter()
        tok = lm.forward(ids, cache, last_only=True)[:, -1:].argmax(-1)
        sync()
        t1 = time.perf_counter()
        tok = lm.forward(tok, cache)[:, -1:].argmax(-1)  # the first step captures
        sync()
        t2 = time.perf_counter()
        for _ in range(64):
            tok = lm.forward(tok, cache)[:, -1:].argmax(-1)
        sync()
        t3 = time.perf_counter()
        tps = 64 / (t3 - t2)
        if mode == "eager":
            notes.append(f"prefill 512: {512 / (t1 - t0):.0f} tok/s")
        notes.append(f"{mode} decode {tps:.1f} tok/s ({nbytes * tps / 1e9:.0f} GB/s of weights)")
        if DEV == "cuda":
            host, kernels = launches(lambda cache=cache: lm.forward(torch.zeros(1, 1, dtype=torch.long), cache))
            notes.append(f"{host} launches, {kernels} kernels per token")
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    return "; ".join(notes) + (f"; peak GPU {peak:.1f} GiB" if DEV == "cuda" else "")


LOADER = r"""
import json, sys, time, torch
from runtime.device import peak_rss_bytes
base = peak_rss_bytes()
from runtime import load_model
t0 = time.perf_counter()
m = load_model(sys.argv[1], device=sys.argv[2])
print(json.dumps({"load_s": round(time.perf_counter() - t0, 1), "rss_before_gib": round(base / 2**30, 2),
                  "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2),
                  "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                  if torch.cuda.is_available() else 0}))
"""


def load_memory_check() -> str:
    """Save a 1B-shaped bf16 folder, load it onto DEV in a fresh process: its peak host and GPU memory."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    over = {**SHAPES["1B-shaped llama"], **(SMALL if DEV == "cpu" else {})}
    m, cfg = build("llama", DEV, torch.bfloat16, over)
    with tempfile.TemporaryDirectory(prefix="gpucheck-") as d:
        save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, f"{d}/model.safetensors")
        del m
        with open(f"{d}/config.json", "w") as f:
            json.dump({**cfg, "torch_dtype": "bfloat16"}, f)
        Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(f"{d}/tokenizer.json")
        size = os.path.getsize(f"{d}/model.safetensors") / 2**30
        p = subprocess.run([sys.executable, "-c", LOADER, d, DEV], capture_output=True, text=True, timeout=300,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "loader failed"
    return f"checkpoint {size:.2f} GiB -> {p.stdout.strip()}"


def table() -> str:
    width = max(len(r[0]) for r in results)
    lines = [f"{'check':<{width}}  result  note", f"{'-' * width}  ------  ----"]
    lines += [f"{name:<{width}}  {res:<6}  {note}" for name, res, note in results]
    return "\n".join(lines)


def main() -> int:
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}, "
          f"checking on {DEV}{' (QUICK)' if QUICK else ''}", flush=True)
    if DEV == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device visible to torch; DEV=cpu dry-runs this script on the CPU")
            return 2
        print(torch.cuda.get_device_name(), "compute capability", torch.cuda.get_device_capability(), flush=True)
    else:
        torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    int4_linear_checks()
    model_checks()
    int4_model_checks()
    graph_checks()
    resume_checks()
    if not QUICK:
        for label, over in SHAPES.items():
            check(f"speed: {label} bf16 on {DEV}{' (small shapes)' if DEV == 'cpu' else ''}",
                  lambda over=over, label=label: speed_check(label, over))
        check(f"load memory: 1B-shaped bf16 folder onto {DEV}", load_memory_check)
    fails = [r for r in results if r[1] == "FAIL"]
    print("\n" + table())
    print(f"\n{len(results) - len(fails)} passed, {len(fails)} failed; this process's peak RSS "
          f"{peak_rss_bytes() / 2**30:.2f} GiB")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
