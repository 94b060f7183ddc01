"""Do the GPU suite's batch-invariance probes keep their tokens under vLLM's batch-invariant mode?

vLLM keeps bit-exact batches behind ``VLLM_BATCH_INVARIANT=1`` (off by default). This runs the probes of
tests/gpu/test_bf16.py (4 prompts, 16 greedy tokens, alone and inside a batch of 32;
``infinitevl_vllm.tools.batch_invariance``) on InfiniteVL and on its Qwen2.5-VL twin, both in bf16 with vLLM's
default compilation, in whichever mode this process was started in (vLLM reads the switch when it loads), and
writes ``batch_invariant_mode_{default|invariant}_{preset}.json``. What the mode costs in speed is the bench's
to measure: ``VLLM_BATCH_INVARIANT=1 infinitevl-vllm bench ...`` (its engines inherit the switch).

    VLLM_BATCH_INVARIANT=1 python benchmarks/batch_invariant_mode.py [--preset tiny|4b] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from infinitevl_vllm.checkpoint import make_checkpoint
from infinitevl_vllm.tools.batch_invariance import probe_prompts, probes_alone_and_in_a_batch
from infinitevl_vllm.tools.bench import machine_info, source_revision

TWIN_PRESET = {"tiny": "tiny", "4b": "3b"}


def run(ckpt: Path, processor_ckpt: Path) -> dict:
    from transformers import AutoProcessor
    from vllm import LLM

    start = time.monotonic()
    llm = LLM(model=str(ckpt), dtype="bfloat16", max_model_len=4096, max_num_seqs=32, seed=0,
              enable_prefix_caching=False, gpu_memory_utilization=0.4, limit_mm_per_prompt={"image": 2, "video": 1})
    started = time.monotonic() - start
    try:
        probes, fillers = probe_prompts(AutoProcessor.from_pretrained(str(processor_ckpt)))
        return {"startup_s": round(started, 1), **probes_alone_and_in_a_batch(llm, probes, fillers)}
    finally:
        llm.llm_engine.engine_core.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(TWIN_PRESET), default="tiny")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    import vllm.envs as envs

    mode = "invariant" if envs.VLLM_BATCH_INVARIANT else "default"
    with tempfile.TemporaryDirectory() as tmp:
        ours = make_checkpoint(Path(tmp) / "ours", args.preset, seed=1)
        twin = make_checkpoint(Path(tmp) / "twin", TWIN_PRESET[args.preset], seed=1, arch="qwen2_5_vl")
        # one processor for both: the probes are the same token ids on both sides
        results = {"infinitevl": run(ours, ours), "qwen2_5_vl_twin": run(twin, ours)}
    record = {"mode": mode, "VLLM_BATCH_INVARIANT": envs.VLLM_BATCH_INVARIANT, "preset": args.preset,
              "results": results, "machine": machine_info(), **source_revision(Path(__file__).resolve().parents[1])}
    path = Path(args.out) / f"batch_invariant_mode_{mode}_{args.preset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    for model, r in results.items():
        print(f"{model} ({mode} mode): {r['fraction_identical']:.2f} of the probes kept their tokens in a batch")
    print("->", path)


if __name__ == "__main__":
    main()
