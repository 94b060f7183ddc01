"""Gated DeltaNet math in plain torch: the numerical truth for every faster path.

Layout everywhere: per sequence ``[T, H, D]`` (tokens, heads, head dim); the recurrent state of
one sequence is ``[H, Dk, Dv]``; ``g`` is the per-token, per-head log decay (<= 0) and ``beta``
the write strength in (0, 1).  One step of the recurrence, per head:

    S <- exp(g_t) * S
    S <- S + beta_t * k_t (v_t - S^T k_t)^T
    o_t = scale * S^T q_t

q and k are L2-normalised per head first (eps 1e-6 inside the square root, as the release).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gdn_gates(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, beta) from the a/b projections, in float32 or wider (the decay must not be rounded)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    g = -torch.exp(A_log.to(dtype)) * F.softplus(a.to(dtype) + dt_bias.to(dtype))
    beta = torch.sigmoid(b.to(dtype))
    return g, beta


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution followed by SiLU, for one sequence.

    x: [T, C]; weight: [C, K] (the checkpoint's (C, 1, K) squeezed); state: [C, K-1], the
    previous K-1 inputs (zeros for a fresh sequence).  Returns (y [T, C], new state [C, K-1]).
    """
    T, C = x.shape
    K = weight.shape[-1]
    if state is None:
        state = x.new_zeros(C, K - 1)
    history = torch.cat([state.to(x.dtype).t(), x], dim=0)  # [K-1+T, C]
    windows = history.unfold(0, K, 1)  # [T, C, K]
    y = (windows * weight.to(x.dtype)).sum(-1)
    return F.silu(y), history[-(K - 1) :].t().contiguous()


def gdn_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    normalize_qk: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence. q,k: [T,H,Dk]; v: [T,H,Dv]; g,beta: [T,H].

    Computes in the wider of the inputs' dtype and float32; returns (o [T,H,Dv], state [H,Dk,Dv]).
    """
    T, H, Dk = q.shape
    Dv = v.shape[-1]
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g, beta = (t.to(dt) for t in (q, k, v, g, beta))
    if normalize_qk:
        q, k = l2norm(q), l2norm(k)
    scale = Dk**-0.5 if scale is None else scale
    S = q.new_zeros(H, Dk, Dv) if initial_state is None else initial_state.to(dt).clone()
    out = q.new_empty(T, H, Dv)
    for t in range(T):
        S = S * torch.exp(g[t])[:, None, None]
        pred = torch.einsum("hkv,hk->hv", S, k[t])
        delta = beta[t][:, None] * (v[t] - pred)
        S = S + torch.einsum("hk,hv->hkv", k[t], delta)
        out[t] = scale * torch.einsum("hkv,hk->hv", S, q[t])
    return out, S


def gdn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    normalize_qk: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence, chunk by chunk (matrix form; what prefill uses).

    Inside a chunk with cumulative log decay G and entering state S0, the corrected values
    U solve (I + A) U = beta * (V - exp(G) * K S0), A[i,j] = beta_i exp(G_i - G_j) k_i.k_j
    for j < i; then O = scale * (exp(G) * Q S0 + (causal exp(G_i - G_j) Q K^T) U) and
    S1 = exp(G_C) S0 + K^T (exp(G_C - G) * U).
    """
    T, H, Dk = q.shape
    Dv = v.shape[-1]
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g, beta = (t.to(dt).transpose(0, 1) for t in (q, k, v, g, beta))  # head-major
    if normalize_qk:
        q, k = l2norm(q), l2norm(k)
    scale = Dk**-0.5 if scale is None else scale
    S = q.new_zeros(H, Dk, Dv) if initial_state is None else initial_state.to(dt).clone()
    out = q.new_empty(H, T, Dv)
    for start in range(0, T, chunk_size):
        sl = slice(start, min(start + chunk_size, T))
        qc, kc, vc, bc = q[:, sl], k[:, sl], v[:, sl], beta[:, sl]
        G = g[:, sl].cumsum(-1)  # [H, C]
        C = G.shape[-1]
        diff = G[:, :, None] - G[:, None, :]  # G_i - G_j
        strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
        incl = strict | torch.eye(C, dtype=torch.bool, device=q.device)
        decay_strict = torch.where(strict, diff, torch.full_like(diff, -torch.inf)).exp()
        decay_incl = torch.where(incl, diff, torch.full_like(diff, -torch.inf)).exp()
        kk = kc @ kc.transpose(-1, -2)
        A = bc[:, :, None] * decay_strict * kk
        eye = torch.eye(C, dtype=dt, device=q.device).expand(H, C, C)
        rhs = bc[:, :, None] * (vc - G.exp()[:, :, None] * (kc @ S))
        U = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        qk = (qc @ kc.transpose(-1, -2)) * decay_incl
        out[:, sl] = scale * (G.exp()[:, :, None] * (qc @ S) + qk @ U)
        last = G[:, -1:]  # [H, 1]
        S = last.exp()[:, :, None] * S + kc.transpose(-1, -2) @ ((last - G).exp()[:, :, None] * U)
    return out.transpose(0, 1), S


def gated_rmsnorm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """norm(x) * weight * silu(gate) over the last dim, computed in float32 (norm first, then gate)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dt)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dt)
    return (y * F.silu(gate.to(dt))).to(x.dtype)
