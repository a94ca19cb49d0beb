"""Linear-time sequence mixers: RWKV-4 time-mix / channel-mix (Peng et al. 2023) and Mamba's
selective state-space block (Gu & Dao 2023).

Instead of attending to every past token, each layer folds the past into a fixed-size state, so
generation carries O(1) memory per token instead of a growing KV cache. Every mixer has two forms:

- the sequence form (training, prompt prefill) processes (B, T, C) at once; it may start from a
  carried state and leaves the final state behind;
- the recurrent form is the same call with T = 1 and a state, which is how decoding runs.

Tests prove both give the same outputs (fp32, 1e-4). `state` is a dict of this layer's tensors
(views into an `llmkit.inference.state_cache.StateCache`), updated in place. `mask` (B, T) marks
real tokens (1) and padding (0): a padded position leaves the state exactly as it was, so a
left-padded prompt ends in the state it reaches alone.

The recurrences run in float32 whatever the autocast dtype: they add up contributions over the
whole sequence, and a bf16 running sum loses the small ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.layers.linear import Linear

NEG = -1e30  # log of "nothing": finite, so NEG - NEG is 0 where -inf - -inf would be NaN
WKV_CHUNK = 8  # RWKV positions handled as one quadratic block; see `wkv`


def token_shift(x: Tensor, last: Tensor | None) -> Tensor:
    """The previous position's input at every position: `last` (B, C) — the state's final token —
    or zeros before the first one."""
    first = last[:, None].to(x.dtype) if last is not None else x.new_zeros(x.shape[0], 1, x.shape[2])
    return torch.cat([first, x[:, :-1]], dim=1)


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask[..., None].to(x.dtype)


# ---- RWKV-4 --------------------------------------------------------------------------------------

def wkv_step(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor, Tensor]
             ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One token of RWKV-4's WKV: a softmax-like average of past values weighted by e^{k_i} and
    decayed by e^{-w} per step, the current token getting a bonus e^{u}.

    The state (num, den, p) stands for num·e^p = Σ_{i<t} e^{k_i-(t-1-i)w} v_i and den·e^p the same
    sum of weights; p is a running maximum exponent, so no e^{k} ever overflows. k, v: (B, C)."""
    num, den, p = state
    q = torch.maximum(p, u + k)
    a, b = torch.exp(p - q), torch.exp(u + k - q)
    out = (a * num + b * v) / (a * den + b)
    q = torch.maximum(p - w, k)  # the state one step later: decay the past, add this token
    a, b = torch.exp(p - w - q), torch.exp(k - q)
    return out, (a * num + b * v, a * den + b, q)


def wkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor, Tensor] | None = None
        ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """WKV over a whole sequence (B, T, C): the output of every position and the final state.

    Chunked: inside blocks of L = WKV_CHUNK positions every (query, key) weight is formed at once
    (L×L per channel, with an exact per-row maximum for stability), and only the block summaries are
    carried from block to block. On a CPU this does about L× the arithmetic of the token loop but in
    T/L steps instead of T, which is what makes training at context 256 practical.
    """
    B, T, C = k.shape
    L = min(WKV_CHUNK, T)
    pad = (-T) % L
    if state is None:
        state = (k.new_zeros(B, C), k.new_zeros(B, C), k.new_full((B, C), NEG))
    num0, den0, p0 = state
    if pad:  # pad in front with keys that weigh nothing; pre-scale the state for the extra decay
        k = torch.cat([k.new_full((B, pad, C), NEG), k], dim=1)
        v = torch.cat([v.new_zeros(B, pad, C), v], dim=1)
        p0 = p0 + pad * w
    n = (T + pad) // L
    kc, vc = k.view(B, n, L, C), v.view(B, n, L, C)
    # Exponents (B, n, L+1, L, C): row j < L is position j's output, key i < j decayed (j-1-i) steps,
    # key j with the bonus u; row L is the block's contribution to the state after the block.
    j = torch.arange(L + 1, device=k.device)[:, None, None]
    i = torch.arange(L, device=k.device)[None, :, None]
    offset = torch.where(i < j, -(j - 1 - i).clamp(min=0).to(k.dtype) * w, u)  # (L+1, L, C), no batch
    offset = offset.masked_fill(i > j, NEG)
    expo = kc[:, :, None] + offset
    m = expo.amax(dim=3)  # (B, n, L+1, C)
    weights = torch.exp(expo - m[:, :, :, None])
    inner_num = (weights * vc[:, :, None]).sum(dim=3)
    inner_den = weights.sum(dim=3)
    # Carry the state across blocks: S_{c+1} = e^{-Lw} S_c + block c's summary (row L).
    starts, carry = [], (num0, den0, p0)
    for c in range(n):
        starts.append(carry)
        num, den, p = carry
        q = torch.maximum(p - L * w, m[:, c, L])
        a, b = torch.exp(p - L * w - q), torch.exp(m[:, c, L] - q)
        carry = (a * num + b * inner_num[:, c, L], a * den + b * inner_den[:, c, L], q)
    s_num, s_den, s_p = (torch.stack(s, dim=1)[:, :, None] for s in zip(*starts))  # (B, n, 1, C)
    # Row j sees the block's starting state decayed j steps, plus its own in-block terms.
    p_row = s_p - torch.arange(L, device=k.device, dtype=k.dtype)[:, None] * w  # (B, n, L, C)
    q = torch.maximum(p_row, m[:, :, :L])
    a, b = torch.exp(p_row - q), torch.exp(m[:, :, :L] - q)
    out = (a * s_num + b * inner_num[:, :, :L]) / (a * s_den + b * inner_den[:, :, :L])
    return out.reshape(B, n * L, C)[:, pad:], carry


