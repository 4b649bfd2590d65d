"""The few blocks the architectures share: RMSNorm, RoPE, GQA attention over SDPA, SwiGLU, top-k MoE,
and the one-token steps of attention blocks that runtime/compile.py captures.

Legend: B batch, T new tokens, S attended positions, H query heads, Hk kv heads, D head dim,
E hidden size, I intermediate size, X experts, K experts per token.
Parameter names follow the Hugging Face checkpoints so HF safetensors load without renaming.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from runtime.cache import KVCache, SSMState, attention_mask
from runtime.compile import MISS, graph


def rms_normalize(x: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """x / RMS(x) over the last dim, computed in float32 and returned in dtype: the one RMS norm
    (RMSNorm; Falcon-Mamba's weightless dt/B/C norms; Mamba-2's grouped, gated norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps, x.dtype)


def embedding(vocab: int, dim: int) -> nn.Embedding:
    """nn.Embedding without the random init: models are built on the meta device and loaded over, and
    nn.Embedding's normal_() on meta tensors imports torch._dynamo (1.6 s of a 2.6 s first load)."""
    return nn.Embedding(vocab, dim, _weight=torch.empty(vocab, dim))


def input_dtype(proj: nn.Module) -> torch.dtype:
    """The dtype a projection wants its input in: an nn.Linear's weight dtype; int4 layers take float32."""
    w = proj._parameters.get("weight")
    return w.dtype if w is not None else torch.float32


def few_rows_linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor | None:
    """x (N, in) @ lin.weight.T (+ bias) for a few rows N <= 8 of a float32 linear as a broadcast product summed
    over its inputs, or None when that does not apply. Inside a compiled step this is one fused loop over the
    weight instead of a GEMM call (Mamba's dt_proj 1536 x 48: ~12 us a call; a MoE router: MKL's parallel
    gemv, 6% of jamba-small's decode samples)."""
    w = lin.weight
    if x.dim() != 2 or x.shape[0] > 8 or w.dtype not in (torch.float32, torch.float16) or x.dtype != torch.float32:
        return None
    y = (x[:, None, :] * w.float()).sum(-1)  # a float16 weight (a GGUF's F16 dt_proj) widened in the loop
    return y + lin.bias if lin.bias is not None else y


# ---------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and the attention scaling factor for a rope_scaling dict (HF semantics)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(is_mid, mid, scaled), 1.0
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


