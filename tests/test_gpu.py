"""The GPU path, checked on the CPU wherever the logic allows, and on a GPU (tests marked `cuda`) when there is one.

On the CPU (every run):
- a copy to the CPU between split layers is blocking; copies to a GPU stay asynchronous;
- --gpu-layers' plan: the embedding with the first layer, the final norm and head with the last, a tied
  embedding with the head, buffer-only (4-bit) embeddings placed and hooked; where each tensor streams to;
- a folder streams tensor by tensor to its destination: loading onto "meta" keeps host memory near one
  tensor; check_fits asks each device for its own share;
- MoE decode routing on the device equals the host-routed loop (float and 4-bit experts);
- the int4 CUDA kernel is chosen by compute capability;
- bench/gpu_check.py's dry run (DEV=cpu QUICK=1): the split run with the CPU standing in, captured decode
  (the eager stand-in) == eager decode over 64 steps, resume across devices, int4 layers.
On a GPU: the same checks (bench/gpu_check.py) on CUDA, one test per group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant.linear import QuantLinear, cuda_int4_kernel, gpu_path
from runtime import loader
from runtime.cache import StaticKVCache, make_static
from runtime.device import destination, place, split_plan, to_device
from runtime.graphs import span_for
from runtime.layers import MoE
from runtime.models import jamba, llama, mamba

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # constructing a device needs no GPU: plans are made on the meta device


class CopySpy(torch.Tensor):
    """A tensor whose .to() records its keyword arguments instead of copying."""

    calls: list[dict] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            cls.calls.append(dict(kwargs or {}))
            return args[0]
        return super().__torch_function__(func, types, args, kwargs or {})


def test_copies_to_the_cpu_block_and_copies_to_a_gpu_do_not():
    x = torch.zeros(2, device="meta").as_subclass(CopySpy)  # "meta" stands for a GPU tensor here
    CopySpy.calls.clear()
    to_device((x, 3, None), torch.device("cpu"))
    to_device(x, CUDA)
    assert CopySpy.calls == [{"non_blocking": False}, {"non_blocking": True}]
    y = torch.zeros(2)
    assert to_device(y, torch.device("cpu")) is y  # already there: no copy at all


def skeleton(mod, **cfg):
    with torch.device("meta"):
        return mod.Model(mod.Args.from_config(cfg))


LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_split_plan_puts_embedding_with_first_layer_and_head_with_last(n):
    m = skeleton(llama, **LLAMA)
    devices, plan = split_plan(m, CUDA, n)
    cpu = torch.device("cpu")
    assert devices == [CUDA] * n + [cpu] * (4 - n)
    assert plan == {"model.embed_tokens": CUDA, "model.norm": devices[-1], "lm_head": devices[-1]}
    where = destination(m, "cuda", n)
    assert where("model.layers.0.self_attn.q_proj.weight") == CUDA
    assert where("model.layers.3.mlp.down_proj.weight") == devices[3]
    assert where("lm_head.weight") == devices[-1] and where("model.embed_tokens.weight") == CUDA
    assert where("something.unknown") == cpu  # place() moves what the plan does not name
    assert destination(m, "cuda", None)("model.layers.3.mlp.down_proj.weight") == CUDA


def test_split_plan_keeps_a_tied_embedding_with_the_head():
    m = skeleton(llama, **{**LLAMA, "tie_word_embeddings": True})
    _, plan = split_plan(m, CUDA, 2)
    assert set(plan.values()) == {torch.device("cpu")}
    _, plan = split_plan(m, CUDA, 4)
    assert set(plan.values()) == {CUDA}
    m = skeleton(mamba, model_type="mamba", vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2)
    _, plan = split_plan(m, CUDA, 1)  # Mamba ties by default
    assert set(plan) == {"backbone.embeddings", "backbone.norm_f", "lm_head"}
    assert set(plan.values()) == {torch.device("cpu")}


def test_split_plan_places_a_buffer_only_embedding():
    from quant.swap import swap_int4

    m = skeleton(jamba, model_type="jamba", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                 num_experts=4, mamba_d_state=4, mamba_dt_rank=4)
    q = torch.zeros(64, 32, dtype=torch.uint8)
    swap_int4(m, "model.embed_tokens", (q, torch.ones(64, 1), torch.zeros(64, 1)), torch.float32, "test")
    assert not any(True for _ in m.model.embed_tokens.parameters())
    _, plan = split_plan(m, CUDA, 1)
    assert plan["model.embed_tokens"] == CUDA and plan["lm_head"] == torch.device("cpu")


def test_check_fits_asks_each_device_for_its_share(monkeypatch):
    m = skeleton(llama, **LLAMA)
    asked = []
    monkeypatch.setattr(loader, "check_fits", lambda n, dev, what: asked.append((dev, n)))
    need = loader.bytes_by_device(m, destination(m, "cuda", 1), itemsize=2)
    loader.check_placement(need, "x", host_overhead=1.0)
    total = 2 * sum(p.numel() for p in m.parameters())
    layer = 2 * sum(p.numel() for p in m.model.layers[0].parameters())
    emb = 2 * m.model.embed_tokens.weight.numel()
    assert dict(asked) == {"cuda": layer + emb, "cpu": total - layer - emb}


LOAD_META = r"""
import json, sys
from pathlib import Path
from runtime.device import peak_rss_bytes
from runtime import loader
for device in ("meta", "cpu"):  # warm-up on a tiny model: imports (meta kernels are Python), first-use buffers
    loader._load_folder(Path(sys.argv[1]), device, None, None)
