"""4-bit execution: QuantLinear and QuantEmbedding over int4 weights with a scale and zero per 32 columns.

Weights arrive as `q` (uint8 [N, K], values 0..15), `scales` and `zeros` (float [N, K/32]) meaning
    w[n, k] = (q[n, k] - 8) * scales[n, k // 32] + zeros[n, k // 32]
which is the convention of torch's int4 kernels (`aten._weight_int4pack_mm_for_cpu` on CPU,
`aten._weight_int4pack_mm` on CUDA, bf16 activations). Q4_0, Q4_1 and Q4_K map onto it losslessly
(quant/formats.py: to_int4).

The kernel's packed layout depends on the device, so packing happens at the first forward on the
device the module ended up on (after --gpu-layers placement); until then the weights are kept as
plain nibble pairs (uint8 [N, K/2]). Where the kernel is unavailable (shapes it does not take, other
devices), a dequantize-then-matmul fallback gives the same result in float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32


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


class QuantLinear(nn.Module):
    """y = x @ w.T (+ bias) with w held as int4; in_features must be a multiple of 32."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        if self.in_features % GROUP:
            raise ValueError(f"in_features {self.in_features} is not a multiple of {GROUP}")
        self.register_buffer("nibbles", pack_nibbles(q), persistent=False)
        self.register_buffer("scales", scales.float().contiguous(), persistent=False)
        self.register_buffer("zeros", zeros.float().contiguous(), persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._packed: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None
        self.use_kernel = True

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32); for inspection and the fallback path, not the hot path."""
        return dequantize_int4(self.nibbles, self.scales, self.zeros, torch.float32)

    def _pack(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._packed is not None and self._packed[0] == device:
            return self._packed[1], self._packed[2]
        sz = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).to(torch.bfloat16).contiguous()  # (K/32, N, 2)
        try:
            if device.type == "cpu":
                w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.nibbles).int(), 1)
            elif device.type == "cuda":
                w = torch.ops.aten._convert_weight_to_int4pack(self.nibbles, 8 if self.in_features % 256 == 0 else 2)
            else:
                return None
        except RuntimeError:
            return None
        self._packed = (device, w, sz)
        return w, sz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x : (..., K)  ->  (..., N)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        packed = self._pack(x.device) if self.use_kernel else None
        if packed is not None:
            w, sz = packed
            xb = x2.to(torch.bfloat16).contiguous()  # the kernel refuses strided input (Mamba's x_proj)
            if x.device.type == "cpu":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w, GROUP, sz)
            else:
                y = torch.ops.aten._weight_int4pack_mm(xb, w, GROUP, sz)
            y = y.to(x.dtype)
        else:
            y = F.linear(x2, dequantize_int4(self.nibbles, self.scales, self.zeros, x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)


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
