"""QuantLinear / QuantEmbedding: the int4 kernel path equals the float reference within bf16 rounding."""

from __future__ import annotations

import pytest
import torch

from quant import native
from quant.formats import GGMLType, dequantize, quantize
from quant.linear import BlockLinear, QuantEmbedding, QuantLinear


def case(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    s = torch.rand(n, k // 32, generator=g) * 0.1
    z = torch.randn(n, k // 32, generator=g) * 0.1
    w = (q.float() - 8) * s.repeat_interleave(32, 1) + z.repeat_interleave(32, 1)
    return q, s, z, w


@pytest.mark.parametrize("n,k", [(64, 128), (100, 96), (24, 32), (3352, 768)])
def test_kernel_and_fallback_match_reference(n, k):
    q, s, z, w = case(n, k)
    x = torch.randn(3, 5, k)
    ref = x @ w.t()
    plain = QuantLinear(q, s, z)
    assert torch.allclose(plain(x), ref, atol=1e-5, rtol=1e-5)  # float fallback: exact dequantization
    packed = QuantLinear(q, s, z)
    packed.prepare()
    assert packed.packed is not None and packed.nibbles is None  # N padded to the kernel's multiple of 16
    assert float((packed(x) - ref).abs().max() / ref.abs().max()) < 2e-2  # bf16 activations and scales
    assert packed(x).shape == (3, 5, n)


def test_concat_equals_separate_outputs():
    parts = [case(48, 64, seed) for seed in range(3)]
    mods = [QuantLinear(q, s, z) for q, s, z, _ in parts]
    fused = QuantLinear.concat(mods)
    x = torch.randn(2, 64)
    assert torch.allclose(fused(x), torch.cat([m(x) for m in mods], -1), atol=1e-6)


def test_embedding_rows():
    q, s, z, w = case(50, 64)
    e = QuantEmbedding(q, s, z, torch.float32)
    ids = torch.tensor([[0, 49, 7]])
    assert torch.allclose(e(ids), w[ids], atol=1e-6)


@pytest.mark.parametrize("n,k", [(3360, 768), (96, 160), (80, 64)])
def test_prefill_rows_take_the_dense_path_with_the_kernels_weights(n, k):
    """From DENSE_ROWS rows on, CPU matmuls unpack the kernel's own packed weights to float32: the
    unpacked levels are exactly the packed ones, and the result is the exact product up to the bf16
    scales the kernel also uses. Layouts that cannot be unpacked (N % 32 == 16) keep the kernel."""
    from quant.linear import DENSE_ROWS, QuantLinear, cpu_block_n, unpack_cpu_int4

    bn = cpu_block_n()
    if bn is None:
        pytest.skip("this torch build packs int4 CPU weights in a layout we do not unpack")
    g = torch.Generator().manual_seed(n)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)
    if n % bn == 0:
        assert torch.equal(unpack_cpu_int4(packed, n, k, bn), q)
    m = QuantLinear(q, torch.rand(n, k // 32, generator=g) * 0.1, torch.randn(n, k // 32, generator=g) * 0.1)
    exact = m.weight.clone()
    m.prepare()
    has_dense = m.dense_weight() is not None
    assert has_dense == (n % bn == 0)
    if has_dense:  # dequantize_cpu_int4: the kernel's arithmetic on the kernel's bf16 scales, bit for bit
        s = m.sz.float()[:, :n]  # (K/32, N, 2)
        levels = q.float().view(n, -1, 32) - 8
        assert torch.equal(m.dense_weight()[:n], (levels * s[..., 0].T[..., None] + s[..., 1].T[..., None]).view(n, k))
    x = torch.randn(DENSE_ROWS, k, generator=g)
    ref = x @ exact.T
    dense, kernel = m(x), torch.cat([m(x[:1]), m(x[1:])])  # one row: the kernel; the rest: dense if it can
    assert float((dense - ref).abs().max() / ref.abs().max()) < (4e-3 if has_dense else 8e-3)  # bf16 scales
    assert float((kernel - ref).abs().max() / ref.abs().max()) < 8e-3  # and bf16 activations


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("t,rows", [(GGMLType.Q4_0, 3), (GGMLType.Q4_0, 4), (GGMLType.Q4_0, 300), (GGMLType.Q8_0, 11),
                                    (GGMLType.Q8_0, 12), (GGMLType.Q4_K, 7), (GGMLType.Q4_K, 11), (GGMLType.Q4_K, 12),
                                    (GGMLType.Q4_K, 300)], ids=lambda v: getattr(v, "name", str(v)))
def test_block_linear_rows_and_tiles(t, rows):
    """BlockLinear equals x @ dequantized(w).T within 8-bit activations' rounding, on either side of the row
    count from which the kernel takes tiles of 8 weight rows, with a row order and a bias."""
    w = torch.randn(200, 512) * 0.05
    blocks = quantize(w, t)
    order = torch.randperm(200)
    bias = torch.randn(200)
    mod = BlockLinear(blocks, int(t), 512, bias, order)
    x = torch.randn(rows, 512)
    ref = x @ dequantize(blocks, t)[order].t() + bias
    y = mod(x)
    tol = 2e-2  # activations quantized to 8 bits per block
    assert y.shape == (rows, 200)
    assert float((y - ref).abs().max() / ref.abs().max()) < tol


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("rows", [1, 3, 6, 24, 192])
def test_block_linear_cat_equals_its_parts(rows):
    """BlockLinearCat (fused q/k/v, gate/up over blocks in place) gives exactly its parts' outputs side by
    side: parts of different types (a Q4_K_M layer mixes Q4_K and Q6_K), row orders and biases."""
    from quant.linear import BlockLinearCat

    g = torch.Generator().manual_seed(5)
    parts = []
    for n, t, order in [(72, GGMLType.Q4_K, True), (40, GGMLType.Q6_K, False), (24, GGMLType.Q4_0, True)]:
        blocks = quantize(torch.randn(n, 512, generator=g) * 0.05, t)
        parts.append(BlockLinear(blocks, int(t), 512, torch.randn(n, generator=g), torch.randperm(n, generator=g)
                                 if order else None))
    fused = BlockLinearCat(parts)
    x = torch.randn(2, rows, 512, generator=g)
    y = fused(x)
    assert y.shape == (2, rows, 136)
    assert torch.equal(y, torch.cat([p(x) for p in parts], -1))
