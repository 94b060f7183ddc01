"""The batch-1 product seam: InfiniteVL's plain linear layers (and its LM head) multiply through one custom op
that equals vLLM's product at every batch size; quantized layers and other methods are left alone.

The Triton matrix-vector pass behind it is checked against torch under Triton's interpreter
(tests/triton) and at the real shapes on a GPU (tests/gpu/test_kernels.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infinitevl_vllm.model.batch_one_linear import (
    BatchOneHeadMethod,
    BatchOneLinearMethod,
    gated_norm_linear_into,
    linear_into,
    use_batch_one_products,
)


def _layer(method, n: int = 24, k: int = 40, bias: bool = True) -> nn.Module:
    g = torch.Generator().manual_seed(n * k)
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.randn(n, k, generator=g), requires_grad=False)
    layer.bias = nn.Parameter(torch.randn(n, generator=g), requires_grad=False) if bias else None
    layer.quant_method = method
    return layer


def test_plain_layers_and_the_head_are_swapped_others_are_not():
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    class Quantized(UnquantizedLinearMethod):  # a subclass stands for any other method
        pass

    plain, other, head = _layer(UnquantizedLinearMethod()), _layer(Quantized()), _layer(UnquantizedEmbeddingMethod())
    use_batch_one_products([plain, other], head)
    assert type(plain.quant_method) is BatchOneLinearMethod
    assert type(other.quant_method) is Quantized
    assert type(head.quant_method) is BatchOneHeadMethod


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_the_swapped_product_is_the_linear_map(rows: int, bias: bool):
    """What vLLM's own method computes on CUDA (``default_unquantized_gemm``: torch's linear)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    layer = _layer(UnquantizedLinearMethod(), bias=bias)
    use_batch_one_products([layer], _layer(None))
    x = torch.randn(rows, 40, generator=torch.Generator().manual_seed(rows))
    torch.testing.assert_close(layer.quant_method.apply(layer, x, layer.bias),
                               torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3])
def test_linear_into_fills_the_given_rows_with_the_product(rows: int):
    """The GDN layer's output projection writes into the rows of its op's output, and only those."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    layer = _layer(UnquantizedLinearMethod(), bias=False)
    use_batch_one_products([layer], _layer(None))
    x = torch.randn(rows, 40, generator=torch.Generator().manual_seed(rows))
    output = torch.full((rows + 1, 24), float("nan"))
    linear_into(layer, x, output[:rows])
    torch.testing.assert_close(output[:rows], torch.nn.functional.linear(x, layer.weight), rtol=1e-6, atol=1e-6)
    assert output[rows].isnan().all()


def test_the_gdn_output_norm_goes_inside_the_product_only_where_the_product_is_ours(monkeypatch):
    """The GDN layer's gated norm + output projection: one fused pass where the layer has the batch-1 product (the
    pass itself is checked under Triton's interpreter, tests/triton); the norm launch, then the layer's own product,
    elsewhere (here a layer left with vLLM's method). Both fill only the given rows, with the same numbers."""
    from infinitevl_kernels import triton_ops
    from infinitevl_kernels.gdn.reference import gated_rmsnorm
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    def normed(o, gate, w, eps):
        return gated_rmsnorm(o, gate.reshape(o.shape), w, eps).reshape(gate.shape)

    calls = []  # torch stand-ins for the Triton launches (no interpreter in this process)
    monkeypatch.setattr(triton_ops, "gated_rmsnorm_heads", lambda *a: calls.append("norm") or normed(*a))
    monkeypatch.setattr(triton_ops, "gated_norm_linear", lambda o, gate, w, eps, weight, out: calls.append("fused")
                        or out.copy_(torch.nn.functional.linear(normed(o, gate, w, eps), weight)))
    o_norm = nn.Module()
    o_norm.weight, o_norm.eps = nn.Parameter(torch.rand(8) + 0.5, requires_grad=False), 1e-6
    g = torch.Generator().manual_seed(5)
    o, proj = torch.randn(1, 5, 8, generator=g), torch.randn(1, 3 + 40 + 2, generator=g)
    gate = proj[:, 3:43]
    ours, vllms = _layer(UnquantizedLinearMethod(), bias=False), _layer(UnquantizedLinearMethod(), bias=False)
    use_batch_one_products([ours], _layer(None))
    vllms.forward = lambda x: (torch.nn.functional.linear(x, vllms.weight), None)  # a linear layer's (out, bias)
    outputs = []
    for layer, path in [(ours, ["fused"]), (vllms, ["norm"])]:
        calls.clear()
        output = torch.full((2, 24), float("nan"))
        gated_norm_linear_into(o_norm, layer, o, gate, output[:1])
        assert calls == path and output[1].isnan().all()
        outputs.append(output[0])
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], torch.nn.functional.linear(normed(o, gate, o_norm.weight, 1e-6),
                                                                      ours.weight)[0])


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_mlp_is_vllms_fused_add_norm_then_the_swiglu_mlp(rows: int, dtype: torch.dtype):
    """The fused norm + MLP rounds as vLLM's own (native) fused add + RMSNorm: the residual stream it returns is
    bit for bit vLLM's; the output is the SwiGLU MLP of vLLM's normed input."""
    from types import SimpleNamespace

    from vllm.ir.ops.layernorm import fused_add_rms_norm

    from infinitevl_vllm.model.batch_one_linear import norm_mlp

    g = torch.Generator().manual_seed(rows)
    hidden, inter, eps = 64, 96, 1e-6
    x, residual = torch.randn(rows, hidden, generator=g).to(dtype), torch.randn(rows, hidden, generator=g).to(dtype)
    norm = SimpleNamespace(weight=(torch.rand(hidden, generator=g) + 0.5).to(dtype), variance_epsilon=eps)
    gate_up_w = (torch.randn(2 * inter, hidden, generator=g) / 8).to(dtype)
    down_w = (torch.randn(hidden, inter, generator=g) / 10).to(dtype)
    mlp = SimpleNamespace(gate_up_proj=SimpleNamespace(weight=gate_up_w), down_proj=SimpleNamespace(weight=down_w))

    out, stream = norm_mlp(norm, mlp, x, residual)

    normed, want_stream = fused_add_rms_norm.impls["native"].impl_fn(x.clone(), residual.clone(), norm.weight, eps)
    assert torch.equal(stream, want_stream)
    gate, up = (normed.float() @ gate_up_w.float().t()).chunk(2, dim=-1)
    want = (torch.nn.functional.silu(gate) * up) @ down_w.float().t()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
