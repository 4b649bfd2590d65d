"""Jamba: attention + Mamba hybrid with MoE feed-forwards (AI21). Reuses ssm.MambaMixer and layers.MoE.

Layer i mixes with attention when i % attn_layer_period == attn_layer_offset (no RoPE: position comes
from the Mamba layers), otherwise with a Mamba-1 mixer whose dt, B and C pass through RMSNorms; its
feed-forward is a top-k MoE when i % expert_layer_period == expert_layer_offset, a dense SwiGLU otherwise.

Module tree (names as in the HF checkpoints; per-expert and fused expert tensors stacked by sanitize):

    Model
      model.embed_tokens            (V, E)
      model.layers[i]               Block
        input_layernorm             RMSNorm
        self_attn | mamba           Attention (GQA, no RoPE) | MambaMixer (bcdt_norm="weighted")
        pre_ff_layernorm            RMSNorm
        feed_forward                SwiGLU | MoE (router `gate` (X, E); w1/w3 (X, I, E); w2 (X, E, I))
      model.final_layernorm         RMSNorm
      lm_head                       (V, E)

Legend: B batch, T tokens, E hidden, I intermediate, X experts, V vocab.
Cache: a list with a KVCache for each attention layer and an SSMState for each Mamba layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from runtime import gguf_names
from runtime.cache import KVCache
from runtime.compile import Chain
from runtime.layers import (
    Attention,
    MoE,
    RMSNorm,
    SwiGLU,
    attention_block_step,
    attn_kv_ffn_step,
    embedding,
    ffn_block_step,
    ffn_in_one_graph,
    stack_experts,
)
from runtime.models.base import LanguageModel, require
from runtime.ssm import MambaMixer, bound_step, ssm_block_step, ssm_ffn_block_step


@dataclass
class Args:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    num_experts: int = 16
    num_experts_per_tok: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    max_position_embeddings: int = 262144

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Args:
        require(cfg, ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"],
                silu=True)
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rank = cfg.get("mamba_dt_rank", "auto")
        a = cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attn_layer_period=int(cfg.get("attn_layer_period", 8)),
            attn_layer_offset=int(cfg.get("attn_layer_offset", 4)),
            expert_layer_period=int(cfg.get("expert_layer_period", 2)),
            expert_layer_offset=int(cfg.get("expert_layer_offset", 1)),
            num_experts=int(cfg.get("num_experts", cfg.get("num_local_experts", 16))),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
            mamba_d_state=int(cfg.get("mamba_d_state", 16)),
            mamba_d_conv=int(cfg.get("mamba_d_conv", 4)),
            mamba_expand=int(cfg.get("mamba_expand", 2)),
            mamba_dt_rank=math.ceil(hidden / 16) if rank in (None, "auto") else int(rank),
            mamba_conv_bias=bool(cfg.get("mamba_conv_bias", True)),
            mamba_proj_bias=bool(cfg.get("mamba_proj_bias", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 262144),
        )
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        return a

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    def is_attention(self, i: int) -> bool:
        return i % self.attn_layer_period == self.attn_layer_offset

    def is_moe(self, i: int) -> bool:
        return self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset


class Block(nn.Module):
    def __init__(self, a: Args, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        if a.is_attention(i):
            self.self_attn = Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads,
                                       a.head_dim)
        else:
            self.mamba = MambaMixer(a.hidden_size, a.mamba_expand * a.hidden_size, a.mamba_d_state,
                                    a.mamba_dt_rank, a.mamba_d_conv, a.mamba_proj_bias, a.mamba_conv_bias,
                                    bcdt_norm="weighted", norm_eps=a.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        if a.is_moe(i):
            self.feed_forward = MoE(a.hidden_size, a.intermediate_size, a.num_experts, a.num_experts_per_tok,
                                    renormalize=False)
        else:
            self.feed_forward = SwiGLU(a.hidden_size, a.intermediate_size)

    compiled_step = False  # runtime/compile.py: one-token steps through compiled graphs

    def forward(self, h: torch.Tensor, cache) -> torch.Tensor:
        if self.compiled_step and cache is not None and h.shape[1] == 1:
            return self._step(h, cache)
        x = self.input_layernorm(h)
        if hasattr(self, "self_attn"):
            h = h + self.self_attn(x, None, cache)
        else:
            h = h + self.mamba(x, cache)
        return h + self.feed_forward(self.pre_ff_layernorm(h))

    def _step(self, h: torch.Tensor, cache) -> torch.Tensor:
        if hasattr(self, "self_attn"):
            return attention_block_step(h, None, cache, self.input_layernorm, self.self_attn, self.pre_ff_layernorm,
                                        self.feed_forward)
        cache.offset += 1
        ffn = self.feed_forward
        if ffn_in_one_graph(ffn):  # the block as one graph
            return bound_step(ssm_ffn_block_step, cache, (self.input_layernorm, self.mamba, h, cache.conv, cache.ssm,
                                                          self.pre_ff_layernorm, ffn))
        h = bound_step(ssm_block_step, cache, (self.input_layernorm, self.mamba, h, cache.conv, cache.ssm))
        return ffn_block_step(self.pre_ff_layernorm, ffn, h)


class Backbone(nn.Module):
    def __init__(self, a: Args):
        super().__init__()
        self.embed_tokens = embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_hidden_layers))
        self.final_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class Model(LanguageModel):
    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def input_embedding(self) -> nn.Module:
        return self.model.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def forward(self, tokens: torch.Tensor, cache: list | None = None, last_only: bool = False) -> torch.Tensor:
        # tokens : (B, T)  ->  logits : (B, T, V) float32
        h = self.embed(tokens)
        h = self.through_blocks(h, cache, lambda layer, h, c: layer(h, c))
        if last_only:
            h = h[:, -1:]
        return self.head_logits(self.model.final_layernorm, h)

    def make_chain(self, cache: list) -> tuple | None:
        """The blocks' compiled calls as one Chain where every block ran as one graph: a Mamba block's call
        bound to its state, an attention block's direct call on a plain KV cache."""
        links, same, mods = [], [], []
        for layer, c in zip(self.model.layers, cache, strict=True):
            ffn = layer.feed_forward
            if not (layer.compiled_step and ffn_in_one_graph(ffn)):
                return None
            if hasattr(layer, "self_attn"):
                if type(c) is not KVCache:
                    return None
                mods.append((layer.input_layernorm, layer.self_attn, layer.pre_ff_layernorm, ffn))
                links.append(attn_kv_ffn_step.latest(mods[-1]))
            else:
                links.append(c.bound)
                same += [layer.input_layernorm, layer.mamba, c.conv, c.ssm, layer.pre_ff_layernorm, ffn]
        return Chain.of(links, tuple(same)), mods, self.model.layers

    def make_cache(self, batch: int = 1, max_len: int | None = None) -> list:
        a, caches = self.args, []
        for layer in self.model.layers:
            if hasattr(layer, "self_attn"):
                w = layer.input_layernorm.weight  # the layer's compute dtype and device
                caches.append(KVCache(batch, a.num_key_value_heads, a.head_dim, self.kv_cache_dtype(w), w.device,
                                      max_len))
            else:
                caches.append(layer.mamba.make_state(batch))
        return caches

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], args: Args) -> dict[str, torch.Tensor]:
        """Router `router` -> `gate`; per-expert (or fused gate_up) expert weights -> stacked w1/w3/w2."""
        weights = stack_experts(weights, r"(model\.layers\.\d+\.feed_forward)\.experts\.(\d+)\."
                                r"(gate_proj|up_proj|down_proj)\.weight",
                                {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})
        out: dict[str, torch.Tensor] = {}
        for name, t in weights.items():
            if name.endswith(".feed_forward.router.weight"):
                out[name.replace(".router.", ".gate.")] = t
            elif name.endswith(".feed_forward.experts.gate_up_proj"):  # fused (X, 2I, E), gate first
                prefix = name[: -len(".experts.gate_up_proj")]
                out[f"{prefix}.w1"], out[f"{prefix}.w3"] = (p.contiguous() for p in t.chunk(2, dim=1))
            elif name.endswith(".feed_forward.experts.down_proj"):
                out[name.replace(".experts.down_proj", ".w2")] = t
            else:
                out[name] = t
        if args.tie_word_embeddings:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out


