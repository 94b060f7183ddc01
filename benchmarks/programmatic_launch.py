"""A decode step with and without programmatic dependent launch, on one GPU (issue 15).

The step is the 4B kernel study's (`kernel_study_decoder.py`: the served path's kernels, random bf16 weights of
the real shapes) in one CUDA graph per batch size (1, and 54: the bench's largest batch). Only
`infinitevl_kernels.launch.PROGRAMMATIC_LAUNCH` differs between the two settings, which alternate twice, each
with graphs of its own. Both must give the same logits and states bit for
bit: the launch attribute changes when a kernel starts, never what it computes.

    PYTHONPATH=.:kernels python benchmarks/programmatic_launch.py --out benchmarks/results

Writes programmatic_launch.json: the step's time and its ratio to the byte floor, for each setting, batch size
and context.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, ".."), os.path.join(HERE, "..", "kernels")]

import triton  # noqa: E402
from gpu_h100 import kernel_table, our_model, our_step_bytes, time_ms  # noqa: E402
from infinitevl_kernels import launch, triton_ops  # noqa: E402
from kernel_study_decoder import DecodeGraphs  # noqa: E402

CONTEXTS = [4096, 131072]
BATCHES = [1, 54]
STEPS_COMPARED = 4


def copy_bandwidth() -> float:
    x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / (time_ms(lambda: y.copy_(x), iters=10) / 1e3)


def choose_products(m) -> list[dict]:
    """The served model's choice at load: Triton tile or cuBLAS per weight shape, timed on this GPU."""
    shapes = {}
    for L in m.layers:
        for name in ("inp", "o", "qkv", "gate_up", "down"):
            if name in L:
                shapes.setdefault(tuple(L[name].shape), L[name])
    shapes.setdefault(tuple(m.embed.shape), m.embed)
    return [triton_ops.choose_matvec(w) for w in shapes.values()]


def run_setting(m, graphs: DecodeGraphs, start: dict[str, torch.Tensor]) -> dict:
    """Times the step of each batch size at each context, then replays STEPS_COMPARED steps of the largest batch
    from `start` for the comparison."""
    ms = {}
    for bs in BATCHES:
        _, ids, pos, tpos, slots, out = graphs.graphs[bs]
        slots.copy_(torch.arange(bs, device=slots.device))
        for ctx in CONTEXTS:
            pos.fill_(ctx)
            tpos.fill_(ctx)
            ms[(bs, ctx)] = time_ms(lambda bs=bs: graphs.replay(bs), iters=100 if bs == 1 else 20, reps=7)
    for name, t in start.items():
        getattr(m, name).copy_(t)
    logits = []
    for i in range(STEPS_COMPARED):
        pos.fill_(CONTEXTS[-1] + i)
        tpos.fill_(CONTEXTS[-1] + i)
        graphs.replay(bs)
        logits.append(out.clone())
    return dict(ms=ms, logits=torch.stack(logits), states={n: getattr(m, n).clone() for n in start})


def profile_steps(m, start: dict[str, torch.Tensor], replays: int = 20) -> dict:
    """Kernels a step by name (microseconds and calls a step) for each batch size at the longest context."""
    from torch.profiler import ProfilerActivity, profile

    launch.PROGRAMMATIC_LAUNCH = False
    graphs = DecodeGraphs(m, BATCHES)
    tables = {}
    for bs in BATCHES:
        _, ids, pos, tpos, slots, out = graphs.graphs[bs]
        slots.copy_(torch.arange(bs, device=slots.device))
        pos.fill_(CONTEXTS[-1])
        tpos.fill_(CONTEXTS[-1])
        graphs.replay(bs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                graphs.replay(bs)
            torch.cuda.synchronize()
        tables[f"batch {bs}"] = [dict(kernel=r["kernel"], us=round(r["us"] / replays, 2), calls=r["calls"] // replays)
                                 for r in kernel_table(prof, limit=40)]
    for name, t in start.items():
        getattr(m, name).copy_(t)
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--profile", action="store_true",
                    help="also record each batch size's kernels a step (without programmatic launch, so that each "
                         "kernel's time is its own) at the longest context")
    args = ap.parse_args()
    t0 = time.time()
    bw = copy_bandwidth()
    m, _ = our_model(num_slots=max(BATCHES) + 1)  # the last slot is the graphs' padding slot
    products = choose_products(m)
    start = {n: getattr(m, n).clone() for n in ("conv_pool", "ssm_pool", "kv_cache")}
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for setting in ("without", "with", "without", "with"):
        launch.PROGRAMMATIC_LAUNCH = setting == "with"
        graphs = DecodeGraphs(m, BATCHES)
        runs[setting].append(run_setting(m, graphs, start))
        del graphs
        print(setting, {f"b{b} c{c}": round(v, 4) for (b, c), v in runs[setting][-1]["ms"].items()}, flush=True)
    kernels = profile_steps(m, start) if args.profile else None
    launch.PROGRAMMATIC_LAUNCH = None
    first = runs["without"][0]
    identical = all(torch.equal(r["logits"], first["logits"])
                    and all(torch.equal(r["states"][n], first["states"][n]) for n in start)
                    for rs in runs.values() for r in rs)
    result = {
        "tool": "benchmarks/programmatic_launch.py",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "wall_s": None,
        "env": dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    python=platform.python_version(), copy_bw_gb_s=round(bw / 1e9, 1)),
        "method": "kernel-study 4B decoder, a CUDA graph per batch size and setting; median of 7 x 100 replays "
                  "(batch 1) or 7 x 20 (batch 54); settings alternate (without, with, without, with); the byte "
                  "floor is weights + each sequence's state read and written at the measured copy bandwidth",
        "products": products,
        "bit_identical_logits_and_states": identical,
        "steps": {},
    }
    for bs in BATCHES:
        for ctx in CONTEXTS:
            key = (bs, ctx)
            floor = our_step_bytes(m, bs, ctx) / bw * 1e3
            row = {"floor_ms": round(floor, 4)}
            for setting, rs in runs.items():
                row[setting] = dict(ms=[round(r["ms"][key], 4) for r in rs],
                                    over_floor=round(min(r["ms"][key] for r in rs) / floor, 3))
            best = {setting: min(r["ms"][key] for r in rs) for setting, rs in runs.items()}
            row["speedup"] = round(best["without"] / best["with"], 3)
            result["steps"][f"batch {bs}, context {ctx}"] = row
    if kernels:
        result["kernels_per_step_without_programmatic_launch"] = kernels
    result["wall_s"] = round(time.time() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "programmatic_launch.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("env", "bit_identical_logits_and_states", "steps")}, indent=1))
    if not identical:
        sys.exit("the two settings computed different logits or states")


if __name__ == "__main__":
    main()
