"""Small fused Triton ops for the decoder's glue (norms, SwiGLU, RoPE), with torch references.

At batch 1 a decode step is ~370 launches; unfused, the glue between the matrix products would
be several times that, and each launch costs microseconds even inside a CUDA graph.
"""

from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl

from .launch import dependent_launch


@triton.jit
def _rmsnorm_kernel(x_ptr, h_ptr, xo_ptr, w_ptr, y_ptr, N, eps, stride_x, stride_h, stride_xo, stride_y,
                    HAS_ADD: tl.constexpr, STORE_SUM: tl.constexpr, BN: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BN)
    m = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0)
    xf = x.to(tl.float32)
    if HAS_ADD:  # as vLLM's fused add + norm: the sum in float32 is normed, the stream keeps it rounded
        xf = xf + tl.load(h_ptr + row * stride_h + offs, mask=m, other=0.0).to(tl.float32)
    if STORE_SUM:
        tl.store(xo_ptr + row * stride_xo + offs, xf.to(x.dtype), mask=m)
    r = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = (xf * r).to(x.dtype).to(tl.float32) * w
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None,
            sum_out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of rows of x [T, N]; with ``add``, of x + add, which is first stored in ``sum_out`` (default:
    x itself, in place: the residual stream). Without ``add``, a ``sum_out`` receives a copy of x."""
    T, N = x.shape
    y = torch.empty_like(x)
    h = x if add is None else add
    xo = x if sum_out is None else sum_out
    _rmsnorm_kernel[(T,)](x, h, xo, weight, y, N, eps, x.stride(0), h.stride(0), xo.stride(0), y.stride(0),
                          HAS_ADD=add is not None, STORE_SUM=add is not None or sum_out is not None,
                          BN=triton.next_power_of_2(N), num_warps=8)
    return y


def _rmsnorm_rounded(xf: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype) * weight


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rmsnorm_rounded(x.float(), weight, eps, x.dtype)


def add_rmsnorm_ref(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + h), x + h) rounded as vLLM's fused add + RMSNorm: the float32 sum is normed."""
    s = x.float() + h.float()
    return _rmsnorm_rounded(s, weight, eps, x.dtype), s.to(x.dtype)


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, N, stride_x, stride_y, BN: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BN + tl.arange(0, BN)
    m = offs < N
    g = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + N + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty), mask=m)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on [T, 2N] (gate | up) -> [T, N]."""
    T, N2 = gate_up.shape
    N = N2 // 2
    y = torch.empty(T, N, dtype=gate_up.dtype, device=gate_up.device)
    BN = 1024
    _silu_mul_kernel[(T, triton.cdiv(N, BN))](gate_up, y, N, gate_up.stride(0), y.stride(0), BN=BN)
    return y


@triton.jit
def _gated_rmsnorm_kernel(o_ptr, g_ptr, w_ptr, y_ptr, eps, stride_ot, stride_oh, stride_g, stride_y,
                          D: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    rd = tl.arange(0, D)
    w = tl.load(w_ptr + rd).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    o = tl.load(o_ptr + t * stride_ot + h * stride_oh + rd).to(tl.float32)
    gate = tl.load(g_ptr + t * stride_g + h * D + rd).to(tl.float32)
    y = o * tl.rsqrt(tl.sum(o * o, 0) / D + eps) * w * (gate / (1.0 + tl.exp(-gate)))
    tl.store(y_ptr + t * stride_y + h * D + rd, y.to(y_ptr.dtype.element_ty))


def gated_rmsnorm_heads(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """norm(o) * weight * silu(gate) per head, in float32: o [T, H, D] (any strides but the last), gate
    [T, H*D] with any row stride (a slice of a wider projection is read in place) -> [T, H*D].
    Reference: ``gdn.reference.gated_rmsnorm``."""
    T, H, D = o.shape
    if D & (D - 1) or o.stride(-1) != 1 or gate.stride(-1) != 1 or gate.shape != (T, H * D):
        raise ValueError(f"need a power-of-two head dim and unit last strides: o {tuple(o.shape)}, "
                         f"gate {tuple(gate.shape)}")
    y = torch.empty(T, H * D, dtype=gate.dtype, device=o.device)
    pdl = dependent_launch(o.device)
    _gated_rmsnorm_kernel[(T, H)](o, gate, weight, y, eps, o.stride(0), o.stride(1), gate.stride(0), y.stride(0), D=D,
                                  PDL=pdl, launch_pdl=pdl)
    return y


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c, HALF: tl.constexpr, HP: tl.constexpr,
                 PDL: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    r = tl.arange(0, HP)
    m = r < HALF
    c1 = tl.load(cos_ptr + t * stride_c + r, mask=m)
    s1 = tl.load(sin_ptr + t * stride_c + r, mask=m)
    c2 = tl.load(cos_ptr + t * stride_c + HALF + r, mask=m)
    s2 = tl.load(sin_ptr + t * stride_c + HALF + r, mask=m)
    base = x_ptr + t * stride_t + h * stride_h
    a = tl.load(base + r, mask=m).to(tl.float32)
    b = tl.load(base + HALF + r, mask=m).to(tl.float32)
    tl.store(base + r, (a * c1 - b * s1).to(x_ptr.dtype.element_ty), mask=m)
    tl.store(base + HALF + r, (b * c2 + a * s2).to(x_ptr.dtype.element_ty), mask=m)


def rope_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half RoPE in place on x [T, H, D] (a view is fine); cos/sin [T, D] float32."""
    T, H, D = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    pdl = dependent_launch(x.device)
    _rope_kernel[(T, H)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), HALF=D // 2,
                         HP=triton.next_power_of_2(D // 2), PDL=pdl, launch_pdl=pdl)


def _qk_heads(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """The q and k parts of a fused q|k|v projection [T, (Hq+2Hkv)*D]: adjacent, so one [T, Hq+Hkv, D] view."""
    return qkv[:, : (heads + kv_heads) * head_dim].view(qkv.shape[0], heads + kv_heads, head_dim)


def rope_qk_inplace(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor,
                    sin: torch.Tensor) -> None:
    """RoPE on the q and k parts of a fused q|k|v projection in place, in one launch."""
    rope_inplace(_qk_heads(qkv, heads, kv_heads, head_dim), cos, sin)


@triton.jit
def _mrope_kernel(x_ptr, y_ptr, pos_ptr, freq_ptr, rows_ptr, H, stride_t, stride_h, stride_yt, stride_yh,
                  stride_pr, stride_pt, HALF: tl.constexpr, HP: tl.constexpr, BH: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0)
    r = tl.arange(0, HP)
    m = r < HALF
    # The angles depend only on the step's positions (written before its first kernel): made before the wait. They
    # are made in float64, as mrope_cos_sin makes them, and reduced to one turn there; float32 cos/sin of the reduced
    # angle are within a few float32 roundings of the float64 ones, at a small part of their cost.
    row = tl.load(rows_ptr + r, mask=m, other=0)
    pos = tl.load(pos_ptr + row * stride_pr + t * stride_pt, mask=m, other=0)
    ang = pos.to(tl.float64) * tl.load(freq_ptr + r, mask=m, other=0.0)
    # tl.full keeps float64 constants (a Python float would be made float32)
    turns = tl.floor(ang * tl.full([HP], 0.15915494309189535, tl.float64) + 0.5)
    ang = (ang - turns * tl.full([HP], 6.283185307179586, tl.float64)).to(tl.float32)  # in [-pi, pi]
    c = tl.cos(ang)[None, :]
    s = tl.sin(ang)[None, :]
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    hh = tl.arange(0, BH)
    mk = (hh < H)[:, None] & m[None, :]
    src = x_ptr + t * stride_t + hh[:, None] * stride_h + r[None, :]
    a = tl.load(src, mask=mk).to(tl.float32)
    b = tl.load(src + HALF, mask=mk).to(tl.float32)
    dst = y_ptr + t * stride_yt + hh[:, None] * stride_yh + r[None, :]
    tl.store(dst, (a * c - b * s).to(y_ptr.dtype.element_ty), mask=mk)
    tl.store(dst + HALF, (b * c + a * s).to(y_ptr.dtype.element_ty), mask=mk)


def mrope_qk(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, positions: torch.Tensor,
             inv_freq: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """M-RoPE on the q and k parts of a fused q|k|v projection [T, (Hq+2Hkv)*D], into a new [T, (Hq+Hkv)*D] tensor
    (q then k; qkv is left as it is, as a custom op must). The angles are made in the kernel from the 3-row
    positions [3, T] and ``rope.mrope_frequencies`` (inv_freq in float64, rows): one launch, no cos/sin tables."""
    qk = _qk_heads(qkv, heads, kv_heads, head_dim)
    T, H, D = qk.shape
    if (positions.shape != (3, T) or inv_freq.dtype != torch.float64 or inv_freq.shape != (D // 2,)
            or rows.shape != (D // 2,)):
        raise ValueError(f"need positions [3, {T}] and float64 inv_freq and rows [{D // 2}]: positions "
                         f"{tuple(positions.shape)}, inv_freq {tuple(inv_freq.shape)} {inv_freq.dtype}, "
                         f"rows {tuple(rows.shape)}")
    y = torch.empty_like(qk, memory_format=torch.contiguous_format)
    pdl = dependent_launch(qkv.device)
    _mrope_kernel[(T,)](qk, y, positions, inv_freq, rows, H, qk.stride(0), qk.stride(1), y.stride(0), y.stride(1),
                        positions.stride(0), positions.stride(1), HALF=D // 2, HP=triton.next_power_of_2(D // 2),
                        BH=triton.next_power_of_2(H), PDL=pdl, num_warps=4, launch_pdl=pdl)
    return y.view(T, -1)


# -- batch-1 matrix-vector products with fused prologues ---------------------------------------------
#
# At batch 1 a decode step is ~190 matrix-vector products. cuBLAS runs the narrow ones (o_proj,
# down_proj: 2048 outputs) as split-K plus a reduce launch, and each of them needs a norm or SwiGLU
# launch in front. One pass per product instead: each program owns BN output rows and streams their
# whole K range, and the prologue (residual add + RMSNorm, SwiGLU, or the GDN output's gated norm) is
# recomputed per program from the small input vector, which sits in L2.

PRO_NONE, PRO_NORM, PRO_SILU, PRO_GATED = 0, 1, 2, 3

# (N, K, weight dtype) -> (BN, BK, num_warps), or None where cuBLAS is faster: choose_matvec fills it on the GPU
# at hand (the served model, at load), as benchmarks/gpu_h100.py's gemv_sweep does for the kernel study. Keyed by
# dtype too: one process may serve a float32 and a bf16 engine, whose best tiles differ.
MATVEC_CONFIGS: dict[tuple[int, int, torch.dtype], tuple[int, int, int] | None] = {}


@triton.jit
def _weight_tile(w_ptr, rn, mn, rk, K, stride_w, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :], mask=mn[:, None], other=0.0)
    return tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :], mask=mn[:, None] & (rk < K)[None, :], other=0.0)


@triton.jit
def _input_tile(x_ptr, h_ptr, nw_ptr, rk, K, r, eps, dtype, PRO: tl.constexpr, HAS_ADD: tl.constexpr,
                BK: tl.constexpr, GD: tl.constexpr):
    """The product's input over columns rk, in float32, rounded as the unfused ops round it."""
    mk = rk < K
    if PRO == 3:  # the GDN output's gated RMSNorm, per head of GD columns (a tile holds whole heads)
        o = tl.load(x_ptr + rk, mask=mk, other=0.0).to(tl.float32)
        g = tl.load(h_ptr + rk, mask=mk, other=0.0).to(tl.float32)
        nw = tl.load(nw_ptr + rk % GD, mask=mk, other=0.0).to(tl.float32)
        ss = tl.sum(tl.reshape(o * o, [BK // GD, GD]), 1)
        rs = tl.reshape(tl.broadcast_to(tl.rsqrt(ss / GD + eps)[:, None], [BK // GD, GD]), [BK])
        return (o * rs * nw * (g / (1.0 + tl.exp(-g)))).to(dtype).to(tl.float32)
    if PRO == 2:  # SwiGLU of a gate|up vector, rounded as silu_mul's output
        g = tl.load(x_ptr + rk, mask=mk, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + K + rk, mask=mk, other=0.0).to(tl.float32)
        return (g / (1.0 + tl.exp(-g)) * u).to(dtype).to(tl.float32)
    xv = tl.load(x_ptr + rk, mask=mk, other=0.0).to(tl.float32)
    if PRO == 1:
        if HAS_ADD:
            xv = xv + tl.load(h_ptr + rk, mask=mk, other=0.0).to(tl.float32)
        nw = tl.load(nw_ptr + rk, mask=mk, other=0.0).to(tl.float32)
        xv = ((xv * r).to(dtype).to(tl.float32) * nw).to(dtype).to(tl.float32)
    return xv


@triton.jit
def _matvec_kernel(x_ptr, h_ptr, nw_ptr, xo_ptr, w_ptr, b_ptr, y_ptr, N, K, eps, stride_w,
                   PRO: tl.constexpr, HAS_ADD: tl.constexpr, STORE_SUM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EVEN_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GD: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    mn = rn < N
    rk0 = tl.arange(0, BK)
    # The first weight tile streams in while the kernel before is still finishing (see launch.py)
    w = _weight_tile(w_ptr, rn, mn, rk0, K, stride_w, EVEN_K)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    r = 1.0
    if PRO == 1:  # RMSNorm over x (+ h): sum of squares first; program 0 also stores x (+ h), the stream
        ss = tl.zeros([BK], tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + rk0
            mk = rk < K
            xv = tl.load(x_ptr + rk, mask=mk, other=0.0)
            xf = xv.to(tl.float32)
            if HAS_ADD:
                xf = xf + tl.load(h_ptr + rk, mask=mk, other=0.0).to(tl.float32)
            if STORE_SUM:
                if pid == 0:
                    tl.store(xo_ptr + rk, xf.to(xv.dtype), mask=mk)
            ss += xf * xf
        r = tl.rsqrt(tl.sum(ss, 0) / K + eps)
    acc = w.to(tl.float32) * _input_tile(x_ptr, h_ptr, nw_ptr, rk0, K, r, eps, w.dtype, PRO, HAS_ADD, BK,
                                         GD)[None, :]
    for k0 in range(BK, K, BK):
        rk = k0 + rk0
        w = _weight_tile(w_ptr, rn, mn, rk, K, stride_w, EVEN_K)
        acc += w.to(tl.float32) * _input_tile(x_ptr, h_ptr, nw_ptr, rk, K, r, eps, w.dtype, PRO, HAS_ADD, BK,
                                              GD)[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=mn)


def _matvec_config(N: int, K: int, dtype: torch.dtype, cuda: bool) -> tuple[int, int, int]:
    if not cuda:  # the interpreter runs one program at a time: few, wide ones
        return min(1024, triton.next_power_of_2(N)), min(256, triton.next_power_of_2(K)), 4
    return MATVEC_CONFIGS.get((N, K, dtype)) or ((16 if N >= 8192 else 8), 512, 4)


def _use_matvec(x: torch.Tensor, w: torch.Tensor) -> bool:
    if (x.dim() != 2 or x.shape[0] != 1 or x.stride(-1) != 1 or w.stride(1) != 1
            or MATVEC_CONFIGS.get((*w.shape, w.dtype), ()) is None):
        return False
    return _triton_runs(x)


def _triton_runs(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _matvec(x, w, bias=None, pro=PRO_NONE, h=None, nw=None, eps=0.0, xo=None, config=None, out=None,
            head_dim=1):
    N, K = w.shape
    if w.stride(1) != 1 or x.stride(-1) != 1:
        raise ValueError("matvec needs unit stride over K")
    y = torch.empty(1, N, dtype=x.dtype, device=x.device) if out is None else out
    BN, BK, warps = config or _matvec_config(N, K, w.dtype, x.is_cuda)
    if BK % head_dim:
        raise ValueError(f"a {BK}-column tile does not hold whole heads of {head_dim}")
    pdl = dependent_launch(x.device)
    dummy = x
    _matvec_kernel[(triton.cdiv(N, BN),)](
        x, dummy if h is None else h, dummy if nw is None else nw, dummy if xo is None else xo, w,
        dummy if bias is None else bias, y, N, K, eps, w.stride(0),
        PRO=pro, HAS_ADD=h is not None, STORE_SUM=xo is not None, HAS_BIAS=bias is not None, EVEN_K=K % BK == 0,
        BN=BN, BK=BK, GD=head_dim,
        PDL=pdl, num_warps=warps, launch_pdl=pdl,
    )
    return y


# The tiles that won the H100 sweep for every decoder shape (benchmarks/results/gpu_h100.json, gemv_sweep).
MATVEC_CANDIDATES = ((4, 1024, 8), (8, 1024, 8))


def _graph_us(fn, calls: int, replays: int = 5) -> float:
    """Device time of one call of fn, in microseconds: the median replay of a CUDA graph of `calls` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and warms outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]


def choose_matvec(w: torch.Tensor, bias: torch.Tensor | None = None,
                  candidates: tuple[tuple[int, int, int], ...] = MATVEC_CANDIDATES) -> dict:
    """Times the batch-1 product with w [N, K] on this GPU, Triton tiles against cuBLAS, and records the
    faster in MATVEC_CONFIGS (None: cuBLAS), so ``linear`` uses it. As in a decode step, each call reads
    its weight from memory, not L2: the calls rotate over copies of w worth twice the L2 cache."""
    N, K = w.shape
    l2 = getattr(torch.cuda.get_device_properties(w.device), "L2_cache_size", 64 * 2**20)
    copies = min(16, max(1, -(-2 * l2 // (w.numel() * w.element_size()))))
    ws = [w] + [w.clone() for _ in range(copies - 1)]
    x = torch.randn(1, K, device=w.device).to(w.dtype)
    calls = max(16, copies)

    def rotating(run):
        weights = itertools.cycle(ws)
        return lambda: run(next(weights))

    timed = {"cublas": _graph_us(rotating(lambda wi: torch.nn.functional.linear(x, wi, bias)), calls)}
    for cfg in candidates:
        timed[cfg] = _graph_us(rotating(lambda wi, cfg=cfg: _matvec(x, wi, bias, config=cfg)), calls)
    best = min(timed, key=timed.get)
    MATVEC_CONFIGS[(N, K, w.dtype)] = None if best == "cublas" else best
    return {"shape": (N, K), "uses": best, "us": {str(k): round(v, 2) for k, v in timed.items()}}


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w[N, K]^T (+ bias): one Triton pass at T == 1, cuBLAS otherwise. With ``out`` (contiguous rows),
    the product lands there; the Triton pass writes it in place."""
    if _use_matvec(x, w) and (out is None or out.is_contiguous()):
        return _matvec(x, w, bias, out=out)
    y = torch.nn.functional.linear(x, w, bias)
    return y if out is None else out.copy_(y)


def norm_linear(x: torch.Tensor, h: torch.Tensor | None, norm_w: torch.Tensor, eps: float, w: torch.Tensor,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rmsnorm(x + h) @ w^T (+ bias), and x + h: a decoder layer's residual add, norm and first product, in one
    pass at batch 1 (each program recomputes the norm from the small input, which sits in L2). Returns (product,
    x + h) with x + h always a new tensor (with h None, a copy of x written by the same pass: the first layer's
    stream needs no zeros to add); x and h are left as they are. The sum is normed in float32 and kept rounded,
    as vLLM's fused add + RMSNorm does."""
    s = torch.empty_like(x)
    if _use_matvec(x, w):
        return _matvec(x, w, bias, PRO_NORM, h=h, nw=norm_w, eps=eps, xo=s), s
    if _triton_runs(x):
        n = rmsnorm(x, norm_w, eps, add=h, sum_out=s)
    elif h is None:
        n, s = rmsnorm_ref(x, norm_w, eps), x.clone()
    else:
        n, s = add_rmsnorm_ref(x, h, norm_w, eps)
    return torch.nn.functional.linear(n, w, bias), s


def gated_norm_linear(o: torch.Tensor, gate: torch.Tensor, norm_w: torch.Tensor, eps: float, w: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """gated_rmsnorm_heads(o, gate) @ w^T: the GDN layer's output norm and projection, in one pass at batch 1
    (27 launches fewer a step at the 4B shape); a norm launch and ``linear`` otherwise. o [T, H, D] contiguous,
    gate [T, H*D] with unit column stride; ``out`` as ``linear``'s."""
    T, H, D = o.shape
    x = o.reshape(T, H * D)
    if (_use_matvec(x, w) and gate.stride(-1) == 1 and (out is None or out.is_contiguous())
            and _matvec_config(*w.shape, w.dtype, x.is_cuda)[1] % D == 0):
        return _matvec(x, w, pro=PRO_GATED, h=gate, nw=norm_w, eps=eps, out=out, head_dim=D)
    return linear(gated_rmsnorm_heads(o, gate, norm_w, eps), w, out=out)


def silu_linear(gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up @ w^T for gate_up [T, 2K] (gate | up): one pass at batch 1."""
    if _use_matvec(gate_up, w):
        return _matvec(gate_up, w, pro=PRO_SILU)
    if _triton_runs(gate_up):
        return silu_mul(gate_up) @ w.t()
    gate, up = gate_up.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate_up.dtype) @ w.t()
