"""runtime/ssm.py: every fast kernel against the token-by-token reference it shares a contract with.

Chunked prefill == sequential scan (any chunk size, lengths not a multiple of it, with and without an
initial state), decode steps == the scan, split prefills == one prefill, causal conv with a rolling
state == one conv over the whole sequence (also for pieces shorter than the kernel).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import ssm


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def largest_state(x, dt, A, B, h0) -> float:
    """The largest |h_t| on the way through a Mamba-1 scan: the scale fp32 rounding of the final state is
    relative to when the state decays (a final state of 1e-3 carries the rounding of the 1.0 it came from)."""
    h, top = h0.double(), h0.abs().max().item()
    for i in range(x.shape[1]):
        h = torch.exp(dt[:, i, :, None].double() * A.double()) * h \
            + (dt[:, i] * x[:, i]).double()[:, :, None] * B[:, i, None, :].double()
        top = max(top, h.abs().max().item())
    return top


def mamba1_inputs(b, t, d, n, seed=0, dt_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g)
    dt = F.softplus(torch.randn(b, t, d, generator=g)) * dt_scale
    A = -torch.exp(torch.randn(d, n, generator=g))
    B, C = torch.randn(b, t, n, generator=g), torch.randn(b, t, n, generator=g)
    D = torch.randn(d, generator=g)
    h0 = torch.randn(b, d, n, generator=g)
    return x, dt, A, B, C, D, h0


def mamba2_inputs(b, t, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, t, h, generator=gen))
    A = -torch.exp(torch.randn(h, generator=gen))
    B, C = torch.randn(b, t, g, n, generator=gen), torch.randn(b, t, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    h0 = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, D, h0


@pytest.mark.parametrize("t", [1, 3, 37, 300])
@pytest.mark.parametrize("chunk", [1, 4, 64, 128])
@pytest.mark.parametrize("with_state", [False, True])
def test_selective_scan_chunked_matches_sequential(t, chunk, with_state):
    x, dt, A, B, C, D, h0 = mamba1_inputs(2, t, 12, 5, seed=t + chunk)
    s_ref = h0.clone() if with_state else None
    s_fast = h0.clone() if with_state else None
    y_ref, h_ref = ssm.selective_scan_ref(x, dt, A, B, C, D, s_ref)
    y, h = ssm.selective_scan(x, dt, A, B, C, D, s_fast, chunk=chunk)
    assert rel(y, y_ref) < 1e-5
    assert rel(h, h_ref) < 1e-5
    if with_state:  # the given state is overwritten in place with the final state
        assert rel(s_fast, h_ref) < 1e-5 and rel(s_ref, h_ref) == 0


def test_selective_scan_survives_large_decays():
    """dt * A of hundreds per chunk: a log-space cumsum would overflow; the product tree must not."""
    x, dt, A, B, C, D, h0 = mamba1_inputs(1, 200, 8, 4, seed=3, dt_scale=40.0)
    y_ref, h_ref = ssm.selective_scan_ref(x, dt, A, B, C, D, h0.clone())
    y, h = ssm.selective_scan(x, dt, A, B, C, D, h0.clone(), chunk=128)
    assert torch.isfinite(y).all()
    assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 70), chunk=st.sampled_from([1, 2, 8, 16, 32]), d=st.integers(1, 6),
       n=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_selective_scan_property(t, chunk, d, n, seed):
    x, dt, A, B, C, D, h0 = mamba1_inputs(1, t, d, n, seed=seed)
    y_ref, h_ref = ssm.selective_scan_ref(x, dt, A, B, C, D, h0.clone())
    y, h = ssm.selective_scan(x, dt, A, B, C, D, h0.clone(), chunk=chunk)
    assert rel(y, y_ref) < 1e-5
    assert float((h - h_ref).abs().max()) < 1e-5 * largest_state(x, dt, A, B, h0)


def test_selective_scan_state_error_is_relative_to_its_history():
    """Found by hypothesis: one state element decays to 1.7e-3 over 61 steps; the chunk-1 scan's final state
    differs from the reference by 1.3e-7, i.e. fp32 rounding of the ~1.0 it held earlier (7.7e-5 of itself)."""
    x, dt, A, B, C, D, h0 = mamba1_inputs(1, 61, 1, 1, seed=1300)
    y_ref, h_ref = ssm.selective_scan_ref(x, dt, A, B, C, D, h0.clone())
    y, h = ssm.selective_scan(x, dt, A, B, C, D, h0.clone(), chunk=1)
    scale = largest_state(x, dt, A, B, h0)
    assert h_ref.abs().max() < 0.01 * scale  # the decayed case this test is about
    assert rel(y, y_ref) < 1e-5 and float((h - h_ref).abs().max()) < 1e-5 * scale


def test_selective_step_and_split_prefill_match_scan():
    x, dt, A, B, C, D, h0 = mamba1_inputs(2, 40, 10, 6, seed=1)
    y_ref, h_ref = ssm.selective_scan_ref(x, dt, A, B, C, D, h0.clone())
    state = h0.clone()
    ys = [ssm.selective_step(x[:, i], dt[:, i], A, B[:, i], C[:, i], D, state) for i in range(40)]
    assert rel(torch.stack(ys, 1), y_ref) < 1e-5 and rel(state, h_ref) < 1e-5
    state = h0.clone()  # a second "turn" continues from the first one's final state
    parts = [ssm.selective_scan(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], D, state, chunk=8)[0]
             for a, b in [(0, 3), (3, 4), (4, 31), (31, 40)]]
    assert rel(torch.cat(parts, 1), y_ref) < 1e-5 and rel(state, h_ref) < 1e-5


@pytest.mark.parametrize("t", [1, 3, 37, 300])
@pytest.mark.parametrize("chunk", [1, 16, 256])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_ssd_scan_chunked_matches_sequential(t, chunk, groups):
    x, dt, A, B, C, D, h0 = mamba2_inputs(2, t, 8, 3, groups, 5, seed=t + chunk + groups)
    y_ref, h_ref = ssm.ssd_scan_ref(x, dt, A, B, C, D, h0.clone())
    state = h0.clone()
    y, h = ssm.ssd_scan(x, dt, A, B, C, D, state, chunk=chunk)
    assert rel(y, y_ref) < 1e-5 and rel(state, h_ref) < 1e-5 and h is state
    y0_ref, h0_ref = ssm.ssd_scan_ref(x, dt, A, B, C, D)
    y0, h0_fast = ssm.ssd_scan(x, dt, A, B, C, D, chunk=chunk)
    assert rel(y0, y0_ref) < 1e-5 and rel(h0_fast, h0_ref) < 1e-5


def test_ssd_scan_decays_exact_and_survives_large_ones():
    """The decay matrix against each sum taken in float64 (l >= s; 0 above the diagonal), for sums from ~1e-4 to
    hundreds per chunk, and the whole scan with decays that large: finite, and equal to the sequential one."""
    gen = torch.Generator().manual_seed(5)
    for scale in (1e-4, 0.05, 1.0, 40.0):
        a = -torch.rand(2, 3, 64, generator=gen) * scale
        d = a.double()
        want = torch.zeros(2, 3, 64, 64, dtype=torch.float64)
        for i in range(64):
            for j in range(i + 1):
                want[..., i, j] = torch.exp(d[..., j + 1:i + 1].sum(-1).clamp(min=ssm.EXP_FLOOR))
        got, cum = ssm._decays(a)
        assert torch.equal(cum, a.cumsum(-1))  # the scan's cumulative sums, as torch's own
        assert got.dtype == torch.float32 and (got.triu(1) == 0).all()
        assert float(((got.double() - want).abs() / want.clamp_min(1e-30)).max()) < 2e-6  # float32 exp
    x, dt, A, B, C, D, h0 = mamba2_inputs(1, 150, 4, 3, 2, 5, seed=9)
    dt = dt * 40.0  # dt A of tens to hundreds a step
    y_ref, h_ref = ssm.ssd_scan_ref(x, dt, A, B, C, D, h0.clone())
    y, h = ssm.ssd_scan(x, dt, A, B, C, D, h0.clone(), chunk=64)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5


def test_ssd_step_and_split_prefill_match_scan():
    x, dt, A, B, C, D, h0 = mamba2_inputs(1, 50, 6, 4, 3, 7, seed=2)
    y_ref, h_ref = ssm.ssd_scan_ref(x, dt, A, B, C, D, h0.clone())
    state = h0.clone()
    ys = [ssm.ssd_step(x[:, i], dt[:, i], A, B[:, i], C[:, i], D, state) for i in range(50)]
    assert rel(torch.stack(ys, 1), y_ref) < 1e-5 and rel(state, h_ref) < 1e-5
    state = h0.clone()
    parts = [ssm.ssd_scan(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], D, state, chunk=16)[0]
             for a, b in [(0, 1), (1, 4), (4, 41), (41, 50)]]
    assert rel(torch.cat(parts, 1), y_ref) < 1e-5 and rel(state, h_ref) < 1e-5


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("pieces", [[1, 1, 1, 1, 1, 1, 1], [2, 5], [1, 3, 3], [7]])
def test_causal_conv_rolling_state(k, pieces):
    g = torch.Generator().manual_seed(k)
    c, t = 6, sum(pieces)
    x, w = torch.randn(2, c, t, generator=g), torch.randn(c, k, generator=g)
    bias = torch.randn(c, generator=g)
    full = ssm.causal_conv1d(x.transpose(1, 2), w, bias).transpose(1, 2)  # it takes (B, T, C)
    ref = F.conv1d(F.pad(x, (k - 1, 0)), w[:, None, :], bias, groups=c)  # zero history before the first token
    assert rel(full, ref) < 1e-6
    state, out, s = torch.zeros(2, c, k - 1), [], 0
    for n in pieces:  # pieces shorter than the kernel must still see the right history
        out.append(ssm.causal_conv1d(x[..., s : s + n].transpose(1, 2), w, bias, state).transpose(1, 2))
        s += n
    assert rel(torch.cat(out, -1), full) < 1e-6
    assert torch.equal(state, F.pad(x, (k - 1, 0))[..., t : t + k - 1])
    state = torch.zeros(2, c, k - 1)
    steps = torch.stack([ssm.conv1d_step(x[..., i], w, bias, state) for i in range(t)], -1)
    assert rel(steps, full) < 1e-6


def test_decay_exp_compiled_is_within_3e7_of_exp():
    """The compiled decode step's exp for decays: relative error under 3e-7 down to -87, then ~1e-38."""
    g = torch.Generator().manual_seed(0)
    v = torch.cat([-torch.rand(20000, generator=g) * 87, torch.tensor([0.0, -1e-9, -87.0])])
    with torch.inference_mode():
        got = torch.compile(ssm.decay_exp, fullgraph=True, dynamic=False)(v)
        far = torch.compile(ssm.decay_exp, fullgraph=True, dynamic=False)(torch.tensor([-100.0, -1e4]))
    assert ((got - torch.exp(v)).abs() / torch.exp(v)).max() < 3e-7
    assert got[-3] == 1.0 and (far >= 0).all() and (far < 2e-38).all()
    assert torch.equal(ssm.decay_exp(v), torch.exp(v))  # eager: torch's exp
