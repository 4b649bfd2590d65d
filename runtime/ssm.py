"""State-space kernels in plain PyTorch: causal depthwise conv, Mamba-1 selective scan, Mamba-2 SSD scan.

Every scan comes three ways with one contract:

    *_ref     the recurrence written out token by token: the reference the fast versions are tested against
    *_scan    chunked parallel prefill: a Python loop only over chunks, all work inside a chunk vectorized
    *_step    one decode token, updating the state in place

    selective_scan_ref / selective_scan / selective_step      Mamba-1 (A per channel and state: (D, N))
    ssd_scan_ref / ssd_scan / ssd_step                        Mamba-2 (A per head: (H,), B/C per group)
    causal_conv1d / conv1d_step                               depthwise causal conv with a rolling state

A scan takes the initial state (None: zeros), overwrites it in place with the final state when one is
given, and returns (y, final_state); so a second chat turn prefills from where the first one stopped.
Inputs are float32 (callers cast); `dt` is already discretized (softplus'd, biased, clamped).

Legend: B batch, T tokens, L tokens in a chunk, D inner channels, N state size, C conv channels,
K conv kernel, H heads, P head dim, G groups (B/C shared by H/G heads), R heads per group, E hidden,
V vocab.

The modules the SSM architectures share are built on these kernels:

    MambaMixer        the Mamba-1 selective-SSM mixer (Mamba, Falcon-Mamba, and Jamba's Mamba layers)
    ssm_block_step    one token through a pre-norm SSM block, as one compiled graph (runtime/compile.py)
    SSMBlock          norm -> mixer -> residual
    SSMModel          the pure-SSM language model (backbone.embeddings, layers, norm_f, lm_head) with a
                      mixer its subclass makes: models/mamba.py (MambaMixer), models/mamba2.py (its own)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.cache import SSMState
from runtime.compile import MISS, Chain, graph
from runtime.layers import RMSNorm, embedding, few_rows_linear, input_dtype, rms_normalize
from runtime.models.base import LanguageModel

MAMBA1_CHUNK = 32  # power of two (the in-chunk scan is a Blelloch tree); small chunks stay in cache
MAMBA2_CHUNK = 64  # the intra-chunk work grows with the chunk; 64 measured fastest on CPU


# ---------------------------------------------------------------- causal depthwise conv


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None,
                  state: Tensor | None = None) -> Tensor:
    """Depthwise causal conv over time, no activation. x : (B, T, C) -> (B, T, C), weight : (C, K),
    state : (B, C, K-1).

    With a state, the state's K-1 inputs precede x and the state is overwritten with the last K-1
    inputs seen (which may still include old ones when T < K-1). Computed as K shifted multiply-adds
    on the time-major activations the projections produce: 1.8x faster than transposing for
    F.conv1d (2048 x 1792: 11 vs 20 ms), and what follows gets contiguous rows.
    """
    b, t, c = x.shape
    k = weight.shape[1]
    hist = state.transpose(1, 2) if state is not None else x.new_zeros(b, k - 1, c)
    xx = torch.cat([hist.to(x.dtype), x], dim=1)  # (B, K-1+T, C)
    if state is not None and k > 1:
        state.copy_(xx[:, t:].transpose(1, 2))
    last = xx[:, k - 1 :]
    y = last * weight[:, -1] if bias is None else torch.addcmul(bias, last, weight[:, -1])
    for j in range(k - 1):
        y.addcmul_(xx[:, j : j + t], weight[:, j])
    return y


def conv1d_step(x: Tensor, weight: Tensor, bias: Tensor | None,
                state: Tensor) -> Tensor:
    """One token of causal_conv1d. x : (B, C), weight : (C, K), state : (B, C, K-1) rolled in place."""
    k = weight.shape[1]
    y = x * weight[:, -1]
    if k > 1:
        y += torch.einsum("bck,ck->bc", state, weight[:, :-1])
        for j in range(k - 2):  # shift left by one; column j+1 is read before it is written
            state[:, :, j].copy_(state[:, :, j + 1])
        state[:, :, -1].copy_(x)
    if bias is not None:
        y += bias
    return y


# ---------------------------------------------------------------- Mamba-1 selective scan
#   h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t        h : (B, D, N)
#   y_t = h_t C_t + D x_t


def selective_scan_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    # x, dt : (B, T, D); A : (D, N); B, C : (B, T, N); D : (D,); state : (B, D, N)
    b, t, d = x.shape
    h = state.clone() if state is not None else x.new_zeros(b, d, A.shape[1])
    ys = []
    for i in range(t):
        h = torch.exp(dt[:, i, :, None] * A) * h + (dt[:, i] * x[:, i])[:, :, None] * B[:, i, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, i]))
    y = torch.stack(ys, dim=1) + x * D
    if state is not None:
        state.copy_(h)
    return y, h


def _blelloch(a: Tensor, u: Tensor) -> None:
    """In-place inclusive scan of h_t = a_t * h_{t-1} + u_t along dim 1 (h_{-1} = 0); u becomes h.

    a, u : (B, L, ...) with L a power of two. Up-sweep builds block aggregates, down-sweep fills in the
    prefixes: 2 log2(L) vectorized steps, O(L) work, only products of decays (no division, no overflow).
    """
    b, n = a.shape[0], a.shape[1]
    rest = a.shape[2:]
    s = 1
    while s < n:  # up-sweep: the last element of each 2s-block absorbs its first half
        av, uv = a.view(b, n // (2 * s), 2 * s, *rest), u.view(b, n // (2 * s), 2 * s, *rest)
        uv[:, :, -1].addcmul_(av[:, :, -1], uv[:, :, s - 1])
        av[:, :, -1].mul_(av[:, :, s - 1])
        s *= 2
    s = n // 4
    while s >= 1:  # down-sweep: the mid element of each 2s-block takes the prefix ending just before it
        av, uv = a.view(b, n // (2 * s), 2 * s, *rest), u.view(b, n // (2 * s), 2 * s, *rest)
        uv[:, 1:, s - 1].addcmul_(av[:, 1:, s - 1], uv[:, :-1, -1])
        s //= 2


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor, state: Tensor | None = None,
                   chunk: int = MAMBA1_CHUNK) -> tuple[Tensor, Tensor]:
    """selective_scan_ref, vectorized within chunks of `chunk` tokens (a power of two)."""
    # x, dt : (B, T, D); A : (D, N); B, C : (B, T, N); D : (D,); state : (B, D, N)
    b, t, d = x.shape
    n = A.shape[1]
    h = state if state is not None else x.new_zeros(b, d, n)
    y = torch.empty_like(x)
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        n_t = e - s
        size = 1 << (n_t - 1).bit_length()  # the chunk padded to a power of two
        a, u = x.new_empty(b, size, d, n), x.new_empty(b, size, d, n)  # (B, L, D, N)
        a[:, n_t:], u[:, n_t:] = 1.0, 0.0  # padding: a = 1, u = 0 leaves the prefixes before it unchanged
        torch.mul(dt[:, s:e, :, None], A, out=a[:, :n_t]).exp_()
        torch.mul((dt[:, s:e] * x[:, s:e])[..., None], B[:, s:e, None, :], out=u[:, :n_t])
        u[:, 0].addcmul_(a[:, 0], h)  # fold the carried state into the first step
        _blelloch(a, u)  # u : (B, L, D, N) now holds h_t
        y[:, s:e] = torch.einsum("bldn,bln->bld", u[:, :n_t], C[:, s:e])
        h = u[:, n_t - 1]  # (B, D, N)
    y.addcmul_(x, D)
    if state is not None:
        state.copy_(h)
        h = state
    return y, h


_LOG2E, _LN2_HI, _LN2_LO = 1.4426950408889634, 0.693145751953125, 1.428606765330187e-06


def decay_exp(v: Tensor) -> Tensor:
    """exp(v) for decays v <= 0 within 3e-7 relative (1e-38 absolute below -87), as a polynomial that a compiled
    step fuses into a few vector instructions: 2^n p(r), n = round(v log2 e), r = v - n ln 2, p degree 6.
    Mamba-1's step takes D x N exps (1536 x 16 for mamba-130m); torch's exp (Sleef, 1 ulp) was half its scan
    kernel: 24.5 -> 15.5-19.4 us a layer, mamba-130m's step p25 7.12 -> 6.95 ms. Eagerly (a dozen ops)
    torch.exp is faster: used when compiling."""
    if not torch.compiler.is_compiling():
        return torch.exp(v)
    v = v.clamp(min=-87.0)
    n = torch.round(v * _LOG2E)
    r = v - n * _LN2_HI - n * _LN2_LO
    p = 1.0 + r * (1.0 + r * (0.5 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720))))))
    return p * ((n.to(torch.int32) + 127) << 23).view(torch.float32)


def selective_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor, state: Tensor) -> Tensor:
    """One token. x, dt : (B, D); B, C : (B, N); state : (B, D, N) updated in place; returns y : (B, D)."""
    state.mul_(decay_exp(dt[:, :, None] * A)).addcmul_((dt * x)[:, :, None], B[:, None, :])
    return torch.bmm(state, C[:, :, None]).squeeze(-1).addcmul_(x, D)


# ---------------------------------------------------------------- Mamba-2 SSD scan
#   h_t = exp(dt_t A_h) * h_{t-1} + dt_t x_t B_t^T    h : (B, H, P, N), A scalar per head
#   y_t = h_t C_t + D_h x_t


def ssd_scan_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    # x : (B, T, H, P); dt : (B, T, H); A, D : (H,); B, C : (B, T, G, N); state : (B, H, P, N)
    b, t, nh, p = x.shape
    rep = nh // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)  # (B, T, H, N)
    h = state.clone() if state is not None else x.new_zeros(b, nh, p, B.shape[3])
    ys = []
    for i in range(t):
        decay = torch.exp(dt[:, i] * A)[:, :, None, None]  # (B, H, 1, 1)
        h = decay * h + (dt[:, i, :, None] * x[:, i])[..., None] * Bh[:, i, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, i]))
    y = torch.stack(ys, dim=1) + x * D[:, None]
    if state is not None:
        state.copy_(h)
    return y, h


EXP_FLOOR = -60.0  # exp() of anything lower is < 1e-26: clamped so exp never makes (slow) denormals


def _decays(a: Tensor) -> tuple[Tensor, Tensor]:
    """a : (..., L)  ->  the decay matrix (..., L, L): [l, s] = exp(a[s+1] + ... + a[l]) for l >= s, 0 above the
    diagonal; and the cumulative sums of a (..., L), both in a's dtype.

    One cumulative sum in float64 serves both. The matrix's sums are its differences: exact to ~1e-16 of the
    chunk's total, so the decays between nearby positions deep into a chunk keep float32's precision
    (differences of a float32 cumsum would lose it). On the CPU these are the same floats as the sums taken
    directly, a masked cumsum over (L, L), and the cumulative sums the same as a.cumsum (torch accumulates a
    float32 cumsum in float64), at half the cost: mamba2-130m's 24 heads of a 64-chunk 215 -> 121 us. a <= 0,
    so the float64 cumsum never rises and each kept sum is <= 0; above the diagonal the differences are >= 0,
    clamped to 0 before exp and zeroed after.
    """
    cum = a.double().cumsum(-1)
    seg = torch.sub(cum[..., :, None], cum[..., None, :]).to(a.dtype)  # [l, s] = a[s+1] + ... + a[l]
    decay = seg.clamp_(min=EXP_FLOOR, max=0.0).exp_().mul_(_lower_mask(a.shape[-1], a.dtype, a.device))
    return decay, cum.to(a.dtype)


_LOWER_MASKS: dict[tuple, Tensor] = {}


def _lower_mask(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """_decays' multiplier: 1 where l >= s, else 0."""
    key = (n, dtype, device)
    if key not in _LOWER_MASKS:
        _LOWER_MASKS[key] = torch.ones(n, n, dtype=torch.bool, device=device).tril().to(dtype)
    return _LOWER_MASKS[key]


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             D: Tensor, state: Tensor | None = None,
             chunk: int = MAMBA2_CHUNK) -> tuple[Tensor, Tensor]:
    """ssd_scan_ref by the SSD chunk algorithm (ssd_minimal_discrete), one chunk at a time.

    Per chunk: 1. intra-chunk outputs (a masked, decayed C B^T "attention", per head), 2. the carried state's
    contribution, 3. the state at the chunk's end. The loop over chunks is the inter-chunk recurrence.
    The state goes through the chunks as (B G, N, R P) (the heads of a group side by side), so 2 and 3 are
    plain matrix products, (L, N) @ (N, R P) and (N, L) @ (L, R P), the second one accumulated into the
    state in place; the carried part is made in y's own layout and the intra-chunk part added to it. Against
    einsums over (B, H, P, N) states: one layer's scan of a 2,048-token prompt, mamba2-130m 79 -> 63 ms,
    Codestral-Mamba-7B's 128 heads at 512 tokens 80 -> 71 ms (docs/performance.md, session 17).
    """
    # x : (B, T, H, P); dt : (B, T, H); A, D : (H,); B, C : (B, T, G, N); state : (B, H, P, N)
    b, t, nh, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = nh // g
    h0 = state if state is not None else x.new_zeros(b, nh, p, n)
    h = h0.view(b * g, r * p, n).transpose(1, 2).contiguous()  # (B G, N, R P), a copy
    y = torch.empty_like(x)
    Bt, Ct = B.transpose(1, 2), C.transpose(1, 2)  # (B, G, T, N)
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        L = e - s
        xdt = (x[:, s:e] * dt[:, s:e, :, None]).view(b, L, g, r, p)
        Bc, Cc = Bt[:, :, s:e].reshape(b * g, L, n), Ct[:, :, s:e].reshape(b * g, L, n)  # (B G, L, N)
        dA = (dt[:, s:e] * A).transpose(1, 2)  # (B, H, L)
        decay, cum = _decays(dA)  # (B, H, L, L), (B, H, L)
        # 1. intra-chunk: y_l = sum_{s<=l} (C_l . B_s) exp(dA_{s+1} + ... + dA_l) dt_s x_s
        scores = torch.bmm(Cc, Bc.transpose(1, 2)).view(b, g, 1, L, L) * decay.view(b, g, r, L, L)
        yc = torch.matmul(scores, xdt.permute(0, 2, 3, 1, 4))  # (B, G, R, L, P)
        # 2. carried state: y_l += exp(cum_l) C_l h
        out = torch.bmm(Cc, h).view(b, g, L, r, p)
        grow = cum.clamp(min=EXP_FLOOR).exp_().view(b, g, r, L).transpose(2, 3)  # (B, G, L, R)
        out.mul_(grow[..., None]).add_(yc.transpose(2, 3))
        y[:, s:e] = out.permute(0, 2, 1, 3, 4).reshape(b, L, nh, p)
        # 3. state at the chunk's end: exp(cum_L) h + sum_s exp(cum_L - cum_s) dt_s x_s B_s^T
        w = (cum[:, :, -1:] - cum).clamp_(min=EXP_FLOOR).exp_().view(b, g, r, L).permute(0, 3, 1, 2)  # (B, L, G, R)
        wx = (xdt * w[..., None]).transpose(1, 2).reshape(b * g, L, r * p)
        h.view(b * g, n, r, p).mul_(torch.exp(cum[:, :, -1]).view(b * g, 1, r, 1))
        h.baddbmm_(Bc.transpose(1, 2), wx)
    y += x * D[:, None]
    h = h.transpose(1, 2).reshape(b, nh, p, n)
    if state is not None:
        state.copy_(h)
        h = state
    return y, h


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             D: Tensor, state: Tensor) -> Tensor:
    """One token. x : (B, H, P); dt : (B, H); B, C : (B, G, N); state : (B, H, P, N) updated in place."""
    b, nh, p = x.shape
    g, n = B.shape[1], B.shape[2]
    hg = state.view(b, g, nh // g, p, n)
    decay = torch.exp(dt * A).view(b, g, nh // g, 1)
    dtx = (dt[:, :, None] * x).view(b, g, nh // g, p)
    # y = new state . C, written from the old state: h . (decay C) + dtx * (B . C) (reading the new state for y
    # made inductor write it to a temporary, copy it back and read it again: 2x the time, state-bound). The
    # decay inside the sum keeps the reduction's loops per head like the update's (pulled out, inductor
    # merged heads and dims into one loop and could not fuse the two): the compiled step then reads each
    # state row for y and updates it while it is in L1, one pass over the state instead of two.
    y = (hg * (decay[..., None] * C.view(b, g, 1, 1, n))).sum(-1) + dtx * (B * C).sum(-1).view(b, g, 1, 1)
    hg.mul_(decay[..., None]).addcmul_(dtx[..., None], B.view(b, g, 1, 1, n))
    return y.view(b, nh, p).addcmul_(x, D[:, None])


# ---------------------------------------------------------------- modules


class MambaMixer(nn.Module):
    """Selective SSM mixer. bcdt_norm: None (Mamba), "weightless" (Falcon-Mamba), "weighted" (Jamba).

        in_proj      (2D, E)      -> x, z (gate)
        conv1d       (D, 1, K)    depthwise causal conv (+ bias)
        x_proj       (R + 2N, D)  -> dt (low rank, R), B, C
        dt_proj      (D, R) + (D,)
        A_log, D     (D, N), (D,)
        out_proj     (E, D)
        [dt|b|c]_layernorm        Jamba only: RMSNorms on dt, B, C (Falcon-Mamba: the same, weightless)
    """

    def __init__(self, hidden: int, inner: int, state: int, rank: int, kernel: int, bias: bool,
                 conv_bias: bool, bcdt_norm: str | None = None, norm_eps: float = 1e-6):
        super().__init__()
        self.inner, self.state, self.rank, self.kernel = inner, state, rank, kernel
        self.bcdt_norm, self.norm_eps = bcdt_norm, norm_eps
        self.in_proj = nn.Linear(hidden, 2 * inner, bias=bias)
        self.conv1d = nn.Conv1d(inner, inner, kernel, groups=inner, padding=kernel - 1, bias=conv_bias)
        self.x_proj = nn.Linear(inner, rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, state))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, hidden, bias=bias)
        if bcdt_norm == "weighted":
            self.dt_layernorm = RMSNorm(rank, norm_eps)
            self.b_layernorm = RMSNorm(state, norm_eps)
            self.c_layernorm = RMSNorm(state, norm_eps)

    def make_state(self, batch: int) -> SSMState:
        dev = self.A_log.device
        return SSMState(torch.zeros(batch, self.inner, self.kernel - 1, device=dev),
                        torch.zeros(batch, self.inner, self.state, device=dev))

    def _dt_b_c(self, x: Tensor, one_token: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        # x : (..., D) float32  ->  dt : (..., D), B, C : (..., N), float32
        proj = self.x_proj(x.to(input_dtype(self.x_proj)))  # (..., R + 2N)
        dt, B, C = proj.split([self.rank, self.state, self.state], dim=-1)
        if self.bcdt_norm == "weighted":
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        elif self.bcdt_norm == "weightless":
            eps = self.norm_eps
            dt, B, C = rms_normalize(dt, eps, dt.dtype), rms_normalize(B, eps, B.dtype), rms_normalize(C, eps, C.dtype)
        small = few_rows_linear(dt, self.dt_proj) if one_token else None
        if small is not None:
            dt = F.softplus(small)
        elif self.dt_proj.weight.dtype == torch.float16 and dt.dtype == torch.float32:  # F16 as stored: widened
            dt = F.softplus(F.linear(dt, self.dt_proj.weight.float(), self.dt_proj.bias))
        else:
            dt = F.softplus(self.dt_proj(dt.to(input_dtype(self.dt_proj))).float())
        return dt, B.float(), C.float()

    decode_A: Tensor | None = None  # A kept while compiled decode steps are on (keep_decode_A)

    def keep_decode_A(self, on: bool) -> None:
        """Keep A = -exp(A_log) (D, N) computed once for the decode steps (runtime/compile.py), or drop it."""
        with torch.no_grad():
            self.decode_A = -torch.exp(self.A_log.float()) if on else None

    def _conv_a(self) -> tuple[Tensor, Tensor | None, Tensor]:
        conv_w = self.conv1d.weight[:, 0].float()  # (D, K)
        conv_b = self.conv1d.bias.float() if self.conv1d.bias is not None else None
        A = self.decode_A if self.decode_A is not None else -torch.exp(self.A_log.float())  # (D, N)
        return conv_w, conv_b, A

    def forward(self, h: Tensor, cache: SSMState | None = None) -> Tensor:
        # h : (B, T, E)  ->  (B, T, E)
        t = h.shape[1]
        if cache is not None and t == 1:
            cache.offset += 1
            return self.step(h[:, 0], cache.conv, cache.ssm).unsqueeze(1)
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (B, T, D) each
        conv_w, conv_b, A = self._conv_a()
        conv_state, ssm_state = (cache.conv, cache.ssm) if cache is not None else (None, None)
        x = F.silu(causal_conv1d(x.float(), conv_w, conv_b, conv_state))  # (B, T, D) float32
        dt, B, C = self._dt_b_c(x)
        y, _ = selective_scan(x, dt, A, B, C, self.D.float(), ssm_state)
        if cache is not None:
            cache.offset += t
        return self.out_proj((y * F.silu(z.float())).to(input_dtype(self.out_proj)))

    def step(self, h: Tensor, conv: Tensor, state: Tensor) -> Tensor:
        """One token: h (B, E) -> (B, E); conv (B, D, K-1) and state (B, D, N) updated in place."""
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (B, D) each
        conv_w, conv_b, A = self._conv_a()
        x = F.silu(conv1d_step(x.float(), conv_w, conv_b, conv))
        dt, B, C = self._dt_b_c(x, one_token=True)
        y = selective_step(x, dt, A, B, C, self.D.float(), state)
        return self.out_proj((y * F.silu(z.float())).to(input_dtype(self.out_proj)))


def ssm_residual(norm: RMSNorm, mixer: nn.Module, h: Tensor, conv: Tensor, state: Tensor) -> Tensor:
    """h + the mixer's one-token step on norm(h): h (B, 1, E); conv and state updated in place."""
    return h + mixer.step(norm(h.to(norm.weight.dtype))[:, 0], conv, state).unsqueeze(1)


@graph
def ssm_block_step(norm: RMSNorm, mixer: nn.Module, h: Tensor, conv: Tensor, state: Tensor) -> Tensor:
    """One token through a pre-norm SSM block (Mamba-1, Mamba-2, Jamba's Mamba layers): h (B, 1, E)."""
    return ssm_residual(norm, mixer, h, conv, state)


@graph
def ssm_ffn_block_step(norm: RMSNorm, mixer: nn.Module, h: Tensor, conv: Tensor, state: Tensor, norm_ff: RMSNorm,
                       ffn: nn.Module) -> Tensor:
    """ssm_block_step and then a pre-norm feed-forward block (Jamba's Mamba layers), as one graph."""
    h = ssm_residual(norm, mixer, h, conv, state)
    return h + ffn(norm_ff(h))


def bound_step(step: Callable, cache: SSMState, args: tuple) -> Tensor:
    """step(*args) for a compiled one-token SSM block step whose third argument is the activations: through
    the Bound call kept on the layer's state (runtime/compile.py), which skips the module-call and input
    checks of a direct call where every other argument is the same object as before; bound again after
    any other call (a new state, a recompile)."""
    if cache.bound is not None:
        out = cache.bound(args)
        if out is not MISS:
            return out
    out = step(*args)
    cache.bound = step.bind(args, 2, out)
    return out


class SSMBlock(nn.Module):
    def __init__(self, a, mixer: nn.Module):
        super().__init__()
        self.norm = RMSNorm(a.hidden_size, a.layer_norm_epsilon)
        self.mixer = mixer

    compiled_step = False  # runtime/compile.py: one-token steps through a compiled graph

    def forward(self, h: Tensor, cache: SSMState | None) -> Tensor:
        if self.compiled_step and cache is not None and h.shape[1] == 1:
            cache.offset += 1
            return bound_step(ssm_block_step, cache, (self.norm, self.mixer, h, cache.conv, cache.ssm))
        return h + self.mixer(self.norm(h.to(self.norm.weight.dtype)), cache)


class SSMBackbone(nn.Module):
    def __init__(self, a, make_mixer):
        super().__init__()
        self.embeddings = embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(SSMBlock(a, make_mixer(a)) for _ in range(a.num_hidden_layers))
        self.norm_f = RMSNorm(a.hidden_size, a.layer_norm_epsilon)


class SSMModel(LanguageModel):
    """The pure-SSM language model; a subclass supplies make_mixer(args) (and its checkpoints' quirks).

    Args fields read here: vocab_size, hidden_size, num_hidden_layers, layer_norm_epsilon,
    residual_in_fp32, tie_word_embeddings. Cache: one SSMState per layer (the mixer's make_state).
    """

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.backbone = SSMBackbone(args, self.make_mixer)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @staticmethod
    def make_mixer(a) -> nn.Module:
        raise NotImplementedError

    def input_embedding(self) -> nn.Module:
        return self.backbone.embeddings

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    def forward(self, tokens: Tensor, cache: list | None = None, last_only: bool = False) -> Tensor:
        # tokens : (B, T)  ->  logits : (B, T, V) float32
        h = self.embed(tokens)
        if self.args.residual_in_fp32:
            h = h.float()
        h = self.through_blocks(h, cache, lambda layer, h, c: layer(h, c))
        if last_only:
            h = h[:, -1:]
        return self.head_logits(self.backbone.norm_f, h)

    def make_cache(self, batch: int = 1, max_len: int | None = None) -> list:
        return [layer.mixer.make_state(batch) for layer in self.backbone.layers]

    def make_chain(self, cache: list) -> tuple | None:
        """Every block's compiled step bound to its state (bound_step), as one Chain."""
        if not self.backbone.layers[0].compiled_step:
            return None
        same = tuple(x for layer, c in zip(self.backbone.layers, cache, strict=True)
                     for x in (layer.norm, layer.mixer, c.conv, c.ssm))
        return Chain.of([c.bound for c in cache], same), [], self.backbone.layers

    @staticmethod
    def sanitize(weights: dict[str, Tensor], args) -> dict[str, Tensor]:
        """mamba_ssm's `backbone.embedding` -> `backbone.embeddings`; the tied head."""
        out = {name.replace("backbone.embedding.", "backbone.embeddings.", 1)
               if name.startswith("backbone.embedding.") else name: t for name, t in weights.items()}
        if args.tie_word_embeddings and "backbone.embeddings.weight" in out:
            out["lm_head.weight"] = out["backbone.embeddings.weight"]
        return out
