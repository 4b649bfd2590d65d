"""Compiled one-token decode steps (runtime/compile.py) give the eager results, for every architecture.

fp32 tiny models: compiled and eager logits agree to float rounding over a prompt and 8 decode steps,
and the counters prove the compiled graphs ran (a silent fallback to eager would fail the test).
Needs a C++ compiler for inductor: skipped, with the reason, where there is none.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import compile as comp
from runtime import load_model
from tests.configs import JAMBA, LLAMA, MAMBA
from tests.fixtures import build_tiny

ROOT = Path(__file__).resolve().parent.parent

LLAMA_CASES = ("mistral-window", "llama-mha-bias", "mixtral-4x-window")
CASES = {**{f"llama:{k}": v for k, v in LLAMA.items() if k in LLAMA_CASES},
         **{f"ssm:{k}": v for k, v in MAMBA.items() if k in ("mamba-k4", "falcon-k3", "mamba2-g2")},
         **{f"jamba:{k}": v for k, v in JAMBA.items() if k == "jamba-p2-x4-top2-gqa2"}}
# Graphs each case must run (besides the embedding lookup's and the final norm and head's): a plain KV
# cache takes the one-graph attention block (attn_kv_*), a sliding-window ring the two graphs around an
# eager append.
EXPECT = {"llama:llama-mha-bias": {"attn_kv_ffn_step"}, "llama:mistral-window": {"attn_in", "attn_out_ffn"},
          "llama:mixtral-4x-window": {"attn_in", "attn_out"}, "ssm": {"ssm_block_step"},
          "jamba": {"attn_kv_step", "ssm_ffn_block_step"}}


@pytest.fixture(autouse=True)
def compile_allowed(monkeypatch):
    monkeypatch.delenv("MAMBA_CLI_NO_COMPILE", raising=False)
    why = comp.unavailable()
    if why:
        pytest.skip(f"decode-step compilation unavailable here: {why}")


def decode(m, n: int = 8, prompt: int = 20) -> torch.Tensor:
    cache = m.make_cache(1)
    ids = torch.randint(5, 320, (1, prompt), generator=torch.Generator().manual_seed(1))
    out = [m.forward(ids, cache)[0, -1]]
    tok = out[-1].argmax().view(1, 1)
    for _ in range(n):
        out.append(m.forward(tok, cache)[0, -1])
        tok = out[-1].argmax().view(1, 1)
    return torch.stack(out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_decode_equals_eager(case):
    cls, cfg = CASES[case]
    m = load_model(build_tiny(cls, cfg), device="cpu")
    eager = decode(m)
    before = dict(comp.compiled_calls)
    assert m.compile() is None, comp.failures
    compiled = decode(m)
    ran = {k for k, v in comp.compiled_calls.items() if v > before.get(k, 0)}
    assert EXPECT.get(case, EXPECT.get(case.split(":")[0])) | {"embed_step", "norm_head_step"} <= ran, ran
    err = float((compiled - eager).abs().max() / eager.abs().max())
    assert err < 1e-5, err
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))
    m.compile(False)
    assert torch.equal(decode(m), eager)  # turned off: the eager path again, bit for bit


def test_direct_calls_after_another_model_and_prefills_of_any_length():
    """A second model whose norms have another eps still decodes through direct calls (dynamo keeps float
    attributes constants instead of turning them into graph inputs a DirectCall does not take); prefills of
    new lengths do not run (or recompile) the one-token head graph."""
    cls, cfg = CASES["llama:llama-mha-bias"]
    for eps in (1e-5, 1e-6):
        m = load_model(build_tiny(cls, {**cfg, "rms_norm_eps": eps}), device="cpu")
        assert m.compile() is None, comp.failures
        before = dict(comp.direct_calls)
        decode(m, n=4)
        direct = {k: v - before.get(k, 0) for k, v in comp.direct_calls.items()}
        assert direct.get("attn_kv_ffn_step", 0) > 0 and direct.get("norm_head_step", 0) > 0, direct
    heads = comp.compiled_calls.get("norm_head_step", 0)
    for n in (3, 7, 12):
        m.forward(torch.arange(5, 5 + n).view(1, n), m.make_cache(1), last_only=True)
    assert comp.compiled_calls.get("norm_head_step", 0) == heads


def test_graphs_past_dynamos_recompile_limit_run_eagerly():
    """A graph function called with more kinds of inputs than dynamo compiles graphs for (16 per function) runs
    the extra calls eagerly, keeps its compiled graphs for the kinds it has, and is not marked failed; a compiled
    model decodes batches of 1 to 20 rows (its embedding and head graphs take one sequence only)."""

    @comp.graph
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    comp.setup()
    with torch.inference_mode():
        for n in range(1, 21):
            x = torch.randn(n)
            assert torch.equal(double(x), x * 2 + 1)
        assert double.__qualname__ not in comp.failures
        before = comp.direct_calls.get(double.__qualname__, 0)
        double(torch.randn(3))
        assert comp.direct_calls.get(double.__qualname__, 0) == before + 1  # a compiled kind: still direct
    cls, cfg = CASES["llama:llama-mha-bias"]
    m = load_model(build_tiny(cls, cfg), device="cpu")
    assert m.compile() is None, comp.failures
    for b in range(1, 21):
        cache = m.make_cache(b)
        m.forward(torch.randint(5, 300, (b, 4), generator=torch.Generator().manual_seed(b)), cache)
        m.forward(torch.randint(5, 300, (b, 1), generator=torch.Generator().manual_seed(b)), cache)
    assert not comp.failures, comp.failures


def test_compiled_attention_across_kv_growth():
    """The one-graph attention block serves every KV length: across the cache's growth (STEP = 256
    positions), compiled decoding still equals eager, from one compiled graph per function."""
    from runtime.cache import STEP

    cls, cfg = CASES["llama:llama-mha-bias"]
    m = load_model(build_tiny(cls, cfg), device="cpu")
    eager = decode(m, n=12, prompt=STEP - 6)
    assert m.compile() is None, comp.failures
    compiled = decode(m, n=12, prompt=STEP - 6)
    err = float((compiled - eager).abs().max() / eager.abs().max())
    assert err < 1e-5, err
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


def test_compile_falls_back_when_unavailable(monkeypatch):
    cls, cfg = CASES["ssm:mamba-k4"]
    m = load_model(build_tiny(cls, cfg), device="cpu")
    monkeypatch.setenv("MAMBA_CLI_NO_COMPILE", "1")
    assert "MAMBA_CLI_NO_COMPILE" in m.compile()
    assert not any(layer.compiled_step for layer in m.module.layers)


def test_chat_compiles_by_default_and_run_output_is_unchanged():
    cls, cfg = CASES["llama:llama-mha-bias"]
    folder = build_tiny(cls, cfg)
    env = {k: v for k, v in os.environ.items() if k != "MAMBA_CLI_NO_COMPILE"}

    def cli(*args, stdin=None):
        p = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=ROOT,
                           env=env, input=stdin, timeout=600)
        assert p.returncode == 0, p.stderr
        return p

    plain = cli("run", str(folder), "State space", "--raw", "-t", "0", "-n", "12", "--ignore-eos").stdout
    fast = cli("run", str(folder), "State space", "--raw", "-t", "0", "-n", "12", "--ignore-eos", "--compile").stdout
    assert fast == plain and plain
    chat = cli("chat", str(folder), "-t", "0", "-n", "6", "--ignore-eos", stdin="hello\n/exit\n")
    # the prompt comes up before the compile ends; the reply waits for it (rich wraps the status line)
    assert "(compiling the decode step meanwhile)" in " ".join(chat.stderr.split())
    assert "6 tokens" in chat.stdout and "not compiled" not in chat.stderr


def test_direct_calls_skip_dynamo_and_fall_back_when_the_call_differs():
    """After dynamo has run a graph once, later decode steps call the compiled graph directly
    (DirectCall: no frame hook, guards or bytecode); a call it did not capture (another batch size,
    a grown KV cache, grad mode on) goes through dynamo again, and every result still equals eager."""
    from runtime.cache import STEP

    cls, cfg = CASES["jamba:jamba-p2-x4-top2-gqa2"]
    m = load_model(build_tiny(cls, cfg), device="cpu")
    eager = decode(m, n=10, prompt=STEP - 5)  # crosses a KV capacity step: new strides
    assert m.compile() is None, comp.failures
    before = dict(comp.direct_calls)
    compiled = decode(m, n=10, prompt=STEP - 5)
    direct = {k: v - before.get(k, 0) for k, v in comp.direct_calls.items()}
    assert direct.get("ssm_ffn_block_step", 0) > 0 and direct.get("attn_kv_step", 0) > 0, direct
    from runtime.layers import attn_kv_step
    from runtime.ssm import ssm_ffn_block_step
    captured = [d for f in (attn_kv_step, ssm_ffn_block_step) for ds in f.direct.values() for d in ds]
    # the step graphs' calls skip aot_autograd's wrappers too: inductor's entry, called with the inputs
    assert captured and all(d.inner is not None for d in captured)
    assert torch.allclose(compiled, eager, rtol=0, atol=1e-5 * float(eager.abs().max()))
    # a batch of two: new shapes, through dynamo (a recompile), then direct again
    cache = m.make_cache(2)
    ids = torch.randint(5, 320, (2, 12), generator=torch.Generator().manual_seed(2))
    m.forward(ids, cache)
    steps = [m.forward(ids[:, i:i + 1], cache)[:, -1] for i in range(4)]
    m.compile(False)
    cache = m.make_cache(2)
    m.forward(ids, cache)
    ref = [m.forward(ids[:, i:i + 1], cache)[:, -1] for i in range(4)]
    for a, b in zip(steps, ref, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_direct_call_refuses_what_it_did_not_capture():
    """A DirectCall answers MISS for other modules, another dtype or rank, a size it was compiled
    for statically, a symbolic size below 2 (dynamo specializes 0 and 1), or grad mode changed."""
    lin = torch.nn.Linear(8, 8)

    @comp.graph(dynamic=None)
    def f(layer: torch.nn.Module, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return layer(x) + kv.sum(1)

    comp.setup()
    with torch.inference_mode():
        x, kv = torch.randn(1, 8), torch.randn(1, 6, 8)
        torch._dynamo.maybe_mark_dynamic(kv, 1)
        f(lin, x, kv)
        ((d,),) = f.direct.values()
        longer = torch.randn(1, 9, 8)  # the symbolic length: served directly, computed right
        assert torch.allclose(d((lin, x, longer)), lin(x) + longer.sum(1), atol=1e-6)
        assert d((torch.nn.Linear(8, 8), x, kv)) is comp.MISS
        assert d((lin, x.double(), kv)) is comp.MISS
        assert d((lin, torch.randn(2, 8), kv)) is comp.MISS
        assert d((lin, x, torch.randn(1, 6, 8, 1))) is comp.MISS
        assert d((lin, x, torch.randn(1, 1, 8))) is comp.MISS
    assert d((lin, x, kv)) is comp.MISS  # grad mode on, not inference tensors


def test_direct_call_misses_when_a_parameter_is_replaced():
    """A module whose parameter tensor was replaced (same module object) goes back through dynamo."""
    lin = torch.nn.Linear(8, 8)

    @comp.graph
    def g(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x) * 2

    comp.setup()
    with torch.inference_mode():
        x = torch.randn(1, 8)
        g(lin, x)
        ((d,),) = g.direct.values()
        assert torch.allclose(d((lin, x)), lin(x) * 2, atol=1e-6)
        lin.weight = torch.nn.Parameter(torch.randn(8, 8))
        assert d((lin, x)) is comp.MISS
        assert torch.allclose(g(lin, x), lin(x) * 2, atol=1e-6)  # through dynamo: recompiled for the new tensor
    assert g.direct
    del lin, d
    gc.collect()
    assert not g.direct  # dropped with the module: its parameters are not kept alive


def test_direct_call_enters_inductor_only_where_aot_passes_through():
    """DirectCall calls inductor's entry itself (no aot_autograd wrappers) when those wrappers handed that
    entry the call's inputs and returned its outputs unchanged, e.g. with a state updated in place inside the
    graph; a graph that returns a view of an input (aot rebuilds it from the caller's tensor after the graph)
    keeps the wrappers. Either way the direct calls compute what eager does."""

    @comp.graph
    def update(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        state.mul_(0.5).add_(x)
        return state * 2

    @comp.graph
    def passthrough(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.view(8), x + y

    comp.setup()
    with torch.inference_mode():
        x, state = torch.randn(1, 8), torch.zeros(1, 8)
        ref = torch.zeros(1, 8)
        for _ in range(3):  # the first call through dynamo, the others direct
            out = update(x, state)
            ref = ref * 0.5 + x
            assert torch.allclose(state, ref, atol=1e-6) and torch.allclose(out, ref * 2, atol=1e-6)
        ((d,),) = update.direct.values()
        assert d.inner is not None
        a, b = torch.randn(1, 8), torch.randn(1, 8)
        passthrough(a, b)
        ((p,),) = passthrough.direct.values()
        assert p.inner is None
        c = torch.randn(1, 8)
        view, total = passthrough(c, b)
        assert view.data_ptr() == c.data_ptr() and torch.equal(view, c.view(8)) and torch.equal(total, c + b)


def native_moe(renormalize: bool, seed: int, up_type: int = 2):
    """A MoE (64 wide, 4 experts of 96, top 2) on native Q4_0 expert blocks (the up experts: up_type), and a
    norm before it."""
    from quant import formats, native
    from quant.linear import BlockLinear
    from runtime.layers import MoE, RMSNorm

    if not native.available():
        pytest.skip(f"native kernels: {native.load()}")
    torch.manual_seed(seed)
    moe = MoE(64, 96, 4, 2, renormalize=renormalize)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        for p in [*moe.parameters(), *norm.parameters()]:
            p.normal_(0, 0.3)
    for name in ("w1", "w3", "w2"):
        w = getattr(moe, name)
        t = up_type if name == "w3" else 2
        moe.set_int4(name, [BlockLinear(formats.quantize(w[e], t), t, w.shape[2]) for e in range(4)])
    assert moe.routes_by_id()
    return moe, norm


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("rows", [1, 2])
def test_moe_decode_graphs_equal_eager(renormalize, rows):
    """A 4-bit MoE's one-token step (ffn_block_step) with the expert ids on the host: the router as one
    graph, each chosen expert as another, called directly after the first time; the result equals the
    eager MoE.forward."""
    from runtime.layers import ffn_block_step

    moe, norm = native_moe(renormalize, seed=0)
    moe.by_id = False  # this test: the routing with the ids on the host (4-bit experts other than BlockLinear)
    comp.setup()
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList([torch.nn.Module()])
    holder.layers[0].moe, holder.layers[0].compiled_step = moe, True
    comp._warm_experts(holder)  # what warm_up does: every expert's direct call captured before the steps
    before = comp.direct_calls.get("moe_expert", 0), comp.compiled_calls.get("moe_expert", 0)
    with torch.inference_mode():
        for seed in range(6):
            h = torch.randn(rows, 1, 64, generator=torch.Generator().manual_seed(seed))
            want = h + moe(norm(h))
            got = ffn_block_step(norm, moe, h)
            assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max())), seed
    direct = comp.direct_calls.get("moe_expert", 0) - before[0]
    assert direct == comp.compiled_calls.get("moe_expert", 0) - before[1] == 6 * rows * 2  # all of them


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("up_type", [2, 3])
def test_moe_on_native_experts_decodes_in_one_graph(renormalize, rows, up_type):
    """A MoE whose experts are native block linears routes its decode steps by id (MoE.experts_by_id: the
    kernel picks the chosen experts' blocks, no host sync), so its whole step is one graph (ffn_residual),
    called directly; the result equals the routing with the ids on the host (to float32 rounding: the
    compiled graph fuses the norm and gates). Gate and up experts of one type go through one kernel call,
    of two types (Q4_0 gates, Q4_1 ups) through one each."""
    from runtime.layers import ffn_block_step

    moe, norm = native_moe(renormalize, seed=1, up_type=up_type)
    comp.setup()
    before = comp.compiled_calls.get("ffn_residual", 0), comp.direct_calls.get("ffn_residual", 0)
    experts = comp.compiled_calls.get("moe_expert", 0)
    with torch.inference_mode():
        for seed in range(6):
            h = torch.randn(rows, 1, 64, generator=torch.Generator().manual_seed(seed))
            got = ffn_block_step(norm, moe, h)
            moe.by_id = False
            want = h + moe(norm(h))  # the ids on the host, each expert's own product
            moe.by_id = True
            assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max())), seed
    assert comp.compiled_calls.get("ffn_residual", 0) - before[0] == 6
    assert comp.direct_calls.get("ffn_residual", 0) - before[1] == 5  # all but the first, through dynamo
    assert comp.compiled_calls.get("moe_expert", 0) == experts  # no expert graphs


def test_ssm_decode_steps_run_as_one_chain():
    """A compiled SSM model's decode step calls its layers' graphs through one Chain (runtime/compile.py)
    once the first steps have bound each layer's graph to its state; the logits equal eager's, and a
    parameter replaced, a state tensor swapped or a new cache each send the step back through the layers
    (and a new Chain), still equal to eager."""
    from runtime.compile import Chain

    cls, cfg = MAMBA["mamba2-g2"]
    m = load_model(build_tiny(cls, cfg), device="cpu")
    eager = decode(m)
    assert m.compile() is None, comp.failures
    n_layers = len(m.module.layers)
    with torch.inference_mode():
        cache = m.make_cache(1)
        ids = torch.randint(5, 320, (1, 20), generator=torch.Generator().manual_seed(1))
        out = [m.forward(ids, cache)[0, -1]]
        for i in range(8):
            if i == 3:
                chain = m.module._chains.get(cache[0])[0]
                assert isinstance(chain, Chain)
                before = comp.direct_calls.get("ssm_block_step", 0)
            out.append(m.forward(out[-1].argmax().view(1, 1), cache)[0, -1])
        assert comp.direct_calls["ssm_block_step"] - before == 5 * n_layers
        assert m.module._chains[cache[0]][0] is chain  # the same Chain served the last five steps
        assert [c.offset for c in cache] == [28] * n_layers
    compiled = torch.stack(out)
    assert torch.allclose(compiled, eager, rtol=0, atol=1e-5 * float(eager.abs().max()))

    def continued(model, cache, tok, n=3):
        return torch.stack([model.forward(tok, cache)[0, -1] for _ in range(n)])

    # a state tensor swapped (same values): the Chain misses, the layers bind again, a new Chain
    ref_m = load_model(build_tiny(cls, cfg), device="cpu")
    ref_cache = ref_m.make_cache(1)
    for c, r in zip(cache, ref_cache, strict=True):
        r.conv.copy_(c.conv), r.ssm.copy_(c.ssm)
        r.offset = c.offset
    tok = out[-1].argmax().view(1, 1)
    expect = continued(ref_m, ref_cache, tok)
    with torch.inference_mode():
        cache[1].ssm = cache[1].ssm.clone()
        got = continued(m, cache, tok)
    assert torch.allclose(got, expect, rtol=0, atol=1e-5 * float(expect.abs().max()))
    assert isinstance(m.module._chains[cache[0]][0], Chain) and m.module._chains[cache[0]][0] is not chain
    # a parameter replaced: the next step computes with the new one
    with torch.no_grad():
        d = m.module.layers[0].mixer.D
        m.module.layers[0].mixer.D = torch.nn.Parameter(d * 0.5, requires_grad=False)
        ref_m.module.layers[0].mixer.D.mul_(0.5)
    expect = continued(ref_m, ref_cache, tok)
    got = continued(m, cache, tok)
    assert torch.allclose(got, expect, rtol=0, atol=1e-5 * float(expect.abs().max()))
    # the Chain goes with its states
    del cache, chain
    gc.collect()
    assert len(m.module._chains) == 0


def test_bound_call_refuses_other_arguments():
    """A Bound call (a direct call with all arguments but one fixed) answers MISS for other objects in the
    fixed arguments, another kind of open tensor, grad mode on, or after a parameter was replaced."""
    lin = torch.nn.Linear(8, 8)

    @comp.graph
    def f(layer: torch.nn.Module, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        state.mul_(0.5)
        return layer(x) + state

    comp.setup()
    with torch.inference_mode():
        x, state = torch.randn(1, 8), torch.randn(1, 8)
        out = f(lin, x, state)
        b = f.bind((lin, x, state), 1, out)
        assert b is not None and b.kinds[0] == b.kinds[1]
        x2 = torch.randn(1, 8)
        want = lin(x2) + state * 0.5
        assert torch.allclose(b((lin, x2, state)), want, atol=1e-6)
        assert torch.allclose(state, want - lin(x2), atol=1e-6)  # the state was updated in place
        assert b((lin, x2, state.clone())) is comp.MISS
        assert b((torch.nn.Linear(8, 8), x2, state)) is comp.MISS
        assert b((lin, torch.randn(2, 8), state)) is comp.MISS
        assert b((lin, x2.double(), state)) is comp.MISS
        assert b((lin, x2, state, state)) is comp.MISS
    assert b((lin, torch.randn(1, 8), state)) is comp.MISS  # grad mode on
    with torch.inference_mode():
        lin.weight = torch.nn.Parameter(torch.randn(8, 8))
        assert b((lin, x2, state)) is comp.MISS
        assert f.bind((lin, x2, state), 0, out) is None  # not a tensor


def test_attention_decode_steps_run_as_one_chain():
    """A compiled Llama-style model on plain KV caches runs a decode step's blocks as one Chain of open links
    (runtime/compile.py) once every block's direct call is captured: the logits equal eager's across a KV growth
    (the chain misses, the blocks run, the chain is made again), and a step the chain refuses (grad mode on)
    appends nothing twice."""
    from runtime.cache import STEP
    from runtime.compile import Chain
    from runtime.layers import chained_step

    cls, cfg = CASES["llama:llama-mha-bias"]
    m = load_model(build_tiny(cls, cfg), device="cpu")
    eager = decode(m, n=12, prompt=STEP - 6)  # the KV buffers grow during the steps
    assert m.compile() is None, comp.failures
    before = comp.direct_calls.get("attn_kv_ffn_step", 0)
    compiled = decode(m, n=12, prompt=STEP - 6)
    n_layers = len(m.module.layers)
    assert comp.direct_calls["attn_kv_ffn_step"] - before == 12 * n_layers  # every step direct, most chained
    assert torch.allclose(compiled, eager, rtol=0, atol=1e-5 * float(eager.abs().max()))
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))

    cache = m.make_cache(1)
    ids = torch.randint(5, 320, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        m.forward(ids, cache)
        for _ in range(3):
            m.forward(ids[:, :1], cache)
    entry, offsets = m.module._chains[cache[0]], [c.offset for c in cache]
    assert isinstance(entry[0], Chain) and entry[0].first_open is not None
    out = chained_step(entry, m.module.embed(ids[:, :1]), cache,
                       m.module.rope(torch.tensor([offsets[0]]), torch.float32))  # grad mode on: refused
    assert out is comp.MISS and [c.offset for c in cache] == offsets and m.module._chains[cache[0]] is entry
    with torch.inference_mode():
        step = m.forward(ids[:, :1], cache)[0, -1]
    assert [c.offset for c in cache] == [o + 1 for o in offsets]
    m.compile(False)
    ref_cache = m.make_cache(1)
    m.forward(ids, ref_cache)
    for _ in range(4):
        ref = m.forward(ids[:, :1], ref_cache)[0, -1]
    assert torch.allclose(step, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_jamba_decode_steps_run_as_one_chain_of_both_kinds():
    """Jamba without expert layers on the host: a decode step's Mamba blocks (bound to their states) and
    attention blocks (open links, fed their key and value views) run as one Chain; logits equal eager's."""
    from runtime.compile import Bound, Chain, DirectCall
    from tests.configs import jamba

    cls, cfg = jamba(4, 2, 1, 8, 7, 4, 2, 4, 2, hidden_size=64, intermediate_size=64, mamba_d_state=8,
                     mamba_d_conv=4, mamba_expand=2)  # attention in layers 1 and 3, no experts
    m = load_model(build_tiny(cls, cfg), device="cpu")
    eager = decode(m, n=10)
    assert m.compile() is None, comp.failures
    before = {k: comp.direct_calls.get(k, 0) for k in ("attn_kv_ffn_step", "ssm_ffn_block_step")}
    cache = m.make_cache(1)
    ids = torch.randint(5, 320, (1, 20), generator=torch.Generator().manual_seed(1))
    out = [m.forward(ids, cache)[0, -1]]
    for _ in range(10):
        out.append(m.forward(out[-1].argmax().view(1, 1), cache)[0, -1])
        if len(out) == 4:
            chain = m.module._chains[cache[0]][0]
    assert isinstance(chain, Chain) and m.module._chains[cache[0]][0] is chain
    assert [type(d) for *_, d in chain.calls] == [type(None), DirectCall, type(None), DirectCall]
    assert isinstance(chain.first_bound, Bound) and chain.first_open is chain.calls[1][3]
    direct = {k: comp.direct_calls[k] - v for k, v in before.items()}
    assert direct == {"attn_kv_ffn_step": 20, "ssm_ffn_block_step": 20}  # every step direct (2 + 2 layers)
    assert [c.offset for c in cache] == [30] * 4
    compiled = torch.stack(out)
    assert torch.allclose(compiled, eager, rtol=0, atol=1e-5 * float(eager.abs().max()))
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


def test_blocks_with_forward_hooks_are_not_chained():
    """A step with forward hooks on its blocks (a --gpu-layers split moves inputs in one) keeps calling the
    blocks: no Chain is made, and every hook runs."""
    cls, cfg = MAMBA["mamba2-g2"]
    m = load_model(build_tiny(cls, cfg), device="cpu")
    assert m.compile() is None, comp.failures
    cache = m.make_cache(1)
    tok = torch.tensor([[7]])
    m.forward(torch.tensor([[5, 6, 7, 8]]), cache)
    for _ in range(3):
        m.forward(tok, cache)
    assert m.module._chains[cache[0]][0] is not None  # chained from here on, were it not for the hooks
    calls = []
    handles = [layer.register_forward_pre_hook(lambda _m, args: calls.append(1)) for layer in m.module.layers]
    for _ in range(4):
        m.forward(tok, cache)
    assert len(calls) == 4 * len(m.module.layers)  # every step, every block
    decode(m, n=6)  # a new cache: no chain is made
    assert len(calls) == 11 * len(m.module.layers)
    for h in handles:
        h.remove()


def test_warm_up_captures_token_ids_of_both_kinds():
    """After compile()'s warm-up, a one-token step calls every graph directly whether its token ids were made
    under inference mode (the server's worker) or not (a chat): no call through dynamo mid-conversation."""
    cls, cfg = CASES["llama:llama-mha-bias"]
    m = load_model(build_tiny(cls, cfg), device="cpu")
    assert m.compile() is None, comp.failures
    cache = m.make_cache(1)
    m.forward(torch.tensor([[5, 6, 7, 8, 9]]), cache)
    for inference in (True, False, True):
        before = sum(comp.compiled_calls.values()) - sum(comp.direct_calls.values())
        with torch.inference_mode(inference):
            tok = torch.tensor([[7]])
        m.forward(tok, cache)
        assert sum(comp.compiled_calls.values()) - sum(comp.direct_calls.values()) == before
