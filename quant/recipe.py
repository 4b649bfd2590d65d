"""Which tensor gets which GGML type: llama.cpp's rules for the file types mamba-cli writes.

    QUANT_TYPES                  --type name -> (general.file_type, the type most weights get)
    tensor_types(tensors, ...)   [(GGUF name, shape)] in file order -> {name: GGMLType}

Two steps, as in llama.cpp:
 1. what stays float (convert_hf_to_gguf.py + llama-quant.cpp tensor_allows_quantization): 1-D
    tensors, norms, ssm_conv1d, MoE routers (ffn_gate_inp) and every tensor whose name does not end
    in `.weight` (ssm_a, ssm_d, biases) stay F32;
 2. for the others, llama-quant.cpp llama_tensor_get_type_impl: the output head (and the token
    embedding when the head is tied to it) in Q6_K (Q8_0 if its rows do not split into blocks);
    for q4_k_m, attn_v and ffn_down in Q6_K on the "use_more_bits" layers (the first and last
    eighth, and every third layer between); 8-expert models take attn_v/attn_k in Q8_0; then
    tensor_type_fallback for rows that the block size does not divide: Q4_K -> Q5_0, Q6_K -> Q8_0,
    a 32-block type -> F16.
One departure: where llama.cpp picks Q5_K (attn_output of 8-expert models under q4_k_m) we write
Q6_K, the next K type we can pack (more bits, never less quality). The 70B-only attn_v bump and the
imatrix-only rules do not apply here.

Shapes are in PyTorch order: shape[-1] is GGUF's ne0, the row length the blocks run along.
"""

from __future__ import annotations

import re

from quant.formats import GGML_BLOCKS, GGMLType

# --type -> (LlamaFileType written as general.file_type, default type of the quantized weights)
QUANT_TYPES: dict[str, tuple[int, GGMLType]] = {
    "f32": (0, GGMLType.F32),
    "f16": (1, GGMLType.F16),
    "q8_0": (7, GGMLType.Q8_0),
    "q4_0": (2, GGMLType.Q4_0),
    "q4_1": (3, GGMLType.Q4_1),
    "q4_k_m": (15, GGMLType.Q4_K),
}

_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q6_K: GGMLType.Q8_0}


def stays_float(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors that every file type keeps in F32."""
    return (len(shape) <= 1 or name.endswith("_norm.weight") or "ffn_gate_inp" in name
            or "ssm_conv1d" in name or not name.endswith(".weight"))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for cat in ("attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_output.weight", "ffn_up", "ffn_gate",
                "ffn_down"):
        if cat in name:
            return cat.removesuffix(".weight")
    return "other"


def _fits(t: GGMLType, ncols: int) -> bool:
    return ncols % GGML_BLOCKS[t][0] == 0


def fallback(t: GGMLType, ncols: int) -> GGMLType:
    """llama.cpp's tensor_type_fallback: a type whose block size divides the row, else F16."""
    if _fits(t, ncols):
        return t
    t = _FALLBACK.get(t, t)
    return t if _fits(t, ncols) else GGMLType.F16


def tensor_types(tensors: list[tuple[str, tuple[int, ...]]], qtype: str, n_layers: int,
                 n_experts: int = 0) -> dict[str, GGMLType]:
    """The GGML type of every tensor, for tensors listed in file order (llama.cpp's counters need it)."""
    if qtype not in QUANT_TYPES:
        raise ValueError(f"unknown quantization type {qtype!r}; one of {', '.join(QUANT_TYPES)}")
    default = QUANT_TYPES[qtype][1]
    tied = all(name != "output.weight" for name, _ in tensors)
    n_attn_v = sum(_category(name) == "attn_v" for name, _ in tensors)
    i_attn_v = i_ffn_down = 0
    out: dict[str, GGMLType] = {}
    for name, shape in tensors:
        if stays_float(name, shape) or default == GGMLType.F32:
            out[name] = GGMLType.F32
            continue
        if default == GGMLType.F16:
            out[name] = GGMLType.F16
            continue
        cat, ncols, t = _category(name), shape[-1], default
        if cat == "output" or (tied and cat == "token_embd"):
            if not _fits(t, ncols):
                t = GGMLType.Q8_0
            elif t != GGMLType.Q8_0:
                t = GGMLType.Q6_K
        elif cat == "attn_v":
            if qtype == "q4_k_m" and use_more_bits(i_attn_v, n_attn_v):
                t = GGMLType.Q6_K
            if n_experts == 8:
                t = GGMLType.Q8_0
            i_attn_v += 1
        elif cat == "attn_k" and n_experts == 8:
            t = GGMLType.Q8_0
        elif cat == "ffn_down":
            i_layer = int(re.match(r"blk\.(\d+)\.", name)[1]) if n_experts > 1 else i_ffn_down
            if qtype == "q4_k_m" and use_more_bits(i_layer, n_layers):
                t = GGMLType.Q6_K
            i_ffn_down += 1
        elif cat == "attn_output" and n_experts == 8 and qtype == "q4_k_m":
            t = GGMLType.Q6_K  # llama.cpp: Q5_K, which we do not pack
        out[name] = fallback(t, ncols)
    return out
