"""Mamba-1 and Falcon-Mamba: a stack of selective-SSM mixers, no attention.

The mixer (MambaMixer, shared with Jamba) and the language-model shell (SSMModel, shared with Mamba-2)
live in runtime/ssm.py; this file holds the config, the checkpoint quirks and the GGUF section.

Module tree (names as in the HF checkpoints):

    Model
      backbone.embeddings           (V, E)
      backbone.layers[i]            SSMBlock
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
from torch import nn

from runtime import gguf_names
from runtime.models.base import require
from runtime.ssm import MambaMixer, SSMModel


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
        require(cfg, ["vocab_size", "hidden_size", "state_size", "num_hidden_layers"], silu=True)
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


class Model(SSMModel):
    """The pure-SSM language model (runtime/ssm.py) with Mamba-1's mixer."""

    @staticmethod
    def make_mixer(a: Args) -> nn.Module:
        return MambaMixer(a.hidden_size, a.intermediate_size, a.state_size, a.time_step_rank, a.conv_kernel,
                          a.use_bias, a.use_conv_bias, a.bcdt_norm, a.mixer_rms_eps)

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], args: Args) -> dict[str, torch.Tensor]:
        """Falcon-Mamba's dummy dt/B/C norm weights dropped; then SSMModel's quirks."""
        if args.bcdt_norm == "weightless":
            weights = {name: t for name, t in weights.items() if not name.endswith("_layernorm.weight")}
        return SSMModel.sanitize(weights, args)


# ---------------------------------------------------------------- GGUF (llama.cpp names and layouts)
# llama.cpp arch `mamba` serves Mamba-1 and Falcon-Mamba (ssm.dt_b_c_rms = true). It stores
# ssm_a = -exp(A_log) and the depthwise conv as (D, K); Falcon-Mamba's dt/B/C norms have no weights.

GGUF_NAMES = gguf_names.table("backbone.embeddings", "backbone.norm_f", "backbone.layers",
                              gguf_names.block_norm("norm"), gguf_names.ssm("mixer", 1))


def config_from_gguf(meta: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """An HF-style config from llama.cpp `mamba` metadata (Falcon-Mamba when ssm.dt_b_c_rms)."""

    get = gguf_names.metadata(meta, "mamba")

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


config_from_gguf_tensors = gguf_names.ssm_bias_config  # the optional biases: only the tensor list tells


gguf_tensor_transform = gguf_names.ssm_tensor_transform  # A = -exp(A_log) back to A_log; conv (D, K) -> (D, 1, K)
gguf_write_transform = gguf_names.ssm_write_transform


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
