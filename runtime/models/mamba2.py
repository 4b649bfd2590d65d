"""Mamba-2 (and Codestral Mamba): multi-head SSD mixers, B/C shared per group, gated grouped RMSNorm.

Module tree (names as in the HF checkpoints; mistral-inference's are mapped in Model.sanitize):

    Model
      backbone.embeddings           (V, E)
      backbone.layers[i]            SSMBlock
        norm                        RMSNorm
        mixer                       Mamba2Mixer
          in_proj                   (D + C + H, E)  -> z (gate, D), xBC (C = D + 2GN), dt (H)
          conv1d                    (C, 1, K)       depthwise causal conv over x, B and C (+ bias)
          dt_bias, A_log, D         (H,) each
          norm                      (D,)            RMSNorm of y * silu(z), per group of D/G channels
          out_proj                  (E, D)
      backbone.norm_f               RMSNorm
      lm_head                       (V, E), tied to the embeddings when tie_word_embeddings

Legend: B batch, T tokens, E hidden, D inner (H * P), H heads, P head dim, G groups, N state size,
C conv channels, K conv kernel, V vocab.
Cache: one SSMState per layer, conv (B, C, K-1) and ssm (B, H, P, N), float32.

Codestral Mamba ships in mistral-inference's layout (params.json + consolidated.safetensors);
config_from_params turns its params.json into the HF-style config this file reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runtime import gguf_names
from runtime.cache import SSMState
from runtime.errors import ModelFormatError
from runtime.layers import input_dtype, rms_normalize
from runtime.models.base import require
from runtime.ssm import MAMBA2_CHUNK, SSMModel, causal_conv1d, conv1d_step, ssd_scan, ssd_step


def config_from_params(params: dict[str, Any]) -> dict[str, Any]:
    """mistral-inference params.json (MambaArgs) -> HF Mamba2 config, filled with mamba_ssm's defaults."""
    if params.get("model_type", "mamba") != "mamba":
        raise ModelFormatError(f"params.json: model_type {params.get('model_type')!r} is not supported "
                               "in the mistral-inference layout (only Codestral Mamba, model_type 'mamba')")
    missing = [k for k in ("dim", "n_layers", "vocab_size") if k not in params]
    if missing:
        raise ModelFormatError(f"params.json: missing field {missing[0]}")
    if params.get("rms_norm", True) is not True:
        raise ModelFormatError("params.json: rms_norm false (LayerNorm Mamba) is not supported")
    dim, head_dim, expand = int(params["dim"]), 64, 2
    vocab, multiple = int(params["vocab_size"]), int(params.get("pad_vocab_size_multiple", 1) or 1)
    return {
        "model_type": "mamba2",
        "architectures": ["Mamba2ForCausalLM"],
        "hidden_size": dim,
        "num_hidden_layers": int(params["n_layers"]),
        "vocab_size": math.ceil(vocab / multiple) * multiple,
        "n_groups": int(params.get("n_groups", 1)),
        "expand": expand,
        "head_dim": head_dim,
        "num_heads": dim * expand // head_dim,
        "state_size": 128,
        "conv_kernel": 4,
        "chunk_size": 256,
        "use_bias": False,
        "use_conv_bias": True,
        "layer_norm_epsilon": 1e-5,
        "residual_in_fp32": bool(params.get("residual_in_fp32", True)),
        "tie_word_embeddings": bool(params.get("tie_embeddings", False)),
        "time_step_limit": [0.0, float("inf")],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def _float(v: Any) -> float:
    """A config float; transformers 5 writes infinities as {"__float__": "Infinity"}."""
    return float(v["__float__"]) if isinstance(v, dict) else float(v)


@dataclass
class Args:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_heads: int
    head_dim: int
    state_size: int = 128
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 256
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = False
    time_step_limit: tuple[float, float] = (0.0, math.inf)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Args:
        require(cfg, ["vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim"], silu=True)
        a = cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_heads"]),
            head_dim=int(cfg["head_dim"]),
            state_size=int(cfg.get("state_size", 128)),
            n_groups=int(cfg.get("n_groups", 1)),
            conv_kernel=int(cfg.get("conv_kernel", 4)),
            chunk_size=int(cfg.get("chunk_size", 256)),
            use_bias=bool(cfg.get("use_bias", False)),
            use_conv_bias=bool(cfg.get("use_conv_bias", True)),
            layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
            residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            time_step_limit=tuple(_float(v) for v in cfg.get("time_step_limit") or (0.0, math.inf)),
        )
        if a.num_heads % a.n_groups:
            raise ValueError(f"num_heads {a.num_heads} is not a multiple of n_groups {a.n_groups}")
        return a

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def context_length(self) -> int | None:
        return None  # a recurrent state has no length limit


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z), normalized per group of `group` channels (norm_before_gate=False)."""

    def __init__(self, dim: int, group: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group, self.eps = group, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # y, z : (B, T, D)
        x = y.float() * F.silu(z.float())
        return self.weight * rms_normalize(x.view(*x.shape[:-1], -1, self.group), self.eps, y.dtype).view(x.shape)


class Mamba2Mixer(nn.Module):
    def __init__(self, a: Args):
        super().__init__()
        self.heads, self.head_dim, self.groups, self.state = a.num_heads, a.head_dim, a.n_groups, a.state_size
        self.inner, self.kernel = a.inner, a.conv_kernel
        self.chunk = min(a.chunk_size, MAMBA2_CHUNK)  # any chunk gives the same result; small is fast
        self.conv_dim = a.inner + 2 * a.n_groups * a.state_size
        lo, hi = a.time_step_limit
        self.dt_limit = None if (lo, hi) == (0.0, math.inf) else (lo, hi)
        self.in_proj = nn.Linear(a.hidden_size, a.inner + self.conv_dim + a.num_heads, bias=a.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, a.conv_kernel, groups=self.conv_dim,
                                padding=a.conv_kernel - 1, bias=a.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(a.num_heads))
        self.A_log = nn.Parameter(torch.empty(a.num_heads))
        self.D = nn.Parameter(torch.empty(a.num_heads))
        self.norm = GatedRMSNorm(a.inner, a.inner // a.n_groups, a.layer_norm_epsilon)
        self.out_proj = nn.Linear(a.inner, a.hidden_size, bias=a.use_bias)

    def make_state(self, batch: int) -> SSMState:
        dev = self.A_log.device
        return SSMState(torch.zeros(batch, self.conv_dim, self.kernel - 1, device=dev),
                        torch.zeros(batch, self.heads, self.head_dim, self.state, device=dev))

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return dt if self.dt_limit is None else dt.clamp(*self.dt_limit)

    def _conv_a(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        conv_w = self.conv1d.weight[:, 0].float()  # (C, K)
        conv_b = self.conv1d.bias.float() if self.conv1d.bias is not None else None
        return conv_w, conv_b, -torch.exp(self.A_log.float())  # A : (H,)

    def forward(self, h: torch.Tensor, cache: SSMState | None = None) -> torch.Tensor:
        # h : (B, T, E)  ->  (B, T, E)
        b, t, _ = h.shape
        if cache is not None and t == 1:
            cache.offset += 1
            return self.step(h[:, 0], cache.conv, cache.ssm).unsqueeze(1)
        gn = self.groups * self.state
        z, xbc, dt = self.in_proj(h).split([self.inner, self.conv_dim, self.heads], dim=-1)
        conv_w, conv_b, A = self._conv_a()
        conv_state, ssm_state = (cache.conv, cache.ssm) if cache is not None else (None, None)
        xbc = F.silu(causal_conv1d(xbc.float(), conv_w, conv_b, conv_state))
        x, B, C = xbc.split([self.inner, gn, gn], dim=-1)  # (B, T, .)
        bc = (b, t, self.groups, self.state)
        y, _ = ssd_scan(x.reshape(b, t, self.heads, self.head_dim), self._dt(dt), A, B.reshape(bc),
                        C.reshape(bc), self.D.float(), ssm_state, self.chunk)
        if cache is not None:
            cache.offset += t
        y = self.norm(y.reshape(b, t, self.inner), z)
        return self.out_proj(y.to(input_dtype(self.out_proj)))

    def step(self, h: torch.Tensor, conv: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One token: h (B, E) -> (B, E); conv (B, C, K-1) and state (B, H, P, N) updated in place."""
        b = h.shape[0]
        gn = self.groups * self.state
        z, xbc, dt = self.in_proj(h).split([self.inner, self.conv_dim, self.heads], dim=-1)
        conv_w, conv_b, A = self._conv_a()
        xbc = F.silu(conv1d_step(xbc.float(), conv_w, conv_b, conv))  # (B, C)
        x, B, C = xbc.split([self.inner, gn, gn], dim=-1)
        y = ssd_step(x.view(b, self.heads, self.head_dim), self._dt(dt), A,
                     B.view(b, self.groups, self.state), C.view(b, self.groups, self.state),
                     self.D.float(), state)
        y = self.norm(y.reshape(b, self.inner), z)
        return self.out_proj(y.to(input_dtype(self.out_proj)))


