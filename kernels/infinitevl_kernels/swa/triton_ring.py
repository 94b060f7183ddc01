"""Sliding-window attention over vLLM's paged KV ring, in Triton, with torch references.

Layout (the one ``ring.py`` specifies and the vLLM model allocates): one SWA layer's cache is
``[num_blocks, kv_heads, block_size, Dk + Dv]`` (K and V side by side in the last dim); each
sequence owns ``ring_blocks`` pages, listed in its block-table row. Token t lives in ring row
``t % (ring_blocks * block_size)``: page ``row // block_size`` of the row, offset ``row % block_size``.
A query at token t sees keys t-W+1 .. t. The ring must hold at least W rows, so the row a new
token takes never holds a key that a query of the same step can still see.

- Decode (one new token per sequence): flash-decoding over the previous ``min(W-1, t)`` ring rows,
  split over the window so batch 1 still fills the GPU, plus the new token's K/V from the inputs;
  the last split also stores the new K/V (its row is outside every window of the step). A merge
  launch combines the splits (skipped when there is one).
- Chunked varlen prefill: one program takes a block of query tokens for all query heads of one KV
  head (the heads are packed into the rows of the tile, so each K/V tile is loaded once per group)
  and a slice of the key range: ring rows for keys before the chunk, the chunk's own K/V after it,
  with the exact window mask. Short chunks (a streaming frame) split the key range over programs
  and merge, the way decode does. A last launch stores the chunk's final ``min(cap, len)`` tokens:
  the chunk's own tokens overwrite rows that earlier queries of the chunk still read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import dependent_launch
from ..layout import ring_blocks
from .ring import PagedRing, ring_decode_attention, ring_prefill_attention

NEG = tl.constexpr(-1.0e30)
SMS = 132  # an H100/H200's multiprocessors: the split counts aim at a number of waves of programs


def _dot_precision(x: torch.Tensor) -> str:
    """float32 inputs keep float32 products (Triton's default would round them to TF32)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _ring_shape(cache: torch.Tensor, block_table: torch.Tensor, head_dim: int, window: int) -> tuple[int, int]:
    """(block_size, capacity) after checking the layout."""
    if cache.dim() != 4 or cache.shape[-1] != 2 * head_dim or cache.stride(-1) != 1:
        raise ValueError(f"cache must be [num_blocks, kv_heads, block_size, 2*{head_dim}] with unit last stride")
    bs = cache.shape[2]
    cap = block_table.shape[1] * bs
    if cap < window:
        raise ValueError(f"ring of {cap} rows cannot hold a window of {window} tokens")
    return bs, cap


# The block table's row stride is left unspecialized: the start-up compilation (warm_up_ring) runs the kernels on a
# scratch table of one ring, whose row stride Triton would otherwise specialize apart from the served table's (a
# multiple of 16 or not), and a served batch would compile its variant again (a mixed batch's decodes run outside
# the captured graphs, at any batch size). It only indexes block ids; the pool's strides, which vectorized loads
# need, stay specialized. The prefill kernels' per-sequence metadata is aligned however it comes: a mixed batch's
# prefills start after its decodes, so their table rows and offsets are views at any offset.
TABLE_STRIDE = ["stride_bt"]
PREFILL_METADATA = ["bt_ptr", "cu_ptr", "start_ptr"]


@triton.jit
def _ring_tile(head, table, j0, end, cap, bs, nblk, i0, t0, t1, stride_cb, stride_ct, rd, D: tl.constexpr,
               BN: tl.constexpr, TWO_PAGES: tl.constexpr):
    """K and V of ring tokens j0 .. j0+BN-1 (rows at or past `end` read as zeros), and the page ids (i0, t0, t1)
    of the tile after it."""
    rj = j0 + tl.arange(0, BN)
    mj = rj < end
    row = rj % cap
    if TWO_PAGES:
        blk = tl.where(row // bs == i0, t0, t1).to(tl.int64)
        i0 = ((j0 + BN) % cap) // bs
        t0 = tl.load(table + i0)
        t1 = tl.load(table + (i0 + 1) % nblk)
    else:
        blk = tl.load(table + row // bs, mask=mj, other=0).to(tl.int64)
    base = head + blk[:, None] * stride_cb + (row % bs)[:, None] * stride_ct + rd[None, :]
    return tl.load(base, mask=mj[:, None], other=0.0), tl.load(base + D, mask=mj[:, None], other=0.0), i0, t0, t1


@triton.jit(do_not_specialize=TABLE_STRIDE)
def _swa_decode_split_kernel(
    q_ptr, kn_ptr, vn_ptr, c_ptr, bt_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, o_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb, stride_ch, stride_ct, stride_bt,
    stride_ob, stride_oh, bs, cap, W, split_len, scale,
    NSPLIT: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
    TWO_PAGES: tl.constexpr, LOOKAHEAD: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    rg = tl.arange(0, GP)
    mg = rg < G
    rd = tl.arange(0, D)
    # Before the programmatic wait: the position, the ring's page ids (written before the step's first kernel) and
    # the first K/V tile (ring rows before token p, written by earlier steps); the query comes from the kernel before.
    p = tl.load(pos_ptr + b).to(tl.int32)  # token indices in int32: the ring arithmetic divides per key
    lo = tl.maximum(p - W + 1, 0)
    start = tl.maximum(p - W + 1 + s * split_len, lo)
    end = tl.minimum(p - W + 1 + (s + 1) * split_len, p)  # exclusive; token p itself comes from the inputs
    m_i = tl.full([GP], NEG, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    table = bt_ptr + b * stride_bt
    head = c_ptr + kvh * stride_ch
    nblk = cap // bs
    # A tile of BN <= block_size consecutive tokens touches at most two pages (page i, then i+1 or,
    # at the ring's end, page 0). Their two ids are loaded one tile ahead, so the K/V loads never
    # wait on a table load.
    i0 = (start % cap) // bs
    t0 = tl.load(table + i0)
    t1 = tl.load(table + (i0 + 1) % nblk)
    k, v, i0, t0, t1 = _ring_tile(head, table, start, end, cap, bs, nblk, i0, t0, t1, stride_cb, stride_ct, rd,
                                  D, BN, TWO_PAGES)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    q = tl.load(q_ptr + b * stride_qb + (kvh * G + rg)[:, None] * stride_qh + rd[None, :],
                mask=mg[:, None], other=0.0)
    for j0 in range(start, end, BN):
        if LOOKAHEAD:  # two tiles a program (batch 1): the next is requested before this one is used
            k_next, v_next, i0, t0, t1 = _ring_tile(head, table, j0 + BN, end, cap, bs, nblk, i0, t0, t1, stride_cb,
                                                    stride_ct, rd, D, BN, TWO_PAGES)
        mj = j0 + tl.arange(0, BN) < end
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * scale
        qk = tl.where(mj[None, :], qk, NEG)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        pr = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(q.dtype), v.to(q.dtype), input_precision=PREC)
        m_i = m_new
        if LOOKAHEAD:
            k, v = k_next, v_next
        else:  # many tiles a program: one tile's registers at a time (at batch 54 the lookahead cost 13%)
            k, v, i0, t0, t1 = _ring_tile(head, table, j0 + BN, end, cap, bs, nblk, i0, t0, t1, stride_cb, stride_ct,
                                          rd, D, BN, TWO_PAGES)
    if s == NSPLIT - 1:
        kn = tl.load(kn_ptr + b * stride_kb + kvh * stride_kh + rd)
        vn = tl.load(vn_ptr + b * stride_vb + kvh * stride_vh + rd)
        qk1 = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * scale
        m_new = tl.maximum(m_i, qk1)
        alpha = tl.exp(m_i - m_new)
        p1 = tl.exp(qk1 - m_new)
        l_i = l_i * alpha + p1
        acc = acc * alpha[:, None] + p1[:, None] * vn.to(tl.float32)[None, :]
        m_i = m_new
        # row p % cap holds token p - cap <= p - W: no program of this step reads it
        row = p % cap
        dst = head + tl.load(table + row // bs).to(tl.int64) * stride_cb + (row % bs) * stride_ct + rd
        tl.store(dst, kn.to(c_ptr.dtype.element_ty))
        tl.store(dst + D, vn.to(c_ptr.dtype.element_ty))
    if NSPLIT == 1:
        tl.store(o_ptr + b * stride_ob + (kvh * G + rg)[:, None] * stride_oh + rd[None, :],
                 (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=mg[:, None])
    else:
        idx = (b * tl.num_programs(1) + kvh) * NSPLIT + s
        tl.store(m_ptr + idx * GP + rg, m_i, mask=mg)
        tl.store(l_ptr + idx * GP + rg, l_i, mask=mg)
        tl.store(acc_ptr + (idx * GP + rg)[:, None] * D + rd[None, :], acc, mask=mg[:, None])


@triton.jit
def _swa_decode_merge_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr, stride_ob, stride_oh,
    NSPLIT: tl.constexpr, SP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    DB: tl.constexpr, PDL: tl.constexpr,
):
    # One program per (sequence, query head, slice of head_dim) reads all its splits' partials in one 2D load:
    # at batch 1 a window is cut into 64 splits, and a loop over them was a chain of 64 dependent loads.
    b = tl.program_id(0)
    h = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    kvh = h // G
    rs = tl.arange(0, SP)
    ms = rs < NSPLIT
    rows = ((b * (tl.num_programs(1) // G) + kvh) * NSPLIT + rs) * GP + h % G
    rd = tl.program_id(2) * DB + tl.arange(0, DB)
    m = tl.load(m_ptr + rows, mask=ms, other=NEG)
    w = tl.exp(m - tl.max(m, 0))
    L = tl.sum(w * tl.load(l_ptr + rows, mask=ms, other=0.0), 0)
    acc = tl.load(acc_ptr + rows[:, None] * D + rd[None, :], mask=ms[:, None], other=0.0)
    o = tl.sum(w[:, None] * acc, 0) / tl.maximum(L, 1e-30)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rd, o.to(o_ptr.dtype.element_ty))


DECODE_WAVES = 16  # decode programs aimed at, in units of the GPU's multiprocessors


def decode_splits(batch: int, kv_heads: int, window: int, sms: int = SMS) -> int:
    """How many pieces (a power of two, at least 128 keys each) to cut each window into: enough for about
    `DECODE_WAVES` waves of programs. On an H200 a step's 9 SWA decodes at batch 54 took 1.59 ms in 2 pieces
    and 1.27 ms in 16; batch 1 is fastest in 64 (benchmarks/results/swa_decode_merge.json)."""
    want = max(1, (DECODE_WAVES * sms) // max(1, batch * kv_heads))
    return min(64, _floor_pow2(want), _floor_pow2(max(1, window // 128)))


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def swa_paged_decode(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    window: int,
    scale: float | None = None,
    nsplit: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention for B sequences; stores each new K/V in its ring.

    q [B, Hq, D] (RoPE applied); k_new, v_new [B, Hkv, D]; cache [num_blocks, Hkv, block_size, 2D];
    block_table [B, ring_blocks]: each sequence's ring pages; positions [B]: token index of the new
    token in its sequence. Returns [B, Hq, D].
    """
    B, Hq, D = q.shape
    Hkv = cache.shape[1]
    bs, cap = _ring_shape(cache, block_table, D, window)
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError("k_new and v_new need unit stride over head_dim")
    G = Hq // Hkv
    GP = max(16, triton.next_power_of_2(G))
    nsplit = nsplit or decode_splits(B, Hkv, window)
    split_len = triton.cdiv(window - 1, nsplit)
    scale = D**-0.5 if scale is None else scale
    o = torch.empty_like(q) if out is None else out
    f32 = dict(dtype=torch.float32, device=q.device)
    n = 1 if nsplit == 1 else nsplit  # partials are unused with one split
    m = torch.empty(B, Hkv, n, GP, **f32)
    lsum = torch.empty(B, Hkv, n, GP, **f32)
    acc = torch.empty(B, Hkv, n, GP, D, **f32) if nsplit > 1 else m
    cs = cache.stride()
    BN = 64 if q.is_cuda else 4
    pdl = dependent_launch(q.device)
    _swa_decode_split_kernel[(B, Hkv, nsplit)](
        q, k_new, v_new, cache, block_table, positions, m, lsum, acc, o,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        cs[0], cs[1], cs[2], block_table.stride(0), o.stride(0), o.stride(1), bs, cap, window, split_len, scale,
        NSPLIT=nsplit, G=G, GP=GP, D=D, BN=BN, TWO_PAGES=BN <= bs, LOOKAHEAD=split_len <= 2 * BN,
        PREC=_dot_precision(q), PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    if nsplit > 1:
        DB = min(D, 32)
        _swa_decode_merge_kernel[(B, Hq, D // DB)](m, lsum, acc, o, o.stride(0), o.stride(1),
                                                   NSPLIT=nsplit, SP=triton.next_power_of_2(nsplit), G=G, GP=GP,
                                                   D=D, DB=DB, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return o


@triton.jit(do_not_specialize=TABLE_STRIDE, do_not_specialize_on_alignment=PREFILL_METADATA)
def _swa_prefill_kernel(
    q_ptr, k_ptr, v_ptr, c_ptr, bt_ptr, cu_ptr, start_ptr, m_ptr, l_ptr, acc_ptr, o_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_ct, stride_bt,
    stride_ot, stride_oh, T, bs, cap, W, scale,
    NSPLIT: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BMT: tl.constexpr, D: tl.constexpr,
    BN: tl.constexpr, PREC: tl.constexpr,
):
    qb = tl.program_id(0)
    kvh = tl.program_id(1)
    n = tl.program_id(2) // NSPLIT
    s = tl.program_id(2) % NSPLIT
    s0 = tl.load(cu_ptr + n).to(tl.int64)
    # token indices in int32 (the ring arithmetic divides per key); only addresses are int64
    L = (tl.load(cu_ptr + n + 1) - tl.load(cu_ptr + n)).to(tl.int32)
    if qb * BMT >= L:
        return
    start = tl.load(start_ptr + n).to(tl.int32)
    # tile rows: BMT query tokens x GP heads of this KV group
    r = tl.arange(0, BMT * GP)
    ti = qb * BMT + r // GP
    hi = kvh * G + r % GP
    valid = (ti < L) & (r % GP < G)
    rd = tl.arange(0, D)
    q = tl.load(q_ptr + (s0 + ti)[:, None] * stride_qt + hi[:, None] * stride_qh + rd[None, :],
                mask=valid[:, None], other=0.0)
    p_i = start + ti
    last = start + tl.minimum(qb * BMT + BMT, L)  # exclusive end of this block's keys
    lo = tl.maximum(start + qb * BMT - W + 1, 0)
    piece = tl.cdiv(tl.cdiv(last - lo, NSPLIT), BN) * BN
    k_lo = lo + s * piece
    k_hi = tl.minimum(k_lo + piece, last)
    m_i = tl.full([BMT * GP], NEG, tl.float32)
    l_i = tl.zeros([BMT * GP], tl.float32)
    acc = tl.zeros([BMT * GP, D], tl.float32)
    table = bt_ptr + n * stride_bt
    for j0 in range(k_lo, k_hi, BN):
        pj = j0 + tl.arange(0, BN)
        in_ring = pj < start
        in_chunk = (pj >= start) & (pj < k_hi)
        row = pj % cap
        blk = tl.load(table + row // bs, mask=in_ring, other=0).to(tl.int64)
        ring = c_ptr + kvh * stride_ch + blk[:, None] * stride_cb + (row % bs)[:, None] * stride_ct + rd[None, :]
        tok = (s0 + pj - start)[:, None]
        k = tl.load(ring, mask=in_ring[:, None], other=0.0).to(q.dtype) + tl.load(
            k_ptr + tok * stride_kt + kvh * stride_kh + rd[None, :], mask=in_chunk[:, None], other=0.0)
        v = tl.load(ring + D, mask=in_ring[:, None], other=0.0).to(q.dtype) + tl.load(
            v_ptr + tok * stride_vt + kvh * stride_vh + rd[None, :], mask=in_chunk[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        diff = p_i[:, None] - pj[None, :]
        ok = (diff >= 0) & (diff < W) & (pj < k_hi)[None, :]
        qk = tl.where(ok, qk, NEG)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        pr = tl.where(ok, tl.exp(qk - m_new[:, None]), 0.0)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    if NSPLIT == 1:
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(o_ptr + (s0 + ti)[:, None] * stride_ot + hi[:, None] * stride_oh + rd[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=valid[:, None])
    else:
        idx = (s * T + s0 + ti) * (tl.num_programs(1) * G) + hi  # partials [NSPLIT, T, Hq]
        tl.store(m_ptr + idx, m_i, mask=valid)
        tl.store(l_ptr + idx, l_i, mask=valid)
        tl.store(acc_ptr + idx[:, None] * D + rd[None, :], acc, mask=valid[:, None])


@triton.jit
def _swa_prefill_merge_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, T, stride_ot, stride_oh,
                              NSPLIT: tl.constexpr, HQ: tl.constexpr, HP: tl.constexpr, D: tl.constexpr):
    t = tl.program_id(0)
    rh = tl.arange(0, HP)
    mh = rh < HQ
    rd = tl.arange(0, D)
    M = tl.full([HP], NEG, tl.float32)
    for s in tl.static_range(NSPLIT):
        M = tl.maximum(M, tl.load(m_ptr + (s * T + t) * HQ + rh, mask=mh, other=NEG))
    L = tl.zeros([HP], tl.float32)
    acc = tl.zeros([HP, D], tl.float32)
    for s in tl.static_range(NSPLIT):
        idx = (s * T + t) * HQ + rh
        w = tl.exp(tl.load(m_ptr + idx, mask=mh, other=NEG) - M)
        L += w * tl.load(l_ptr + idx, mask=mh, other=0.0)
        acc += w[:, None] * tl.load(acc_ptr + idx[:, None] * D + rd[None, :], mask=mh[:, None], other=0.0)
    tl.store(o_ptr + t * stride_ot + rh[:, None] * stride_oh + rd[None, :],
             (acc / tl.maximum(L, 1e-30)[:, None]).to(o_ptr.dtype.element_ty), mask=mh[:, None])


@triton.jit(do_not_specialize=TABLE_STRIDE, do_not_specialize_on_alignment=PREFILL_METADATA)
def _ring_write_kernel(
    k_ptr, v_ptr, c_ptr, bt_ptr, cu_ptr, start_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_ct, stride_bt, bs, cap,
    D: tl.constexpr, BT: tl.constexpr,
):
    tb = tl.program_id(0)
    kvh = tl.program_id(1)
    n = tl.program_id(2)
    s0 = tl.load(cu_ptr + n).to(tl.int64)
    L = tl.load(cu_ptr + n + 1).to(tl.int64) - s0
    start = tl.load(start_ptr + n).to(tl.int64)
    rt = tb * BT + tl.arange(0, BT)
    keep = (rt < L) & (rt >= L - cap)
    rd = tl.arange(0, D)
    row = (start + rt) % cap
    blk = tl.load(bt_ptr + n * stride_bt + row // bs, mask=keep, other=0).to(tl.int64)
    dst = c_ptr + blk[:, None] * stride_cb + kvh * stride_ch + (row % bs)[:, None] * stride_ct + rd[None, :]
    tok = (s0 + rt)[:, None]
    ty = c_ptr.dtype.element_ty
    k = tl.load(k_ptr + tok * stride_kt + kvh * stride_kh + rd[None, :], mask=keep[:, None])
    v = tl.load(v_ptr + tok * stride_vt + kvh * stride_vh + rd[None, :], mask=keep[:, None])
    tl.store(dst, k.to(ty), mask=keep[:, None])
    tl.store(dst + D, v.to(ty), mask=keep[:, None])


def prefill_splits(query_blocks: int, kv_heads: int, key_span: int, sms: int = SMS) -> int:
    """Key-range pieces per query block: enough programs for about two waves, pieces >= 512 keys."""
    want = max(1, (2 * sms) // max(1, query_blocks * kv_heads))
    return int(min(16, triton.next_power_of_2(want), max(1, key_span // 512)))


def _query_rows(q: torch.Tensor, group: int) -> int:
    """Query tokens a prefill tile takes: 128 tile rows on the GPU (16 tokens x 8 heads at the 4B shapes),
    small tiles in the interpreter."""
    return max(1, (128 if q.is_cuda else 16) // triton.next_power_of_2(group))


def swa_paged_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens: torch.Tensor,
    start_pos: torch.Tensor,
    max_len: int,
    window: int,
    scale: float | None = None,
    nsplit: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked-prefill attention over a packed varlen batch, then the ring update.

    q [T, Hq, D], k/v [T, Hkv, D] (RoPE applied); cu_seqlens [N+1]; start_pos [N]: token index of
    each sequence's first new token (its ring holds the tokens before it); block_table [N, ring_blocks].
    """
    T, Hq, D = q.shape
    Hkv = cache.shape[1]
    bs, cap = _ring_shape(cache, block_table, D, window)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need unit stride over head_dim")
    N = cu_seqlens.numel() - 1
    G = Hq // Hkv
    GP = triton.next_power_of_2(G)
    scale = D**-0.5 if scale is None else scale
    o = torch.empty_like(q) if out is None else out
    BMT = _query_rows(q, G)
    BN = 64 if q.is_cuda else 16
    qblocks = triton.cdiv(max_len, BMT)
    if nsplit is None:
        nsplit = prefill_splits(qblocks * N, Hkv, window + BMT) if q.is_cuda else 1
    f32 = dict(dtype=torch.float32, device=q.device)
    if nsplit > 1:
        m, lsum, acc = torch.empty(nsplit, T, Hq, **f32), torch.empty(nsplit, T, Hq, **f32), torch.empty(
            nsplit, T, Hq, D, **f32)
    else:
        m = lsum = acc = o
    cs = cache.stride()
    _swa_prefill_kernel[(qblocks, Hkv, N * nsplit)](
        q, k, v, cache, block_table, cu_seqlens, start_pos, m, lsum, acc, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cs[0], cs[1], cs[2],
        block_table.stride(0), o.stride(0), o.stride(1), T, bs, cap, window, scale,
        NSPLIT=nsplit, G=G, GP=GP, BMT=BMT, D=D, BN=BN, PREC=_dot_precision(q), num_warps=8 if q.is_cuda else 4,
        num_stages=2,
    )
    if nsplit > 1:
        _swa_prefill_merge_kernel[(T,)](m, lsum, acc, o, T, o.stride(0), o.stride(1),
                                        NSPLIT=nsplit, HQ=Hq, HP=triton.next_power_of_2(Hq), D=D, num_warps=4)
    BT = 64
    _ring_write_kernel[(triton.cdiv(max_len, BT), Hkv, N)](
        k, v, cache, block_table, cu_seqlens, start_pos,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), cs[0], cs[1], cs[2], block_table.stride(0), bs, cap,
        D=D, BT=BT,
    )
    return o


def swa_paged_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
    starts: torch.Tensor, num_decodes: int, prefill_query_start_loc: torch.Tensor | None, max_prefill_len: int,
    window: int, scale: float, out: torch.Tensor,
) -> torch.Tensor:
    """A vLLM step's SWA attention over a batch ordered decodes first, with no host sync (so a step of
    decodes can be captured in a CUDA graph).

    The first ``num_decodes`` rows are one-token requests (decode kernel); the rest are the packed
    prefill chunks that ``prefill_query_start_loc`` ([num_prefills + 1], counted from row
    ``num_decodes``; None when there are none) delimits, in one varlen launch. ``starts`` [requests]:
    each request's token index of its first new token; ``block_table`` [requests, ring_blocks].
    """
    nd = num_decodes
    if nd:
        swa_paged_decode(q[:nd], k[:nd], v[:nd], cache, block_table[:nd], starts[:nd], window, scale, out=out[:nd])
    if prefill_query_start_loc is not None and prefill_query_start_loc.numel() > 1:
        n = prefill_query_start_loc.numel() - 1
        swa_paged_prefill(q[nd:], k[nd:], v[nd:], cache, block_table[nd : nd + n], prefill_query_start_loc,
                          starts[nd : nd + n], max_prefill_len, window, scale, out=out[nd:])
    return out


def warm_up_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block_size: int,
                 scale: float) -> None:
    """Compile every variant decode and prefill launch (each split count the batch size or chunk length can
    pick; prefill token counts of each class Triton compiles apart: 1, a multiple of 16, other) on a scratch
    ring of one sequence. q [T, Hq, D], k/v [T, Hkv, D] give the shapes, dtypes and strides the served step
    passes (token counts above T are skipped). Without this a server compiles a variant when a batch first
    needs it."""
    Hkv, D = k.shape[1], k.shape[2]
    dev = q.device
    blocks = ring_blocks(window, block_size)
    cache = torch.zeros(blocks, Hkv, block_size, 2 * D, dtype=k.dtype, device=dev)
    table = torch.arange(blocks, dtype=torch.int32, device=dev)[None]
    i32 = dict(dtype=torch.int32, device=dev)
    programs = range(1, 2 * SMS + 1)  # every count of query tiles that changes prefill's split count
    for nsplit in sorted({decode_splits(b, Hkv, window) for b in range(1, DECODE_WAVES * SMS + 1)}):
        swa_paged_decode(q[:1], k[:1], v[:1], cache, table, torch.tensor([window + 1], **i32), window, scale,
                         nsplit=nsplit)
    rows = _query_rows(q, q.shape[1] // Hkv)
    for nsplit in sorted({prefill_splits(t, Hkv, window + rows) for t in programs} if q.is_cuda else {1}):
        for n in (n for n in (1, 16, 17) if n <= q.shape[0]):
            swa_paged_prefill(q[:n], k[:n], v[:n], cache, table, torch.tensor([0, n], **i32),
                              torch.tensor([0], **i32), n, window, scale, nsplit=nsplit)


# -- torch references: ring.py's per-sequence attention (float64 math, cache updated in place) ------


def swa_paged_decode_ref(q, k_new, v_new, cache, block_table, positions: list[int], window: int,
                         scale: float | None = None) -> torch.Tensor:
    """Truth for ``swa_paged_decode``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for i, p in enumerate(positions):
        ring = PagedRing(cache, block_table[i].long(), q.shape[-1])
        outs.append(ring_decode_attention(q[i : i + 1].double(), k_new[i : i + 1].double(),
                                          v_new[i : i + 1].double(), ring, p, window, scale))
    return torch.cat(outs)


def swa_paged_prefill_ref(q, k, v, cache, block_table, cu_seqlens: list[int], start_pos: list[int], window: int,
                          scale: float | None = None) -> torch.Tensor:
    """Truth for ``swa_paged_prefill``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for n, p0 in enumerate(start_pos):
        s, e = cu_seqlens[n], cu_seqlens[n + 1]
        if e == s:
            continue
        ring = PagedRing(cache, block_table[n].long(), q.shape[-1])
        out[s:e] = ring_prefill_attention(q[s:e].double(), k[s:e].double(), v[s:e].double(), ring, p0, window,
                                          scale)
    return out