class RWKVTimeMix(nn.Module):
    """RWKV-4's attention replacement: receptance-gated WKV of token-shifted keys and values."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, a = cfg.d_model, cfg.rwkv_attention_dim
        self.layer, self.n_layers = layer, cfg.n_layers
        self.time_decay = nn.Parameter(torch.zeros(a))  # w = e^{time_decay}: per-channel decay per step
        self.time_first = nn.Parameter(torch.zeros(a))  # u: the current token's bonus
        # How much of the current token (vs the previous one) feeds keys, values and receptance.
        self.mix_k, self.mix_v, self.mix_r = (nn.Parameter(torch.zeros(d)) for _ in range(3))
        self.k_proj, self.v_proj, self.r_proj = (Linear(d, a, bias=False) for _ in range(3))
        self.o_proj = Linear(a, d, bias=False)

    @torch.no_grad()
    def reset_recurrent_parameters(self) -> None:
        """RWKV-4's initialisation: lower layers look more at the previous token, and channels span
        decay rates from e^-5 (remember long) to e^3 per step (forget at once)."""
        d, a = self.mix_k.numel(), self.time_decay.numel()
        depth = self.layer / max(self.n_layers - 1, 1)  # 0 → 1
        shallowness = 1.0 - self.layer / self.n_layers  # 1 → ~0
        ramp = torch.arange(d, dtype=torch.float32) / d
        self.mix_k.copy_(ramp ** shallowness)
        self.mix_v.copy_(ramp ** shallowness + 0.3 * depth)
        self.mix_r.copy_(ramp ** (0.5 * shallowness))
        h = torch.arange(a, dtype=torch.float32) / max(a - 1, 1)
        self.time_decay.copy_(-5 + 8 * h ** (0.7 + 1.3 * depth))
        zigzag = ((torch.arange(a) + 1) % 3 - 1).float() * 0.5
        self.time_first.copy_(math.log(0.3) + zigzag)

    def forward(self, x: Tensor, state: dict[str, Tensor] | None = None, mask: Tensor | None = None) -> Tensor:
        x = _masked(x, mask)  # a padded position shifts in zeros, as before a sequence's first token
        shifted = token_shift(x, state["att_shift"] if state is not None else None)
        k = self.k_proj(torch.lerp(shifted, x, self.mix_k)).float()
        v = self.v_proj(torch.lerp(shifted, x, self.mix_v)).float()
        r = torch.sigmoid(self.r_proj(torch.lerp(shifted, x, self.mix_r)))
        if mask is not None:
            k = k.masked_fill(~mask.bool()[..., None], NEG)  # padding adds nothing to the state
        w, u = torch.exp(self.time_decay.float()), self.time_first.float()
        with torch.autocast(x.device.type, enabled=False):
            carried = None if state is None else (state["num"], state["den"], state["max"])
            if state is not None and x.shape[1] == 1:
                out, carry = wkv_step(w, u, k[:, 0], v[:, 0], carried)
                out = out[:, None]
            else:
                out, carry = wkv(w, u, k, v, carried)
        if state is not None:
            for name, value in zip(("num", "den", "max"), carry):
                state[name].copy_(value)
            state["att_shift"].copy_(x[:, -1])
        return self.o_proj(r * out.to(r.dtype))


class RWKVChannelMix(nn.Module):
    """RWKV-4's MLP: squared-ReLU of a token-shifted key, gated by a sigmoid receptance."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, f = cfg.d_model, cfg.d_ff
        self.layer, self.n_layers = layer, cfg.n_layers
        self.mix_k, self.mix_r = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.up_proj = Linear(d, f, bias=False)
        self.r_proj = Linear(d, d, bias=False)
        self.down_proj = Linear(f, d, bias=False)

    @torch.no_grad()
    def reset_recurrent_parameters(self) -> None:
        ramp = torch.arange(self.mix_k.numel(), dtype=torch.float32) / self.mix_k.numel()
        mix = ramp ** (1.0 - self.layer / self.n_layers)
        self.mix_k.copy_(mix)
        self.mix_r.copy_(mix)

    def forward(self, x: Tensor, state: dict[str, Tensor] | None = None, mask: Tensor | None = None) -> Tensor:
        x = _masked(x, mask)
        shifted = token_shift(x, state["ffn_shift"] if state is not None else None)
        if state is not None:
            state["ffn_shift"].copy_(x[:, -1])
        hidden = torch.relu(self.up_proj(torch.lerp(shifted, x, self.mix_k))).square()
        return torch.sigmoid(self.r_proj(torch.lerp(shifted, x, self.mix_r))) * self.down_proj(hidden)