class Model(SSMModel):
    """The pure-SSM language model (runtime/ssm.py) with the Mamba-2 mixer."""

    @staticmethod
    def make_mixer(a: Args) -> nn.Module:
        return Mamba2Mixer(a)

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], args: Args) -> dict[str, torch.Tensor]:
        """mistral-inference names (a `model.` prefix) -> HF names; then SSMModel's quirks."""
        return SSMModel.sanitize({name.removeprefix("model."): t for name, t in weights.items()}, args)


# ---------------------------------------------------------------- GGUF (llama.cpp names and layouts)
# llama.cpp arch `mamba2`: ssm_a = -exp(A_log) and ssm_d as (H, 1), the conv as (C, K), the gated
# norm's weight as (G, D / G), dt_bias named ssm_dt.bias; time_step_rank holds the head count.

GGUF_NAMES = gguf_names.table("backbone.embeddings", "backbone.norm_f", "backbone.layers",
                              gguf_names.block_norm("norm"), gguf_names.ssm("mixer", 2))


def config_from_gguf(meta: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """An HF-style Mamba2 config from llama.cpp `mamba2` metadata."""

    get = gguf_names.metadata(meta, "mamba2")

    inner, heads = int(get("ssm.inner_size")), int(get("ssm.time_step_rank"))
    hidden = int(get("embedding_length"))
    if heads <= 0 or inner % heads:
        raise ValueError(f"mamba2.ssm.time_step_rank {heads} does not divide ssm.inner_size {inner}")
    return {
        "model_type": "mamba2",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "expand": inner // hidden,
        "num_hidden_layers": int(get("block_count")),
        "num_heads": heads,
        "head_dim": inner // heads,
        "state_size": int(get("ssm.state_size")),
        "n_groups": int(get("ssm.group_count", 1)),
        "conv_kernel": int(get("ssm.conv_kernel")),
        "layer_norm_epsilon": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
    }


config_from_gguf_tensors = gguf_names.ssm_bias_config  # the optional biases: only the tensor list tells


def gguf_tensor_transform(hf_name: str, t: torch.Tensor, args: Args) -> torch.Tensor:
    """A GGUF tensor -> our layout (A back to A_log, (H, 1) -> (H,), (G, D/G) -> (D,), conv (C, 1, K))."""
    t = gguf_names.ssm_tensor_transform(hf_name, t, args)
    return t.reshape(-1) if hf_name.endswith((".A_log", ".D", "mixer.norm.weight")) else t


def gguf_write_transform(hf_name: str, t: torch.Tensor, args: Args) -> torch.Tensor:
    """Our tensor -> llama.cpp's layout (the inverse of gguf_tensor_transform)."""
    t = gguf_names.ssm_write_transform(hf_name, t, args)
    if hf_name.endswith((".A_log", ".D")):
        return t.reshape(-1, 1)
    if hf_name.endswith("mixer.norm.weight"):
        return t.reshape(args.n_groups, -1)
    return t


def gguf_metadata(args: Args) -> dict[str, Any]:
    """The `mamba2.*` keys llama.cpp's converter writes (context length: its arbitrary 2**20)."""
    return {
        "mamba2.context_length": 2**20,
        "mamba2.embedding_length": args.hidden_size,
        "mamba2.feed_forward_length": 0,
        "mamba2.attention.head_count": 0,
        "mamba2.block_count": args.num_hidden_layers,
        "mamba2.ssm.conv_kernel": args.conv_kernel,
        "mamba2.ssm.inner_size": args.inner,
        "mamba2.ssm.state_size": args.state_size,
        "mamba2.ssm.time_step_rank": args.num_heads,
        "mamba2.ssm.group_count": args.n_groups,
        "mamba2.attention.layer_norm_rms_epsilon": args.layer_norm_epsilon,
    }
