"""Sliding-window attention over the ring KV layout, in Triton, with torch references.

Ring layout (what the vLLM side allocates for each SWA layer): K and V rings shaped
``[num_slots, cap, num_kv_heads, head_dim]`` with ``cap >= W-1``; the token at absolute
position p of a sequence lives in row ``p % cap`` of its slot.  A query at position p sees keys
at positions ``max(0, p-W+1) .. p`` (W includes itself).

- Decode (one new token per sequence): flash-decoding over the ring rows of the previous
  ``min(W-1, p)`` tokens, split over the window so batch 1 still fills the GPU, plus the new
  token's own K/V from the inputs; a second launch merges the splits and only then writes the
  new K/V into row ``p % cap`` (with ``cap == W-1`` that row still holds a key in the window).
- Chunked prefill (a varlen batch of new tokens, each sequence starting at its own position):
  each query block reads ring rows for keys before the chunk and the chunk's own K/V after it,
  with the exact window/causal mask; then the last ``min(cap, len)`` tokens go into the ring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import sliding_window_attention

NEG = tl.constexpr(-1.0e30)


@triton.jit
def _swa_decode_split_kernel(
    q_ptr, kn_ptr, vn_ptr, kr_ptr, vr_ptr, pos_ptr, slot_ptr, m_ptr, l_ptr, acc_ptr,
    stride_qb, stride_qh, stride_nb, stride_nh, stride_rs, stride_rt, stride_rh,
    cap, W, split_len, scale,
    NSPLIT: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    rg = tl.arange(0, GP)
    mg = rg < G
    rd = tl.arange(0, D)
    p = tl.load(pos_ptr + b).to(tl.int64)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + (kvh * G + rg)[:, None] * stride_qh + rd[None, :],
                mask=mg[:, None], other=0.0)
    lo = tl.maximum(p - W + 1, 0)
    start = tl.maximum(p - W + 1 + s * split_len, lo)
    end = tl.minimum(p - W + 1 + (s + 1) * split_len, p)  # exclusive; p itself comes from the inputs
    m_i = tl.full([GP], NEG, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    kbase = kr_ptr + slot * stride_rs + kvh * stride_rh
    vbase = vr_ptr + slot * stride_rs + kvh * stride_rh
    for j0 in range(start, end, BN):
        rj = j0 + tl.arange(0, BN)
        mj = rj < end
        row = rj % cap
        k = tl.load(kbase + row[:, None] * stride_rt + rd[None, :], mask=mj[:, None], other=0.0)
        v = tl.load(vbase + row[:, None] * stride_rt + rd[None, :], mask=mj[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * scale
        qk = tl.where(mj[None, :], qk, NEG)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        pr = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new
    if s == NSPLIT - 1:
        kn = tl.load(kn_ptr + b * stride_nb + kvh * stride_nh + rd).to(tl.float32)
        vn = tl.load(vn_ptr + b * stride_nb + kvh * stride_nh + rd).to(tl.float32)
        qk1 = tl.sum(q.to(tl.float32) * kn[None, :], 1) * scale
        m_new = tl.maximum(m_i, qk1)
        alpha = tl.exp(m_i - m_new)
        p1 = tl.exp(qk1 - m_new)
        l_i = l_i * alpha + p1
        acc = acc * alpha[:, None] + p1[:, None] * vn[None, :]
        m_i = m_new
    base = (b * tl.num_programs(1) + kvh) * NSPLIT + s
    tl.store(m_ptr + base * GP + rg, m_i)
    tl.store(l_ptr + base * GP + rg, l_i)
    tl.store(acc_ptr + (base * GP + rg)[:, None] * D + rd[None, :], acc)


@triton.jit
def _swa_decode_merge_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr, kn_ptr, vn_ptr, kr_ptr, vr_ptr, pos_ptr, slot_ptr,
    stride_ob, stride_oh, stride_nb, stride_nh, stride_rs, stride_rt, stride_rh, cap,
    NSPLIT: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    rg = tl.arange(0, GP)
    rd = tl.arange(0, D)
    base = (b * tl.num_programs(1) + kvh) * NSPLIT
    M = tl.full([GP], NEG, tl.float32)
    for s in tl.static_range(NSPLIT):
        M = tl.maximum(M, tl.load(m_ptr + (base + s) * GP + rg))
    L = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for s in tl.static_range(NSPLIT):
        w = tl.exp(tl.load(m_ptr + (base + s) * GP + rg) - M)
        L += w * tl.load(l_ptr + (base + s) * GP + rg)
        acc += w[:, None] * tl.load(acc_ptr + ((base + s) * GP + rg)[:, None] * D + rd[None, :])
    out = acc / L[:, None]
    tl.store(o_ptr + b * stride_ob + (kvh * G + rg)[:, None] * stride_oh + rd[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(rg < G)[:, None])
    # every split has read the ring by now: the new token may take its row
    p = tl.load(pos_ptr + b).to(tl.int64)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    dst = slot * stride_rs + (p % cap) * stride_rt + kvh * stride_rh + rd
    tl.store(kr_ptr + dst, tl.load(kn_ptr + b * stride_nb + kvh * stride_nh + rd))
    tl.store(vr_ptr + dst, tl.load(vn_ptr + b * stride_nb + kvh * stride_nh + rd))


def decode_splits(batch: int, kv_heads: int, window: int, sms: int = 132) -> int:
    """How many pieces to cut each window into so that about two waves of programs run."""
    want = max(1, (2 * sms) // max(1, batch * kv_heads))
    return int(min(32, triton.next_power_of_2(want), max(1, window // 256)))


def swa_ring_decode(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_ring: torch.Tensor,
    v_ring: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    window: int,
    scale: float | None = None,
    nsplit: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention for B sequences; writes each new K/V into its ring afterwards.

    q [B, Hq, D] (RoPE applied); k_new, v_new [B, Hkv, D]; rings [slots, cap, Hkv, D];
    positions [B]: absolute position of the new token; slots [B]. Returns [B, Hq, D].
    """
    B, Hq, D = q.shape
    Hkv, cap = k_ring.shape[2], k_ring.shape[1]
    if cap < window - 1:
        raise ValueError(f"ring of {cap} rows cannot hold a window of {window}")
    G = Hq // Hkv
    GP = max(16, triton.next_power_of_2(G))
    nsplit = nsplit or decode_splits(B, Hkv, window)
    split_len = triton.cdiv(window - 1, nsplit)
    scale = D**-0.5 if scale is None else scale
    f32 = dict(dtype=torch.float32, device=q.device)
    m = torch.empty(B, Hkv, nsplit, GP, **f32)
    lsum = torch.empty(B, Hkv, nsplit, GP, **f32)
    acc = torch.empty(B, Hkv, nsplit, GP, D, **f32)
    o = torch.empty_like(q) if out is None else out
    for t in (k_new, v_new):
        if t.stride() != k_new.stride() or t.stride(-1) != 1:
            raise ValueError("k_new and v_new need the same strides and unit stride over head_dim")
    if k_ring.stride() != v_ring.stride():
        raise ValueError("K and V rings need the same strides")
    rs = k_ring.stride()
    _swa_decode_split_kernel[(B, Hkv, nsplit)](
        q, k_new, v_new, k_ring, v_ring, positions, slots, m, lsum, acc,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), rs[0], rs[1], rs[2],
        cap, window, split_len, scale,
        NSPLIT=nsplit, G=G, GP=GP, D=D, BN=64, num_warps=4,
    )
    _swa_decode_merge_kernel[(B, Hkv)](
        m, lsum, acc, o, k_new, v_new, k_ring, v_ring, positions, slots,
        o.stride(0), o.stride(1), k_new.stride(0), k_new.stride(1), rs[0], rs[1], rs[2], cap,
        NSPLIT=nsplit, G=G, GP=GP, D=D, num_warps=4,
    )
    return o


