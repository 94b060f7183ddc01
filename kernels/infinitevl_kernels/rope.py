"""Multimodal RoPE (M-RoPE) in plain torch, shared by the reference model and the vLLM model."""

from __future__ import annotations

import torch


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
