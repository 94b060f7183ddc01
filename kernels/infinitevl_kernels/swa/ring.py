"""Sliding-window attention over a ring of KV rows, one ring per sequence, in plain torch.

A sequence's ring is a fixed list of cache blocks (``capacity = blocks x block_size >= window``
rows); the token at index t lives in row ``t % capacity``. Its memory is fixed for the sequence's
life: new tokens overwrite the oldest rows once the window has passed, so a sequence of any
length keeps the same KV bytes.

The cache layout is vLLM's attention page: ``[num_blocks, kv_heads, block_size, Dk + Dv]`` (keys
and values side by side in the last dim). Window semantics are those of ``reference.py``: the
query at token t sees keys t-W+1 .. t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

QUERY_BLOCK = 1024  # prefill queries per attention call: bounds the score matrix to QUERY_BLOCK x (W + QUERY_BLOCK)


@dataclass
class PagedRing:
    """One sequence's ring: `blocks` (block ids, in ring order) of `cache`."""

    cache: torch.Tensor  # [num_blocks, kv_heads, block_size, Dk + Dv]
    blocks: torch.Tensor  # [ring_blocks] int64
    key_dim: int

    @property
    def capacity(self) -> int:
        return self.blocks.numel() * self.cache.shape[2]

    def _where(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = tokens % self.capacity
        block_size = self.cache.shape[2]
        return self.blocks[rows // block_size], rows % block_size

    def read(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [n, kv_heads, D] of the given token indices (a copy)."""
        block, offset = self._where(tokens)
        kv = self.cache[block, :, offset]  # [n, kv_heads, Dk + Dv]
        return kv[..., : self.key_dim], kv[..., self.key_dim :]

    def write(self, first_token: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store tokens first_token .. first_token+len-1; only the last `capacity` of them survive."""
        keep = min(k.shape[0], self.capacity)
        tokens = torch.arange(first_token + k.shape[0] - keep, first_token + k.shape[0], device=self.cache.device)
        block, offset = self._where(tokens)
        self.cache[block, :, offset] = torch.cat([k[-keep:], v[-keep:]], dim=-1).to(self.cache.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
            ) -> torch.Tensor:
    """q [Tq,Hq,D], k/v [Tk,Hkv,D], mask [Tq,Tk] bool or None -> [Tq,Hq,D]; grouped heads are not copied.

    Half-precision inputs are attended in float32: in bf16 a request's greedy tokens depended on the
    batch it ran in (CPU, tiny checkpoint); in float32 they do not."""
    dt = torch.promote_types(q.dtype, torch.float32)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None].to(dt), k.transpose(0, 1)[None].to(dt), v.transpose(0, 1)[None].to(dt),
        attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1).to(q.dtype)


def _check_capacity(ring: PagedRing, window: int) -> None:
    if ring.capacity < window:
        raise ValueError(f"ring of {ring.capacity} rows cannot hold a window of {window} tokens")


def ring_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: PagedRing, start: int, window: int, scale: float
) -> torch.Tensor:
    """New tokens start .. start+L-1 of one sequence (q [L,Hq,D], k/v [L,Hkv,D]) attend to the ring's
    earlier tokens and to each other; then they are written into the ring. Returns [L,Hq,D].

    The earlier tokens are read before the chunk is written, so a chunk longer than the ring is
    exact too.
    """
    _check_capacity(ring, window)
    L = q.shape[0]
    n_prev = min(start, window - 1)
    token = torch.arange(start - n_prev, start + L, device=q.device)  # token index of each key
    k_prev, v_prev = ring.read(token[:n_prev])
    keys, values = torch.cat([k_prev.to(k.dtype), k]), torch.cat([v_prev.to(v.dtype), v])
    out = torch.empty_like(q)
    for j0 in range(0, L, QUERY_BLOCK):
        j1 = min(L, j0 + QUERY_BLOCK)
        lo = max(0, n_prev + j0 - (window - 1))  # first key any query of this block can see
        hi = n_prev + j1
        diff = token[n_prev + j0 : hi, None] - token[None, lo:hi]
        out[j0:j1] = _attend(q[j0:j1], keys[lo:hi], values[lo:hi], (diff >= 0) & (diff < window), scale)
    ring.write(start, k, v)
    return out


def ring_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: PagedRing, token: int, window: int, scale: float
) -> torch.Tensor:
    """One new token (q [1,Hq,D], k/v [1,Hkv,D]) at index `token`: written, then the window's rows
    are read back. Rows this sequence has not written are never read, so a reused ring needs no
    zeroing."""
    _check_capacity(ring, window)
    ring.write(token, k, v)
    tokens = torch.arange(max(0, token - window + 1), token + 1, device=q.device)
    k_win, v_win = ring.read(tokens)
    return _attend(q, k_win, v_win, None, scale)
