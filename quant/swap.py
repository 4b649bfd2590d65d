"""Putting 4-bit modules into a loaded model: QuantLinear / QuantEmbedding (torch's int4 kernels) or
BlockLinear / BlockEmbedding (GGUF blocks in place, native kernels) in place of nn.Linear /
nn.Embedding, bf16 casts for narrowed float weights, and fusing of 4-bit projections.

    swap_int4(module, path, parts, dtype, where)   one layer (or stacked experts): (q, scales, zeros) or Blocks
    narrow_modules(module)                         bf16 Linear/Embedding -> CastLinear/CastEmbedding
    fuse_linears(mods)                             layers.fuse_linears, plus QuantLinear.concat and BlockLinearCat

runtime/loader.py calls these while it builds a model from a GGUF file; the runtime's layers know
nothing of QuantLinear.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.linear import (
    BlockEmbedding,
    BlockLinear,
    BlockLinearCat,
    Blocks,
    CastEmbedding,
    CastLinear,
    QuantEmbedding,
    QuantLinear,
)
from runtime import layers
from runtime.errors import ModelFormatError
from runtime.layers import MoE


def swap_int4(module: nn.Module, path: str, parts: tuple[torch.Tensor, ...] | Blocks, dtype: torch.dtype,
              where: str) -> None:
    """Replace the nn.Linear / nn.Embedding at `path` (or a MoE's stacked w1/w2/w3) by its 4-bit form:
    parts is (q, scales, zeros) for torch's int4 kernels (QuantLinear / QuantEmbedding), or Blocks, GGUF
    blocks read in place by the native kernels (BlockLinear / BlockEmbedding)."""
    parent_path, _, child = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    old = getattr(parent, child, None)
    blocks = parts if isinstance(parts, Blocks) else None
    shape = (blocks.n, blocks.k) if blocks else tuple(parts[0].shape)
    if isinstance(parent, MoE) and child in MoE.EXPERT_WEIGHTS:  # stacked experts (X, rows, cols)
        x, rows, cols = old.shape
        if shape != (x * rows, cols):
            raise ModelFormatError(f"{where}: tensor {path} has {list(shape)} as rows x columns, the config "
                                   f"implies {[x * rows, cols]}")
        if blocks:
            experts = [BlockLinear(b, blocks.ggml_type, cols) for b in blocks.data.split(rows)]
        else:
            experts = [QuantLinear(*p) for p in zip(*(t.split(rows) for t in parts), strict=True)]
        parent.set_int4(child, experts)
        return
    if isinstance(old, nn.Embedding):
        new: nn.Module = (BlockEmbedding(blocks.data, blocks.ggml_type, blocks.k, dtype) if blocks
                          else QuantEmbedding(*parts, dtype))
    elif isinstance(old, nn.Linear):
        if shape != (old.out_features, old.in_features):
            raise ModelFormatError(f"{where}: tensor {path}.weight has shape {list(shape)}, the config implies "
                                   f"{[old.out_features, old.in_features]}")
        bias = torch.empty(old.out_features) if old.bias is not None else None
        new = (BlockLinear(blocks.data, blocks.ggml_type, blocks.k, bias, blocks.rows) if blocks
               else QuantLinear(*parts, bias))
    else:
        raise ModelFormatError(f"{where}: {path} is 4-bit but is not a linear layer or embedding here")
    setattr(parent, child, new)


def narrow_modules(module: nn.Module) -> None:
    """Linear/Embedding layers whose weights were kept in bf16 compute in bf16 and return float32."""
    for mod in module.modules():
        if type(mod) is nn.Linear and mod.weight.dtype == torch.bfloat16:
            mod.__class__ = CastLinear
        elif type(mod) is nn.Embedding and mod.weight.dtype == torch.bfloat16:
            mod.__class__ = CastEmbedding


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing torch.cat([m(x) for m in mods], -1): 4-bit projections through
    QuantLinear.concat, float ones through layers.fuse_linears; None when they cannot be fused."""
    if all(isinstance(m, QuantLinear) for m in mods):
        return QuantLinear.concat(mods)
    if all(isinstance(m, BlockLinear) for m in mods) and len({m.in_features for m in mods}) == 1 and \
            len({m.bias is None for m in mods}) == 1:
        return BlockLinearCat(mods)
    return layers.fuse_linears(mods)
