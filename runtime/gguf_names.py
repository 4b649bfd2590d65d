"""llama.cpp's tensor names and layouts <-> ours: ONE table per architecture, built from shared rows.

    NameTable                    gguf pattern -> our pattern ("{i}" is the layer); to_ours / to_gguf /
                                 sort_key (llama.cpp's order: token_embd, the blocks, the head)
    table(embed, norm, layer, *groups)   the head rows and a block's row groups under a layer prefix
    attention(attn, bias)        attn_q/k/v/output (+ biases)
    ssm(mixer, version, bcdt_norms)      ssm_in, ssm_conv1d, Mamba-1's ssm_x/ssm_dt (+ Jamba's dt/B/C norms)
                                 or Mamba-2's dt_bias, ssm_a, ssm_d, Mamba-2's ssm_norm, ssm_out
    ffn(norm, mlp), moe(moe)     the feed-forward norm and SwiGLU rows; router and stacked experts
    metadata(meta, arch)         get(key, default): an `{arch}.*` metadata value, KeyError when absent

The loader (runtime/loader.py) reads GGUF files through these tables and the writer (quant/gguf_out.py)
names its tensors with them. Layout transforms the SSM architectures share (llama.cpp stores
A = -exp(A_log) and the depthwise conv as (C, K)) live here too: ssm_tensor_transform and its inverse
ssm_write_transform, and ssm_bias_config (the optional Mamba biases only the tensor list tells).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch


class NameTable:
    """llama.cpp tensor names <-> our (Hugging Face) names, from rows `gguf pattern -> our pattern`."""

    def __init__(self, rows: dict[str, str]):
        self.rows = rows
        self._to_ours = [(_pattern(g), h) for g, h in rows.items()]
        self._to_gguf = [(_pattern(h), g) for g, h in rows.items()]
        self._order = {g: i for i, g in enumerate(rows)}

    def to_ours(self, name: str) -> str | None:
        """A GGUF tensor name -> ours, or None when the architecture has no such tensor."""
        return _lookup(self._to_ours, name)

    def to_gguf(self, name: str) -> str | None:
        """One of our tensor names -> llama.cpp's, or None when it has no GGUF name."""
        return _lookup(self._to_gguf, name)

    def sort_key(self, name: str) -> tuple:
        """llama.cpp's file order: token_embd, then each block's tensors in row order, then the head."""
        m = re.match(r"blk\.(\d+)\.(.*)$", name)
        if m:
            return (1, int(m[1]), self._order.get("blk.{i}." + m[2], 0))
        return (0 if name == "token_embd.weight" else 2, 0, self._order.get(name, 0))


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


def _lookup(patterns: list[tuple[re.Pattern, str]], name: str) -> str | None:
    return next((out.replace("{i}", m[1]) if "{i}" in out else out for p, out in patterns if (m := p.match(name))),
                None)


# ---------------------------------------------------------------- row groups (relative to a layer)


def table(embed: str, norm: str, layer: str, *groups: dict[str, str]) -> NameTable:
    """The head rows (embeddings, final norm, lm_head) and every group's rows under `layer`.{i}."""
    rows = {"token_embd.weight": f"{embed}.weight", "output_norm.weight": f"{norm}.weight",
            "output.weight": "lm_head.weight"}
    for group in groups:
        rows.update({f"blk.{{i}}.{g}": f"{layer}.{{i}}.{h}" for g, h in group.items()})
    return NameTable(rows)


def block_norm(norm: str) -> dict[str, str]:
    """The pre-norm of a block's mixer (llama.cpp calls it attn_norm whatever the mixer)."""
    return {"attn_norm.weight": f"{norm}.weight"}


def attention(attn: str, bias: bool = True) -> dict[str, str]:
    projections = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "output": "o_proj"}
    kinds = ("weight", "bias") if bias else ("weight",)
    return {f"attn_{g}.{kind}": f"{attn}.{h}.{kind}" for kind in kinds for g, h in projections.items()}


def ssm(mixer: str, version: int, bcdt_norms: bool = False) -> dict[str, str]:
    """A Mamba-1 (version 1; Jamba's with bcdt_norms) or Mamba-2 (version 2) mixer's rows."""
    rows = {f"ssm_{g}.{kind}": f"{mixer}.{h}.{kind}" for g, h in (("in", "in_proj"), ("conv1d", "conv1d"))
            for kind in ("weight", "bias")}
    if version == 1:
        rows.update({"ssm_x.weight": f"{mixer}.x_proj.weight", "ssm_dt.weight": f"{mixer}.dt_proj.weight",
                     "ssm_dt.bias": f"{mixer}.dt_proj.bias"})
        if bcdt_norms:
            rows.update({f"ssm_{n}_norm.weight": f"{mixer}.{n}_layernorm.weight" for n in ("dt", "b", "c")})
    else:
        rows["ssm_dt.bias"] = f"{mixer}.dt_bias"
    rows.update({"ssm_a": f"{mixer}.A_log", "ssm_d": f"{mixer}.D"})
    if version == 2:
        rows["ssm_norm.weight"] = f"{mixer}.norm.weight"
    rows.update({f"ssm_out.{kind}": f"{mixer}.out_proj.{kind}" for kind in ("weight", "bias")})
    return rows


def ffn(norm: str, mlp: str) -> dict[str, str]:
    return {"ffn_norm.weight": f"{norm}.weight", "ffn_gate.weight": f"{mlp}.gate_proj.weight",
            "ffn_up.weight": f"{mlp}.up_proj.weight", "ffn_down.weight": f"{mlp}.down_proj.weight"}


def moe(moe: str) -> dict[str, str]:
    """The router and the stacked experts (X, out, in): gate = w1, up = w3, down = w2."""
    return {"ffn_gate_inp.weight": f"{moe}.gate.weight", "ffn_gate_exps.weight": f"{moe}.w1",
            "ffn_up_exps.weight": f"{moe}.w3", "ffn_down_exps.weight": f"{moe}.w2"}


def metadata(meta: dict[str, Any], arch: str) -> Callable[..., Any]:
    """get(key, default=None) -> meta[f"{arch}.{key}"], or the default; KeyError naming the key when
    there is neither (the loader reports it as missing metadata)."""

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise KeyError(f"{arch}.{key}")
        return v

    return get


# ---------------------------------------------------------------- SSM layouts shared by mamba, mamba2, jamba


def ssm_tensor_transform(name: str, t: torch.Tensor, args: Any) -> torch.Tensor:
    """A GGUF SSM tensor -> our layout: A = -exp(A_log) back to A_log; conv (C, K) -> (C, 1, K)."""
    if name.endswith(".A_log"):
        return torch.log(-t)
    if name.endswith("conv1d.weight"):
        return t.unsqueeze(1)
    return t


def ssm_write_transform(name: str, t: torch.Tensor, args: Any) -> torch.Tensor:
    """Our SSM tensor -> llama.cpp's layout (the inverse of ssm_tensor_transform)."""
    if name.endswith(".A_log"):
        return -torch.exp(t.float())
    if name.endswith("conv1d.weight"):
        return t[:, 0]
    return t


def ssm_bias_config(names: set[str], layer: str = "0", keys: tuple[str, str] = ("use_bias", "use_conv_bias")
                    ) -> dict[str, bool]:
    """The optional Mamba biases, which only a GGUF tensor list tells (block `layer`): whether in_proj and
    the conv have one, under the config keys `keys`."""
    return {keys[0]: f"blk.{layer}.ssm_in.bias" in names, keys[1]: f"blk.{layer}.ssm_conv1d.bias" in names}
