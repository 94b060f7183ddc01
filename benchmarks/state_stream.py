"""Flat memory at any length: one engine, one sequence at a time of 10K, 100K and 1M tokens (tiny
checkpoint, the release's 8192-token window), the process tree's peak RSS during each, and the
time per generated token after that much context.

    .venv/bin/python benchmarks/state_stream.py [--tokens 10000,100000,1000000] \\
        [--out benchmarks/results/state_stream.json]

Each sequence is a prompt of N token ids (prefilled in 8192-token chunks) followed by 96 greedy
tokens; decode latency is the median gap between the last 48 (the client may lag the engine while it
takes in a long prompt's first output, and then catches up). RSS is sampled every 0.2 s over the
engine's whole process tree. Also written: the bytes one sequence holds and the slot count for some
memory budgets, from the formula in infinitevl_vllm/model/state_size.py (which the test suite checks against
the engine's allocation).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import psutil
import torch

from infinitevl_vllm.tools.workloads import CHUNK, GENERATED, stream_one_sequence


def slots_for_budgets(preset: str, dtype: torch.dtype, alignment: int, budgets_gib: list[int]) -> dict:
    from infinitevl_vllm.checkpoint import preset_config
    from infinitevl_vllm.config import InfiniteVLConfig
    from infinitevl_vllm.model import state_size

    cfg = InfiniteVLConfig(**preset_config(preset)).text_config
    block = state_size.state_block_size(cfg, alignment, dtype, dtype, dtype)
    per_seq = state_size.allocated_sequence_bytes(cfg, block, dtype)
    return {"preset": preset, "dtype": str(dtype).removeprefix("torch."), "block_size": block,
            "bytes_per_sequence": per_seq,
            "slots": {f"{b} GiB": (b << 30) // per_seq for b in budgets_gib}}


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    tokens = [r["tokens"] for r in runs]
    a.plot(tokens, [r["peak_rss_bytes"] / 2**30 for r in runs], "o-")
    a.set_xscale("log")
    a.set_ylim(0, max(r["peak_rss_bytes"] for r in runs) / 2**30 * 1.3)
    a.set_xlabel("tokens in the sequence")
    a.set_ylabel("peak RSS of the engine (GiB)")
    a.set_title("Memory per sequence length")
    b.plot(tokens, [r["decode_ms_per_token"] for r in runs], "o-", color="tab:orange")
    b.set_xscale("log")
    b.set_ylim(0, max(r["decode_ms_per_token"] for r in runs) * 1.3)
    b.set_xlabel("tokens of context")
    b.set_ylabel("ms per generated token")
    b.set_title("Decode latency after that context")
    fig.suptitle(f"InfiniteVL tiny on vLLM CPU ({result['machine']['cpus']} cores): flat in sequence length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="10000,100000,1000000")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/state_stream.json"))
    args = ap.parse_args()
    lengths = [int(x) for x in args.tokens.split(",")]

    import vllm
    from vllm import LLM

    from infinitevl_vllm.checkpoint import make_checkpoint
    from infinitevl_vllm.model.state_manager import StatePool

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "tiny", "tiny", seed=0)
        llm = LLM(model=str(ckpt), dtype="float32", enforce_eager=True, max_num_seqs=1,
                  max_model_len=max(lengths) + GENERATED, max_num_batched_tokens=CHUNK, enable_chunked_prefill=True,
                  limit_mm_per_prompt={"image": 0, "video": 0}, seed=0)
        pool = StatePool.from_vllm_config(llm.llm_engine.vllm_config)
        runs = []
        for n in lengths:
            runs.append(stream_one_sequence(llm, n))
            r = runs[-1]
            print(f"{n} tokens: peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, {r['prefill_tokens_per_s']:.0f} "
                  f"prefill tok/s, {r['decode_ms_per_token']:.1f} ms/token", flush=True)
        llm.llm_engine.engine_core.shutdown()
    result = {
        "what": "one sequence at a time through one engine; peak RSS of the whole process tree during each",
        "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform(), "vllm": vllm.__version__,
                    "torch": torch.__version__},
        "model": "tiny preset, float32, window 8192, eager",
        "peak_rss_bytes": {str(r["tokens"]): r["peak_rss_bytes"] for r in runs},
        "decode_ms_per_token": {str(r["tokens"]): r["decode_ms_per_token"] for r in runs},
        "rss_growth_last_decade": (runs[-1]["peak_rss_bytes"] - runs[-2]["peak_rss_bytes"]) / runs[-2]["peak_rss_bytes"]
        if len(runs) > 1 else None,
        "state_pool": {"bytes_per_sequence": pool.bytes_per_sequence, "blocks_per_sequence": pool.blocks_per_sequence,
                       "pool_blocks": pool.num_blocks, "slots": pool.slots},
        "slots_for_budget": [slots_for_budgets("tiny", torch.float32, 128, [1, 8]),
                             slots_for_budgets("4b", torch.bfloat16, 16, [20, 60])],
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