class RoPE(nn.Module):
    """Rotary embedding in the HF 'rotate_half' layout (GGUF q/k are un-permuted to it on load)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        with torch.device("cpu"):  # a plain attribute, not a buffer: models are built on the meta device
            self.inv_freq, self.mscale = rope_inv_freq(head_dim, theta, scaling)
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (dtype, device) -> cos, sin (N, D)

    def span(self, start: int, t: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, D) of positions start .. start + t - 1 (the same values as forward's): rows of a table
        kept per dtype and device, grown 1,024 positions at a time. A decode step takes two views of it instead
        of forward's ~11 ops (arange to sin: 0.18 ms of SmolLM2's ~9 ms step; in-process A/B, step p25 8.95 ->
        8.66 ms)."""
        end = start + t
        key = (dtype, torch.device(device))
        table = self.tables.get(key)
        if table is None or table[0].shape[0] < end:
            n = -(-end // 1024) * 1024
            table = self.tables[key] = self.forward(torch.arange(n, device=device), dtype)
        return table[0][start:end], table[1][start:end]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions : (T,)  ->  cos, sin : (T, D);  per-sequence positions (B, T)  ->  (B, 1, T, D)
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        if emb.dim() == 3:
            emb = emb[:, None]  # broadcast over the heads of (B, H, T, D)
        return (emb.cos() * self.mscale).to(dtype), (emb.sin() * self.mscale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x : (B, H, T, D)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------- attention


class Attention(nn.Module):
    """Grouped-query attention; RoPE optional (Jamba has none); sliding window via the cache or a mask."""

    def __init__(self, hidden: int, n_heads: int, n_kv: int, head_dim: int, window: int | None = None,
                 bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim, self.window = n_heads, n_kv, head_dim, window
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=bias)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        """x (B, T, E) -> q (B, H, T, D), k and v (B, Hk, T, D), RoPE applied."""
        b, t, _ = x.shape
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if hasattr(self, "qkv_proj"):
            qkv = self.qkv_proj(x)
            if rope is not None:
                # queries and keys rotated as one tensor (one pass); in a compiled decode step that tensor, with
                # two users, is computed once into a buffer (ATTENTION_INDUCTOR) instead of inside the attention's
                # loop over positions, which recomputed the queries' rotation for every cached key
                qk, v = qkv.split([nq + nk, nk], dim=-1)
                qk = apply_rope(qk.view(b, t, self.n_heads + self.n_kv, self.head_dim).transpose(1, 2), *rope)
                v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
                return qk[:, : self.n_heads], qk[:, self.n_heads :], v
            q, k, v = qkv.split([nq, nk, nk], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hk, T, D)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output (B, H, T, D) -> o_proj'd (B, T, E)."""
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache=None) -> torch.Tensor:
        # x : (B, T, E)
        t = x.shape[1]
        q, k, v = self.project(x, rope)
        if cache is None:
            mask = None
            if self.window is not None and t > self.window:
                pos = torch.arange(t, device=x.device)
                mask = attention_mask(pos, pos, self.window)
            out = sdpa(q, k, v, mask, causal=mask is None and t > 1)
        else:
            k, v, mask = cache.update(k, v)
            out = sdpa(q, k, v, mask, causal=False)
        return self.merge(out)


def sdpa(q, k, v, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    # q : (B, H, T, D), k/v : (B, Hk, S, D), mask : (T, S) bool or None.
    # k/v may be stored narrower than q (a float16 cache of a 4-bit model): the compiled one-query loops widen
    # them as they read; everything else widens them first.
    b, h, t, d = q.shape
    hk = k.shape[1]
    if t == 1 and mask is None and q.device.type == "cpu" and torch.compiler.is_compiling():
        return one_query_attention(q, k, v)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if t == 1 and hk != h and (mask is not None or (h // hk >= 4 and q.device.type == "cpu")):
        # One query per head: the H/Hk heads sharing a kv head become that kv head's queries, so any SDPA
        # kernel takes a mask (a static cache's decode step) without repeating keys and values, and torch's
        # CPU kernel reads each kv head once instead of once per query head: 2x faster for groups of 4 and
        # more (Mistral's 32/8 heads of 128: 547 -> 279 us at 1,000 positions, 2 threads); groups of 3
        # (SmolLM2's 9/3 of 64) were slower this way (fewer work items for the threads).
        return F.scaled_dot_product_attention(q.reshape(b, hk, h // hk, d), k, v, attn_mask=mask).view(b, h, 1, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


def one_query_attention(q, k, v) -> torch.Tensor:
    """One query per head in a compiled CPU decode step: scores, softmax and the weighted sum as plain
    reductions that inductor turns into its loops (torch's flash kernel does ~25 us of fixed work a call).

    Keys and values are position-major (a KVCache's). The scores reduce along a key's dims (contiguous); the
    weighted sum reduces over positions and is vectorized along a value row's dims, one accumulator a vector
    of dims (values stored dims-major, as they were, reduce along positions instead: inductor's 8-wide loop
    with one accumulator and a partial float16 load through the stack each step).

    Groups of fewer than 4 query heads per kv head (SmolLM2's 9/3 heads of 64, Jamba's) repeat the kv heads
    as an index h // g, so the loops run over query heads: the threads share 9 work items rather than 3
    (2:1 on 2 threads) and the softmax runs inside that parallel loop rather than on one thread. Against
    dims-major values and kv-head loops, in-process A/B, step p25 at 512 positions: SmolLM2 10.27 -> 9.42 ms,
    jamba-small 4.35 -> 4.28, Mistral-7B-4l 25.42 -> 25.03. Groups of 4 and more (Mistral's 32/8 heads of 128)
    are unrolled into one reduction per query head over the same loops, which inductor fuses into one loop
    nest with an accumulator per query head: each key and value row is read once per kv head (repeating the
    kv heads there reads each row 4 times: Mistral-7B's layer 245 -> 390 us at 520 positions).

    The scale 1/sqrt(d) applies once per score, inside the exponential (softmax(c s) = exp(c (s - max s)) / sum
    for c > 0; a power of two for these head sizes, so the same floats), not to q inside the scores' loop, where
    inductor repeated it for every vector of every key: in-process A/B, SmolLM2 step p25 9.21 -> 9.11 ms."""
    b, h, _, d = q.shape
    hk = k.shape[1]
    g = h // hk
    if g < 4:
        kx, vx = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, H, S, D), as indexes
        s = (q * kx).sum(-1)  # (B, H, S)
        e = torch.exp((s - s.amax(-1, keepdim=True)) * d**-0.5)
        out = (e[..., None] * vx).sum(-2)  # (B, H, D)
    else:
        qg = q.view(b, hk, g, d)
        s = torch.stack([(qg[:, :, i, None] * k).sum(-1) for i in range(g)], 2)  # (B, Hk, G, S)
        e = torch.exp((s - s.amax(-1, keepdim=True)) * d**-0.5)
        out = torch.stack([(e[:, :, i, :, None] * v).sum(-2) for i in range(g)], 2)  # (B, Hk, G, D)
    return (out / e.sum(-1, keepdim=True)).reshape(b, h, 1, d)


# ---------------------------------------------------------------- fused projections


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One nn.Linear computing torch.cat([m(x) for m in mods], -1): fewer, larger matmuls per token.
    None unless all are plain nn.Linear with matching biases (quant/swap.py fuses 4-bit ones)."""
    if all(type(m) is nn.Linear for m in mods):
        has_bias = [m.bias is not None for m in mods]
        if any(has_bias) and not all(has_bias):
            return None
        w = torch.cat([m.weight.data for m in mods])
        fused = nn.Linear(w.shape[1], w.shape[0], bias=all(has_bias), device=w.device, dtype=w.dtype)
        fused.weight.data = w
        if all(has_bias):
            fused.bias.data = torch.cat([m.bias.data for m in mods])
        return fused
    return None


def fuse_projections(model: nn.Module, fuse: Callable[[list[nn.Module]], nn.Module | None] = fuse_linears
                     ) -> None:
    """After loading: q/k/v -> qkv_proj and gate/up -> gate_up_proj wherever `fuse` allows it."""
    for mod in model.modules():
        if isinstance(mod, Attention) and not hasattr(mod, "qkv_proj"):
            fused = fuse([mod.q_proj, mod.k_proj, mod.v_proj])
            if fused is not None:
                mod.qkv_proj = fused
                del mod.q_proj, mod.k_proj, mod.v_proj
        elif isinstance(mod, SwiGLU) and not hasattr(mod, "gate_up_proj"):
            fused = fuse([mod.gate_proj, mod.up_proj])
            if fused is not None:
                mod.gate_up_proj = fused
                del mod.gate_proj, mod.up_proj


# ---------------------------------------------------------------- feed-forward


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def stack_experts(weights: dict[str, torch.Tensor], pattern: str, rename: dict[str, str] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint matrices -> a MoE's stacked parameters (X, out, in); other tensors pass.

    pattern matches a whole per-expert name with three groups: the MoE module's path, the expert index
    and the weight's name, which `rename` maps to w1 / w3 / w2 (default: it already is one of them).
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in weights.items():
        m = re.fullmatch(pattern, name)
        if m:
            experts.setdefault(f"{m[1]}.{(rename or {}).get(m[3], m[3])}", {})[int(m[2])] = t
        else:
            out[name] = t
    for name, per in experts.items():
        out[name] = torch.stack([per[e] for e in sorted(per)])
    return out


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts, stacked: w1/w3 (X, I, E), w2 (X, E, I); router `gate` (X, E).

    renormalize=True (Mixtral): weights are the softmax over the chosen k logits.
    renormalize=False (Jamba): weights are the full softmax's values at the chosen k.
    4-bit GGUF experts replace w1/w3/w2 by per-expert QuantLinears in q1/q3/q2 (set_int4).
    """

    EXPERT_WEIGHTS = ("w1", "w2", "w3")

    def __init__(self, hidden: int, inter: int, n_experts: int, top_k: int, renormalize: bool = True):
        super().__init__()
        self.top_k, self.renormalize, self.n_experts = top_k, renormalize, n_experts
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(n_experts, inter, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, inter))

    by_id = False  # decode picks the chosen experts' GGUF blocks in the kernel (experts_by_id)

    def set_int4(self, name: str, experts: list[nn.Module]) -> None:
        """Replace the stacked float parameter `name` (w1, w3 or w2) by one int4 linear per expert."""
        delattr(self, name)
        setattr(self, "q" + name[1], nn.ModuleList(experts))
        stacks = [getattr(self, q, None) for q in ("q1", "q3", "q2")]
        # every expert a native block linear (quant/linear.py BlockLinear) in file order, one type per stack
        self.by_id = all(
            stack is not None and len({getattr(e, "ggml_type", None) for e in stack}) == 1
            and all(getattr(e, "blocks", None) is not None and e.rows is None and e.bias is None for e in stack)
            for stack in stacks)

    def experts_by_id(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """A decode step's experts with their ids on the device: x (N, E); weights, idx (N, K). The native
        kernel (ggml_mm_id) multiplies each (token, chosen expert) row by that expert's blocks, as
        llama.cpp's mul_mat_id: no host sync, so one compiled graph holds the whole layer."""
        n, k = idx.shape
        ids = idx.reshape(-1)
        rows = x.float().repeat_interleave(k, 0)  # (N * K, E): each token once per chosen expert

        def product(stacks: list[nn.ModuleList], v: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
            return torch.ops.mamba_cli.ggml_mm_id(v, [e.blocks for stack in stacks for e in stack],
                                                  stacks[0][0].ggml_type, stacks[0][0].in_features, by)

        if self.q1[0].ggml_type == self.q3[0].ggml_type:
            # gate and up in one call: each row twice, the up rows' ids past the gate experts (one parallel
            # region and one call's fixed cost less a layer: jamba-small's step p25 4.50 -> 4.45 ms, in process)
            both = product([self.q1, self.q3], rows.repeat(2, 1), torch.cat([ids, ids + len(self.q1)]))
            gate, up = both.chunk(2)
        else:
            gate, up = product([self.q1], rows, ids), product([self.q3], rows, ids)
        y = product([self.q2], F.silu(gate) * up, ids)  # (N * K, E)
        return (y.view(n, k, -1).to(x.dtype) * weights[..., None]).sum(1)  # as forward's host loop sums

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        # x : (N, E) or (E,) -> the same shape, through expert e
        def proj(name: str):
            q = getattr(self, "q" + name[1], None)
            return q[e] if q is not None else (lambda v: F.linear(v, getattr(self, name)[e]))

        return proj("w2")(F.silu(proj("w1")(x)) * proj("w3")(x))

    device_routing = False  # route decode steps on the device on the CPU too (tests, dry runs)

    def route_on_device(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The decode step's experts chosen without a host sync (a CUDA graph can hold it).

        x : (N, E); weights, idx : (N, K). Stacked float experts are gathered by index (gpt-fast's way:
        letters n token, k chosen expert, i intermediate, e hidden); 4-bit experts (one module each)
        all run, the unchosen ones weighted 0.
        """
        if hasattr(self, "q1"):
            dense = torch.zeros(x.shape[0], self.n_experts, dtype=x.dtype, device=x.device)
            dense.scatter_(1, idx, weights)  # (N, X): the routing weights, 0 for unchosen experts
            out = torch.zeros_like(x)
            for e in range(self.n_experts):
                out += dense[:, e, None] * self._expert(e, x)
            return out
        w1, w3, w2 = self.w1[idx], self.w3[idx], self.w2[idx]  # (N, K, I, E), (N, K, I, E), (N, K, E, I)
        h = F.silu(torch.einsum("nkie,ne->nki", w1, x)) * torch.einsum("nkie,ne->nki", w3, x)
        y = torch.einsum("nkei,nki->nke", w2, h)
        return torch.einsum("nke,nk->ne", y, weights)

    def routes_by_id(self) -> bool:
        """Whether decode steps take experts_by_id (no host sync: a compiled graph holds the whole layer)."""
        return self.by_id and not self.device_routing and all(q in self._modules for q in ("q1", "q3", "q2"))

    def routes_on_host(self, x: torch.Tensor) -> bool:
        """Whether tokens x (N, E) take the decode routing with the expert ids on the host: a CPU decode step."""
        return x.shape[0] <= 2 and x.device.type == "cpu" and not self.device_routing

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens x (N, E) -> the chosen experts' weights (N, K) in x's dtype and their ids (N, K)."""
        logits = few_rows_linear(x, self.gate) if x.shape[0] <= 2 else None  # decode
        probs = F.softmax((self.gate(x) if logits is None else logits).float(), dim=-1)  # (N, X)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)  # (N, K)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(x.dtype), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, E)
        weights, idx = self.route(x)
        if x.shape[0] <= 2 and self.routes_by_id():
            return self.experts_by_id(x, weights, idx).view(shape)
        if x.shape[0] <= 2 and not self.routes_on_host(x):
            return self.route_on_device(x, weights, idx).view(shape)
        out = torch.zeros_like(x)
        if self.routes_on_host(x):
            # Decode on the CPU: run the K chosen experts on their weight views (no gathered copies); the
            # expert ids come to the host (.tolist()), which is free here and a stall on a GPU.
            for n in range(x.shape[0]):
                for j, e in enumerate(idx[n].tolist()):
                    out[n] += weights[n, j] * self._expert(e, x[n])
            return out.view(shape)
        # Prefill: group tokens by expert.
        flat_idx = idx.flatten()
        order = flat_idx.argsort(stable=True)
        counts = torch.bincount(flat_idx, minlength=self.n_experts).tolist()
        token_of = order // self.top_k
        start = 0
        quantized = hasattr(self, "q1")
        for e, c in enumerate(counts):
            if c == 0:
                continue
            sel = order[start : start + c]
            tok = token_of[start : start + c]
            start += c
            xe = x[tok]
            if quantized:
                y = self._expert(e, xe)
            else:
                y = (F.silu(xe @ self.w1[e].T) * (xe @ self.w3[e].T)) @ self.w2[e].T
            out.index_add_(0, tok, y * weights.flatten()[sel, None])
        return out.view(shape)


# ---------------------------------------------------------------- one-token steps (runtime/compile.py)
# Plain functions of (modules, tensors) so that one compiled graph serves every layer of a shape.


@graph
def attn_in(norm: RMSNorm, attn: Attention, h: torch.Tensor, rope) -> tuple[torch.Tensor, ...]:
    return attn.project(norm(h), rope)


@graph
def attn_out(attn: Attention, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return h + attn.merge(out)


@graph
def attn_out_ffn(attn: Attention, h: torch.Tensor, out: torch.Tensor, norm: RMSNorm, ffn: nn.Module) -> torch.Tensor:
    h = h + attn.merge(out)
    return h + ffn(norm(h))


@graph
def ffn_residual(norm: RMSNorm, ffn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return h + ffn(norm(h))


@graph
def moe_route(norm: RMSNorm, moe: MoE, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A MoE block's norm and router, as MoE.forward: x (N, E), the chosen experts' weights and ids (N, K)."""
    x = norm(h).reshape(-1, h.shape[-1])
    return x, *moe.route(x)


@graph
def moe_expert(w1: nn.Module, w3: nn.Module, w2: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One chosen 4-bit expert on one token x (1, E), times its routing weight (1, 1)."""
    return weight * w2(F.silu(w1(x)) * w3(x))


def ffn_in_one_graph(ffn: nn.Module) -> bool:
    """Whether a feed-forward block's one-token step fits inside one compiled graph: anything but a MoE
    whose expert ids come to the host (MoE.routes_by_id)."""
    return not isinstance(ffn, MoE) or ffn.routes_by_id()


def ffn_block_step(norm: RMSNorm, ffn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """h + ffn(norm(h)) for one token, compiled: one graph, MoE layers on native experts included
    (MoE.experts_by_id). Other 4-bit experts: the router is one graph, the ids come to the host (free on
    the CPU), and each chosen expert is a graph of its own (float experts and device routing stay eager)."""
    if ffn_in_one_graph(ffn):
        return ffn_residual(norm, ffn, h)
    if not hasattr(ffn, "q1") or not ffn.routes_on_host(h.reshape(-1, h.shape[-1])):
        return h + ffn(norm(h))
    x, weights, idx = moe_route(norm, ffn, h)
    rows = []
    for n, chosen in enumerate(idx.tolist()):
        out = None  # summed as MoE.forward does: (0 + y0) + y1 ...
        for j, e in enumerate(chosen):
            y = moe_expert(ffn.q1[e], ffn.q3[e], ffn.q2[e], x[n : n + 1], weights[n : n + 1, j : j + 1])
            out = y if out is None else out + y
        rows.append(out)
    return h + (rows[0] if len(rows) == 1 else torch.cat(rows)).view(h.shape)


def attend_kv(norm: RMSNorm, attn: Attention, h: torch.Tensor, rope, k_all: torch.Tensor,
              v_all: torch.Tensor) -> torch.Tensor:
    """h + attention of one token, writing its key and value as the last position of k_all / v_all."""
    q, k, v = attn.project(norm(h), rope)
    k_all[:, :, -1:] = k
    v_all[:, :, -1:] = v
    return h + attn.merge(sdpa(q, k_all, v_all, None, causal=False))


# Inductor inlines a pointwise tensor into each consumer unless it has several users and more than
# `realize_reads_threshold` (4) loads; the rotated queries + keys (Attention.project) have 4. At 3 they become
# a buffer: SmolLM2's step at 700 positions 11.7 -> 11.0 ms (in-process A/B, p25).
ATTENTION_INDUCTOR = {"realize_reads_threshold": 3}


@graph(dynamic=None, inductor=ATTENTION_INDUCTOR)
def attn_kv_step(norm: RMSNorm, attn: Attention, h: torch.Tensor, rope, k_all: torch.Tensor,
                 v_all: torch.Tensor) -> torch.Tensor:
    return attend_kv(norm, attn, h, rope, k_all, v_all)


@graph(dynamic=None, inductor=ATTENTION_INDUCTOR)
def attn_kv_ffn_step(norm_in: RMSNorm, attn: Attention, h: torch.Tensor, rope, k_all: torch.Tensor,
                     v_all: torch.Tensor, norm_ff: RMSNorm, ffn: nn.Module) -> torch.Tensor:
    """attend_kv and then the feed-forward block, as one graph."""
    h = attend_kv(norm_in, attn, h, rope, k_all, v_all)
    return h + ffn(norm_ff(h))


def attention_block_step(h: torch.Tensor, rope, cache, norm_in: RMSNorm, attn: Attention, norm_ff: RMSNorm,
                         ffn: nn.Module) -> torch.Tensor:
    """One token through a pre-norm attention + feed-forward block, through compiled graphs.

    With a plain KVCache the whole block is one graph over the cache's keys and values (their length
    symbolic, so one graph serves every length), a MoE on native experts included; other MoE routing
    follows in its own graphs. A sliding-window ring (RollingKVCache) appends and attends eagerly between
    two graphs.
    """
    moe = not ffn_in_one_graph(ffn)  # a MoE whose routing leaves the graph
    if type(cache) is KVCache:  # exactly: a StaticKVCache updates at its device position (runtime/graphs.py)
        k_all, v_all = cache.append_one()
        torch._dynamo.maybe_mark_dynamic(k_all, 2)
        torch._dynamo.maybe_mark_dynamic(v_all, 2)
        if moe:
            return ffn_block_step(norm_ff, ffn, attn_kv_step(norm_in, attn, h, rope, k_all, v_all))
        return attn_kv_ffn_step(norm_in, attn, h, rope, k_all, v_all, norm_ff, ffn)
    q, k, v = attn_in(norm_in, attn, h, rope)
    k, v, mask = cache.update(k, v)
    out = sdpa(q, k, v, mask, causal=False)
    if moe:
        return ffn_block_step(norm_ff, ffn, attn_out(attn, h, out))
    return attn_out_ffn(attn, h, out, norm_ff, ffn)  # one graph for the output projection and the MLP


def kv_appends(kv: list) -> list | None:
    """For a decode step's Chain (runtime/compile.py): each KV cache's keys and values with one more position,
    or None (nothing appended) unless all are plain KV caches alike (size, dtype, device, layout, capacity,
    offset: views of one kind, as the Chain's attention links after the first take them unchecked) with room."""
    if not kv:
        return []

    def kind(c) -> tuple | None:
        return (c.shape, c.dtype, c.device, c.capacity, c.offset) if type(c) is KVCache else None

    like = kind(kv[0])
    if like is None or kv[0].offset + 2 > kv[0].capacity or any(kind(c) != like for c in kv):
        return None
    return [c.append_one() for c in kv]


def chainable(layers: nn.ModuleList) -> bool:
    """Whether a step may run these blocks as one Chain, skipping their module calls: no block has forward
    hooks (a --gpu-layers split moves each block's inputs to its device in one)."""
    from torch.nn.modules import module

    return not (module._global_forward_hooks or module._global_forward_pre_hooks) and not any(
        layer._forward_hooks or layer._forward_pre_hooks for layer in layers)


def chained_step(entry: tuple | None, h: torch.Tensor, cache: list, rope=None):
    """A compiled one-token step's layers through one Chain (runtime/compile.py), or MISS (the caches as they
    were). entry: (the Chain, each attention layer's modules as attn_kv_ffn_step takes them, the blocks), made
    by the model after a step through its blocks; its Bound links come from the SSM states, its open links are
    the attention layers, fed this step's key and value views (kv_appends) and RoPE tables."""
    if entry is None or entry[0] is None or not chainable(entry[2]):  # hooks added since it was made
        return MISS
    chain, mods, _ = entry
    ssm = [c for c in cache if isinstance(c, SSMState)]
    kv_caches = [c for c in cache if not isinstance(c, SSMState)]
    kv = kv_appends(kv_caches)
    if kv is None:
        return MISS
    out = MISS
    if len(kv) == len(mods):
        out = chain(h, tuple(t for c in ssm for t in (c.conv, c.ssm)),
                    [(n, a, None, rope, k, v, nf, f) for (n, a, nf, f), (k, v) in zip(mods, kv, strict=True)])
    if out is MISS:
        for c in kv_caches:  # undo the appends
            c.offset -= 1
        return MISS
    for c in ssm:
        c.offset += 1
    return out


def final_logits(norm: nn.Module, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """float32 logits of head(norm(h)), norm's output in its weight's dtype."""
    return head(norm(h).to(norm.weight.dtype)).float()


@graph
def norm_head_step(norm: nn.Module, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A one-token step's final norm and vocabulary head as one graph."""
    return final_logits(norm, head, h)


@graph
def embed_step(embed: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A one-token step's embedding lookup as one graph."""
    return embed(tokens)
