"""Llama-style decoders: Llama, Mistral (sliding-window attention) and Mixtral (top-k MoE).

Module tree (names as in the HF checkpoints):

    Model
      model.embed_tokens            (V, E)
      model.layers[i]               Block
        input_layernorm             RMSNorm
        self_attn                   Attention (GQA, RoPE, optional sliding window)
        post_attention_layernorm    RMSNorm
        mlp | block_sparse_moe      SwiGLU | MoE (experts stacked)
      model.norm                    RMSNorm
      lm_head                       (V, E), tied to embed_tokens when tie_word_embeddings

Legend: B batch, T tokens, E hidden, V vocab.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from runtime.cache import KVCache, RollingKVCache, cache_offset
from runtime.layers import Attention, MoE, RMSNorm, RoPE, SwiGLU


def rope_theta(cfg: dict[str, Any], default: float = 10000.0) -> float:
    """rope_theta from a config, old (top-level) or transformers-5 (rope_parameters) style."""
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or default)


def rope_scaling(cfg: dict[str, Any]) -> dict | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return scaling


@dataclass
class Args:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_bias: bool = False
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 4096
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Args:
        need = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in need if cfg.get(k) is None]
        if missing:
            raise KeyError(", ".join(missing))
        heads = int(cfg["num_attention_heads"])
        window = cfg.get("sliding_window") if cfg.get("model_type") in ("mistral", "mixtral") else None
        if cfg.get("use_sliding_window") is False:
            window = None
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta(cfg),
            rope_scaling=rope_scaling(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
            attention_bias=bool(cfg.get("attention_bias", False)),
            num_local_experts=int(cfg.get("num_local_experts") or 0),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 2),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        )

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings


class Block(nn.Module):
    def __init__(self, a: Args):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                   a.sliding_window, a.attention_bias)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        if a.num_local_experts:
            self.block_sparse_moe = MoE(a.hidden_size, a.intermediate_size, a.num_local_experts,
                                        a.num_experts_per_tok, renormalize=True)
        else:
            self.mlp = SwiGLU(a.hidden_size, a.intermediate_size)

    def forward(self, h: torch.Tensor, rope, cache) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, cache)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return h + ffn(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, a: Args):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def forward(self, tokens: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        # tokens : (B, T)  ->  logits : (B, T, V) float32
        h = self.model.embed_tokens(tokens)
        start = cache_offset(cache) if cache is not None else 0
        pos = torch.arange(start, start + tokens.shape[1], device=h.device)
        rope = self.rope(pos, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, rope, cache[i] if cache is not None else None)
        h = self.model.norm(h)
        return self.lm_head(h).float()

    def make_cache(self, batch: int = 1, max_len: int | None = None) -> list:
        a = self.args
        caches = []
        for layer in self.model.layers:
            w = layer.self_attn.q_proj.weight
            if a.sliding_window:
                caches.append(RollingKVCache(batch, a.num_key_value_heads, a.head_dim, a.sliding_window,
                                             w.dtype if w.is_floating_point() else torch.float32, w.device))
            else:
                caches.append(KVCache(batch, a.num_key_value_heads, a.head_dim,
                                      w.dtype if w.is_floating_point() else torch.float32, w.device, max_len))
        return caches

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], args: Args) -> dict[str, torch.Tensor]:
        """Checkpoint quirks: stack per-expert Mixtral weights; drop rotary buffers; tied heads."""
        out: dict[str, torch.Tensor] = {}
        experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
        pat = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
        for name, t in weights.items():
            if "rotary_emb.inv_freq" in name:
                continue
            m = pat.fullmatch(name)
            if m:
                experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = t
                continue
            out[name] = t
        for (layer, w), per in experts.items():
            out[f"model.layers.{layer}.block_sparse_moe.{w}"] = torch.stack([per[e] for e in sorted(per)])
        if args.tie_word_embeddings:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out
