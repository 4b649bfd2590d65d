"""Mamba-1 and Falcon-Mamba: a stack of selective-SSM mixers, no attention. Jamba reuses MambaMixer.

Module tree (names as in the HF checkpoints):

    Model
      backbone.embeddings           (V, E)
      backbone.layers[i]            Block
        norm                        RMSNorm
        mixer                       MambaMixer
          in_proj                   (2D, E)      -> x, z (gate)
          conv1d                    (D, 1, K)    depthwise causal conv (+ bias)
          x_proj                    (R + 2N, D)  -> dt (low rank), B, C
          dt_proj                   (D, R) + (D,)
          A_log, D                  (D, N), (D,)
          out_proj                  (E, D)
          [dt|b|c]_layernorm        Jamba only: RMSNorms on dt, B, C (Falcon-Mamba: the same, weightless)
      backbone.norm_f               RMSNorm
      lm_head                       (V, E), tied to the embeddings when tie_word_embeddings

Legend: B batch, T tokens, E hidden, D inner (expand * E), N state size, R dt rank, K conv kernel, V vocab.
Cache: one SSMState per layer, conv (B, D, K-1) and ssm (B, D, N), float32 whatever the weights' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runtime import ssm
from runtime.cache import SSMState
from runtime.compile import graph
from runtime.layers import RMSNorm, embedding, input_dtype


@dataclass
class Args:
    vocab_size: int
    hidden_size: int
    state_size: int
    num_hidden_layers: int
    intermediate_size: int
    time_step_rank: int
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = True
    bcdt_norm: str | None = None  # None | "weightless" (Falcon-Mamba)
    mixer_rms_eps: float = 1e-6

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Args:
        need = ["vocab_size", "hidden_size", "state_size", "num_hidden_layers"]
        missing = [k for k in need if cfg.get(k) is None]
        if missing:
            raise KeyError(", ".join(missing))
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} (only silu is supported)")
        hidden = int(cfg["hidden_size"])
        rank = cfg.get("time_step_rank", "auto")
        falcon = cfg.get("model_type") == "falcon_mamba"
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            state_size=int(cfg["state_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            intermediate_size=int(cfg.get("intermediate_size") or int(cfg.get("expand", 2) * hidden)),
            time_step_rank=math.ceil(hidden / 16) if rank in (None, "auto") else int(rank),
            conv_kernel=int(cfg.get("conv_kernel", 4)),
            use_bias=bool(cfg.get("use_bias", False)),
            use_conv_bias=bool(cfg.get("use_conv_bias", True)),
            layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
            residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            bcdt_norm="weightless" if falcon else None,
            mixer_rms_eps=float(cfg.get("mixer_rms_eps", 1e-6)),
        )

    @property
    def context_length(self) -> int | None:
        return None  # a recurrent state has no length limit


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMSNorm over the last dim, computed in float32 (Falcon-Mamba's B/C/dt norms)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class MambaMixer(nn.Module):
    """Selective SSM mixer. bcdt_norm: None (Mamba), "weightless" (Falcon-Mamba), "weighted" (Jamba)."""

    def __init__(self, hidden: int, inner: int, state: int, rank: int, kernel: int, bias: bool,
                 conv_bias: bool, bcdt_norm: str | None = None, norm_eps: float = 1e-6):
        super().__init__()
        self.inner, self.state, self.rank, self.kernel = inner, state, rank, kernel
        self.bcdt_norm, self.norm_eps = bcdt_norm, norm_eps
        self.in_proj = nn.Linear(hidden, 2 * inner, bias=bias)
        self.conv1d = nn.Conv1d(inner, inner, kernel, groups=inner, padding=kernel - 1, bias=conv_bias)
        self.x_proj = nn.Linear(inner, rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, state))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, hidden, bias=bias)
        if bcdt_norm == "weighted":
            self.dt_layernorm = RMSNorm(rank, norm_eps)
            self.b_layernorm = RMSNorm(state, norm_eps)
            self.c_layernorm = RMSNorm(state, norm_eps)

    def make_state(self, batch: int) -> SSMState:
        dev = self.A_log.device
        return SSMState(torch.zeros(batch, self.inner, self.kernel - 1, device=dev),
                        torch.zeros(batch, self.inner, self.state, device=dev))

    def _dt_b_c(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x : (..., D) float32  ->  dt : (..., D), B, C : (..., N), float32
        proj = self.x_proj(x.to(input_dtype(self.x_proj)))  # (..., R + 2N)
        dt, B, C = proj.split([self.rank, self.state, self.state], dim=-1)
        if self.bcdt_norm == "weighted":
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        elif self.bcdt_norm == "weightless":
            dt, B, C = rms(dt, self.norm_eps), rms(B, self.norm_eps), rms(C, self.norm_eps)
        dt = F.softplus(self.dt_proj(dt.to(input_dtype(self.dt_proj))).float())
        return dt, B.float(), C.float()

    def _conv_a(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        conv_w = self.conv1d.weight[:, 0].float()  # (D, K)
        conv_b = self.conv1d.bias.float() if self.conv1d.bias is not None else None
        return conv_w, conv_b, -torch.exp(self.A_log.float())  # A : (D, N)

    def forward(self, h: torch.Tensor, cache: SSMState | None = None) -> torch.Tensor:
        # h : (B, T, E)  ->  (B, T, E)
        t = h.shape[1]
        if cache is not None and t == 1:
            cache.offset += 1
            return self.step(h[:, 0], cache.conv, cache.ssm).unsqueeze(1)
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (B, T, D) each
        conv_w, conv_b, A = self._conv_a()
        conv_state, ssm_state = (cache.conv, cache.ssm) if cache is not None else (None, None)
        x = F.silu(ssm.causal_conv1d(x.float(), conv_w, conv_b, conv_state))  # (B, T, D) float32
        dt, B, C = self._dt_b_c(x)
        y, _ = ssm.selective_scan(x, dt, A, B, C, self.D.float(), ssm_state)
        if cache is not None:
            cache.offset += t
        return self.out_proj((y * F.silu(z.float())).to(input_dtype(self.out_proj)))

    def step(self, h: torch.Tensor, conv: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One token: h (B, E) -> (B, E); conv (B, D, K-1) and state (B, D, N) updated in place."""
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (B, D) each
        conv_w, conv_b, A = self._conv_a()
        x = F.silu(ssm.conv1d_step(x.float(), conv_w, conv_b, conv))
        dt, B, C = self._dt_b_c(x)
        y = ssm.selective_step(x, dt, A, B, C, self.D.float(), state)
        return self.out_proj((y * F.silu(z.float())).to(input_dtype(self.out_proj)))


