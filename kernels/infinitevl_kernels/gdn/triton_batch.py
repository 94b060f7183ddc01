"""Gated DeltaNet on a slot pool in Triton: decode in place, and varlen prefill from each slot's state.

State layout is vLLM's (the one ``batch.py`` documents): conv ``[slots, C, K-1]`` (channels q|k|v),
recurrent ``[slots, H, Dv, Dk]`` (value-major).  Decode reads and writes both pools by slot index
inside the kernels, so a decode step moves each state exactly once (no gather/scatter copies).

Decode is two launches: the short convolution (each channel owned by one program, so its conv
state can be shifted in place without a race), then the recurrence (one program per
(sequence, head, block of value rows)).  Prefill runs the convolution over a packed varlen batch
in one launch (initial conv state read by slot, final one written back in place) and hands the
recurrence to fla's chunked kernel on CUDA (initial states read by slot; the final states are
written back by slot), or to the torch chunked reference elsewhere.

Every function here has its torch reference in ``batch.py`` (``gdn_decode_batch``,
``gdn_forward_batch``); ``tests/triton/test_triton_kernels.py`` compares them, run in float64, under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl

from ..launch import dependent_launch
from .batch import GDNBatch, GDNLayer, gdn_forward_batch
from .reference import gdn_chunked, gdn_gates


def triton_enabled(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1`` (how CI tests it)."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _conv_decode_kernel(
    x_ptr, w_ptr, state_ptr, slot_ptr, y_ptr,
    C, stride_xb, stride_sb, stride_sc, stride_sk, stride_yb,
    K: tl.constexpr, BC: tl.constexpr, PDL: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BC + tl.arange(0, BC)
    m = offs < C
    # Before the wait: the slot, the weights and the slot's history, none of which the kernel before writes (in
    # the served step, the input projection: the slots were written before the step's first kernel, and this
    # layer's conv state only here). Only the input row needs the wait.
    slot = tl.load(slot_ptr + b).to(tl.int64)
    base = state_ptr + slot * stride_sb + offs * stride_sc
    acc = tl.zeros([BC], tl.float32)
    for j in tl.static_range(K - 1):
        h = tl.load(base + j * stride_sk, mask=m, other=0.0).to(tl.float32)
        acc += h * tl.load(w_ptr + offs * K + j, mask=m, other=0.0).to(tl.float32)
    w_last = tl.load(w_ptr + offs * K + (K - 1), mask=m, other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(x_ptr + b * stride_xb + offs, mask=m, other=0.0).to(tl.float32)
    acc += x * w_last
    # shift the history left by one and append x (each channel belongs to this program alone)
    for j in tl.static_range(K - 2):
        h = tl.load(base + (j + 1) * stride_sk, mask=m, other=0.0)
        tl.store(base + j * stride_sk, h, mask=m)
    tl.store(base + (K - 2) * stride_sk, x.to(state_ptr.dtype.element_ty), mask=m)
    y = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + b * stride_yb + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gdn_decode_kernel(
    y_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, ssm_ptr, slot_ptr, o_ptr,
    stride_yb, stride_ab, stride_bb, stride_sb, stride_sh, stride_sv, stride_ob, stride_oh,
    key_dim, scale, eps,
    DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, PDL: tl.constexpr,
):
    bi = tl.program_id(0)
    h = tl.program_id(1)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    rk = tl.arange(0, DK)
    # The kernel before is always the conv's (gdn_decode_slots), which writes neither the slots nor this state,
    # nor a and b: it has passed its own wait, so the kernel that wrote them has finished. All of it streams in
    # while the conv runs (see launch.py); only the conv's output needs the wait.
    slot = tl.load(slot_ptr + bi).to(tl.int64)
    sp = ssm_ptr + slot * stride_sb + h * stride_sh + rv[:, None] * stride_sv + rk[None, :]
    S = tl.load(sp).to(tl.float32)  # [BV, DK]
    g = -tl.exp(tl.load(alog_ptr + h).to(tl.float32))
    dtb = tl.load(dtb_ptr + h).to(tl.float32)
    a = tl.load(a_ptr + bi * stride_ab + h).to(tl.float32)
    bb = tl.load(b_ptr + bi * stride_bb + h).to(tl.float32)
    g = g * _softplus(a + dtb)
    beta = 1.0 / (1.0 + tl.exp(-bb))
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    yrow = y_ptr + bi * stride_yb
    q = tl.load(yrow + h * DK + rk).to(tl.float32)
    k = tl.load(yrow + key_dim + h * DK + rk).to(tl.float32)
    v = tl.load(yrow + 2 * key_dim + h * DV + rv).to(tl.float32)
    q = q / tl.sqrt(tl.sum(q * q, 0) + eps)
    k = k / tl.sqrt(tl.sum(k * k, 0) + eps)
    S = S * tl.exp(g)
    pred = tl.sum(S * k[None, :], 1)
    S += (beta * (v - pred))[:, None] * k[None, :]
    o = tl.sum(S * q[None, :], 1) * scale
    tl.store(sp, S.to(ssm_ptr.dtype.element_ty))
    tl.store(o_ptr + bi * stride_ob + h * stride_oh + rv, o.to(o_ptr.dtype.element_ty))


def conv_decode_slots(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    slots: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Short conv + SiLU for one token per sequence; shifts ``conv_state[slots]`` in place.

    x: [B, C] (row stride free, unit channel stride); weight: [C, K] contiguous;
    conv_state: [slots, C, K-1] (any strides); slots: [B] int. Returns y [B, C] in x's dtype.
    """
    B, C = x.shape
    K = weight.shape[-1]
    if K < 2:
        raise ValueError("conv kernel size must be at least 2")
    if x.stride(-1) != 1:
        raise ValueError("x needs unit stride over channels")
    if not weight.is_contiguous():  # a copy here would be the kernel right before, writing what it reads early
        raise ValueError("the conv weight must be contiguous")
    y = torch.empty(B, C, dtype=x.dtype, device=x.device) if out is None else out
    BC = 256
    pdl = dependent_launch(x.device)
    _conv_decode_kernel[(B, triton.cdiv(C, BC))](
        x, weight, conv_state, slots, y,
        C, x.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), y.stride(0),
        K=K, BC=BC, PDL=pdl, launch_pdl=pdl,
    )
    return y


