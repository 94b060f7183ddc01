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
