"""Sliding-window attention and multimodal RoPE in plain torch.

Window semantics (flash-attn ``window_size=(W-1, 0)``): the query at absolute position t sees
keys at positions t-W+1 .. t, itself included, so a sequence never needs more than the last
W-1 keys/values kept from the past.
"""

from __future__ import annotations

import torch


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [Tq, Tk]: True where the query may attend the key (causal, and inside the window)."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Grouped-query attention of one sequence. q: [Tq,Hq,D]; k,v: [Tk,Hkv,D]; positions are the
    token indices in the sequence (not RoPE positions). Returns [Tq,Hq,D]."""
    Hq, Hkv = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rep = Hq // Hkv
    kr = k.repeat_interleave(rep, dim=1)
    vr = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float() if q.dtype != torch.float64 else q,
                          kr.to(q.dtype if q.dtype == torch.float64 else torch.float32)) * scale
    mask = window_mask(q_pos, k_pos, window)
    scores = scores.masked_fill(~mask[None], -torch.inf)
    probs = scores.softmax(-1)
    out = torch.einsum("hqk,khd->qhd", probs, vr.to(probs.dtype))
    return out.to(q.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def mrope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] for 3-row positions [3, T] (temporal, height, width).

    Frequency band i of the half-dim takes its angle from row 0 for the first
    ``mrope_section[0]`` bands, row 1 for the next ``mrope_section[1]``, row 2 for the rest;
    the two halves of the head use the same assignment (non-interleaved rotate_half RoPE).
    """
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    # Everything is made on the positions' device: a host tensor copied in would break CUDA-graph capture.
    dt, dev = torch.float64, positions.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dt, device=dev) / head_dim))
    angles = positions.to(dt)[:, :, None] * inv_freq  # [3, T, D/2]
    rows = torch.cat([torch.full((n,), r, dtype=torch.long, device=dev) for r, n in enumerate(mrope_section)])
    half = angles.gather(0, rows[None, None, :].expand(1, angles.shape[1], -1))[0]
    emb = torch.cat([half, half], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, D]."""
    c, s = cos[:, None, :].to(torch.promote_types(x.dtype, torch.float32)), sin[:, None, :]
    xf = x.to(c.dtype)
    return (xf * c + rotate_half(xf) * s.to(c.dtype)).to(x.dtype)
