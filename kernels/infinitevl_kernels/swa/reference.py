"""Sliding-window attention in plain torch: the numerical truth for the ring paths beside it.

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