# ---------------------------------------------------------------- GGUF (llama.cpp names and layouts)
# llama.cpp arch `jamba`: attention layers are those with a non-zero attention.head_count_kv entry,
# MoE layers those with an ffn_gate_inp tensor; no RoPE, so q/k rows are not permuted. Mamba
# tensors as in mamba.py (ssm_a = -exp(A_log), conv (D, K)); experts stacked (X, out, in).

GGUF_NAMES = gguf_names.table(
    "model.embed_tokens", "model.final_layernorm", "model.layers",
    gguf_names.block_norm("input_layernorm"), gguf_names.attention("self_attn", bias=False),
    gguf_names.ssm("mamba", 1, bcdt_norms=True), gguf_names.ffn("pre_ff_layernorm", "feed_forward"),
    gguf_names.moe("feed_forward"))


def fit_period(flags: list[bool]) -> tuple[int, int]:
    """The (period, offset) with flags[i] == (i % period == offset) for every layer i."""
    n = len(flags)
    if not any(flags):
        return n + 1, n  # matches no layer
    for period in range(1, n + 1):
        for offset in range(period):
            if all(f == (i % period == offset) for i, f in enumerate(flags)):
                return period, offset
    raise ValueError(f"layer pattern {[int(f) for f in flags]} is not periodic")


