"""The SWA decode (split + merge) of one step's 9 SWA layers at the 4B shapes, on one GPU (issue 15).

The bench's batch-1 profile (run 4) put the merge at 13.7 us a layer and the split at 8.9, for a window whose K/V
the GPU reads in about 2 us. This times `swa_paged_decode` as the served step calls it (9 layers back to back in
one CUDA graph, programmatic launch as served) for the package's kernels and, with `--baseline MODULE`, for
another version of `triton_ring` (say the previous commit's, copied into the package under another name), in
alternation, and checks both give the same outputs. `--splits` also times other split counts than the default.

    PYTHONPATH=.:kernels python benchmarks/swa_decode_merge.py --out benchmarks/results [--baseline MODULE]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, ".."), os.path.join(HERE, "..", "kernels")]

import triton  # noqa: E402
from gpu_h100 import time_ms  # noqa: E402
from infinitevl_kernels.layout import ring_blocks  # noqa: E402

HQ, HKV, D, WINDOW, BLOCK, LAYERS = 16, 2, 128, 8192, 16, 9  # InfiniteVL-4B's SWA layers, vLLM's block size


def case(batch: int, context: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    rb = ring_blocks(WINDOW, BLOCK)
    cache = torch.randn(batch * rb, HKV, BLOCK, 2 * D, generator=g, device="cuda").to(torch.bfloat16)
    table = torch.randperm(batch * rb, generator=g, device="cuda").view(batch, rb).int()
    q = torch.randn(batch, HQ, D, generator=g, device="cuda").to(torch.bfloat16)
    kv = torch.randn(batch, 2, HKV, D, generator=g, device="cuda").to(torch.bfloat16)
    pos = torch.full((batch,), context - 1, device="cuda")
    return dict(q=q, kn=kv[:, 0], vn=kv[:, 1], cache=cache, table=table, pos=pos)


def step_graph(mod, c: dict, nsplit: int | None):
    """One step's SWA decodes in a CUDA graph; the output of the last."""
    out = torch.empty_like(c["q"])

    def step() -> None:
        for _ in range(LAYERS):
            mod.swa_paged_decode(c["q"], c["kn"], c["vn"], c["cache"], c["table"], c["pos"], WINDOW, nsplit=nsplit,
                                 out=out)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--baseline", help="another triton_ring module to compare, e.g. infinitevl_kernels.swa.old")
    ap.add_argument("--splits", default="8,16,32", help="split counts timed besides the default")
    a = ap.parse_args()
    versions = {"package": importlib.import_module("infinitevl_kernels.swa.triton_ring")}
    if a.baseline:
        versions["baseline"] = importlib.import_module(a.baseline)
    rows = []
    for batch in (1, 54):
        for context in (16384, 131072):
            c = case(batch, context, seed=batch + context)
            default = versions["package"].decode_splits(batch, HKV, WINDOW)
            outs, ms = {}, {}
            graphs = {name: step_graph(mod, c, None) for name, mod in versions.items()}
            for name, extra in [(f"package/nsplit={n}", n) for n in map(int, a.splits.split(",")) if n != default]:
                graphs[name] = step_graph(versions["package"], c, extra)
            for _ in range(2):  # alternate, twice
                for name, (graph, out) in graphs.items():
                    ms.setdefault(name, []).append(time_ms(graph.replay, iters=50))
                    outs[name] = out.float().clone()
            ref = outs["package"]
            rows.append({
                "batch": batch, "context": context, "default_nsplit": default,
                "ms_per_step": {k: min(v) for k, v in ms.items()},
                "us_per_layer": {k: round(1e3 * min(v) / LAYERS, 2) for k, v in ms.items()},
                "max_abs_diff_vs_package": {k: float((o - ref).abs().max()) for k, o in outs.items()},
            })
            print(json.dumps(rows[-1]), flush=True)
    result = {"tool": "benchmarks/swa_decode_merge.py", "gpu": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "triton": triton.__version__,
                           "python": platform.python_version()},
              "shape": {"query_heads": HQ, "kv_heads": HKV, "head_dim": D, "window": WINDOW, "block": BLOCK,
                        "layers_a_step": LAYERS},
              "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "swa_decode_merge.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
