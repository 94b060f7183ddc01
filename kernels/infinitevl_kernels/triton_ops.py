"""Small fused Triton ops for the decoder's glue (norms, SwiGLU, RoPE), with torch references.

At batch 1 a decode step is ~370 launches; unfused, the glue between the matrix products would
be several times that, and each launch costs microseconds even inside a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(x_ptr, h_ptr, w_ptr, y_ptr, N, eps, stride_x, stride_h, stride_y,
                    HAS_ADD: tl.constexpr, BN: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BN)
    m = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0)
    if HAS_ADD:
        x = x + tl.load(h_ptr + row * stride_h + offs, mask=m, other=0.0)
        tl.store(x_ptr + row * stride_x + offs, x, mask=m)
    xf = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = (xf * r).to(x.dtype).to(tl.float32) * w
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of rows of x [T, N]; with ``add``, first x += add in place (the residual stream)."""
    T, N = x.shape
    y = torch.empty_like(x)
    h = x if add is None else add
    _rmsnorm_kernel[(T,)](x, h, weight, y, N, eps, x.stride(0), h.stride(0), y.stride(0),
                          HAS_ADD=add is not None, BN=triton.next_power_of_2(N), num_warps=8)
    return y


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


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
                          D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    rd = tl.arange(0, D)
    o = tl.load(o_ptr + t * stride_ot + h * stride_oh + rd).to(tl.float32)
    gate = tl.load(g_ptr + t * stride_g + h * D + rd).to(tl.float32)
    w = tl.load(w_ptr + rd).to(tl.float32)
    y = o * tl.rsqrt(tl.sum(o * o, 0) / D + eps) * w * (gate / (1.0 + tl.exp(-gate)))
    tl.store(y_ptr + t * stride_y + h * D + rd, y.to(y_ptr.dtype.element_ty))


def gated_rmsnorm_heads(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """norm(o) * weight * silu(gate) per head: o [T, H, D], gate [T, H*D] -> [T, H*D]."""
    T, H, D = o.shape
    y = torch.empty(T, H * D, dtype=gate.dtype, device=o.device)
    _gated_rmsnorm_kernel[(T, H)](o, gate, weight, y, eps, o.stride(0), o.stride(1), gate.stride(0), y.stride(0), D=D)
    return y


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c, HALF: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, HALF)
    base = x_ptr + t * stride_t + h * stride_h
    a = tl.load(base + r).to(tl.float32)
    b = tl.load(base + HALF + r).to(tl.float32)
    c1 = tl.load(cos_ptr + t * stride_c + r)
    s1 = tl.load(sin_ptr + t * stride_c + r)
    c2 = tl.load(cos_ptr + t * stride_c + HALF + r)
    s2 = tl.load(sin_ptr + t * stride_c + HALF + r)
    tl.store(base + r, (a * c1 - b * s1).to(x_ptr.dtype.element_ty))
    tl.store(base + HALF + r, (b * c2 + a * s2).to(x_ptr.dtype.element_ty))


def rope_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half RoPE in place on x [T, H, D] (a view is fine); cos/sin [T, D] float32 contiguous."""
    T, H, D = x.shape
    _rope_kernel[(T, H)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), HALF=D // 2)
