"""quant/formats: packers byte-identical to the gguf package and to llama.cpp, dequantizers equal to
gguf.quants.dequantize, and the int4 mapping checked through torch's own int4 kernels."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch

from quant import native
from quant.formats import GGML_BLOCKS, QK_K, GGMLType, dequantize, quantize, to_int4
from tests import ggml_oracle
from tests.fixtures import calls_bounded, missing_oracle, num_threads

F16_FIELDS = {  # byte ranges of the fp16 numbers in each block
    GGMLType.Q4_0: [(0, 2)], GGMLType.Q4_1: [(0, 4)], GGMLType.Q5_0: [(0, 2)], GGMLType.Q5_1: [(0, 4)],
    GGMLType.Q8_0: [(0, 2)], GGMLType.Q4_K: [(0, 4)], GGMLType.Q5_K: [(0, 4)], GGMLType.Q6_K: [(208, 210)],
}
PACKED = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K]


def weights(rows: int = 256, cols: int = 2048, seed: int = 0) -> torch.Tensor:
    """Rows that exercise the packers' corners: gaussian of varied scale, heavy tails, outliers,
    zero / constant / one-signed blocks, +-max ties, values too small for fp16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows).unsqueeze(1)
    x[1] = torch.distributions.StudentT(2.0).sample((cols,))
    x[2, ::97] *= 40
    x[3, :256] = 0
    x[3, 256:512] = 0.7
    x[4, :256] = -torch.rand(256, generator=g)
    x[4, 256:512] = torch.rand(256, generator=g) + 3
    x[5, :32] = torch.tensor([1.0, -1.0] * 16)
    x[6] *= 1e-30
    x[7, 5] = -3e4
    return x


def test_type_table_matches_gguf_package() -> None:
    for qtype, sizes in gguf.GGML_QUANT_SIZES.items():
        if qtype == gguf.GGMLQuantizationType.Q8_1:
            continue  # gguf-py still says 40 bytes; ggml's block_q8_1 has been 36 (two halves + 32) for long
        assert GGML_BLOCKS[GGMLType(int(qtype))] == sizes, qtype.name


@pytest.mark.llamacpp
def test_type_table_matches_ggml() -> None:
    for t in range(43):
        block, size = ggml_oracle.type_traits(t)
        if size == 0:
            assert t not in GGML_BLOCKS  # a removed type
        else:
            assert GGML_BLOCKS[GGMLType(t)] == (block, size), t


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.F16, GGMLType.BF16],
                         ids=lambda t: t.name)
def test_quantize_matches_gguf_package(qtype: GGMLType) -> None:
    x = weights()
    ours = quantize(x, qtype).numpy()
    theirs = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType(int(qtype)))
    assert np.array_equal(ours, theirs.view(np.uint8).reshape(ours.shape))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf's numpy on NaN / inf scales