@graph
def ssm_block_step(norm: RMSNorm, mixer: nn.Module, h: torch.Tensor, conv: torch.Tensor,
                   state: torch.Tensor) -> torch.Tensor:
    """One token through a pre-norm SSM block (Mamba-1, Mamba-2, Jamba's Mamba layers): h (B, 1, E)."""
    return h + mixer.step(norm(h.to(norm.weight.dtype))[:, 0], conv, state).unsqueeze(1)


class Block(nn.Module):
    def __init__(self, a, mixer: nn.Module):
        super().__init__()
        self.norm = RMSNorm(a.hidden_size, a.layer_norm_epsilon)
        self.mixer = mixer

    compiled_step = False  # runtime/compile.py: one-token steps through a compiled graph

    def forward(self, h: torch.Tensor, cache: SSMState | None) -> torch.Tensor:
        if self.compiled_step and cache is not None and h.shape[1] == 1:
            cache.offset += 1
            return ssm_block_step(self.norm, self.mixer, h, cache.conv, cache.ssm)
        return h + self.mixer(self.norm(h.to(self.norm.weight.dtype)), cache)


class Backbone(nn.Module):
    def __init__(self, a, make_mixer):
        super().__init__()
        self.embeddings = embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, make_mixer(a)) for _ in range(a.num_hidden_layers))
        self.norm_f = RMSNorm(a.hidden_size, a.layer_norm_epsilon)


class Model(nn.Module):
    """The pure-SSM language model; Mamba-2 (models/mamba2.py) reuses it with its own mixer."""

    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        self.backbone = Backbone(args, self.make_mixer)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @staticmethod
    def make_mixer(a: Args) -> nn.Module:
        return MambaMixer(a.hidden_size, a.intermediate_size, a.state_size, a.time_step_rank, a.conv_kernel,
                          a.use_bias, a.use_conv_bias, a.bcdt_norm, a.mixer_rms_eps)

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    def forward(self, tokens: torch.Tensor, cache: list | None = None, last_only: bool = False) -> torch.Tensor:
        # tokens : (B, T)  ->  logits : (B, T, V) float32
        h = self.backbone.embeddings(tokens)
        if self.args.residual_in_fp32:
            h = h.float()
        for i, layer in enumerate(self.backbone.layers):
            h = layer(h, cache[i] if cache is not None else None)
        if last_only:
            h = h[:, -1:]
        h = self.backbone.norm_f(h)
        return self.lm_head(h.to(self.backbone.norm_f.weight.dtype)).float()

    def make_cache(self, batch: int = 1, max_len: int | None = None) -> list:
        return [layer.mixer.make_state(batch) for layer in self.backbone.layers]

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], args: Args) -> dict[str, torch.Tensor]:
        """Quirks: mamba_ssm's `backbone.embedding`; Falcon-Mamba's dummy norm weights; the tied head."""
        out: dict[str, torch.Tensor] = {}
        for name, t in weights.items():
            if name.startswith("backbone.embedding."):
                name = name.replace("backbone.embedding.", "backbone.embeddings.", 1)
            if args.bcdt_norm == "weightless" and name.endswith("_layernorm.weight"):
                continue
            out[name] = t
        if args.tie_word_embeddings and "backbone.embeddings.weight" in out:
            out["lm_head.weight"] = out["backbone.embeddings.weight"]
        return out


