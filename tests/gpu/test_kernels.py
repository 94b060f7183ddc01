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
