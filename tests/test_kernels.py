"""The native 4-bit CPU kernels (quant/kernels/ggml_cpu.cpp) against a float64 reference.

The reference does what llama.cpp specifies, written independently: weights dequantized by
quant.formats.dequantize, activations quantized to 8 bits per block (Q8_0 / Q8_1 / Q8_K, round half to
even, fp16 scales where the block stores them), every block product summed in float64. The kernel may
differ only by fp32 rounding of its accumulation. Blocks are random bytes (every bit pattern of the
quants and packed scales) with chosen scales: ordinary, zero, subnormal and the largest fp16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quant import native
from quant.formats import GGML_BLOCKS, GGMLType, dequantize
from tests.fixtures import missing_oracle, num_threads


@pytest.fixture(autouse=True)
def kernels():
    """The kernels, built here if need be; their absence skips (fails under CI=true, which builds them)."""
    if not native.available():
        missing_oracle(f"native kernels: {native.load()}")

TYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K]
# byte offsets of the fp16 scale fields inside each block: (d, min-or-None)
SCALES = {GGMLType.Q4_0: (0, None), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0, None), GGMLType.Q5_1: (0, 2),
          GGMLType.Q8_0: (0, None), GGMLType.Q4_K: (0, 2), GGMLType.Q6_K: (208, None)}
WITH_SUM = {GGMLType.Q4_1, GGMLType.Q5_1}  # activations as Q8_1 (the block stores s = d * sum(q))
SUPER = {GGMLType.Q4_K, GGMLType.Q6_K}  # activations as Q8_K


def random_blocks(t: GGMLType, n: int, k: int, seed: int, scale: str = "normal") -> torch.Tensor:
    block, size = GGML_BLOCKS[t]
    g = np.random.default_rng(seed)
    b = g.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    d_off, m_off = SCALES[t]
    nblk = b.shape[:2]
    if scale == "normal":
        d = g.uniform(0.001, 0.05, nblk)
    elif scale == "zero":
        d = np.where(g.random(nblk) < 0.5, 0.0, g.uniform(0.001, 0.05, nblk))
    elif scale == "subnormal":
        d = g.uniform(1e-7, 6e-5, nblk)  # below fp16's smallest normal (6.1e-5)
    else:  # "extreme": the largest half, where products still fit fp32
        d = np.full(nblk, 65504.0)
    b[..., d_off:d_off + 2] = d.astype(np.float16).view(np.uint8).reshape(*nblk, 2)
    if m_off is not None:
        m = g.uniform(-0.05, 0.05, nblk) if scale != "extreme" else np.full(nblk, -65504.0)
        b[..., m_off:m_off + 2] = m.astype(np.float16).view(np.uint8).reshape(*nblk, 2)
    return torch.from_numpy(b.reshape(n, -1).copy())


def quantize_acts(x: np.ndarray, t: GGMLType) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """x (M, K) float32 -> (q int, d float per block, s per block or None) as llama.cpp quantizes them."""
    m, k = x.shape
    if t in SUPER:
        xb = x.reshape(m, -1, 256)
        first = np.abs(xb).argmax(-1)  # the first element of largest magnitude, with its sign
        mx = np.take_along_axis(xb, first[..., None], -1)[..., 0]
        with np.errstate(divide="ignore"):
            iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0)).astype(np.float32)
        q = np.minimum(127, np.rint(iscale[..., None] * xb)).astype(np.int64)
        with np.errstate(divide="ignore"):
            d = np.where(iscale != 0, np.float32(1.0) / iscale, 0).astype(np.float32)
        return q.reshape(m, -1, 256), d.astype(np.float64), None
    xb = x.reshape(m, -1, 32)
    amax = np.abs(xb).max(-1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint((xb * idv[..., None]).astype(np.float32)).astype(np.int64)
    d16 = d.astype(np.float16).astype(np.float64)
    s = (d * q.sum(-1).astype(np.float32)).astype(np.float16).astype(np.float64) if t in WITH_SUM else None
    return q, d16, s


def reference(x: torch.Tensor, w: torch.Tensor, t: GGMLType) -> tuple[np.ndarray, np.ndarray]:
    """(y, bound): y (M, N) float64 and the sum of |terms| each y[m, n] adds up (for the tolerance)."""
    k = x.shape[1]
    wd = dequantize(w, t).double().numpy()  # (N, K)
    q, d, s = quantize_acts(x.numpy(), t)
    blk = q.shape[-1]
    if t in WITH_SUM:  # w = dw * qw + mw: the min part is mw * s, s as the activation block stores it
        _, size = GGML_BLOCKS[t]
        raw = w.numpy().reshape(w.shape[0], -1, size)
        mw = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)  # (N, nb)
        no_min = raw.copy()
        no_min[..., 2:4] = 0  # dequantized without the min: dw * qw, exact in fp32
        wq = dequantize(torch.from_numpy(no_min.reshape(w.shape)), t).double().numpy().reshape(w.shape[0], -1, blk)
        prod = np.einsum("nbj,mbj->mnb", wq, q * d[..., None]) + np.einsum("nb,mb->mnb", mw, s)
        y = prod.sum(-1)
        bound = np.abs(prod).sum(-1) + 1e-30
        return y, bound
    xq = (q * d[..., None]).reshape(x.shape[0], k)
    terms = np.abs(wd)[None] * np.abs(xq)[:, None]
    return xq @ wd.T, terms.sum(-1) + 1e-30


def check(t, n, k, m, seed=0, scale="normal", threads=None):
    w = random_blocks(t, n, k, seed, scale)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (1 if scale != "extreme" else 1e-3)
    with num_threads(threads):
        y = native.mm(x, w, int(t), k).double().numpy()
    ref, bound = reference(x, w, t)
    err = np.abs(y - ref) / bound
    assert err.max() < 1e-5, f"{t.name} n={n} k={k} m={m}: worst error {err.max():.2e} of the |terms|"
    return w, x, y


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n,k,m", [(1, 256, 1), (7, 512, 1), (33, 768, 3), (64, 256, 4), (19, 1280, 9), (12, 512, 2),
                                   (45, 512, 23), (21, 1280, 40)])  # from 12 rows the K types take tiles
def test_kernel_equals_reference(t, n, k, m):
    check(t, n, k, m, seed=n * 31 + m)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("scale", ["zero", "subnormal", "extreme"])
def test_kernel_edge_scales(t, scale):
    check(t, 24, 512, 5, seed=3, scale=scale)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 24])
def test_activation_rounding_ties(t, m):
    """Activations quantized as llama.cpp does, ties included: every block's largest magnitude is 127 (so the
    scale is 1, -1 for Q8_K) and the other values lie on .5, which round half to even; equal magnitudes of
    both signs in one 256-block (Q8_K takes the first). One quant off by one moves the sum by ~1/65000 of
    its terms, above the 1e-5 bound."""
    k = 512
    w = random_blocks(t, 16, k, 9)
    g = torch.Generator().manual_seed(m)
    x = torch.randint(-120, 120, (m, k), generator=g).float() + 0.5
    x[:, ::32] = 127.0
    x[:, 5::256] = -127.0
    y = native.mm(x, w, int(t), k).double().numpy()
    ref, bound = reference(x, w, t)
    assert (np.abs(y - ref) / bound).max() < 1e-5


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("scale", ["zero", "subnormal", "extreme"])
def test_tiles_edge_scales(t, scale):
    check(t, 29, 512, 21, seed=7, scale=scale)  # tiles of 8 weight rows


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_tiles_rows_are_independent(t):
    """Tiles of 8 weight rows: any row's output is that row's own sum, whichever rows share its tile, on 1 and
    2 threads: a permutation walked in place, an index with repeats and a short last tile give the same bits
    as the rows copied out."""
    k, m = 512, 24
    w = random_blocks(t, 27, k, 8)
    x = torch.randn(m, k)
    for threads in (1, 2):
        with num_threads(threads):
            full = native.mm(x, w, int(t), k)
            for idx in (torch.randperm(27), torch.tensor([5, 5, 0, 26, 2, 9, 9, 9, 13, 1, 3])):
                assert torch.equal(native.mm(x, w, int(t), k, idx), full[:, idx])
                assert torch.equal(native.mm(x, w[idx].contiguous(), int(t), k), full[:, idx])
            assert torch.equal(native.mm(x[:21], w, int(t), k), full[:21])


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_1], ids=lambda t: t.name)
def test_short_rows_of_32_blocks(t):
    check(t, 5, 32, 2)  # K = one block
    check(t, 40, 96, 6)  # K not a multiple of any tile but the block


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("k", [32, 64, 96, 800, 832])
@pytest.mark.parametrize("scale", ["normal", "zero", "subnormal", "extreme"])
def test_one_token_odd_block_counts(t, k, scale):
    """One activation row (the 4-bit one-token kernel takes two blocks at a time, odd block counts the general
    kernel): odd and even numbers of blocks, four-row groups and a leftover row."""
    check(t, 9, k, 1, seed=k, scale=scale)


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_threads_give_identical_results(t):
    _, _, one = check(t, 257, 512, 3, seed=5, threads=1)
    _, _, two = check(t, 257, 512, 3, seed=5, threads=2)
    assert np.array_equal(one, two)  # rows are split between threads, never a row's sum


def test_zero_activations_and_zero_rows():
    w = random_blocks(GGMLType.Q4_K, 8, 512, 1)
    assert torch.equal(native.mm(torch.zeros(2, 512), w, int(GGMLType.Q4_K), 512), torch.zeros(2, 8))
    assert native.mm(torch.zeros(0, 512), w, int(GGMLType.Q4_K), 512).shape == (0, 8)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequant_equals_reference(t):
    w = random_blocks(t, 9, 512, 2)
    assert torch.equal(native.dequant(w, int(t), 512), dequantize(w, t))


def test_rows_permutation_reads_rows_in_place():
    t = GGMLType.Q4_0
    w = random_blocks(t, 16, 256, 4)
    x = torch.randn(3, 256)
    perm = torch.randperm(16)
    assert torch.equal(native.mm(x, w, int(t), 256, perm), native.mm(x, w[perm].contiguous(), int(t), 256))
    with pytest.raises(RuntimeError, match="out of range"):
        native.mm(x, w, int(t), 256, torch.tensor([0, 16]))


def test_bad_shapes_are_errors():
    w = random_blocks(GGMLType.Q4_0, 4, 64, 0)
    with pytest.raises(RuntimeError, match="bytes"):
        native.mm(torch.randn(1, 96), w, int(GGMLType.Q4_0), 96)
    with pytest.raises(RuntimeError, match="activations"):
        native.mm(torch.randn(1, 32), w, int(GGMLType.Q4_0), 64)
    with pytest.raises(RuntimeError, match="unsupported"):
        native.mm(torch.randn(1, 64), w, 13, 64)


def test_strided_weight_rows():
    """Rows of a larger buffer (an expert's slice, a view into the mapped file) are read in place."""
    t = GGMLType.Q6_K
    w = random_blocks(t, 12, 512, 6)
    view = torch.cat([w, torch.zeros(12, 7, dtype=torch.uint8)], 1)[4:9, : w.shape[1]]  # row stride > row
    assert view.stride(0) != view.shape[1]
    x = torch.randn(2, 512)
    assert torch.equal(native.mm(x, view, int(t), 512), native.mm(x, view.contiguous(), int(t), 512))


@pytest.mark.slow
def test_generic_cpp_path_equals_reference(tmp_path):
    """The plain C++ path (what CPUs without a SIMD path we wrote get) passes the same checks: built in
    a subprocess with MAMBA_CLI_NATIVE_SIMD=generic, since one process holds one build of the ops."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MAMBA_CLI_NATIVE_SIMD": "generic", "MAMBA_CLI_KERNEL_DIR": str(tmp_path)}
    code = "from quant import native; print(native.describe())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "native 4-bit kernels (generic)" in out.stdout, out.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                          "-k", "not generic"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:]


@pytest.mark.parametrize("m", [1, 3, 6, 22])
def test_mm_cat_equals_separate_products(m):
    """ggml_mm_cat: several matrices of one input width in one call (activations quantized once per
    format, one parallel region) == each product alone, side by side; mixed types and row indices."""
    k = 512
    specs = [(GGMLType.Q4_K, 37, None), (GGMLType.Q6_K, 20, torch.randperm(20)), (GGMLType.Q4_0, 13, None),
             (GGMLType.Q4_1, 9, torch.tensor([3, 3, 0, 8])), (GGMLType.Q8_0, 16, torch.randperm(16))]
    ws = [random_blocks(t, n, k, 10 + i) for i, (t, n, _) in enumerate(specs)]
    x = torch.randn(m, k)
    for threads in (1, 2):
        with num_threads(threads):
            got = torch.ops.mamba_cli.ggml_mm_cat(x, ws, [int(t) for t, _, _ in specs], k, [r for _, _, r in specs])
            want = torch.cat([native.mm(x, w, int(t), k, r) for w, (t, _, r) in zip(ws, specs, strict=True)], 1)
            assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="one type and one rows entry"):
        torch.ops.mamba_cli.ggml_mm_cat(x, ws, [int(GGMLType.Q4_K)], k, [None])


def test_row_index_that_is_not_a_permutation():
    t = GGMLType.Q4_0
    w = random_blocks(t, 16, 256, 4)
    x = torch.randn(2, 256)
    idx = torch.tensor([5, 5, 0, 15, 2])
    assert torch.equal(native.mm(x, w, int(t), 256, idx), native.mm(x, w[idx].contiguous(), int(t), 256))


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("ids", [[2], [0, 3], [1, 1, 4, 0, 2]])
def test_mm_id_equals_each_rows_product(t, ids):
    """ggml_mm_id (a MoE layer's chosen experts, picked in the kernel): row r of x times expert ids[r]'s
    blocks equals that row's own product, bit for bit, on 1 and 2 threads."""
    k, n = 512, 36
    ws = [random_blocks(t, n, k, 40 + e) for e in range(5)]
    x = torch.randn(len(ids), k)
    want = torch.cat([native.mm(x[r : r + 1], ws[e], int(t), k) for r, e in enumerate(ids)])
    for threads in (1, 2):
        with num_threads(threads):
            got = torch.ops.mamba_cli.ggml_mm_id(x, ws, int(t), k, torch.tensor(ids))
            assert torch.equal(got, want)


def test_mm_id_bad_input_is_an_error():
    t, k = GGMLType.Q4_0, 256
    ws = [random_blocks(t, 8, k, e) for e in range(3)]
    x = torch.randn(2, k)
    op = torch.ops.mamba_cli.ggml_mm_id
    with pytest.raises(RuntimeError, match="out of range"):
        op(x, ws, int(t), k, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="one expert id per activation row"):
        op(x, ws, int(t), k, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="one shape"):
        op(x, [ws[0], random_blocks(t, 4, k, 9)], int(t), k, torch.tensor([0, 1]))
    assert op(x[:0], ws, int(t), k, torch.tensor([], dtype=torch.long)).shape == (0, 8)