# ---------------------------------------------------------------- GGUF (llama.cpp names and layouts)
# llama.cpp arch `mamba` serves Mamba-1 and Falcon-Mamba (ssm.dt_b_c_rms = true). It stores
# ssm_a = -exp(A_log) and the depthwise conv as (D, K); Falcon-Mamba's dt/B/C norms have no weights.

GGUF_NAMES = {
    "token_embd.weight": "backbone.embeddings.weight",
    "output_norm.weight": "backbone.norm_f.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "backbone.layers.{i}.norm.weight",
    "blk.{i}.ssm_in.weight": "backbone.layers.{i}.mixer.in_proj.weight",
    "blk.{i}.ssm_in.bias": "backbone.layers.{i}.mixer.in_proj.bias",
    "blk.{i}.ssm_conv1d.weight": "backbone.layers.{i}.mixer.conv1d.weight",
    "blk.{i}.ssm_conv1d.bias": "backbone.layers.{i}.mixer.conv1d.bias",
    "blk.{i}.ssm_x.weight": "backbone.layers.{i}.mixer.x_proj.weight",
    "blk.{i}.ssm_dt.weight": "backbone.layers.{i}.mixer.dt_proj.weight",
    "blk.{i}.ssm_dt.bias": "backbone.layers.{i}.mixer.dt_proj.bias",
    "blk.{i}.ssm_a": "backbone.layers.{i}.mixer.A_log",
    "blk.{i}.ssm_d": "backbone.layers.{i}.mixer.D",
    "blk.{i}.ssm_out.weight": "backbone.layers.{i}.mixer.out_proj.weight",
    "blk.{i}.ssm_out.bias": "backbone.layers.{i}.mixer.out_proj.bias",
}


def config_from_gguf(meta: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """An HF-style config from llama.cpp `mamba` metadata (Falcon-Mamba when ssm.dt_b_c_rms)."""

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"mamba.{key}", default)
        if v is None:
            raise KeyError(f"mamba.{key}")
        return v

    hidden = int(get("embedding_length"))
    return {
        "model_type": "falcon_mamba" if get("ssm.dt_b_c_rms", False) else "mamba",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(get("ssm.inner_size")),
        "state_size": int(get("ssm.state_size")),
        "num_hidden_layers": int(get("block_count")),
        "time_step_rank": int(get("ssm.time_step_rank")),
        "conv_kernel": int(get("ssm.conv_kernel")),
        "layer_norm_epsilon": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
    }


def config_from_gguf_tensors(names: set[str]) -> dict[str, Any]:
    """Config fields only the tensor list tells: the optional biases."""
    return {"use_bias": "blk.0.ssm_in.bias" in names, "use_conv_bias": "blk.0.ssm_conv1d.bias" in names}


def gguf_tensor_transform(hf_name: str, t: torch.Tensor, args: Args) -> torch.Tensor:
    """A GGUF tensor -> our layout: A = -exp(A_log) back to A_log; conv (D, K) -> (D, 1, K)."""
    if hf_name.endswith(".A_log"):
        return torch.log(-t)
    if hf_name.endswith("conv1d.weight"):
        return t.unsqueeze(1)
    return t


def gguf_write_transform(hf_name: str, t: torch.Tensor, args: Args) -> torch.Tensor:
    """Our tensor -> llama.cpp's layout (the inverse of gguf_tensor_transform)."""
    if hf_name.endswith(".A_log"):
        return -torch.exp(t.float())
    if hf_name.endswith("conv1d.weight"):
        return t[:, 0]
    return t


def gguf_metadata(args: Args) -> dict[str, Any]:
    """The `mamba.*` keys llama.cpp's converter writes (context length: its arbitrary 2**20)."""
    return {
        "mamba.context_length": 2**20,
        "mamba.embedding_length": args.hidden_size,
        "mamba.feed_forward_length": 0,
        "mamba.attention.head_count": 0,
        "mamba.block_count": args.num_hidden_layers,
        "mamba.ssm.conv_kernel": args.conv_kernel,
        "mamba.ssm.inner_size": args.intermediate_size,
        "mamba.ssm.state_size": args.state_size,
        "mamba.ssm.time_step_rank": args.time_step_rank,
        "mamba.attention.layer_norm_rms_epsilon": args.layer_norm_epsilon,
        "mamba.ssm.dt_b_c_rms": args.bcdt_norm == "weightless",
    }