def gdn_decode_slots(
    mixed_qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    layer: GDNLayer,
    *,
    slots: torch.Tensor,
    out: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """One GDN token for each of B sequences, states updated in place by slot (Triton).

    Same contract as ``batch.gdn_decode_batch`` (its reference): mixed_qkv [B, C] before the
    conv; a, b [B, H]; ssm_state [slots, H, Dv, Dk] with unit stride over Dk. Returns o [B, H, Dv].
    """
    A_log, dt_bias, ssm_state, shape = layer.A_log, layer.dt_bias, layer.ssm_state, layer.shape
    B = mixed_qkv.shape[0]
    H, Dk, Dv = shape.num_heads, shape.head_k_dim, shape.head_v_dim
    if ssm_state.stride(-1) != 1:
        raise ValueError("ssm_state needs unit stride over Dk")
    y = conv_decode_slots(mixed_qkv, layer.conv_weight, layer.conv_state, slots)
    o = torch.empty(B, H, Dv, dtype=mixed_qkv.dtype, device=mixed_qkv.device) if out is None else out
    BV = min(32, Dv)
    pdl = dependent_launch(mixed_qkv.device)
    _gdn_decode_kernel[(B, H, triton.cdiv(Dv, BV))](
        y, a, b, A_log, dt_bias, ssm_state, slots, o,
        y.stride(0), a.stride(0), b.stride(0), ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2),
        o.stride(0), o.stride(1),
        shape.key_dim, Dk**-0.5, eps,
        DK=Dk, DV=Dv, BV=BV, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    return o


# -- varlen prefill -------------------------------------------------------------------------------


# The state pool's strides are left unspecialized: the start-up compilation runs on a scratch pool, whose layout
# (channel-major) Triton would otherwise specialize apart from the served pool's (a stride of 1 on another axis);
# they only address the K-1 history taps, not the token rows. So is the alignment of the per-sequence metadata: a
# mixed batch's prefills start after its decodes, so their slots and flags are views at any offset.
@triton.jit(do_not_specialize=["stride_sb", "stride_sc", "stride_sk"],
            do_not_specialize_on_alignment=["slot_ptr", "init_ptr", "cu_ptr"])
def _conv_varlen_kernel(
    x_ptr, w_ptr, state_ptr, slot_ptr, init_ptr, cu_ptr, y_ptr,
    C, stride_xt, stride_sb, stride_sc, stride_sk, stride_yt,
    K: tl.constexpr, KH: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = offs_c < C
    s0 = tl.load(cu_ptr + n)
    L = tl.load(cu_ptr + n + 1) - s0
    slot = tl.load(slot_ptr + n).to(tl.int64)
    has_init = tl.load(init_ptr + n) != 0
    sbase = state_ptr + slot * stride_sb + offs_c * stride_sc
    # Walk the sequence in blocks of BT tokens; tap j of output t reads input t - (K-1) + j,
    # which is the conv state for negative indices.
    for t0 in range(0, L, BT):
        rt = t0 + tl.arange(0, BT)
        mt = rt < L
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        for j in tl.static_range(K):
            src = rt - (K - 1) + j
            from_x = (src >= 0) & mt
            xv = tl.load(x_ptr + (s0 + src)[:, None] * stride_xt + offs_c[None, :],
                         mask=from_x[:, None] & mc[None, :], other=0.0).to(tl.float32)
            hist_idx = src + (K - 1)  # position inside the K-1 history when src < 0
            from_s = (src < 0) & mt & has_init
            sv = tl.load(sbase[None, :] + hist_idx[:, None] * stride_sk,
                         mask=from_s[:, None] & mc[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_c * K + j, mask=mc, other=0.0).to(tl.float32)
            acc += (xv + sv) * w[None, :]
        y = acc / (1.0 + tl.exp(-acc))
        tl.store(y_ptr + (s0 + rt)[:, None] * stride_yt + offs_c[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mt[:, None] & mc[None, :])
    # New history: the last K-1 inputs, reaching into the old history for short sequences.
    # Read everything first, then write (the old history feeds the new one).
    rh = tl.arange(0, KH)
    mh = rh < K - 1
    src = L - (K - 1) + rh
    xv = tl.load(x_ptr + (s0 + src)[:, None] * stride_xt + offs_c[None, :],
                 mask=((src >= 0) & mh)[:, None] & mc[None, :], other=0.0)
    sv = tl.load(sbase[None, :] + (src + (K - 1))[:, None] * stride_sk,
                 mask=((src < 0) & mh & has_init)[:, None] & mc[None, :], other=0.0)
    new = tl.where((src >= 0)[:, None], xv.to(tl.float32), sv.to(tl.float32))
    tl.debug_barrier()
    tl.store(sbase[None, :] + rh[:, None] * stride_sk, new.to(state_ptr.dtype.element_ty),
             mask=mh[:, None] & mc[None, :])


def conv_tile_rows(max_len: int) -> int:
    """Token rows a conv program covers at a time: each height is a kernel variant of its own."""
    return max(16, min(64, triton.next_power_of_2(max(max_len, 1))))


def conv_varlen_slots(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
) -> torch.Tensor:
    """Short conv + SiLU over a packed varlen batch x [T, C]; conv_state[slots] advanced in place.

    Sequences without an initial state start from zeros. Returns y [T, C].
    """
    T, C = x.shape
    K = weight.shape[-1]
    if K < 2:
        raise ValueError("conv kernel size must be at least 2")
    y = torch.empty(T, C, dtype=x.dtype, device=x.device)
    N = cu_seqlens.numel() - 1
    BC = 32  # 256 programs over 8192 channels even for one sequence
    BT = conv_tile_rows(max_len)
    _conv_varlen_kernel[(N, triton.cdiv(C, BC))](
        x, weight.contiguous(), conv_state, slots, has_initial_state, cu_seqlens, y,
        C, x.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), y.stride(0),
        K=K, KH=triton.next_power_of_2(K - 1), BT=BT, BC=BC,
    )
    return y


def _fla_chunk():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    return chunk_gated_delta_rule


def gdn_prefill_varlen(
    mixed_qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    layer: GDNLayer,
    *,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    use_fla: bool | None = None,
) -> torch.Tensor:
    """GDN over a packed varlen batch, each sequence from (and back into) its own slot's state.

    mixed_qkv [T, C] before the conv; a, b [T, H]; slots, has_initial_state [N]; cu_seqlens [N+1]
    (int32/int64 on the device). Returns o [T, H, Dv]. The recurrence runs in fla's chunked kernel
    on CUDA when fla is installed (``use_fla``), else in the torch chunked reference per sequence.
    """
    ssm_state, shape = layer.ssm_state, layer.shape
    H, Dk, Dv = shape.num_heads, shape.head_k_dim, shape.head_v_dim
    T = mixed_qkv.shape[0]
    if not triton_enabled(mixed_qkv):  # plain CPU: the serving path's torch code does it all
        o = torch.empty(T, H, Dv, dtype=mixed_qkv.dtype, device=mixed_qkv.device)
        batch = GDNBatch(cu_seqlens.tolist(), slots.tolist(), has_initial_state.tolist(), num_decodes=0)
        gdn_forward_batch(mixed_qkv, a, b, layer, batch=batch, out=o)
        return o
    y = conv_varlen_slots(mixed_qkv, layer.conv_weight, layer.conv_state, slots, has_initial_state, cu_seqlens,
                          max_len)
    q, k, v = y.split([shape.key_dim, shape.key_dim, shape.value_dim], dim=-1)
    q, k, v = q.view(T, H, Dk), k.view(T, H, Dk), v.view(T, H, Dv)
    g, beta = gdn_gates(a, b, layer.A_log, layer.dt_bias)
    chunk = _fla_chunk() if (use_fla is None or use_fla) and mixed_qkv.is_cuda else None
    if use_fla and chunk is None:
        raise RuntimeError("fla's chunk_gated_delta_rule is not available here")
    if chunk is not None:
        init = torch.where(has_initial_state[:, None, None, None], ssm_state[slots.long()].float(), 0.0)
        # one sequence: no cu_seqlens, so fla needs no host sync and the call can sit in a CUDA graph
        o, final = chunk(
            q.contiguous()[None], k.contiguous()[None], v.contiguous()[None], g[None], beta[None].to(q.dtype),
            scale=Dk**-0.5, initial_state=init, output_final_state=True, use_qk_l2norm_in_kernel=True,
            state_v_first=True, cu_seqlens=cu_seqlens.long() if cu_seqlens.numel() > 2 else None,
        )
        ssm_state.index_copy_(0, slots.long(), final.to(ssm_state.dtype))
        return o[0]
    o = torch.empty(T, H, Dv, dtype=mixed_qkv.dtype, device=mixed_qkv.device)
    for n, (s, e) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        slot = int(slots[n])
        S0 = ssm_state[slot].float().transpose(-1, -2) if bool(has_initial_state[n]) else None
        on, S = gdn_chunked(q[s:e].float(), k[s:e].float(), v[s:e].float(), g[s:e], beta[s:e], initial_state=S0)
        ssm_state[slot] = S.transpose(-1, -2).to(ssm_state.dtype)
        o[s:e] = on.to(o.dtype)
    return o


# -- start-up compilation -------------------------------------------------------------------------


# Packed batches whose shapes fall in every class Triton compiles apart, after the whole chunk as one sequence and
# as two (fla's varlen kernels, autotuned at full size too): the token count T and fla's chunk count NT (64 tokens
# a chunk, summed over sequences) each 1, a multiple of 16, or other; conv tile heights 16, 32 and 64 rows.
PREFILL_WARM_UP = (
    [1], [16], [17],  # (T, NT): (1, 1), (16k, 1), (other, 1); tiles 16, 16, 32
    [128], [129], [1000],  # (16k, other), (other, other), (other, 16k)
    [1, 16], [1, 127], [1, 960],  # two sequences: (other, other), (16k, other), (other, 16k)
)


# fla autotunes its q/k L2 norm once per bucket of rows (tokens x heads): 65,536 rows a bucket (`NB` in
# fla.modules.norm.l2norm), about 11 s each on an H200.
L2NORM_BUCKET_ROWS = 2048 * 32


def _l2norm_buckets(tokens: int, heads: int) -> list[list[int]]:
    """One single-sequence length per bucket that a chunk of `tokens` reaches, short of the chunk's own (the whole
    chunk runs first) and the first (the small batches)."""
    full = triton.cdiv(tokens * heads, L2NORM_BUCKET_ROWS)
    return [[nb * L2NORM_BUCKET_ROWS // heads] for nb in range(2, full)]


def _packed_row_offsets(x: torch.Tensor) -> tuple[int, ...]:
    """Row offsets of the packed input that reach both of Triton's alignment classes of a row pointer (16-byte
    aligned or not). A mixed batch's prefill rows follow its decodes', so they start at any row; where a row is not
    a multiple of 16 bytes (the tiny model in bf16: 772 columns), every other start is a variant of its own."""
    return (0,) if x.stride(0) * x.element_size() % 16 == 0 else (0, 1)


def warm_up_prefill(mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, layer: GDNLayer, *,
                    use_fla: bool) -> None:
    """Compile every variant the varlen prefill launches (the whole chunk, then ``PREFILL_WARM_UP``'s batches
    that fit in it) on a scratch pool of two slots; ``layer``'s own state pools are not touched. Without this
    a server compiles them on its first requests: 48 s on an H200, most of it fla's autotuning.

    fla keys its autotuning on the head shape, not the token count, so the first call, over all of
    ``mixed_qkv`` (pass a whole prefill chunk), is the one whose timings choose its configs.
    """
    shape = layer.shape
    T, C = mixed_qkv.shape
    dev = mixed_qkv.device
    conv = torch.zeros(2, C, layer.conv_weight.shape[-1] - 1, dtype=layer.conv_state.dtype, device=dev)
    ssm = torch.zeros(2, shape.num_heads, shape.head_v_dim, shape.head_k_dim, dtype=layer.ssm_state.dtype,
                      device=dev)
    scratch = GDNLayer(conv_weight=layer.conv_weight, A_log=layer.A_log, dt_bias=layer.dt_bias, conv_state=conv,
                       ssm_state=ssm, shape=shape)
    buckets = _l2norm_buckets(T, shape.num_heads) if use_fla else []
    for offset, lens in itertools.product(_packed_row_offsets(mixed_qkv),
                                          ([T], [T // 2, T - T // 2], *PREFILL_WARM_UP, *buckets)):
        n = sum(lens)
        if min(lens) < 1 or offset + n > T:
            continue
        rows = slice(offset, offset + n)
        cu = torch.tensor([0, *lens], device=dev).cumsum(0).to(torch.int32)  # int32 like vLLM's: same compile keys
        slots = torch.arange(len(lens), dtype=torch.int32, device=dev)
        gdn_prefill_varlen(mixed_qkv[rows], a[rows], b[rows], scratch, slots=slots,
                           has_initial_state=torch.tensor([True, False][: len(lens)], device=dev),
                           cu_seqlens=cu, max_len=max(lens), use_fla=use_fla)
