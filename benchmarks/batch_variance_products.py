"""Is one sequence's product the same alone and inside a batch? The GPU suite's bf16 batch-invariance bar
(tests/gpu/test_bf16.py) compares greedy tokens of probes run alone and in a batch of 32; this looks at the
products under it, bit for bit, on one GPU.

For the decoder products of the tiny preset the suite serves (ours: the fused SWA QKV, GDN input and output,
MLP and LM head; the Qwen2.5-VL twin's: QKV, output, MLP and LM head), with random bf16 weights and inputs:

- ``cublas``: each of 1,024 random rows (``--rows``) through cuBLAS alone against the same row inside
  cuBLAS's product of M consecutive rows (M = 2, 8, 32), which is what a Transformer served by vLLM computes
  alone and in a batch;
- ``ours_batch_one``: our decoder's op around the product (``ours_op``: the norm or SwiGLU before it), each
  row alone against the same row inside the batches: at batch 1 the path ``triton_ops.choose_matvec`` picks at
  load (the Triton matrix-vector pass with the norm or SwiGLU folded in, or cuBLAS where it is faster), at
  batch M a norm or SwiGLU launch and cuBLAS.

The same at the sizes users serve (InfiniteVL-4B, the Qwen2.5-VL-3B twin), on a quarter of the rows.

And the prefill, where the GPU suite's batch puts a probe among 10,428 prompt tokens while alone it has 31:

- ``prefill_cublas``: the first 31 rows of cuBLAS's product of 10,428 rows against its product of those 31;
- ``gdn_prefill``: our GDN prefill (``gdn_prefill_varlen``: fla's chunked kernel where fla is installed, called
  without ``cu_seqlens`` for one sequence and with them for a packed batch) of a 31-token sequence alone against
  the same sequence packed first among others, outputs and final state.

Each records how many outputs differ and the largest difference in bf16 steps (units in the last place of the
batched value). No vLLM import: ``kernels/`` only.

    PYTHONPATH=kernels python benchmarks/batch_variance_products.py [--out benchmarks/results] [--prefill-tokens N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))

import triton  # noqa: E402
from infinitevl_kernels import triton_ops  # noqa: E402
from infinitevl_kernels.gdn.batch import GDNLayer, GDNShape  # noqa: E402
from infinitevl_kernels.gdn.triton_batch import _fla_chunk, gdn_prefill_varlen  # noqa: E402

VOCAB = 151936  # the real tokenizer's embedding rows; the tiny preset ties the LM head to them
# (N, K) of each decoder product of the tiny preset (hidden 128, MLP 256), as vLLM fuses them, and for ours the
# op our decoder layer wraps it in
SHAPES = {
    "ours": {"swa_qkv": (512, 128, "norm"), "gdn_in": (772, 128, "norm"), "swa_out": (128, 256, "plain"),
             "gdn_out": (128, 256, "gated_norm"), "mlp_gate_up": (512, 128, "norm"),
             "mlp_down": (128, 256, "silu"), "lm_head": (VOCAB, 128, "plain")},
    "twin": {"qkv": (384, 128, None), "attn_out": (128, 128, None), "mlp_gate_up": (512, 128, None),
             "mlp_down": (128, 256, None), "lm_head": (VOCAB, 128, None)},
}
# The same products at the sizes users serve: InfiniteVL-4B and its Qwen2.5-VL-3B twin (hidden 2048, MLP 11008,
# 16 query and 2 KV heads of 128, 16 linear-attention heads of 128)
SHAPES_SERVED = {
    "ours_4b": {"swa_qkv": (2560, 2048, "norm"), "gdn_in": (8224, 2048, "norm"), "swa_out": (2048, 2048, "plain"),
                "gdn_out": (2048, 2048, "gated_norm"), "mlp_gate_up": (22016, 2048, "norm"),
                "mlp_down": (2048, 11008, "silu"), "lm_head": (VOCAB, 2048, "plain")},
    "twin_3b": {"qkv": (2560, 2048, None), "attn_out": (2048, 2048, None), "mlp_gate_up": (22016, 2048, None),
                "mlp_down": (2048, 11008, None), "lm_head": (VOCAB, 2048, None)},
}
BATCHES = (2, 8, 32)
PROBE_TOKENS = 31  # the suite's shortest probe prompt; its batch prefills 10,428 tokens in one step
GDN_SHAPE = GDNShape(num_heads=2, head_k_dim=64, head_v_dim=128)  # the tiny preset's linear-attention heads


def bf16_steps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in units of the last place of b (bf16: 8 significant bits)."""
    ulp = torch.exp2(torch.floor(torch.log2(b.float().abs().clamp_min(2.0**-126))) - 7)
    return float(((a.float() - b.float()).abs() / ulp).max())


def compare(alone: torch.Tensor, in_batch: torch.Tensor) -> dict:
    return {"outputs": alone.numel(), "differ": int((alone != in_batch).sum()),
            "max_bf16_steps": bf16_steps(alone, in_batch)}


