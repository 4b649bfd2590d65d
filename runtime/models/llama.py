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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from runtime import gguf_names
from runtime.cache import KVCache, RollingKVCache, cache_positions, cache_start
from runtime.compile import Chain
from runtime.layers import (
    Attention,
    MoE,
    RMSNorm,
    RoPE,
    SwiGLU,
    attention_block_step,
    attn_kv_ffn_step,
    embedding,
    ffn_in_one_graph,
    stack_experts,
)
from runtime.models.base import LanguageModel, require


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
        require(cfg, ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"])
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

    compiled_step = False  # runtime/compile.py: one-token steps through compiled graphs

    def ffn(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def forward(self, h: torch.Tensor, rope, cache) -> torch.Tensor:
        ffn = self.ffn()
        if self.compiled_step and cache is not None and h.shape[1] == 1:
            return attention_block_step(h, rope, cache, self.input_layernorm, self.self_attn,
                                        self.post_attention_layernorm, ffn)
        h = h + self.self_attn(self.input_layernorm(h), rope, cache)
        return h + ffn(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, a: Args):
        super().__init__()
        self.embed_tokens = embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class Model(LanguageModel):
    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
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
        start = cache_start(cache)
        if start is not None:  # one range of positions: rows of the RoPE table
            rope = self.rope.span(start, tokens.shape[1], h.dtype, h.device)
        else:
            pos = cache_positions(cache, tokens.shape[0], tokens.shape[1], h.device)  # (T,) or (B, T)
            rope = self.rope(pos, h.dtype)
        h = self.through_blocks(h, cache, lambda layer, h, c: layer(h, rope, c), rope)
        if last_only:
            h = h[:, -1:]
        return self.head_logits(self.model.norm, h)

    def make_chain(self, cache: list) -> tuple | None:
        """The blocks' direct calls as one Chain where every block took the one-graph attention step
        (compiled, a plain KV cache, its feed-forward inside the graph)."""
        if not all(layer.compiled_step and type(c) is KVCache and ffn_in_one_graph(layer.ffn())
                   for layer, c in zip(self.model.layers, cache, strict=True)):
            return None
        mods = [(layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm, layer.ffn())
                for layer in self.model.layers]
        return Chain.of([attn_kv_ffn_step.latest(m) for m in mods], ()), mods, self.model.layers

    def make_cache(self, batch: int = 1, max_len: int | None = None) -> list:
        a = self.args
        caches = []
        for layer in self.model.layers:
            w = layer.input_layernorm.weight  # the layer's compute dtype and device
            if a.sliding_window:
                caches.append(RollingKVCache(batch, a.num_key_value_heads, a.head_dim, a.sliding_window,
                                             self.kv_cache_dtype(w), w.device))
            else:
                caches.append(KVCache(batch, a.num_key_value_heads, a.head_dim, self.kv_cache_dtype(w), w.device,
                                      max_len))
        return caches

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], args: Args) -> dict[str, torch.Tensor]:
        """Checkpoint quirks: stack per-expert Mixtral weights; drop rotary buffers; tied heads."""
        out = {name: t for name, t in weights.items() if "rotary_emb.inv_freq" not in name}
        out = stack_experts(out, r"(model\.layers\.\d+\.block_sparse_moe)\.experts\.(\d+)\.(w[123])\.weight")
        if args.tie_word_embeddings and "model.embed_tokens.weight" in out:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out


# ---------------------------------------------------------------- GGUF (llama.cpp names and layouts)

GGUF_NAMES = gguf_names.table(
    "model.embed_tokens", "model.norm", "model.layers",
    gguf_names.block_norm("input_layernorm"), gguf_names.attention("self_attn"),
    gguf_names.ffn("post_attention_layernorm", "mlp"), gguf_names.moe("block_sparse_moe"))


def config_from_gguf(meta: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """An HF-style config from llama.cpp metadata (Mistral and Mixtral are `llama` in GGUF)."""

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"llama.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    experts = int(get("expert_count", 0) or 0)
    window = get("attention.sliding_window")
    cfg = {
        "model_type": "mixtral" if experts else ("mistral" if window else "llama"),
        "vocab_size": int(get("vocab_size", vocab_size) or vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(get("expert_feed_forward_length") or get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "sliding_window": int(window) if window else None,
        "num_local_experts": experts,
        "num_experts_per_tok": int(get("expert_used_count", 2) or 2),
    }
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise KeyError(f"llama.rope.scaling.type={scaling} (unsupported)")
    return cfg


def unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its RoPE pairs adjacent dims; HF's pairs the two halves)."""
    rows = t.shape[0]
    return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def gguf_row_transform(hf_name: str, args: Args):
    """A function applied to the rows of a tensor (and of its int4 scales/zeros), or None."""
    if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
        return lambda t: unpermute_rows(t, args.num_attention_heads)
    if hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
        return lambda t: unpermute_rows(t, args.num_key_value_heads)
    return None


def permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (the inverse of unpermute_rows), as its converter applies it."""
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def gguf_write_transform(hf_name: str, t: torch.Tensor, args: Args) -> torch.Tensor:
    """Our tensor -> llama.cpp's layout: q/k rows permuted for its RoPE."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_rows(t, args.num_attention_heads)
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_rows(t, args.num_key_value_heads)
    return t


def gguf_metadata(args: Args) -> dict[str, Any]:
    """The `llama.*` keys llama.cpp's converter writes, plus attention.sliding_window (which it forgets)."""
    meta: dict[str, Any] = {
        "llama.block_count": args.num_hidden_layers,
        "llama.context_length": args.max_position_embeddings,
        "llama.embedding_length": args.hidden_size,
        "llama.feed_forward_length": args.intermediate_size,
        "llama.attention.head_count": args.num_attention_heads,
        "llama.attention.head_count_kv": args.num_key_value_heads,
        "llama.rope.freq_base": args.rope_theta,
        "llama.attention.layer_norm_rms_epsilon": args.rms_norm_eps,
    }
    if args.num_local_experts:
        meta["llama.expert_count"] = args.num_local_experts
        meta["llama.expert_used_count"] = args.num_experts_per_tok
    meta["llama.vocab_size"] = args.vocab_size
    meta["llama.rope.dimension_count"] = args.head_dim
    if args.head_dim != args.hidden_size // args.num_attention_heads:
        meta["llama.attention.key_length"] = meta["llama.attention.value_length"] = args.head_dim
    if args.sliding_window:
        meta["llama.attention.sliding_window"] = args.sliding_window
    if args.rope_scaling:
        kind = args.rope_scaling.get("rope_type", args.rope_scaling.get("type"))
        if kind != "linear":
            raise ValueError(f"rope_scaling {kind!r} has no GGUF form mamba-cli writes (linear only)")
        meta["llama.rope.scaling.type"] = "linear"
        meta["llama.rope.scaling.factor"] = float(args.rope_scaling["factor"])
    return meta
