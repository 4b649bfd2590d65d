"""4-bit execution: QuantLinear and QuantEmbedding over int4 weights with a scale and zero per 32 columns.

Weights arrive as `q` (uint8 [N, K], values 0..15), `scales` and `zeros` (float [N, K/32]) meaning
    w[n, k] = (q[n, k] - 8) * scales[n, k // 32] + zeros[n, k // 32]
which is the convention of torch's int4 kernels (`aten._weight_int4pack_mm_for_cpu` on CPU,
`aten._weight_int4pack_mm` on CUDA, bf16 activations). Q4_0, Q4_1 and Q4_K map onto it losslessly
(quant/formats.py: to_int4).

The kernel's packed layout depends on the device, so packing happens once the module is on the
device it ended up on (runtime.device.place calls prepare()); until then the weights are kept as
plain nibble pairs (uint8 [N, K/2]). Where the kernel is unavailable (shapes it does not take, other
devices), a dequantize-then-matmul fallback gives the same result in float. On a GPU below compute
capability 8.0 (no int4 kernel there), prepare() dequantizes the weights to bf16 once (cuda_int4_kernel).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from quant import native
from quant.formats import row_nbytes

GROUP = 32
# From this many rows (tokens) on, a CPU matmul dequantizes the packed weights to float32 and runs an
# fp32 GEMM: torch's int4 CPU kernel reaches ~80 GFLOP/s on 2 AVX2 cores, an fp32 GEMM ~165, and
# dequantizing (dequantize_cpu_int4) costs about one GEMM of ~35 rows. Measured on every int4 shape of
# the bench models, kernel/dense time is 0.83-1.05 at 64 rows, 1.05-1.28 at 96 (docs/performance.md).
# Decode (1 row) keeps the kernel.
DENSE_ROWS = 80


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    # q : (N, K) uint8 0..15  ->  (N, K/2) uint8, even columns in the high nibble (torch's int4 order)
    return (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    out = torch.empty(p.shape[0], p.shape[1] * 2, dtype=torch.uint8, device=p.device)
    out[:, 0::2] = p >> 4
    out[:, 1::2] = p & 0xF
    return out


def dequantize_int4(p: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K/2) nibbles + (N, K/32) scales/zeros -> (N, K) weights in dtype."""
    q = unpack_nibbles(p).view(p.shape[0], -1, GROUP).to(torch.float32)
    w = (q - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(p.shape[0], -1).to(dtype)


@functools.lru_cache(maxsize=1)
def cpu_block_n() -> int | None:
    """Rows per tile of _convert_weight_to_int4pack_for_cpu's layout (32 on AVX2 builds), found by
    packing probes once; None when the layout is not one we can unpack (then the kernel is always used)."""
    n_rows = k = 128
    n = torch.arange(n_rows)[:, None].expand(n_rows, k)
    try:
        lo = torch.ops.aten._convert_weight_to_int4pack_for_cpu((n % 16).int().contiguous(), 1)
        hi = torch.ops.aten._convert_weight_to_int4pack_for_cpu((n // 16).int().contiguous(), 1)
    except (RuntimeError, AttributeError):  # an op this torch build lacks
        return None
    for bn in (32, 64, 16):
        if torch.equal(unpack_cpu_int4(lo, n_rows, k, bn).long() + 16 * unpack_cpu_int4(hi, n_rows, k, bn).long(), n):
            return bn
    return None


def unpack_cpu_int4(packed: torch.Tensor, n: int, k: int, block_n: int) -> torch.Tensor:
    """The CPU kernel's packed int4 weights -> (n, k) uint8 levels: tiles of block_n rows, each storing,
    per column, block_n / 2 bytes whose low nibbles are the tile's first half of rows, high the second."""
    v = packed.reshape(n // block_n, k, block_n // 2)
    return torch.cat([v & 0xF, v >> 4], dim=-1).permute(0, 2, 1).reshape(n, k)


def dequantize_cpu_int4(packed: torch.Tensor, sz: torch.Tensor, n: int, k: int, block_n: int) -> torch.Tensor:
    """The CPU kernel's packed weights and (K/32, N, 2) scales/zeros -> (n, k) float32, computing what the
    kernel does, (q - 8) * scale + zero, bit for bit. Written in as few passes over the output as eager
    PyTorch allows (each tile's nibble halves transposed straight into place, then one multiply and one
    add in place): 4-5x faster than unpack_cpu_int4 followed by float arithmetic."""
    v = packed.view(n // block_n, k, block_n // 2)
    out = torch.empty(n // block_n, 2, block_n // 2, k)
    out[:, 0] = ((v & 0xF).view(torch.int8) - 8).transpose(1, 2)  # low nibbles: the tile's first rows
    out[:, 1] = ((v >> 4).view(torch.int8) - 8).transpose(1, 2)
    s = sz.float().permute(1, 0, 2)  # (N, K/32, 2): scale, zero
    w = out.view(n, k // GROUP, GROUP)
    w.mul_(s[..., :1]).add_(s[..., 1:])  # (q - 8) * scale is exact in fp32: one rounding, as the kernel
    return out.view(n, k)


def cuda_int4_kernel(device: torch.device) -> bool:
    """Whether torch's CUDA int4 kernel may run on `device`: compute capability 8.0 (Ampere) or newer.

    Below that its packing kernel fails without reporting a launch error (so no try/except can catch
    it); those GPUs get the weights dequantized to bf16 once (DENSE_GPU_DTYPE) instead."""
    if os.environ.get("MAMBA_CLI_FAKE_CUDA_CAPABILITY"):  # tests: "7.5" / "8.0"
        return tuple(int(v) for v in os.environ["MAMBA_CLI_FAKE_CUDA_CAPABILITY"].split(".")) >= (8, 0)
    return torch.cuda.get_device_capability(device) >= (8, 0)


DENSE_GPU_DTYPE = torch.bfloat16


def gpu_path(device: torch.device) -> str:
    """Which 4-bit path QuantLinear takes on a GPU, for -v."""
    if cuda_int4_kernel(device):
        return "torch int4 CUDA kernel"
    return "dequantized to bf16 (the int4 CUDA kernel needs compute capability 8.0)"


class QuantLinear(nn.Module):
    """y = x @ w.T (+ bias) with w held as int4; in_features must be a multiple of 32.

    prepare() (called once the module is on its final device) packs the weights for that device's
    kernel and drops the plain copy, so memory is the 4-bit size plus bf16 scales and zeros.
    MAMBA_CLI_NO_INT4_KERNEL=1 keeps the plain copy and runs the exact float fallback instead.
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        if self.in_features % GROUP:
            raise ValueError(f"in_features {self.in_features} is not a multiple of {GROUP}")
        self._set_source(pack_nibbles(q), scales.float().contiguous(), zeros.float().contiguous())
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def _set_source(self, nibbles, scales, zeros) -> None:
        self.register_buffer("nibbles", nibbles, persistent=False)  # (N, K/2) uint8
        self.register_buffer("scales", scales, persistent=False)  # (N, K/32) float32
        self.register_buffer("zeros", zeros, persistent=False)  # (N, K/32) float32
        self.register_buffer("packed", None, persistent=False)  # the kernel's layout for its device
        self.register_buffer("sz", None, persistent=False)  # (K/32, N, 2) bf16 scales and zeros
        self.register_buffer("dense", None, persistent=False)  # (N, K) bf16: GPUs without the int4 kernel

    @classmethod
    def concat(cls, mods: list[QuantLinear]) -> QuantLinear | None:
        """Stack several QuantLinears over the same input into one (outputs concatenated)."""
        if len({m.in_features for m in mods}) != 1 or any(m.bias is not None or m.nibbles is None for m in mods):
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features = mods[0].in_features
        fused.out_features = sum(m.out_features for m in mods)
        fused._set_source(*(torch.cat([getattr(m, n) for m in mods]) for n in ("nibbles", "scales", "zeros")))
        fused.bias = None
        return fused

    def prepare(self) -> None:
        """Pack for the int4 kernel of the device the weights are on; keep the plain copy if it cannot."""
        if self.packed is not None or self.dense is not None or os.environ.get("MAMBA_CLI_NO_INT4_KERNEL"):
            return
        device = self.nibbles.device
        if device.type == "cuda" and not cuda_int4_kernel(device):
            self.dense = dequantize_int4(self.nibbles, self.scales, self.zeros, DENSE_GPU_DTYPE)
            self.nibbles = self.scales = self.zeros = None
            return
        pad = -self.out_features % 16  # the kernels take N in multiples of 16: pad with zero rows
        nib, sc, ze = self.nibbles, self.scales, self.zeros
        if pad:
            nib = torch.cat([nib, torch.full((pad, nib.shape[1]), 0x88, dtype=torch.uint8, device=device)])
            sc = torch.cat([sc, sc.new_zeros(pad, sc.shape[1])])
            ze = torch.cat([ze, ze.new_zeros(pad, ze.shape[1])])
        try:
            if device.type == "cpu":
                w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(nib).int(), 1)
            elif device.type == "cuda":
                w = torch.ops.aten._convert_weight_to_int4pack(nib, 8 if self.in_features % 256 == 0 else 2)
            else:
                return
        except (RuntimeError, AttributeError):  # shapes the kernel refuses, or a torch without it
            return
        self.packed = w
        self.sz = torch.stack([sc.t(), ze.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.nibbles = self.scales = self.zeros = None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32), while the plain copy is kept (before prepare())."""
        if self.dense is not None:
            return self.dense.float()
        if self.nibbles is None:
            raise RuntimeError("the int4 weights were packed for the kernel; the plain copy is gone")
        return dequantize_int4(self.nibbles, self.scales, self.zeros, torch.float32)

    def dense_weight(self) -> torch.Tensor | None:
        """The packed CPU weights as float32 (N padded, K), exactly what the kernel multiplies by; None
        when their layout cannot be unpacked here."""
        bn = cpu_block_n() if self.packed is not None and self.packed.device.type == "cpu" else None
        n_pad = self.sz.shape[1] if bn else 0
        if not bn or n_pad % bn:
            return None
        return dequantize_cpu_int4(self.packed, self.sz, n_pad, self.in_features, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x : (..., K)  ->  (..., N)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.dense is not None:
            y = F.linear(x2.to(self.dense.dtype), self.dense).to(x.dtype)
        elif self.packed is not None and x2.shape[0] >= DENSE_ROWS and (w := self.dense_weight()) is not None:
            y = F.linear(x2.float(), w)[:, : self.out_features].to(x.dtype)  # prefill: an fp32 GEMM
        elif self.packed is not None:
            xb = x2.to(torch.bfloat16).contiguous()  # the kernel refuses strided input (Mamba's x_proj)
            if x.device.type == "cpu":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, GROUP, self.sz)
            else:
                y = torch.ops.aten._weight_int4pack_mm(xb, self.packed, GROUP, self.sz)
            y = y[:, : self.out_features].to(x.dtype)
        else:
            y = F.linear(x2, dequantize_int4(self.nibbles, self.scales, self.zeros, x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)


@dataclasses.dataclass
class Blocks:
    """A matrix as GGUF blocks: data (n, row_bytes) uint8, rows of k values of ggml_type; rows: an
    optional output order (block row rows[j] computes output j)."""

    data: torch.Tensor
    ggml_type: int
    k: int
    rows: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.data.shape[0] if self.rows is None else self.rows.shape[0]


class BlockLinear(nn.Module):
    """y = x @ w.T (+ bias) with w as GGUF blocks, read in place by the native kernels (quant/native.py).

    blocks : (N, row_bytes) uint8, usually a view into the memory-mapped GGUF file (nothing is copied or
    repacked); rows : optional (N,) int64, output j computed from block row rows[j] (llama.cpp's q/k row
    order read as ours). Every row count runs the integer kernel (activations quantized to 8 bits per
    block, as llama.cpp does): from a few rows on it takes tiles of 8 weight rows, which beat dequantizing
    to an fp32 GEMM at any length (docs/performance.md, session 8).
    """

    def __init__(self, blocks: torch.Tensor, ggml_type: int, in_features: int, bias: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None):
        super().__init__()
        if blocks.dim() != 2 or blocks.shape[1] != row_nbytes(ggml_type, in_features):
            raise ValueError(f"blocks {list(blocks.shape)} are not rows of {in_features} values of type {ggml_type}")
        self.ggml_type, self.in_features = int(ggml_type), in_features
        self.out_features = blocks.shape[0] if rows is None else rows.shape[0]
        self.register_buffer("blocks", blocks, persistent=False)
        self.register_buffer("rows", rows, persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32), rows in our order."""
        w = native.dequant(self.blocks, self.ggml_type, self.in_features)
        return w if self.rows is None else w[self.rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x : (..., K)  ->  (..., N)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        y = torch.ops.mamba_cli.ggml_mm(x2, self.blocks, self.ggml_type, self.in_features, self.rows)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class BlockLinearCat(nn.Module):
    """Several BlockLinears of one input width (q/k/v, gate/up) as one: y = cat([p(x) for p in parts], -1).

    One kernel call for all of them (the activations quantized once per format, one parallel region over
    every part's rows). The parts keep their own types and row orders (a Q4_K_M layer mixes Q4_K and Q6_K)."""

    def __init__(self, parts: list[BlockLinear]):
        super().__init__()
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("fused parts must share their input width")
        if len({p.bias is None for p in parts}) != 1:
            raise ValueError("fused parts must all have a bias or none")
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.types = [p.ggml_type for p in parts]
        # the parts' biases side by side, once (not on every decode step)
        bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        y = torch.ops.mamba_cli.ggml_mm_cat(x2, [p.blocks for p in self.parts], self.types, self.in_features,
                                            [p.rows for p in self.parts])
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class BlockEmbedding(nn.Module):
    """Embedding lookup over GGUF blocks in place: gathers the rows asked for, then dequantizes only them."""

    def __init__(self, blocks: torch.Tensor, ggml_type: int, dim: int, dtype: torch.dtype):
        super().__init__()
        if blocks.dim() != 2 or blocks.shape[1] != row_nbytes(ggml_type, dim):
            raise ValueError(f"blocks {list(blocks.shape)} are not rows of {dim} values of type {ggml_type}")
        self.ggml_type, self.embedding_dim, self.dtype = int(ggml_type), dim, dtype
        self.register_buffer("blocks", blocks, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return native.dequant(self.blocks, self.ggml_type, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks.index_select(0, ids.reshape(-1))
        out = torch.ops.mamba_cli.ggml_dequant(rows, self.ggml_type, self.embedding_dim)
        return out.to(self.dtype).view(*ids.shape, self.embedding_dim)


class QuantEmbedding(nn.Module):
    """Embedding lookup that dequantizes only the rows it returns."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("nibbles", pack_nibbles(q), persistent=False)
        self.register_buffer("scales", scales.float().contiguous(), persistent=False)
        self.register_buffer("zeros", zeros.float().contiguous(), persistent=False)
        self.dtype = dtype

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_int4(self.nibbles, self.scales, self.zeros, torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize_int4(self.nibbles[flat], self.scales[flat], self.zeros[flat], self.dtype)
        return rows.view(*ids.shape, -1)


class CastLinear(nn.Linear):
    """A linear layer stored in a narrower float (bf16) than the activations it serves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class CastEmbedding(nn.Embedding):
    """An embedding table stored in bf16 that returns rows in the model's activation dtype."""

    out_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.out_dtype)
