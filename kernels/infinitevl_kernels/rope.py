"""Multimodal RoPE (M-RoPE) in plain torch, shared by the reference model and the vLLM model."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def mrope_frequencies(head_dim: int, theta: float, mrope_section: list[int],
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse frequencies [head_dim/2] in float64, position row [head_dim/2] of each): frequency band i takes its
    angle from row 0 (temporal) for the first ``mrope_section[0]`` bands, row 1 (height) for the next
    ``mrope_section[1]``, row 2 (width) for the rest."""
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    rows = torch.cat([torch.full((n,), r, dtype=torch.long, device=device) for r, n in enumerate(mrope_section)])
    return inv_freq, rows


def mrope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] for 3-row positions [3, T] (temporal, height, width), in float64.

    Each band's angle is its row's position times its frequency (``mrope_frequencies``); the two halves of the
    head use the same assignment (non-interleaved rotate_half RoPE).
    """
    # Everything is made on the positions' device: a host tensor copied in would break CUDA-graph capture.
    inv_freq, rows = mrope_frequencies(head_dim, theta, mrope_section, positions.device)
    half = positions.to(torch.float64)[rows] * inv_freq[:, None]  # [D/2, T]
    emb = torch.cat([half, half], dim=0).t().contiguous()
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, D]."""
    c, s = cos[:, None, :].to(torch.promote_types(x.dtype, torch.float32)), sin[:, None, :]
    xf = x.to(c.dtype)
    return (xf * c + rotate_half(xf) * s.to(c.dtype)).to(x.dtype)