def rwkv_state_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """Per-layer, per-row decoding state: (shape, initial value)."""
    d, a = cfg.d_model, cfg.rwkv_attention_dim
    return {"att_shift": ((d,), 0.0), "ffn_shift": ((d,), 0.0), "num": ((a,), 0.0), "den": ((a,), 0.0),
            "max": ((a,), NEG)}


# ---- Mamba ---------------------------------------------------------------------------------------

def selective_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
    """y_t = C_t · h_t with h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t, per channel e (state size N).

    u, dt: (B, T, E); A: (E, N); B, C: (B, T, N); h: (B, E, N) or None (zeros). Returns y (B, T, E)
    and the final h. The states are E·N numbers per position, so the scan runs in chunks of
    SCAN_CHUNK positions: each chunk's (B, L, E, N) tensors stay small enough for the CPU cache, the
    multiply-add of the recurrence walks the chunk, and everything else is batched. (A parallel
    prefix scan makes log T passes over all of (B, T, E, N); on a CPU that traffic costs more.)
    Autograd goes through `_SelectiveScan`, which keeps only the inputs and each chunk's starting
    state and recomputes the rest in backward, instead of storing several (B, T, E, N) tensors per
    layer (gigabytes at mamba-demo's size).
    """
    if h is None:
        h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    y, h_last = _SelectiveScan.apply(u, dt, A, B, C, h)
    return y, h_last


SCAN_CHUNK = 32


def _scan_states(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """The states after each position of a chunk (B, L, E, N), and the decays exp(Δ_t A)."""
    decay = torch.exp(dt[..., None] * A)
    states = (dt * u)[..., None] * B[:, :, None, :]  # Δ B u, turned into the states in place
    for t in range(u.shape[1]):
        h = torch.addcmul(states[:, t], decay[:, t], h)
        states[:, t] = h
    return states, decay


def _chunks(T: int) -> list[slice]:
    return [slice(s, min(s + SCAN_CHUNK, T)) for s in range(0, T, SCAN_CHUNK)]


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0):
        y, h, starts = u.new_empty(u.shape), h0, []
        for c in _chunks(u.shape[1]):
            starts.append(h)
            states, _ = _scan_states(u[:, c], dt[:, c], A, B[:, c], h)
            y[:, c] = (states * C[:, c, None, :]).sum(-1)
            h = states[:, -1].clone()
        ctx.save_for_backward(u, dt, A, B, C, torch.stack(starts))
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, dt, A, B, C, starts = ctx.saved_tensors
        grad_u, grad_dt = torch.zeros_like(u), torch.zeros_like(dt)
        grad_B, grad_C, grad_A = torch.zeros_like(B), torch.zeros_like(C), torch.zeros_like(A)
        carry = grad_last if grad_last is not None else torch.zeros_like(starts[0])  # dL/d(chunk's last h)
        for i, c in reversed(list(enumerate(_chunks(u.shape[1])))):
            uc, dtc, Bc, gy = u[:, c], dt[:, c], B[:, c], grad_y[:, c]
            states, decay = _scan_states(uc, dtc, A, Bc, starts[i])
            # g_t = dL/dh_t: from y_t, and from h_{t+1} = a_{t+1} ⊙ h_t + … (the next chunk via `carry`)
            g = gy[..., None] * C[:, c, None, :]
            g[:, -1] += carry
            for t in range(g.shape[1] - 2, -1, -1):
                g[:, t] = torch.addcmul(g[:, t], decay[:, t + 1], g[:, t + 1])
            grad_C[:, c] = (gy[..., None] * states).sum(2)
            previous = torch.cat([starts[i][:, None], states[:, :-1]], dim=1)
            grad_decay = g * previous * decay  # dL/d(Δ A), elementwise
            g_inject = (g * Bc[:, :, None, :]).sum(-1)  # dL/d(Δ u)
            grad_dt[:, c] = (grad_decay * A).sum(-1) + g_inject * uc
            grad_u[:, c] = g_inject * dtc
            grad_A += (grad_decay * dtc[..., None]).sum((0, 1))
            grad_B[:, c] = (g * (dtc * uc)[..., None]).sum(2)
            carry = g[:, 0] * decay[:, 0]
        return grad_u, grad_dt, grad_A, grad_B, grad_C, carry


