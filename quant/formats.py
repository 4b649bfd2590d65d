"""GGML block formats, torch-vectorized: the type table, packers, unpackers and the int4 mapping.

    GGMLType, GGML_BLOCKS      every type a GGUF file may hold: (elements per block, bytes per block)
    quantize(x, type)          float rows [..., K] -> uint8 blocks [..., K / block * bytes]
                               F32 F16 BF16 Q4_0 Q4_1 Q8_0 Q4_K Q6_K
    dequantize(blocks, type)   uint8 blocks [..., nbytes] -> float32 rows [..., K]
                               the above + Q5_0 Q5_1 Q5_K
    to_int4(blocks, type)      Q4_0 / Q4_1 / Q4_K -> int4 values [R, K] + scale, zero [R, K/32]
                               with w = (q - 8) * scale + zero, the form torch's int4 kernels take

Every packer is a port of ggml-quants.c's reference row quantizer (quantize_row_*_ref), which is
what llama.cpp's quantize tool runs without an importance matrix. The packers loop over the
elements of a block (32 or 16 steps), never over blocks, and add in element order like the C loops,
so Q4_K and Q6_K come out byte for byte as llama.cpp makes them; Q4_0 / Q4_1 / Q8_0 match the
`gguf` package. The byte layouts are drawn in docs/formats.md.

Legend: R rows, K elements per row, B blocks, S sub-blocks (B * sub-blocks per block),
E elements per sub-block. Sub-block tensors are kept element-major, (E, S), so that a sum over
a sub-block in element order is E contiguous vector adds.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class GGMLType(IntEnum):
    """ggml's type ids (ggml.h); the gaps are types llama.cpp removed from GGUF files."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41
    Q2_0 = 42


QK_K = 256

# type -> (elements per block, bytes per block), as ggml_blck_size / ggml_type_size report them
GGML_BLOCKS: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 36),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176), GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66), GGMLType.IQ2_XS: (256, 74), GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50), GGMLType.IQ4_NL: (32, 18), GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82), GGMLType.IQ4_XS: (256, 136), GGMLType.IQ1_M: (256, 56),
    GGMLType.TQ1_0: (256, 54), GGMLType.TQ2_0: (256, 66), GGMLType.MXFP4: (32, 17),
    GGMLType.NVFP4: (64, 36), GGMLType.Q1_0: (128, 18), GGMLType.Q2_0: (64, 18),
}

QUANTIZABLE = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1,
                         GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K})
DEQUANTIZABLE = QUANTIZABLE | {GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K}
INT4_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K})

_CHUNK_ELEMS = 1 << 20  # elements packed per step: keeps the temporaries near the cache


def row_nbytes(ggml_type: int, n: int) -> int:
    """Bytes of one row of n elements (n a multiple of the block size)."""
    block, size = GGML_BLOCKS[GGMLType(ggml_type)]
    if n % block:
        raise ValueError(f"{GGMLType(ggml_type).name} rows need a multiple of {block} elements, got {n}")
    return n // block * size


# ---------------------------------------------------------------------------------------------
# dequantize