def ours_op(kind: str, w: torch.Tensor, rows: int, gen: torch.Generator):
    """Our decoder's op around a product, as the layer calls it (batch 1: one Triton pass with the norm or
    SwiGLU folded in; batch N: a norm or SwiGLU launch, then cuBLAS), on rows [lo, hi) of `rows` random inputs."""
    n, k = w.shape

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16)

    if kind == "norm":  # the residual add + RMSNorm before QKV, the GDN input and the MLP
        x, h, nw = rand(rows, k), rand(rows, k), 1 + 0.1 * rand(k)
        return lambda lo, hi: triton_ops.norm_linear(x[lo:hi], h[lo:hi], nw, 1e-6, w)[0]
    if kind == "silu":  # SwiGLU before the MLP's down product
        gate_up = rand(rows, 2 * k)
        return lambda lo, hi: triton_ops.silu_linear(gate_up[lo:hi], w)
    if kind == "gated_norm":  # the GDN output's gated RMSNorm (heads of 128) before its output product
        o, gate, nw = rand(rows, k // 128, 128), rand(rows, k), 1 + 0.1 * rand(128)
        return lambda lo, hi: triton_ops.gated_norm_linear(o[lo:hi], gate[lo:hi], nw, 1e-6, w)
    x = rand(rows, k)
    return lambda lo, hi: triton_ops.linear(x[lo:hi], w)


def alone_and_batched(op, rows: int) -> dict:
    """Every row computed alone against the same row inside consecutive batches of each size."""
    alone = torch.cat([op(i, i + 1) for i in range(rows)])
    return {m: compare(alone, torch.cat([op(i, i + m) for i in range(0, rows, m)])) for m in BATCHES}


def measure(n: int, k: int, kind: str | None, rows: int, gen: torch.Generator) -> dict:
    w = (torch.randn(n, k, generator=gen) * 0.05).to("cuda", torch.bfloat16)
    x = torch.randn(rows, k, generator=gen).to("cuda", torch.bfloat16)
    cublas = alone_and_batched(lambda lo, hi: torch.nn.functional.linear(x[lo:hi], w), rows)
    result: dict = {"shape": [n, k], "rows": rows, "by_batch": {m: {"cublas": c} for m, c in cublas.items()}}
    if kind is not None:
        result["ours_batch_one_path"] = str(triton_ops.choose_matvec(w)["uses"])
        result["ours_op"] = kind
        for m, c in alone_and_batched(ours_op(kind, w, rows, gen), rows).items():
            result["by_batch"][m]["ours_batch_one"] = c
    return result


def prefill_cublas(n: int, k: int, tokens: int, gen: torch.Generator) -> dict:
    w = (torch.randn(n, k, generator=gen) * 0.05).to("cuda", torch.bfloat16)
    x = torch.randn(tokens, k, generator=gen).to("cuda", torch.bfloat16)
    return compare(torch.nn.functional.linear(x[:PROBE_TOKENS], w),
                   torch.nn.functional.linear(x, w)[:PROBE_TOKENS])


def gdn_prefill(tokens: int, gen: torch.Generator) -> dict:
    """One 31-token sequence alone, then first in a packed batch of `tokens` (the rest in sequences of about
    300), each from a zero state in its own slot."""
    sh = GDN_SHAPE
    channels = 2 * sh.key_dim + sh.value_dim
    lens = [PROBE_TOKENS] + [300] * ((tokens - PROBE_TOKENS) // 300)
    cu = torch.tensor([0, *itertools.accumulate(lens)], device="cuda")
    t = int(cu[-1])

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to("cuda")

    params = dict(conv_weight=rand(channels, 4, scale=0.5).to(torch.bfloat16), A_log=rand(sh.num_heads).abs(),
                  dt_bias=rand(sh.num_heads))
    x = rand(t, channels).to(torch.bfloat16)
    a, b = rand(t, sh.num_heads).to(torch.bfloat16), rand(t, sh.num_heads).to(torch.bfloat16)

    def run(seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer = GDNLayer(conv_state=torch.zeros(seqs, channels, 3, device="cuda", dtype=torch.bfloat16),
                         ssm_state=torch.zeros(seqs, sh.num_heads, sh.head_v_dim, sh.head_k_dim, device="cuda"),
                         shape=sh, **params)
        rows = int(cu[seqs])
        o = gdn_prefill_varlen(x[:rows], a[:rows], b[:rows], layer, slots=torch.arange(seqs, device="cuda"),
                               has_initial_state=torch.zeros(seqs, dtype=torch.bool, device="cuda"),
                               cu_seqlens=cu[:seqs + 1], max_len=max(lens[:seqs]))
        return o[:PROBE_TOKENS], layer.ssm_state[0]

    (o1, s1), (on, sn) = run(1), run(len(lens))
    return {"path": "fla" if _fla_chunk() is not None else "torch", "batch_tokens": t,
            "output": compare(o1, on), "final_state": compare(s1, sn)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--prefill-tokens", type=int, default=10428)
    parser.add_argument("--rows", type=int, default=1024, help="decode rows compared alone and in each batch")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    results = {model: {name: measure(n, k, kind, args.rows, gen) for name, (n, k, kind) in shapes.items()}
               for model, shapes in SHAPES.items()}
    results.update({model: {name: measure(n, k, kind, args.rows // 4, gen) for name, (n, k, kind) in shapes.items()}
                    for model, shapes in SHAPES_SERVED.items()})
    results["prefill_cublas"] = {name: prefill_cublas(n, k, args.prefill_tokens, gen)
                                 for name, (n, k, _) in SHAPES["ours"].items() if name != "lm_head"}
    results["gdn_prefill"] = gdn_prefill(args.prefill_tokens, gen)
    record = {"results": results,
              "env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                      "cuda": torch.version.cuda, "python": platform.python_version()}}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "batch_variance_products.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    for model in [*SHAPES, *SHAPES_SERVED]:
        for name, r in results[model].items():
            differ = {m: {path: c["differ"] for path, c in v.items()} for m, v in r["by_batch"].items()}
            print(f"{model} {name} {r['shape']} (batch-1 path {r.get('ours_batch_one_path', 'cublas')}):",
                  f"of {r['rows']} rows x {r['shape'][0]} outputs, those that differ alone and in a batch:", differ)
    print("prefill, outputs of the 31 rows alone that differ from them in the batch:",
          {name: c["differ"] for name, c in results["prefill_cublas"].items()})
    print("GDN prefill", results["gdn_prefill"])
    print("->", path)


if __name__ == "__main__":
    main()