@triton.jit
def _swa_prefill_kernel(
    q_ptr, k_ptr, v_ptr, kr_ptr, vr_ptr, cu_ptr, start_ptr, slot_ptr, o_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_rs, stride_rt, stride_rh, stride_ot, stride_oh,
    cap, W, scale,
    G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    qb = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.program_id(2)
    kvh = h // G
    s0 = tl.load(cu_ptr + n).to(tl.int64)
    L = tl.load(cu_ptr + n + 1).to(tl.int64) - s0
    if qb * BM >= L:
        return
    start = tl.load(start_ptr + n).to(tl.int64)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    ri = qb * BM + tl.arange(0, BM)
    mi = ri < L
    rd = tl.arange(0, D)
    q = tl.load(q_ptr + (s0 + ri)[:, None] * stride_qt + h * stride_qh + rd[None, :], mask=mi[:, None], other=0.0)
    p_i = start + ri
    last = start + tl.minimum(qb * BM + BM, L) - 1
    lo = tl.maximum(start + qb * BM - W + 1, 0)
    m_i = tl.full([BM], NEG, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for j0 in range(lo, last + 1, BN):
        pj = j0 + tl.arange(0, BN)
        in_ring = pj < start
        in_chunk = (pj >= start) & (pj <= last)
        ring_off = slot * stride_rs + (pj % cap)[:, None] * stride_rt + kvh * stride_rh + rd[None, :]
        chunk_off = (s0 + pj - start)[:, None] * stride_kt + kvh * stride_kh + rd[None, :]
        k = tl.load(kr_ptr + ring_off, mask=in_ring[:, None], other=0.0) + tl.load(
            k_ptr + chunk_off, mask=in_chunk[:, None], other=0.0)
        v = tl.load(vr_ptr + ring_off, mask=in_ring[:, None], other=0.0) + tl.load(
            v_ptr + chunk_off, mask=in_chunk[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * scale
        diff = p_i[:, None] - pj[None, :]
        ok = (diff >= 0) & (diff < W) & (pj[None, :] <= last)
        qk = tl.where(ok, qk, NEG)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        pr = tl.exp(qk - m_new[:, None])
        pr = tl.where(ok, pr, 0.0)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(o_ptr + (s0 + ri)[:, None] * stride_ot + h * stride_oh + rd[None, :], out.to(o_ptr.dtype.element_ty),
             mask=mi[:, None])


@triton.jit
def _ring_write_kernel(
    k_ptr, v_ptr, kr_ptr, vr_ptr, cu_ptr, start_ptr, slot_ptr,
    stride_kt, stride_kh, stride_rs, stride_rt, stride_rh, cap,
    HKV: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
):
    tb = tl.program_id(0)
    n = tl.program_id(1)
    s0 = tl.load(cu_ptr + n).to(tl.int64)
    L = tl.load(cu_ptr + n + 1).to(tl.int64) - s0
    start = tl.load(start_ptr + n).to(tl.int64)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    rt = tb * BT + tl.arange(0, BT)
    keep = (rt < L) & (rt >= L - cap)
    rd = tl.arange(0, D)
    for hh in tl.static_range(HKV):
        src = (s0 + rt)[:, None] * stride_kt + hh * stride_kh + rd[None, :]
        dst = slot * stride_rs + ((start + rt) % cap)[:, None] * stride_rt + hh * stride_rh + rd[None, :]
        tl.store(kr_ptr + dst, tl.load(k_ptr + src, mask=keep[:, None]), mask=keep[:, None])
        tl.store(vr_ptr + dst, tl.load(v_ptr + src, mask=keep[:, None]), mask=keep[:, None])


def swa_ring_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ring: torch.Tensor,
    v_ring: torch.Tensor,
    cu_seqlens: torch.Tensor,
    start_pos: torch.Tensor,
    slots: torch.Tensor,
    max_len: int,
    window: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked-prefill attention over a packed varlen batch, then the ring update.

    q [T, Hq, D], k/v [T, Hkv, D] (RoPE applied); cu_seqlens [N+1]; start_pos [N]: absolute position
    of each sequence's first new token (its ring holds the tokens before it); slots [N].
    """
    T, Hq, D = q.shape
    Hkv, cap = k_ring.shape[2], k_ring.shape[1]
    if cap < window - 1:
        raise ValueError(f"ring of {cap} rows cannot hold a window of {window}")
    if k.stride() != v.stride() or k_ring.stride() != v_ring.stride():
        raise ValueError("K and V need the same strides (chunk and ring)")
    N = cu_seqlens.numel() - 1
    scale = D**-0.5 if scale is None else scale
    o = torch.empty_like(q) if out is None else out
    rs = k_ring.stride()
    # short chunks (a streaming frame) need small query blocks to give the GPU enough programs
    BM, BN = ((64 if max_len > 2048 else 16), 64) if q.is_cuda else (16, 16)
    _swa_prefill_kernel[(triton.cdiv(max_len, BM), Hq, N)](
        q, k, v, k_ring, v_ring, cu_seqlens, start_pos, slots, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), rs[0], rs[1], rs[2], o.stride(0), o.stride(1),
        cap, window, scale, G=Hq // Hkv, D=D, BM=BM, BN=BN, num_warps=4, num_stages=2,
    )
    BT = 64
    _ring_write_kernel[(triton.cdiv(max_len, BT), N)](
        k, v, k_ring, v_ring, cu_seqlens, start_pos, slots,
        k.stride(0), k.stride(1), rs[0], rs[1], rs[2], cap, HKV=Hkv, D=D, BT=BT,
    )
    return o


# -- torch references -------------------------------------------------------------------------------


def _ring_past(k_ring, v_ring, slot: int, p: int, window: int):
    """Positions and K/V of the previous min(W-1, p) tokens of a sequence, read from its ring."""
    cap = k_ring.shape[1]
    past = torch.arange(max(0, p - window + 1), p, device=k_ring.device)
    rows = past % cap
    return past, k_ring[slot, rows], v_ring[slot, rows]


def swa_ring_decode_ref(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
    positions: list[int], slots: list[int], window: int,
) -> torch.Tensor:
    """Truth for ``swa_ring_decode`` (float64 math, rings updated in place)."""
    outs = []
    for i, (p, slot) in enumerate(zip(positions, slots)):
        past, kp, vp = _ring_past(k_ring, v_ring, slot, p, window)
        kk = torch.cat([kp, k_new[i : i + 1]]).double()
        vv = torch.cat([vp, v_new[i : i + 1]]).double()
        here = torch.tensor([p], device=q.device)
        pos = torch.cat([past, here])
        outs.append(sliding_window_attention(q[i : i + 1].double(), kk, vv, here, pos, window))
    for i, (p, slot) in enumerate(zip(positions, slots)):
        k_ring[slot, p % k_ring.shape[1]] = k_new[i]
        v_ring[slot, p % k_ring.shape[1]] = v_new[i]
    return torch.cat(outs)


def swa_ring_prefill_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
    cu_seqlens: list[int], start_pos: list[int], slots: list[int], window: int,
) -> torch.Tensor:
    """Truth for ``swa_ring_prefill`` (float64 math, rings updated in place)."""
    cap = k_ring.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for n, slot in enumerate(slots):
        s, e, p0 = cu_seqlens[n], cu_seqlens[n + 1], start_pos[n]
        past, kp, vp = _ring_past(k_ring, v_ring, slot, p0, window)
        qpos = torch.arange(p0, p0 + e - s, device=q.device)
        out[s:e] = sliding_window_attention(
            q[s:e].double(), torch.cat([kp, k[s:e]]).double(), torch.cat([vp, v[s:e]]).double(),
            qpos, torch.cat([past, qpos]), window,
        )
        for t in range(max(0, e - s - cap), e - s):
            k_ring[slot, (p0 + t) % cap] = k[s + t]
            v_ring[slot, (p0 + t) % cap] = v[s + t]
    return out