def dequantize(blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """uint8 blocks [..., nbytes] -> float32 [..., K], the same values gguf.quants.dequantize gives."""
    t = GGMLType(ggml_type)
    if t not in DEQUANTIZABLE:
        raise ValueError(f"cannot dequantize {t.name}")
    block, size = GGML_BLOCKS[t]
    lead = blocks.shape[:-1]
    if blocks.dtype != torch.uint8 or blocks.shape[-1] % size:
        raise ValueError(f"{t.name} needs uint8 rows of a multiple of {size} bytes")
    k = blocks.shape[-1] // size * block
    b = blocks.contiguous().reshape(-1, size)  # (B, size)
    out = _DEQUANT[t](b)
    return out.reshape(*lead, k)


def _f16(b: torch.Tensor) -> torch.Tensor:
    # b : (B, 2) bytes of a little-endian half -> (B, 1) float32
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # qs : (..., n) bytes -> (..., 2, n): low nibbles first, then high nibbles
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    # qh : (B, 4) little-endian uint32 -> (B, 32) bit j of the word
    word = qh.contiguous().view(torch.int32).to(torch.int64)
    return ((word >> torch.arange(32)) & 1).to(torch.uint8)


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:]).reshape(-1, 32)
    return _f16(b[:, :2]) * (q.to(torch.int8) - 8).float()


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:]).reshape(-1, 32).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _dq_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]).reshape(-1, 32) | (_bits32(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.to(torch.int8) - 16).float()


def _dq_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]).reshape(-1, 32) | (_bits32(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # s : (B, 12) packed 6-bit scales and mins of Q4_K / Q5_K -> sc, m : (B, 8) float32
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _q4_k_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # b : (B, 144) -> q (B, 8, 32) in 0..15, scale (B, 8, 1), min (B, 8, 1): w = scale * q - min
    sc, mn = _k_scale_min(b[:, 4:16])
    scale = (_f16(b[:, :2]) * sc).unsqueeze(-1)
    dmin = (_f16(b[:, 2:4]) * mn).unsqueeze(-1)
    q = _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return q, scale, dmin


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:
    q, scale, dmin = _q4_k_parts(b)
    return (scale * q.float() - dmin).reshape(-1, QK_K)


def _dq_q5_k(b: torch.Tensor) -> torch.Tensor:
    sc, mn = _k_scale_min(b[:, 4:16])
    scale = (_f16(b[:, :2]) * sc).unsqueeze(-1)
    dmin = (_f16(b[:, 2:4]) * mn).unsqueeze(-1)
    qh = b[:, 16:48].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)  # (B, 8, 32)
    ql = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    q = ql | ((qh & 1) << 4)
    return (scale * q.float() - dmin).reshape(-1, QK_K)


def _dq_q6_k(b: torch.Tensor) -> torch.Tensor:
    ql, qh, sc = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = (_f16(b[:, 208:]) * sc.contiguous().view(torch.int8).float()).unsqueeze(-1)  # (B, 16, 1)
    lo = _nibbles(ql.reshape(-1, 2, 64)).reshape(-1, 8, 32)
    hi = (qh.reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    q = (lo | (hi.reshape(-1, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.reshape(-1, 16, 16).float()).reshape(-1, QK_K)


_DEQUANT = {
    GGMLType.F32: lambda b: b.view(torch.float32),
    GGMLType.F16: lambda b: b.view(torch.float16).float(),
    GGMLType.BF16: lambda b: b.view(torch.bfloat16).float(),
    GGMLType.Q4_0: _dq_q4_0, GGMLType.Q4_1: _dq_q4_1, GGMLType.Q5_0: _dq_q5_0, GGMLType.Q5_1: _dq_q5_1,
    GGMLType.Q8_0: _dq_q8_0, GGMLType.Q4_K: _dq_q4_k, GGMLType.Q5_K: _dq_q5_k, GGMLType.Q6_K: _dq_q6_k,
}


# ---------------------------------------------------------------------------------------------
# quantize


def quantize(x: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """float rows [..., K] -> uint8 blocks [..., K / block * bytes], as llama.cpp's reference packers."""
    t = GGMLType(ggml_type)
    if t not in QUANTIZABLE:
        raise ValueError(f"cannot quantize to {t.name}")
    block, size = GGML_BLOCKS[t]
    lead, k = x.shape[:-1], x.shape[-1]
    if k % block:
        raise ValueError(f"{t.name} rows need a multiple of {block} elements, got {k}")
    flat = x.detach().to("cpu", torch.float32).contiguous().reshape(-1, block)  # (B, block)
    if t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        dtype = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}[t]
        out = flat.to(dtype).view(torch.uint8)
    else:
        step = max(1, _CHUNK_ELEMS // block)
        out = torch.cat([_QUANT[t](flat[i:i + step]) for i in range(0, flat.shape[0], step)])
    return out.reshape(*lead, k // block * size)


def _c(v: float) -> torch.Tensor:
    """A float32 scalar, so `c / t` divides in float32 as C does (torch's rdiv multiplies by 1/t)."""
    return torch.tensor(v, dtype=torch.float32)


def _f32(v: float) -> float:
    return float(np.float32(v))


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    # v : (B,) float32 -> (B, 2) bytes of the rounded half
    return v.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    # q : (..., 2, n) values 0..15 -> (..., n) bytes, the first half in the low nibbles
    return q[..., 0, :] | (q[..., 1, :] << 4)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), computed as gguf's np_roundf does."""
    a = v.abs()
    fl = a.floor()
    return torch.sign(v) * (fl + (2 * (a - fl)).floor())


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    # t : (E, ...) -> (...), added in element order like `for (i...) s += t[i]`
    acc = t[0].clone()
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def _q_q4_0(b: torch.Tensor) -> torch.Tensor:
    # b : (B, 32)
    mx = b.gather(1, b.abs().argmax(dim=1, keepdim=True))
    d = mx / -8
    inv = torch.where(d == 0, 0.0, _c(1.0) / d)
    q = torch.trunc(b * inv + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_half_bytes(d), _pack_nibbles(q.view(-1, 2, 16))], dim=1)


def _q_q4_1(b: torch.Tensor) -> torch.Tensor:
    mx, mn = b.amax(dim=1, keepdim=True), b.amin(dim=1, keepdim=True)
    d = (mx - mn) / 15
    inv = torch.where(d == 0, 0.0, _c(1.0) / d)
    q = torch.trunc((b - mn) * inv + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_half_bytes(d), _half_bytes(mn), _pack_nibbles(q.view(-1, 2, 16))], dim=1)


def _q_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = b.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, 0.0, _c(1.0) / d)
    q = _roundf(b * inv).to(torch.int8).view(torch.uint8)
    return torch.cat([_half_bytes(d), q], dim=1)


def _make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml-quants.c make_qkx2_quants (use_mad=false): per sub-block scale, -min and levels 0..nmax
    minimizing the weighted squared error over a sweep of nstep+1 trial scales."""
    # x, w : (E, S)  ->  scale (S,), the_min (S,), L (E, S) float levels
    mn0 = x.amin(dim=0).clamp(max=0)
    mx = x.amax(dim=0)
    flat = mx == mn0
    mn = torch.where(flat, mx - 1, mn0)  # flat sub-blocks take the early exit; keep their math finite
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    iscale = _c(nmax) / (mx - mn)
    scale = _c(1.0) / iscale
    lv = (iscale * (x - mn)).round().clamp(0, nmax)
    diff = scale * lv + mn - x
    best = _seqsum(w * (diff * diff))
    la, tmp = torch.empty_like(x), torch.empty_like(x)
    sums_in = torch.empty(3, *x.shape)  # w*l, w*l*l, w*l*x, summed together in one pass
    for i in range(nstep + 1):
        trial = _f32(_f32(_f32(rmin) + _f32(_f32(rdelta) * i)) + nmax)  # rmin + rdelta*is + nmax, in float
        # the C loop moves `min` with each better fit, and both uses of it below see the move
        torch.sub(x, mn, out=tmp)
        torch.mul(tmp, _c(trial) / (mx - mn), out=la).round_().clamp_(0, nmax)
        torch.mul(w, la, out=sums_in[0])
        torch.mul(sums_in[0], la, out=sums_in[1])
        torch.mul(sums_in[0], x, out=sums_in[2])
        sum_l, sum_l2, sum_xl = _seqsum(sums_in.transpose(0, 1))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clip = this_min > 0
        this_min = torch.where(clip, 0.0, this_min)
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        torch.mul(this_scale, la, out=tmp).add_(this_min).sub_(x)
        cur = _seqsum(tmp.mul_(tmp).mul_(w))
        better = (det > 0) & (cur < best)
        lv = torch.where(better, la, lv)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    return torch.where(flat, 0.0, scale), -torch.where(flat, mn0, mn), torch.where(flat, 0.0, lv)


def _nearest_u8(v: torch.Tensor) -> torch.Tensor:
    # `uint8_t l = nearest_int(v)`: round half to even, then wrap to 0..255
    return torch.remainder(v.round(), 256)


def _q_q4_k(b: torch.Tensor) -> torch.Tensor:
    # b : (B, 256) -> (B, 144): d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
    nb = b.shape[0]
    x = b.reshape(nb * 8, 32).T.contiguous()  # (E=32, S)
    av_x = torch.sqrt((_seqsum(x * x) / 32).double()).float()  # torch's float32 sqrt is not correctly rounded
    w = av_x + x.abs()
    scales, mins, lv = _make_qkx2_quants(x, w, 15, -1.0, 0.1, 20)
    scales, mins = scales.view(nb, 8), mins.view(nb, 8)
    max_scale, max_min = scales.amax(dim=1), mins.amax(dim=1)
    max_scale = torch.where(max_scale > 0, max_scale, 0.0)  # C starts the max at +0: -0.0 stays out
    max_min = torch.where(max_min > 0, max_min, 0.0)
    inv_scale = torch.where(max_scale > 0, _c(63.0) / max_scale, 0.0)
    inv_min = torch.where(max_min > 0, _c(63.0) / max_min, 0.0)
    ls = _nearest_u8(inv_scale[:, None] * scales).clamp(max=63)  # (B, 8)
    lm = _nearest_u8(inv_min[:, None] * mins).clamp(max=63)
    d16 = (max_scale / 63).to(torch.float16)
    dmin16 = (max_min / 63).to(torch.float16)
    d = (d16.float()[:, None] * ls).reshape(-1)  # (S,)
    dm = (dmin16.float()[:, None] * lm).reshape(-1)
    fresh = ((x + dm) / d).round().clamp(0, 15)
    lv = torch.where(d == 0, lv, fresh).T.to(torch.uint8).reshape(nb, 4, 2, 32)
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    packed = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                        lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                        (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)], dim=1)
    return torch.cat([_half_bytes(d16.float()), _half_bytes(dmin16.float()), packed,
                      _pack_nibbles(lv).reshape(nb, 128)], dim=1)


def _first_absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The signed value of largest magnitude, the first one on ties (C's `if (ax > amax)` scan)."""
    return x.gather(dim, x.abs().argmax(dim=dim, keepdim=True)).squeeze(dim)


def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml-quants.c make_qx_quants with rmse_type=1 and no importance weights: a symmetric scale
    and levels 0..2*nmax-1 (value + nmax), refined over 18 trial scales with weights x^2."""
    # x : (E, S) -> scale (S,), L (E, S) float levels
    mx = _first_absmax(x, 0)
    zero = mx.abs() < 1e-15
    mx = torch.where(zero, 1.0, mx)
    w = x * x
    wx = w * x

    def levels(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lv = (iscale * x).round().clamp(-nmax, nmax - 1)
        return lv, _seqsum(wx * lv), _seqsum(w * lv * lv)

    lv, sumlx, suml2 = levels(_c(-nmax) / mx)
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        la, sumlx, suml2 = levels(_c(-_f32(nmax + _f32(_f32(0.1) * i))) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        lv = torch.where(better, la, lv)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, lv + nmax)


def _q_q6_k(b: torch.Tensor) -> torch.Tensor:
    # b : (B, 256) -> (B, 210): 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d (f16)
    nb = b.shape[0]
    x = b.reshape(nb * 16, 16).T.contiguous()  # (E=16, S)
    scales, lv = _make_qx_quants(x, 32)
    scales = scales.view(nb, 16)
    max_scale = _first_absmax(scales, 1)
    empty = max_scale.abs() < 1e-15
    iscale = _c(-128.0) / torch.where(empty, 1.0, max_scale)
    d16 = (_c(1.0) / iscale).to(torch.float16)
    sc = (iscale[:, None] * scales).round().clamp(max=127)  # (B, 16) in -128..127
    d = (d16.float()[:, None] * sc).reshape(-1)  # (S,)
    fresh = (x / d).round().clamp(-32, 31) + 32
    lv = torch.where(d == 0, lv, fresh).T.reshape(nb, 2, 4, 32).to(torch.uint8)
    ql = torch.cat([lv[:, :, 0] & 0x0F | ((lv[:, :, 2] & 0x0F) << 4),
                    lv[:, :, 1] & 0x0F | ((lv[:, :, 3] & 0x0F) << 4)], dim=2)  # (B, 2, 64)
    hi = lv >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = torch.cat([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.to(torch.int8).view(torch.uint8),
                     _half_bytes(d16.float())], dim=1)
    return torch.where(empty[:, None], 0, out).to(torch.uint8)


_QUANT = {GGMLType.Q4_0: _q_q4_0, GGMLType.Q4_1: _q_q4_1, GGMLType.Q8_0: _q_q8_0,
          GGMLType.Q4_K: _q_q4_k, GGMLType.Q6_K: _q_q6_k}


# ---------------------------------------------------------------------------------------------
# int4 mapping


def to_int4(blocks: torch.Tensor, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K rows -> (q uint8 [R, K] in 0..15, scale [R, K/32], zero [R, K/32]), float32,
    such that w = (q - 8) * scale + zero: the convention of aten._weight_int4pack_mm(_for_cpu).
    No level is requantized; scale and zero are the block's own fp16 numbers combined in float32."""
    t = GGMLType(ggml_type)
    if t not in INT4_TYPES:
        raise ValueError(f"{t.name} has no int4 form (Q4_0, Q4_1, Q4_K do)")
    block, size = GGML_BLOCKS[t]
    if blocks.dim() != 2 or blocks.dtype != torch.uint8 or blocks.shape[1] % size:
        raise ValueError(f"{t.name} needs uint8 rows [R, multiple of {size} bytes]")
    rows = blocks.shape[0]
    b = blocks.contiguous().reshape(-1, size)  # (B, size)
    if t == GGMLType.Q4_K:
        q, scale, dmin = _q4_k_parts(b)  # (B, 8, 32), (B, 8, 1), (B, 8, 1)
        zero = 8 * scale - dmin
    else:
        q = _nibbles(b[:, 2 if t == GGMLType.Q4_0 else 4:]).reshape(-1, 1, 32)
        scale = _f16(b[:, :2]).unsqueeze(-1)  # (B, 1, 1)
        zero = torch.zeros_like(scale) if t == GGMLType.Q4_0 else 8 * scale + _f16(b[:, 2:4]).unsqueeze(-1)
    return q.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)
