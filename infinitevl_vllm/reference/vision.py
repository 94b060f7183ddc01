"""Qwen2.5-VL vision tower, written for reading: patch embed, 2-D RoPE, windowed and full
attention blocks, 2x2 patch merger.

Input is what the Qwen2.5-VL processor emits: ``pixel_values`` [num_patches, C*Tp*P*P] with the
patches of each 2x2 merge group adjacent, and ``grid_thw`` [num_items, 3] in patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from infinitevl_kernels.rope import rotate_half
from torch import nn

from .layers import RMSNorm


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[int]):
        T, D = x.shape
        q, k, v = self.qkv(x).view(T, 3, self.heads, D // self.heads).unbind(1)
        dt = cos.dtype
        q = (q.to(dt) * cos + rotate_half(q.to(dt)) * sin).to(x.dtype)
        k = (k.to(dt) * cos + rotate_half(k.to(dt)) * sin).to(x.dtype)
        outs = []
        for qs, ks, vs in zip(q.split(segments), k.split(segments), v.split(segments)):
            o = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))
            outs.append(o.transpose(0, 1))
        return self.proj(torch.cat(outs).reshape(T, D))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(
            cfg.in_channels, cfg.hidden_size, kernel_size=self.shape[1:], stride=self.shape[1:], bias=False
        )

    def forward(self, pixels):
        x = pixels.view(-1, *self.shape).to(self.proj.weight.dtype)
        return self.proj(x).flatten(1)


class PatchMerger(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.group = cfg.spatial_merge_size**2
        width = cfg.hidden_size * self.group
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, cfg.out_hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).reshape(-1, self.ln_q.weight.shape[0] * self.group))


def patch_hw_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch, in the processor's order (merge groups adjacent): [N, 2]."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)

        def grouped(a, h=h, w=w):
            return a.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten()

        out.append(torch.stack([grouped(rows), grouped(cols)], -1).repeat(t, 1))
    return torch.cat(out)


def window_order(grid_thw: torch.Tensor, merge: int, window_units: int) -> tuple[torch.Tensor, list[int]]:
    """Permutation of merge groups so each attention window is contiguous, and the window sizes
    (in merge groups). Windows tile each frame's merged grid in window_units x window_units squares."""
    order, sizes, base = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).view(t, gh, gw)
        for f in range(t):
            for r0 in range(0, gh, window_units):
                for c0 in range(0, gw, window_units):
                    win = ids[f, r0 : r0 + window_units, c0 : c0 + window_units].flatten()
                    order.append(win + base)
                    sizes.append(win.numel())
        base += t * gh * gw
    return torch.cat(order), sizes


class VisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        head_dim = cfg.hidden_size // cfg.num_heads
        self.register_buffer(
            "inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float64) / (head_dim // 2)),
            persistent=False,
        )

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        merge, group = cfg.spatial_merge_size, cfg.spatial_merge_size**2
        x = self.patch_embed(pixels)
        pos = patch_hw_positions(grid_thw, merge).to(x.device)
        dt = torch.promote_types(x.dtype, torch.float32)
        angles = (pos[..., None].to(dt) * self.inv_freq.to(dt)).flatten(1)  # [N, head_dim/2]
        emb = torch.cat([angles, angles], -1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]

        window_units = cfg.window_size // merge // cfg.patch_size
        order, win_sizes = window_order(grid_thw, merge, window_units)
        order = order.to(x.device)
        perm = (order[:, None] * group + torch.arange(group, device=x.device)).flatten()

        def by_window(a):
            return a[perm]

        x, cos, sin = by_window(x), by_window(cos), by_window(sin)
        window_segments = [s * group for s in win_sizes]
        frame_segments = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        # Full attention runs per frame; frames are contiguous in window order as well.
        for i, block in enumerate(self.blocks):
            full = i in cfg.fullatt_block_indexes
            x = block(x, cos, sin, frame_segments if full else window_segments)
        merged = self.merger(x)
        return merged[torch.argsort(order)]
