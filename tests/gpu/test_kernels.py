"""The batch-1 products the served decoder uses (infinitevl_vllm/model/batch_one_linear.py) at the 4B model's
weight shapes in bf16: the start-up timing picks Triton or cuBLAS per shape, and whichever it picks, and every
Triton tile it tries, computes the product as exactly as cuBLAS does (both against a float32 product)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

# (N, K) of the 4B decoder: GDN in (q|k|v|g|a|b) and out, MLP gate|up and down, SWA qkv and out, the LM head
SHAPES_4B = [(12320, 2048), (2048, 4096), (22016, 2048), (2048, 11008), (2560, 2048), (2048, 2048), (151936, 2048)]


@pytest.mark.parametrize("n,k", SHAPES_4B)
def test_batch_one_product_at_4b_shapes(n: int, k: int, gpu_record):
    from infinitevl_kernels import triton_ops

    g = torch.Generator(device="cuda").manual_seed(n + k)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)
    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16) if n == 2560 else None  # SWA qkv
    x = torch.randn(1, k, device="cuda", generator=g).to(torch.bfloat16)
    exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())

    def err(y: torch.Tensor) -> float:
        return float((y.double() - exact).abs().max())

    choice = triton_ops.choose_matvec(w, bias)
    gpu_record.setdefault("batch_one_products", {})[f"{n}x{k}"] = {"uses": str(choice["uses"]), "us": choice["us"]}
    cublas = err(torch.nn.functional.linear(x, w, bias))
    assert err(triton_ops.linear(x, w, bias)) <= 2 * cublas + 1e-3
    for cfg in triton_ops.MATVEC_CANDIDATES:
        assert err(triton_ops._matvec(x, w, bias, config=cfg)) <= 2 * cublas + 1e-3, cfg


@pytest.mark.parametrize("rows", [1, 5])
def test_norm_and_mlp_products_at_4b_shapes(rows: int):
    """The MLP as the served decoder runs it on one GPU (norm folded into gate|up, SwiGLU into down): the residual
    stream bit for bit vLLM's rounding, the output as close to a float64 MLP as cuBLAS after vLLM's norm is."""
    from infinitevl_kernels import triton_ops

    g = torch.Generator(device="cuda").manual_seed(rows)
    hidden, inter, eps = 2048, 11008, 1e-6
    bf = torch.bfloat16
    x, res = (torch.randn(rows, hidden, device="cuda", generator=g).to(bf) for _ in range(2))
    nw = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(bf)
    w_gu = (torch.randn(2 * inter, hidden, device="cuda", generator=g) * hidden**-0.5).to(bf)
    w_down = (torch.randn(hidden, inter, device="cuda", generator=g) * inter**-0.5).to(bf)
    for w in (w_gu, w_down):
        triton_ops.choose_matvec(w)
    gu, stream = triton_ops.norm_linear(x, res, nw, eps, w_gu)
    out = triton_ops.silu_linear(gu, w_down)

    normed, want_stream = triton_ops.add_rmsnorm_ref(x, res, nw, eps)
    assert torch.equal(stream, want_stream)
    gate, up = (normed.double() @ w_gu.double().t()).chunk(2, dim=-1)
    exact = (torch.nn.functional.silu(gate) * up) @ w_down.double().t()
    cublas_gu = normed @ w_gu.t()
    cublas = ((torch.nn.functional.silu(cublas_gu[:, :inter].float()) * cublas_gu[:, inter:].float()).to(bf)
              @ w_down.t())
    assert float((out.double() - exact).abs().max()) <= 2 * float((cublas.double() - exact).abs().max()) + 1e-3
    # the first layer has no residual yet: its stream is a copy of x, written by the same pass
    gu_first, first_stream = triton_ops.norm_linear(x, None, nw, eps, w_gu)
    assert first_stream.data_ptr() != x.data_ptr() and torch.equal(first_stream, x)
    want = triton_ops.rmsnorm_ref(x, nw, eps) @ w_gu.t()
    assert float((gu_first.float() - want.float()).abs().max()) <= 2e-2 * float(want.float().abs().max())


@pytest.mark.parametrize("rows", [1, 5])
def test_gdn_output_norm_and_projection_at_4b_shapes(rows: int):
    """The GDN layer's gated norm and output projection as the served decoder runs them (at batch 1 the norm inside
    the product's pass, the gate read in place from the input projection): as close to a float64 norm + product
    as the norm launch followed by cuBLAS is."""
    from infinitevl_kernels import triton_ops
    from infinitevl_kernels.gdn.reference import gated_rmsnorm

    g = torch.Generator(device="cuda").manual_seed(rows)
    heads, dv, hidden, eps = 16, 256, 2048, 1e-6
    bf = torch.bfloat16
    o = torch.randn(rows, heads, dv, device="cuda", generator=g).to(bf)
    proj = torch.randn(rows, 12320, device="cuda", generator=g).to(bf)
    gate = proj[:, 8192 : 8192 + heads * dv]
    nw = (torch.rand(dv, device="cuda", generator=g) + 0.5).to(bf)
    w = (torch.randn(hidden, heads * dv, device="cuda", generator=g) * (heads * dv) ** -0.5).to(bf)
    triton_ops.choose_matvec(w)
    out = triton_ops.gated_norm_linear(o, gate, nw, eps, w)
    exact = gated_rmsnorm(o.double(), gate.double().reshape(rows, heads, dv), nw.double(), eps).reshape(rows, -1)
    exact = exact @ w.double().t()
    two = triton_ops.gated_rmsnorm_heads(o, gate, nw, eps) @ w.t()
    assert float((out.double() - exact).abs().max()) <= 2 * float((two.double() - exact).abs().max()) + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swa_mrope_at_4b_shapes(dtype: torch.dtype):
    """The served SWA layer's M-RoPE (one launch that makes its angles from the positions, into a new tensor)
    against the torch RoPE the CPU path runs on float64 tables of random 3-row positions up to a million, read
    through a view of a wider buffer as vLLM's; the projection it reads is left as it was."""
    from infinitevl_kernels.rope import apply_rope, mrope_cos_sin, mrope_frequencies
    from infinitevl_kernels.triton_ops import mrope_qk

    g = torch.Generator(device="cuda").manual_seed(3)
    T, Hq, Hkv, D, section = 37, 16, 2, 128, [16, 24, 24]
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device="cuda", generator=g).to(dtype)
    before = qkv.clone()
    positions = torch.randint(0, 10**6, (3, T + 11), device="cuda", generator=g)[:, :T]
    qk = mrope_qk(qkv, Hq, Hkv, D, positions, *mrope_frequencies(D, 1e6, section, "cuda")).view(T, Hq + Hkv, D)
    cos, sin = (t.float() for t in mrope_cos_sin(positions, D, 1e6, section))
    ref = apply_rope(qkv[:, : (Hq + Hkv) * D].view(T, Hq + Hkv, D), cos, sin)
    assert torch.equal(qkv, before)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(qk, ref, **tol)