# The Mamba layers' tensors are stored as Mamba-1's: A as -exp(A_log), the conv as (D, K).
gguf_tensor_transform = gguf_names.ssm_tensor_transform
gguf_write_transform = gguf_names.ssm_write_transform


def config_from_gguf(meta: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """An HF-style Jamba config from llama.cpp `jamba` metadata (MoE layers: config_from_gguf_tensors)."""

    get = gguf_names.metadata(meta, "jamba")

    layers, hidden = int(get("block_count")), int(get("embedding_length"))
    kv = get("attention.head_count_kv")
    kv = [int(x) for x in kv] if isinstance(kv, list) else [int(kv)] * layers
    if len(kv) != layers:
        raise ValueError(f"jamba.attention.head_count_kv has {len(kv)} entries for {layers} layers")
    period, offset = fit_period([k > 0 for k in kv])
    return {
        "model_type": "jamba",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": int(get("attention.head_count")),
        "num_key_value_heads": max(kv) or int(get("attention.head_count")),
        "attn_layer_period": period,
        "attn_layer_offset": offset,
        "num_experts": int(get("expert_count", 1) or 1),
        "num_experts_per_tok": int(get("expert_used_count", 1) or 1),
        "mamba_d_state": int(get("ssm.state_size")),
        "mamba_d_conv": int(get("ssm.conv_kernel")),
        "mamba_expand": int(get("ssm.inner_size")) // hidden,
        "mamba_dt_rank": int(get("ssm.time_step_rank")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(get("context_length", 262144)),
    }


def config_from_gguf_tensors(names: set[str]) -> dict[str, Any]:
    """MoE layers (those with a router) and the optional Mamba biases, from the tensor list."""
    layers = 1 + max(int(n.split(".")[1]) for n in names if n.startswith("blk."))
    period, offset = fit_period([f"blk.{i}.ffn_gate_inp.weight" in names for i in range(layers)])
    mamba = [n.split(".")[1] for n in names if n.endswith(".ssm_in.weight")]
    biases = gguf_names.ssm_bias_config(names, mamba[0] if mamba else "0", ("mamba_proj_bias", "mamba_conv_bias"))
    return {"expert_layer_period": period, "expert_layer_offset": offset, **biases}


def gguf_metadata(args: Args) -> dict[str, Any]:
    """The `jamba.*` keys llama.cpp's converter writes; head_count_kv is 0 on the Mamba layers."""
    n = args.num_hidden_layers
    return {
        "jamba.block_count": n,
        "jamba.context_length": args.max_position_embeddings,
        "jamba.embedding_length": args.hidden_size,
        "jamba.feed_forward_length": args.intermediate_size,
        "jamba.attention.head_count": args.num_attention_heads,
        "jamba.attention.head_count_kv": [args.num_key_value_heads if args.is_attention(i) else 0
                                          for i in range(n)],
        "jamba.ssm.conv_kernel": args.mamba_d_conv,
        "jamba.ssm.inner_size": args.mamba_expand * args.hidden_size,
        "jamba.ssm.state_size": args.mamba_d_state,
        "jamba.ssm.time_step_rank": args.mamba_dt_rank,
        "jamba.attention.layer_norm_rms_epsilon": args.rms_norm_eps,
        "jamba.expert_count": args.num_experts,
        "jamba.expert_used_count": args.num_experts_per_tok,
    }