def causal_depthwise_conv(window: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Per-channel conv of width k over (B, E, k-1+T) — the k-1 inputs before the sequence, then
    the sequence — giving (B, E, T): k shifted multiply-adds. Same as F.conv1d(groups=E), which on a
    CPU takes a slow oneDNN path for depthwise kernels (~100× slower here, forward and backward)."""
    k = weight.shape[1]
    T = window.shape[-1] - (k - 1)
    out = window[:, :, :T] * weight[:, None, 0]
    for j in range(1, k):
        out = torch.addcmul(out, window[:, :, j:j + T], weight[:, None, j])
    return out if bias is None else out + bias[:, None]


class MambaMixer(nn.Module):
    """Mamba's block body: in-projection to (x, z), causal depthwise conv and SiLU on x, a selective
    scan whose Δ, B, C depend on the input, a D skip, gating by SiLU(z), out-projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, e, n, r = cfg.d_model, cfg.ssm_inner, cfg.ssm_state, cfg.ssm_dt_rank
        self.inner, self.state_size, self.dt_rank, self.kernel = e, n, r, cfg.ssm_conv
        self.in_proj = Linear(d, 2 * e, bias=cfg.bias)
        self.conv = nn.Conv1d(e, e, cfg.ssm_conv, groups=e, bias=cfg.ssm_conv_bias)
        self.x_proj = Linear(e, r + 2 * n, bias=False)
        self.dt_proj = Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.zeros(e, n))  # A = -exp(A_log) < 0: every channel decays
        self.A_log.no_weight_decay = True  # as the reference: decay would drag all rates to A = -1
        self.D = nn.Parameter(torch.ones(e))
        self.o_proj = Linear(e, d, bias=cfg.bias)

    @torch.no_grad()
    def reset_recurrent_parameters(self, *, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """The paper's initialisation: A = -(1..N) per channel (S4D-real), D = 1, and Δ's bias set so
        softplus gives steps log-uniform in [dt_min, dt_max]."""
        self.A_log.copy_(torch.log(torch.arange(1, self.state_size + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(self.inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        self.conv.reset_parameters()

    def forward(self, x: Tensor, state: dict[str, Tensor] | None = None, mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E) each
        xs = _masked(xs, mask).transpose(1, 2)  # (B, E, T); padding enters the conv as zeros
        k = self.kernel
        history = state["conv"].to(xs.dtype) if state is not None else xs.new_zeros(B, self.inner, k - 1)
        window = torch.cat([history, xs], dim=-1)  # (B, E, k-1+T): the conv's left context, then T
        if state is not None:
            state["conv"].copy_(window[:, :, window.shape[-1] - (k - 1):])
        xs = F.silu(causal_depthwise_conv(window, self.conv.weight[:, 0], self.conv.bias)).transpose(1, 2)
        dt, Bm, Cm = self.x_proj(xs).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        with torch.autocast(x.device.type, enabled=False):
            dt = F.softplus(F.linear(dt.float(), self.dt_proj.weight.float(), self.dt_proj.bias.float()))
            if mask is not None:
                dt = dt * mask[..., None].to(dt.dtype)  # Δ = 0: decay 1, nothing added — state kept
            A = -torch.exp(self.A_log.float())
            y, h = selective_scan(xs.float(), dt, A, Bm.float(), Cm.float(),
                                  state["ssm"] if state is not None else None)
            y = y + xs.float() * self.D.float()
        if state is not None:
            state["ssm"].copy_(h)
        return self.o_proj((y * F.silu(z.float())).to(x.dtype))


def mamba_state_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """Per-layer, per-row decoding state: the conv's last ssm_conv - 1 inputs and the scan's h."""
    return {"conv": ((cfg.ssm_inner, cfg.ssm_conv - 1), 0.0), "ssm": ((cfg.ssm_inner, cfg.ssm_state), 0.0)}