@pytest.mark.parametrize("qtype", sorted(F16_FIELDS) + [GGMLType.F32, GGMLType.F16, GGMLType.BF16],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("finite", [True, False])
def test_dequantize_matches_gguf_package(qtype: GGMLType, finite: bool) -> None:
    """Random blocks (every bit pattern of levels and scales); finite=True keeps the fp16 fields finite."""
    block, size = GGML_BLOCKS[qtype]
    rng = np.random.default_rng(int(qtype))
    blocks = rng.integers(0, 256, size=(24, 4 * size), dtype=np.uint8)
    if finite:
        if qtype in F16_FIELDS:
            b = blocks.reshape(-1, size)
            for lo, hi in F16_FIELDS[qtype]:
                halves = (rng.standard_normal((len(b), (hi - lo) // 2)) * 0.05).astype(np.float16)
                b[:, lo:hi] = halves.view(np.uint8)
        else:
            vals = torch.from_numpy(rng.standard_normal(blocks.size // size))
            dtype = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16,
                     GGMLType.BF16: torch.bfloat16}[qtype]
            blocks = vals.to(dtype).view(torch.uint8).numpy().reshape(blocks.shape)
    ours = dequantize(torch.from_numpy(blocks), qtype).numpy()
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(int(qtype)))
    assert ours.shape == theirs.shape == (24, 4 * block)
    np.testing.assert_array_equal(ours, theirs)  # NaN == NaN here
    if finite:
        assert np.isfinite(ours).all()


def test_dequantize_keeps_leading_dims() -> None:
    x = torch.randn(2, 3, 256)
    assert dequantize(quantize(x, GGMLType.Q4_K), GGMLType.Q4_K).shape == (2, 3, 256)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_packers_byte_identical_to_llama_cpp(qtype: GGMLType) -> None:
    """ggml_quantize_chunk without an importance matrix is quantize_row_*_ref: we match it bit for bit,
    so the round-trip error is llama.cpp's own (the 5% allowance is spent on nothing)."""
    x = weights()
    ours = quantize(x, qtype).numpy()
    theirs = ggml_oracle.quantize(x.numpy(), int(qtype))
    size = GGML_BLOCKS[qtype][1]
    same_blocks = (ours.reshape(-1, size) == theirs.reshape(-1, size)).all(axis=1).mean()
    rms = [_rms(x, dequantize(torch.from_numpy(b), qtype)) for b in (ours, theirs)]
    assert rms[0] <= 1.05 * rms[1]
    assert same_blocks == 1.0, f"{qtype.name}: {same_blocks:.2%} of blocks identical"


@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_native_packers_equal_the_torch_port_and_llama_cpp(qtype: GGMLType) -> None:
    """quant/kernels/ggml_quantize.cpp (what the writer runs when it is built): the same bytes as the torch
    port and as llama.cpp, on one thread and on several."""
    if not native.available():
        missing_oracle(f"native kernels: {native.load()}")
    x = torch.cat([weights(seed=s) for s in range(3)])
    want = quantize(x, qtype)
    for n in (1, 2):
        with num_threads(n):
            got = native.quantize(x.reshape(-1, GGML_BLOCKS[qtype][0]), int(qtype))
        assert torch.equal(got.reshape(want.shape), want)
    if importlib.util.find_spec("llama_cpp") is not None:
        assert np.array_equal(want.numpy().reshape(-1), ggml_oracle.quantize(x.numpy(), int(qtype)).reshape(-1))


def _rms(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).pow(2).mean().sqrt())


def test_k_quant_errors_are_in_their_expected_order() -> None:
    """Without the oracle: on gaussian rows the RMS errors order as Q8_0 < Q6_K < Q4_K < Q4_1 < Q4_0."""
    x = torch.randn(64, 2048, generator=torch.Generator().manual_seed(3))
    err = {t: _rms(x, dequantize(quantize(x, t), t)) for t in PACKED}
    order = [GGMLType.Q8_0, GGMLType.Q6_K, GGMLType.Q4_K, GGMLType.Q4_1, GGMLType.Q4_0]
    assert [err[t] for t in order] == sorted(err.values()), err
    assert err[GGMLType.Q4_K] < 0.1 * float(x.std())


def test_special_blocks() -> None:
    """Zero blocks stay zero (Q4_K and Q6_K as all-zero bytes, like llama.cpp); constant blocks survive."""
    zeros = torch.zeros(2, QK_K)
    for t in PACKED:
        assert not dequantize(quantize(zeros, t), t).any(), t.name
    assert not quantize(zeros, GGMLType.Q4_K).any() and not quantize(zeros, GGMLType.Q6_K).any()
    const = torch.full((1, QK_K), 0.75)
    for t in (GGMLType.Q4_1, GGMLType.Q4_K):
        assert torch.allclose(dequantize(quantize(const, t), t), const, rtol=2e-3), t.name


def _python_calls(f) -> int:
    with calls_bounded() as work:
        f()
    return work.calls


@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_packing_is_vectorized(qtype: GGMLType) -> None:
    """No Python loop over blocks or rows: packing 64x more blocks makes not one more Python call
    (measured: Q4_K 827 calls, Q6_K 341, Q4_0 30 for 16 blocks and for 1,024 alike)."""
    small, big = torch.randn(4, 1024), torch.randn(64, 4096)
    quantize(small, qtype)  # first-call imports and caches are not per-block work
    assert _python_calls(lambda: quantize(big, qtype)) == _python_calls(lambda: quantize(small, qtype))


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K], ids=lambda t: t.name)
def test_to_int4_is_lossless(qtype: GGMLType) -> None:
    blocks = quantize(weights(), qtype)
    w = dequantize(blocks, qtype)
    q, scale, zero = to_int4(blocks, qtype)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and q.shape == w.shape
    assert scale.shape == zero.shape == (w.shape[0], w.shape[1] // 32)
    recon = (q.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
    # the same levels and the block's own fp16 numbers: only float32 rounding of (q-8)*s + z vs s*q - m
    tol = 4 * torch.finfo(torch.float32).eps * (scale.abs() * 16 + zero.abs()).repeat_interleave(32, 1)
    assert ((recon - w).abs() <= tol).all()


def _int4_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    # x : (M, K) bf16, q : (N, K) 0..15, scale / zero : (N, K/32)  ->  (M, N)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K], ids=lambda t: t.name)
def test_int4_kernel_equals_dequantized_matmul(qtype: GGMLType) -> None:
    """torch's CPU int4 kernel on to_int4's output computes x @ dequantize(blocks).T up to bf16 rounding
    of x, scale, zero and the output; the opposite zero sign is far outside that bound."""
    g = torch.Generator().manual_seed(int(qtype))
    wt = torch.randn(64, 512, generator=g) * 0.05 + 0.02  # a mean offset makes the zeros matter
    blocks = quantize(wt, qtype)
    q, scale, zero = to_int4(blocks, qtype)
    x = torch.randn(8, 512, generator=g).to(torch.bfloat16)
    ref = x.float() @ dequantize(blocks, qtype).T
    got = _int4_mm(x, q, scale, zero).float()
    s, z = scale.repeat_interleave(32, 1), zero.repeat_interleave(32, 1)
    bound = 2**-7 * (x.float().abs() @ ((q.float() - 8).abs() * s.abs() + z.abs()).T) + 2**-7 * ref.abs()
    assert ((got - ref).abs() <= bound).all(), float((got - ref).abs().max())
    if qtype != GGMLType.Q4_0:
        flipped = _int4_mm(x, q, scale, -zero).float()
        assert ((flipped - ref).abs() > bound).any()
