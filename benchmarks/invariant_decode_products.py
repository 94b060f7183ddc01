"""Kernel study: can a decode product be the same bit for bit at every batch size and still be as fast as today's?

Today a batch-1 decode step multiplies on CUDA cores (``triton_ops._matvec_kernel``: one row, elementwise
products summed by ``tl.sum``) and a batch of M on cuBLAS; the two round about 0.1% of outputs one bf16 step
apart (``batch_variance_products.py``), which is what makes a probe's greedy tokens alone and inside a batch of
32 differ at a tie (tests/gpu/test_bf16.py). A product that reduces every output the same way whatever M is
would not. Here a tensor-core tile kernel does that: ``tl.dot`` on tiles of BM = 16 rows (a batch of one is
zero-padded), one fixed tile, K order and K split per weight shape, the K parts summed in order by a second
launch. A row's outputs never depend on the other rows of its tile, so M = 1 and every decode batch agree.

For each product of InfiniteVL-4B (the sizes the bench serves) it records, on the GPU at hand:
- the device time at M = 1 of cuBLAS, of the matrix-vector pass (its best candidate tile) and of each tile
  here; at M = 54 (the bench's largest batch) of cuBLAS and of each tile;
- whether the best tile's rows at M = 1 equal the same rows inside M = 8, 32 and 54, bit for bit.
Weights rotate past L2 as in a decode step (``triton_ops.choose_matvec``). No vLLM import: ``kernels/`` only.

    python benchmarks/invariant_decode_products.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))

from infinitevl_kernels import triton_ops  # noqa: E402

VOCAB = 151936
SHAPES_4B = {"swa_qkv": (2560, 2048), "gdn_in": (8224, 2048), "o_proj": (2048, 2048),
             "mlp_gate_up": (22016, 2048), "mlp_down": (2048, 11008), "lm_head": (VOCAB, 2048)}
# (BN, BK, warps, stages, K parts)
TILES = [(bn, bk, 4, 4, split) for bn in (16, 32, 64) for bk in (128, 256) for split in (1, 2, 4, 8)]
BM = 16
BATCH_LARGEST = 54
INVARIANCE_BATCHES = (8, 32, BATCH_LARGEST)


@triton.jit
def _rows_kernel(x_ptr, w_ptr, y_ptr, M, N, K, K_PART, stride_x, stride_w, stride_y, stride_s,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # row tiles vary fastest, so the tiles of a batch that share a weight tile run together and share it in L2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)  # which K part (split-K): part s sums columns [s * K_PART, (s + 1) * K_PART)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    k_end = tl.minimum(K, (pid_s + 1) * K_PART)
    for k0 in range(pid_s * K_PART, k_end, BK):
        ks = k0 + rk
        xt = tl.load(x_ptr + rm[:, None] * stride_x + ks[None, :], mask=(rm < M)[:, None] & (ks < k_end)[None, :],
                     other=0.0)
        wt = tl.load(w_ptr + rn[:, None] * stride_w + ks[None, :], mask=(rn < N)[:, None] & (ks < k_end)[None, :],
                     other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc)
    out = y_ptr + pid_s * stride_s + rm[:, None] * stride_y + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _sum_parts_kernel(p_ptr, y_ptr, MN, S: tl.constexpr, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    acc = tl.load(p_ptr + i, mask=i < MN, other=0.0)
    for s in tl.static_range(1, S):  # always in the order of the parts: the same sum for any batch
        acc += tl.load(p_ptr + s * MN + i, mask=i < MN, other=0.0)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=i < MN)


def rows_product(x: torch.Tensor, w: torch.Tensor, tile: tuple[int, int, int, int, int]) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T in tiles of BM rows, K cut into `split` parts summed in order by a second launch:
    each output is reduced the same way for any M."""
    (M, K), N = x.shape, w.shape[0]
    bn, bk, warps, stages, split = tile
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    k_part = triton.cdiv(triton.cdiv(K, split), bk) * bk
    parts = y if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    _rows_kernel[(triton.cdiv(M, BM), triton.cdiv(N, bn), split)](
        x, w, parts, M, N, K, k_part, x.stride(0), w.stride(0), N, M * N,
        BM=BM, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    if split > 1:
        _sum_parts_kernel[(triton.cdiv(M * N, 1024),)](parts, y, M * N, S=split, B=1024)
    return y


def rows_product_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The torch reference: float32 products of the bf16 operands, rounded once."""
    return (x.float() @ w.float().t()).to(x.dtype)


def timed_us(run, w: torch.Tensor) -> float:
    l2 = getattr(torch.cuda.get_device_properties(w.device), "L2_cache_size", 64 * 2**20)
    copies = min(16, max(1, -(-2 * l2 // (w.numel() * w.element_size()))))
    ws = itertools.cycle([w] + [w.clone() for _ in range(copies - 1)])
    return triton_ops._graph_us(lambda: run(next(ws)), max(16, copies))


def study(name: str, n: int, k: int, gen: torch.Generator) -> dict:
    w = (torch.randn(n, k, generator=gen) * 0.05).to("cuda", torch.bfloat16)
    x = torch.randn(BATCH_LARGEST, k, generator=gen).to("cuda", torch.bfloat16)
    x1 = x[:1]
    ref = rows_product_ref(x, w)
    result: dict = {"shape": [n, k], "m1_us": {}, f"m{BATCH_LARGEST}_us": {}}
    result["m1_us"]["cublas"] = timed_us(lambda wi: torch.nn.functional.linear(x1, wi), w)
    for cfg in triton_ops.MATVEC_CANDIDATES:
        result["m1_us"][f"matvec{cfg}"] = timed_us(lambda wi, cfg=cfg: triton_ops._matvec(x1, wi, config=cfg), w)
    result[f"m{BATCH_LARGEST}_us"]["cublas"] = timed_us(lambda wi: torch.nn.functional.linear(x, wi), w)
    errors = {}
    for tile in TILES:
        key = str(tile)
        try:
            out = rows_product(x, w, tile)
        except Exception as e:  # noqa: BLE001 - a tile the compiler rejects (shared memory) is recorded, not fatal
            errors[key] = f"{type(e).__name__}: {str(e)[:120]}"
            continue
        errors[key] = float(((out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-2)).max())
        result["m1_us"][key] = timed_us(lambda wi, tile=tile: rows_product(x1, wi, tile), w)
        result[f"m{BATCH_LARGEST}_us"][key] = timed_us(lambda wi, tile=tile: rows_product(x, wi, tile), w)
    tiles_ok = [t for t in map(str, TILES) if isinstance(errors[t], float) and errors[t] < 0.02]
    best = min(tiles_ok, key=lambda t: result["m1_us"][t])
    best_tile = next(t for t in TILES if str(t) == best)
    alone = torch.cat([rows_product(x[i:i + 1], w, best_tile) for i in range(BATCH_LARGEST)])
    cublas_alone = torch.cat([torch.nn.functional.linear(x[i:i + 1], w) for i in range(BATCH_LARGEST)])
    result.update(
        max_rel_error_vs_ref=errors, best_tile_m1=best,
        best_tile_m1_invariant={m: int((alone[:m] != rows_product(x[:m], w, best_tile)).sum()) for m in
                                INVARIANCE_BATCHES},
        cublas_invariant={m: int((cublas_alone[:m] != torch.nn.functional.linear(x[:m], w)).sum()) for m in
                          INVARIANCE_BATCHES},
    )
    m1 = result["m1_us"]
    print(f"{name} {n}x{k}: M=1 cublas {m1['cublas']:.2f} us, matvec "
          f"{min(v for t, v in m1.items() if t.startswith('matvec')):.2f}, best tile {best} {m1[best]:.2f}; "
          f"M={BATCH_LARGEST} cublas {result[f'm{BATCH_LARGEST}_us']['cublas']:.2f}, best tile there "
          f"{min(v for t, v in result[f'm{BATCH_LARGEST}_us'].items() if t != 'cublas'):.2f}; outputs that differ "
          f"alone vs in a batch: tile {result['best_tile_m1_invariant']}, cublas {result['cublas_invariant']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    results = {name: study(name, n, k, gen) for name, (n, k) in SHAPES_4B.items()}
    record = {"results": results, "tiles": [str(t) for t in TILES], "bm": BM,
              "env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                      "cuda": torch.version.cuda, "python": platform.python_version()}}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "invariant_decode_products.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print("->", path)


if __name__ == "__main__":
    main()
