"""The ring KV layout gives exactly the attention of a plain linear KV layout (all keys kept), for
any chunking, while holding only ceil(W / block_size) + 1 blocks per sequence."""

from __future__ import annotations

import math

import pytest
import torch
from infinitevl_kernels import sliding_window_attention
from infinitevl_kernels.swa.ring import PagedRing, ring_decode_attention, ring_prefill_attention

WINDOW, BLOCK, HQ, HKV, D = 16, 5, 4, 2, 8
SCALE = D**-0.5


def _linear_layout(q, k, v):
    pos = torch.arange(q.shape[0])
    return sliding_window_attention(q, k, v, pos, pos, WINDOW, SCALE)


def _random_chunks(total: int, gen: torch.Generator) -> list[int]:
    sizes, left = [], total
    while left:
        kind = torch.randint(0, 3, (), generator=gen).item()
        n = 1 if kind == 0 else int(torch.randint(1, 3 * WINDOW, (), generator=gen))
        sizes.append(min(n, left))
        left -= sizes[-1]
    return sizes


def _ring_layout(q, k, v, chunks, num_blocks=64, poison=True, seed=0):
    """Runs the sequence through a ring in randomly placed blocks of a NaN-filled cache."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.full((num_blocks, HKV, BLOCK, 2 * D), math.nan if poison else 0.0, dtype=q.dtype)
    blocks = torch.randperm(num_blocks, generator=g)[: math.ceil(WINDOW / BLOCK) + 1]
    ring = PagedRing(cache, blocks, D)
    out, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        attend = ring_decode_attention if n == 1 else ring_prefill_attention
        out.append(attend(q[sl], k[sl], v[sl], ring, start, WINDOW, SCALE))
        start += n
    return torch.cat(out), cache, blocks


@pytest.mark.parametrize("multiple", [1, 3, 10])
@pytest.mark.parametrize("seed", [0, 1])
def test_ring_equals_linear_layout_for_random_chunking(multiple, seed):
    gen = torch.Generator().manual_seed(seed)
    T = multiple * WINDOW
    q = torch.randn(T, HQ, D, generator=gen, dtype=torch.float64)
    k = torch.randn(T, HKV, D, generator=gen, dtype=torch.float64)
    v = torch.randn(T, HKV, D, generator=gen, dtype=torch.float64)
    got, _, _ = _ring_layout(q, k, v, _random_chunks(T, gen), seed=seed)
    torch.testing.assert_close(got, _linear_layout(q, k, v), atol=1e-12, rtol=1e-12)


def test_token_by_token_and_one_chunk_longer_than_the_ring():
    gen = torch.Generator().manual_seed(3)
    T = 7 * WINDOW
    q, k, v = (torch.randn(T, h, D, generator=gen, dtype=torch.float64) for h in (HQ, HKV, HKV))
    want = _linear_layout(q, k, v)
    torch.testing.assert_close(_ring_layout(q, k, v, [1] * T)[0], want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(_ring_layout(q, k, v, [T])[0], want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(_ring_layout(q, k, v, [T - 5, 1, 4])[0], want, atol=1e-12, rtol=1e-12)


def test_only_the_rings_own_blocks_are_written_and_unwritten_rows_are_never_read():
    gen = torch.Generator().manual_seed(4)
    T = 3 * WINDOW + 2
    q, k, v = (torch.randn(T, h, D, generator=gen) for h in (HQ, HKV, HKV))
    got, cache, blocks = _ring_layout(q, k, v, [3, 1, 1, 20, 1, T - 26])  # NaN-filled cache
    assert torch.isfinite(got).all()
    others = torch.ones(cache.shape[0], dtype=torch.bool)
    others[blocks] = False
    assert cache[others].isnan().all(), "a block outside the ring was written"


def test_ring_smaller_than_window_is_refused():
    cache = torch.zeros(4, HKV, BLOCK, 2 * D)
    ring = PagedRing(cache, torch.tensor([0, 1]), D)  # 10 rows < 16
    x = torch.zeros(1, HKV, D)
    with pytest.raises(ValueError, match="cannot hold a window"):
        ring_decode_attention(torch.zeros(1, HQ, D), x, x, ring, 0, WINDOW, SCALE)
