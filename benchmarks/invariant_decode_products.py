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
- whether each of the two best tiles (at M = 1, at M = 54) gives a row alone the same bits as inside M = 8, 32
  and 54;
- ``summary``: a decode step's products, today's against bit-exact tiles (one tile a shape at every batch size).
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
# (BM, BN, BK, warps, stages, K parts): tiles of 16 rows (mma.sync) and of 64 (Hopper's warpgroup MMA)
TILES = ([(16, bn, bk, 4, 4, split) for bn in (16, 32, 64) for bk in (128, 256) for split in (1, 2, 4, 8)]
         + [(64, bn, bk, 4, 3, split) for bn in (64, 128) for bk in (64, 128) for split in (1, 2, 4)])
BATCH_LARGEST = 54
INVARIANCE_BATCHES = (8, 32, BATCH_LARGEST)


@triton.jit
def _rows_kernel(x_ptr, w_ptr, part_ptr, count_ptr, y_ptr, M, N, K, K_PART, stride_x, stride_w, stride_y,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, S: tl.constexpr):
    # row tiles vary fastest, so the tiles of a batch that share a weight tile run together and share it in L2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)  # which K part (split-K): part s sums columns [s * K_PART, (s + 1) * K_PART)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    keep = (rm < M)[:, None] & (rn < N)[None, :]
    acc = tl.zeros([BM, BN], tl.float32)
    k_end = tl.minimum(K, (pid_s + 1) * K_PART)
    for k0 in range(pid_s * K_PART, k_end, BK):
        ks = k0 + rk
        xt = tl.load(x_ptr + rm[:, None] * stride_x + ks[None, :], mask=(rm < M)[:, None] & (ks < k_end)[None, :],
                     other=0.0)
        wt = tl.load(w_ptr + rn[:, None] * stride_w + ks[None, :], mask=(rn < N)[:, None] & (ks < k_end)[None, :],
                     other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc)
    out = y_ptr + rm[:, None] * stride_y + rn[None, :]
    if S == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=keep)
    else:
        # each part stores its sum; the last of a tile's parts to finish adds them up, always in part order
        tile = pid_m * tl.num_programs(1) + pid_n
        parts = part_ptr + (tile * S) * BM * BN + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        tl.store(parts + pid_s * BM * BN, acc)
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == S - 1:
            tl.debug_barrier()
            total = tl.load(parts, cache_modifier=".cg")
            for s in tl.static_range(1, S):
                total += tl.load(parts + s * BM * BN, cache_modifier=".cg")
            tl.store(out, total.to(y_ptr.dtype.element_ty), mask=keep)
            tl.atomic_xchg(count_ptr + tile, 0)  # ready for the next call (and a CUDA graph's next replay)


_scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rows_product(x: torch.Tensor, w: torch.Tensor, tile: tuple[int, ...]) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T in tiles of BM rows, K cut into `split` parts summed in part order: each output is
    reduced the same way for any M."""
    (M, K), N = x.shape, w.shape[0]
    bm, bn, bk, warps, stages, split = tile
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split)
    key = (grid, bm, bn, x.device)
    if key not in _scratch:  # made outside any graph capture (the timing warms up first), reused after
        tiles = grid[0] * grid[1]
        _scratch[key] = (torch.empty(tiles * split * bm * bn, dtype=torch.float32, device=x.device),
                         torch.zeros(tiles, dtype=torch.int32, device=x.device))
    parts, counts = _scratch[key]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    k_part = triton.cdiv(triton.cdiv(K, split), bk) * bk
    _rows_kernel[grid](x, w, parts, counts, y, M, N, K, k_part, x.stride(0), w.stride(0), y.stride(0),
                       BM=bm, BN=bn, BK=bk, S=split, num_warps=warps, num_stages=stages)
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
        if errors[key] >= 0.02:  # a wrong product is not timed (so never picked)
            continue
        result["m1_us"][key] = timed_us(lambda wi, tile=tile: rows_product(x1, wi, tile), w)
        result[f"m{BATCH_LARGEST}_us"][key] = timed_us(lambda wi, tile=tile: rows_product(x, wi, tile), w)
    big = f"m{BATCH_LARGEST}_us"
    timed = [t for t in TILES if str(t) in result["m1_us"]]
    best = {pick: min(timed, key=lambda t, pick=pick: result[pick][str(t)]) for pick in ("m1_us", big)}

    def differing(run) -> dict[int, int]:
        """Outputs of each row alone that differ from the same row inside batches of M."""
        alone = torch.cat([run(x[i:i + 1]) for i in range(BATCH_LARGEST)])
        return {m: int((alone[:m] != run(x[:m])).sum()) for m in INVARIANCE_BATCHES}

    result.update(
        max_rel_error_vs_ref=errors, best_tile_m1=str(best["m1_us"]), best_tile_m54=str(best[big]),
        best_tile_m1_invariant=differing(lambda xs: rows_product(xs, w, best["m1_us"])),
        best_tile_m54_invariant=differing(lambda xs: rows_product(xs, w, best[big])),
        cublas_invariant=differing(lambda xs: torch.nn.functional.linear(xs, w)),
    )
    best = str(best["m1_us"])
    m1 = result["m1_us"]
    print(f"{name} {n}x{k}: M=1 cublas {m1['cublas']:.2f} us, matvec "
          f"{min(v for t, v in m1.items() if t.startswith('matvec')):.2f}, best tile {best} {m1[best]:.2f}; "
          f"M={BATCH_LARGEST} cublas {result[f'm{BATCH_LARGEST}_us']['cublas']:.2f}, best tile there "
          f"{min(v for t, v in result[f'm{BATCH_LARGEST}_us'].items() if t != 'cublas'):.2f}; outputs that differ "
          f"alone vs in a batch: tiles {result['best_tile_m1_invariant']} {result['best_tile_m54_invariant']}, "
          f"cublas {result['cublas_invariant']}")
    return result


# How often a decode step of InfiniteVL-4B runs each product (9 SWA and 27 GDN layers, their MLPs, the LM head)
PER_STEP = {"swa_qkv": 9, "gdn_in": 27, "o_proj": 36, "mlp_gate_up": 36, "mlp_down": 36, "lm_head": 1}


def step_summary(results: dict) -> dict:
    """A step's products in microseconds: today's (batch 1: the faster of the matrix-vector pass and cuBLAS;
    batch 54: cuBLAS) against bit-exact tiles. A shape keeps one tile at every batch size (another tile sums in
    another order), picked either for batch 1 or for batch 54."""
    big = f"m{BATCH_LARGEST}_us"
    today = {"m1_us": sum(n * min(v for t, v in results[p]["m1_us"].items() if not t.startswith("("))
                             for p, n in PER_STEP.items()),
             big: sum(n * results[p][big]["cublas"] for p, n in PER_STEP.items())}
    out = {"today": today}
    for pick in ("m1_us", big):
        chosen = {p: min((t for t in results[p]["m1_us"] if t.startswith("(") and t in results[p][big]),
                         key=lambda t, p=p: results[p][pick][t]) for p in PER_STEP}
        out[f"tiles_for_{pick}"] = {"tiles": chosen, **{m: sum(n * results[p][m][chosen[p]] for p, n in
                                                                PER_STEP.items()) for m in ("m1_us", big)}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "invariant_decode_products.json")
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version()}
    results: dict = {}
    for name, (n, k) in SHAPES_4B.items():  # written after each shape: a run stopped early keeps what it measured
        results[name] = study(name, n, k, gen)
        record = {"results": results, "tiles": [str(t) for t in TILES], "env": env,
                  "summary": step_summary(results) if len(results) == len(SHAPES_4B) else None}
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
    print("->", path)


if __name__ == "__main__":
    main()