base = peak_rss_bytes()
m = loader._load_folder(Path(sys.argv[2]), "meta", None, None)
assert next(m.module.parameters()).device.type == "meta"
meta = peak_rss_bytes()
m = loader._load_folder(Path(sys.argv[2]), "cpu", None, None)  # the control: a CPU load holds the whole model
print(json.dumps({"base": base, "meta": meta, "cpu": peak_rss_bytes()}))
"""


def save_folder(folder: Path, cfg: dict) -> tuple[int, int]:
    """A llama folder of cfg with constant float32 weights; (its bytes, its largest tensor's bytes)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    folder.mkdir()
    tensors = {k: torch.full(t.shape, 0.01) for k, t in skeleton(llama, **cfg).state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    return sum(t.numel() * 4 for t in tensors.values()), max(t.numel() * 4 for t in tensors.values())


def test_folder_streams_tensor_by_tensor(tmp_path):
    """Loading onto "meta" goes through the same stream as onto a GPU: the host holds about one tensor."""
    save_folder(tmp_path / "tiny", LLAMA)
    cfg = {**LLAMA, "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
           "num_attention_heads": 8, "num_key_value_heads": 4}
    size, largest = save_folder(tmp_path / "mid", cfg)  # ~90 MiB, its largest tensor 8 MiB
    p = subprocess.run([sys.executable, "-c", LOAD_META, str(tmp_path / "tiny"), str(tmp_path / "mid")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    meta, cpu = got["meta"] - got["base"], got["cpu"] - got["base"]
    mib = (f"{size / 2**20:.0f} MiB model: the meta load grew the peak by {meta / 2**20:.0f} MiB, "
           f"the CPU load by {cpu / 2**20:.0f}")
    assert cpu > 0.5 * size, mib  # the measure sees a whole model (less the heap the warm-up freed)
    assert meta < max(3 * largest, size // 4), mib


def test_gguf_streams_to_its_destination(tmp_path):
    """A 4-bit GGUF's tensors go straight to where they will live ("meta" standing in for the GPU): 4-bit
    matrices (MoE experts, the embedding) and float ones alike; split at 1 layer, the rest on the CPU."""
    from quant.gguf_out import plan_from_source, write_gguf
    from tests.configs import LLAMA as TINY
    from tests.fixtures import build_tiny

    out = tmp_path / "m.gguf"
    write_gguf(plan_from_source(build_tiny(*TINY["mixtral-8x-gqa4"])), out, "q4_0")
    m = loader._load_gguf(out, "meta", None, 1)
    devices = {name: t.device.type for name, t in [*m.module.named_parameters(), *m.module.named_buffers()]}
    assert {d for n, d in devices.items() if n.startswith("model.layers.0.")} == {"meta"}
    assert {d for n, d in devices.items() if n.startswith("model.layers.1.")} == {"cpu"}
    assert {d for n, d in devices.items() if n.startswith("model.embed_tokens.")} == {"meta"}
    assert devices["model.norm.weight"] == "cpu"
    assert any(isinstance(mod, QuantLinear) for mod in m.module.model.layers[0].modules())


def moe(quantized: bool) -> MoE:
    torch.manual_seed(0)
    m = MoE(32, 64, 4, 2, renormalize=True)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    if quantized:
        for name in ("w1", "w3", "w2"):
            w = getattr(m, name)
            experts = []
            for e in range(4):
                q = torch.randint(0, 16, tuple(w[e].shape), dtype=torch.uint8)
                experts.append(QuantLinear(q, torch.full((w.shape[1], w.shape[2] // 32), 0.05),
                                           torch.zeros(w.shape[1], w.shape[2] // 32)))
            m.set_int4(name, experts)
    return m


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("rows", [1, 2])
def test_moe_routing_on_the_device_equals_the_host_loop(quantized, renormalize, rows):
    m = moe(quantized)
    m.renormalize = renormalize
    x = torch.randn(rows, 1, 32, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        ref = m(x)
        m.device_routing = True
        got = m(x)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_int4_cuda_kernel_by_capability(monkeypatch):
    monkeypatch.setenv("MAMBA_CLI_FAKE_CUDA_CAPABILITY", "7.5")
    assert not cuda_int4_kernel(CUDA) and "dequantized to bf16" in gpu_path(CUDA)
    monkeypatch.setenv("MAMBA_CLI_FAKE_CUDA_CAPABILITY", "8.0")
    assert cuda_int4_kernel(CUDA) and gpu_path(CUDA) == "torch int4 CUDA kernel"


def test_static_cache_spans_and_capacity():
    assert [span_for(n, 4096) for n in (1, 256, 257, 1000, 5000)] == [256, 256, 512, 1024, 4096]
    assert span_for(300, 300) == 300
    cache = make_static([None], 16)
    assert len(cache) == 1 and cache.cursor.tolist() == [0]
    c = StaticKVCache(1, 2, 4, torch.float32, "cpu", 8, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="holds 8 positions"):
        c.update(torch.zeros(1, 2, 9, 4), torch.zeros(1, 2, 9, 4))


def test_gpu_check_dry_runs_on_the_cpu():
    """bench/gpu_check.py with the CPU standing in for the GPU, checks only: what CI can run of it."""
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "DEV": "cpu", "QUICK": "1", "PYTHONPATH": str(ROOT)}, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert " 0 failed" in p.stdout and "graph decode == eager, jamba" in p.stdout


# ---------------------------------------------------------------- on a GPU


@pytest.fixture
def on_cuda(monkeypatch):
    from bench import gpu_check
    from runtime import graphs

    monkeypatch.setattr(gpu_check, "DEV", "cuda")
    monkeypatch.setattr(gpu_check, "GRAPH", graphs.CudaGraph)
    monkeypatch.setattr(gpu_check, "QUICK", True)
    gpu_check.results.clear()
    return gpu_check


@pytest.mark.cuda
@pytest.mark.parametrize("group", ["int4_linear_checks", "model_checks", "int4_model_checks", "graph_checks",
                                   "resume_checks"])
def test_on_cuda(on_cuda, group):
    """Full GPU vs CPU logits (fp32, bf16), splits at 1, N/2, N, int4 at 1/7/80/512 rows, captured decode ==
    eager over 64 steps, save/resume across devices: bench/gpu_check.py's groups on the GPU."""
    getattr(on_cuda, group)()
    fails = [r for r in on_cuda.results if r[1] == "FAIL"]
    assert on_cuda.results and not fails, fails


@pytest.mark.cuda
def test_cuda_int4_path_matches_capability():
    q = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    m = QuantLinear(q, torch.full((64, 4), 0.01), torch.zeros(64, 4)).to("cuda")
    m.prepare()
    if cuda_int4_kernel(CUDA):
        assert m.packed is not None and m.dense is None
    else:
        assert m.dense is not None and m.dense.dtype == torch.bfloat16 and m.packed is None


@pytest.mark.cuda
def test_cuda_split_moves_ids_and_keeps_caches_on_layer_devices():
    from bench import gpu_check

    base, cfg = gpu_check.build("jamba")
    lm = gpu_check.loaded(base, "jamba", cfg)
    place(base, "cuda", 2)
    cache = lm.make_cache(1)
    lm.forward(torch.tensor([[5, 6, 7]]), cache)
    assert lm.input_device.type == "cuda"
    assert [(c.k if hasattr(c, "k") else c.conv).device.type for c in cache] == ["cuda", "cuda", "cpu", "cpu"]
