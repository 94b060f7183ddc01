"""The decoder's linear layers at batch 1 on CUDA: a Triton matrix-vector pass where it beats cuBLAS.

A batch-1 decode step reads every weight once and does nothing else of weight; cuBLAS runs those
products at about three quarters of the copy bandwidth on an H200 (the narrow ones as split-K plus a reduce
launch). ``infinitevl_kernels.triton_ops`` has a one-pass matrix-vector kernel; at load each weight shape is
timed both ways on the GPU at hand and the faster one is kept, so this can only make a step faster.

The layers stay vLLM's: only their ``quant_method`` (vLLM's seam for how a linear layer multiplies) is
swapped for one whose product is a custom op, which torch.compile and CUDA graphs treat as one opaque call
(its batch-1 branch is taken when a graph of batch 1 is captured). On one GPU the decoder layer also calls
``norm_linear`` and ``norm_mlp``, which fold each RMSNorm (and SwiGLU) into the product after it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from infinitevl_kernels import triton_ops
from torch import nn
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.utils.torch_utils import direct_register_custom_op

logger = logging.getLogger("vllm.infinitevl_vllm")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return triton_ops.linear(x, weight, bias)


def _linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


direct_register_custom_op("infinitevl_linear", _linear, fake_impl=_linear_fake)


def _add_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                     weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_ops.norm_linear(x, residual, norm_weight, eps, weight, bias)


def _add_norm_linear_fake(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                          weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty((x.shape[0], weight.shape[0])), torch.empty_like(x)


def _silu_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return triton_ops.silu_linear(gate_up, weight)


def _silu_linear_fake(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return gate_up.new_empty((gate_up.shape[0], weight.shape[0]))


direct_register_custom_op("infinitevl_add_norm_linear", _add_norm_linear, fake_impl=_add_norm_linear_fake)
direct_register_custom_op("infinitevl_silu_linear", _silu_linear, fake_impl=_silu_linear_fake)


def norm_linear(norm: nn.Module, linear: nn.Module, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused residual add + ``RMSNorm`` and the linear layer after it (one GPU): one matrix-vector pass at
    batch 1, a norm launch and the product otherwise. Returns (product, residual stream); the first layer passes
    no residual, and its stream is a copy of x that the same pass writes."""
    return torch.ops.vllm.infinitevl_add_norm_linear(x, residual, norm.weight, norm.variance_epsilon, linear.weight,
                                                     getattr(linear, "bias", None))


def norm_mlp(norm: nn.Module, mlp: nn.Module, x: torch.Tensor,
             residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's residual add + RMSNorm + SwiGLU MLP (vLLM's ``RMSNorm`` and ``Qwen2MLP``, one GPU):
    at batch 1 two matrix-vector passes with the norm and the SwiGLU folded in, saving two launches a layer;
    otherwise a norm launch, the products and a SwiGLU launch, as the compiled graph would run them.
    Returns (output, residual stream)."""
    gate_up, residual = norm_linear(norm, mlp.gate_up_proj, x, residual)
    return torch.ops.vllm.infinitevl_silu_linear(gate_up, mlp.down_proj.weight), residual


def linear_into(linear: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = linear(x)``, from inside a custom op that owns its output (the GDN layer's). With the batch-1 product
    on one GPU the product is written in place: the decode graph then has no copy node after it, which would also
    break the chain of programmatically launched kernels (infinitevl_kernels.launch)."""
    if _writes_in_place(linear):
        triton_ops.linear(x, linear.weight, out=out)
    else:
        out.copy_(linear(x)[0])


def gated_norm_linear_into(norm: nn.Module, linear: nn.Module, o: torch.Tensor, gate: torch.Tensor,
                           out: torch.Tensor) -> None:
    """``out[:] = linear(norm(o, gate))`` for the GDN layer's output on CUDA, from inside its op. With the batch-1
    product on one GPU the gated norm runs inside the product's pass at batch 1: one launch a layer fewer."""
    if _writes_in_place(linear):
        triton_ops.gated_norm_linear(o, gate, norm.weight, norm.eps, linear.weight, out=out)
    else:
        linear_into(linear, triton_ops.gated_rmsnorm_heads(o, gate, norm.weight, norm.eps), out)


def _writes_in_place(linear: nn.Module) -> bool:
    return (isinstance(linear.quant_method, _BatchOneProduct) and getattr(linear, "tp_size", 1) == 1
            and linear.bias is None)


_timed: set[tuple] = set()  # (shape, dtype) already timed in this process: layers of one shape share it


def _choose(layer: nn.Module) -> None:
    w = layer.weight
    key = (tuple(w.shape), w.dtype)
    if key in _timed:
        return
    _timed.add(key)
    result = triton_ops.choose_matvec(w.data, getattr(layer, "bias", None))
    logger.info("InfiniteVL: batch-1 product %dx%d uses %s (microseconds: %s)", *result["shape"],
                result["uses"], result["us"])


class _BatchOneProduct:
    """vLLM's unquantized method (the next class in the MRO), with its product as ``infinitevl_linear``."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        super().process_weights_after_loading(layer)
        _choose(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.vllm.infinitevl_linear(x, layer.weight, bias)


class BatchOneLinearMethod(_BatchOneProduct, UnquantizedLinearMethod):
    pass


class BatchOneHeadMethod(_BatchOneProduct, UnquantizedEmbeddingMethod):
    """The LM head's product; its embedding lookup stays vLLM's."""


def use_batch_one_products(layers: Iterable[nn.Module], lm_head: nn.Module) -> None:
    """Swap the plain (unquantized) linear layers among `layers`, and the head, to the methods above."""
    for module in layers:
        if type(getattr(module, "quant_method", None)) is UnquantizedLinearMethod:
            module.quant_method = BatchOneLinearMethod()
    if type(lm_head.quant_method) is UnquantizedEmbeddingMethod:
        lm_head.quant_method = BatchOneHeadMethod()
