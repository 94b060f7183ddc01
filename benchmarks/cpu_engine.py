"""CPU engine numbers for the `small` preset: start-up, prefill and decode throughput, peak RSS.

    .venv/bin/python benchmarks/cpu_engine.py [--preset small] [--out benchmarks/results/cpu_engine.json]

Decode throughput is output tokens / wall time of a generate() call whose prompts are short
(so prefill is a small part of it); prefill throughput is prompt tokens / wall time of a call
generating one token. RSS is the whole process tree (API process, engine core, worker),
sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import psutil

from infinitevl_vllm.tools.workloads import TreeRSS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_engine.json"))
    a = ap.parse_args()

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    from infinitevl_vllm.checkpoint import make_checkpoint

    ckpt = make_checkpoint(Path(tempfile.mkdtemp()) / a.preset, a.preset, seed=0)
    with TreeRSS() as rss:
        t0 = time.perf_counter()
        llm = LLM(model=str(ckpt), max_model_len=a.prefill_tokens + 256, max_num_seqs=8, seed=0)
        startup = time.perf_counter() - t0

        g = torch.Generator().manual_seed(0)
        long_prompt = {"prompt_token_ids": torch.randint(0, 150000, (a.prefill_tokens,), generator=g).tolist()}
        llm.generate([long_prompt], SamplingParams(max_tokens=1), use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        llm.generate([long_prompt], SamplingParams(max_tokens=1), use_tqdm=False)
        prefill_s = time.perf_counter() - t0

        decode = {}
        for batch in (1, 8):
            prompts = [{"prompt_token_ids": torch.randint(0, 150000, (16,), generator=g).tolist()}
                       for _ in range(batch)]
            sp = SamplingParams(max_tokens=a.decode_tokens, ignore_eos=True, temperature=0)
            llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            wall = time.perf_counter() - t0
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            decode[str(batch)] = {"tokens": n, "seconds": round(wall, 3), "tokens_per_s": round(n / wall, 2)}
        llm.llm_engine.engine_core.shutdown()

    result = {
        "preset": a.preset,
        "dtype": "bfloat16",
        "machine": {"cpus": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "processor": platform.processor() or platform.machine()},
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
        "startup_s": round(startup, 2),
        "prefill": {"tokens": a.prefill_tokens, "seconds": round(prefill_s, 3),
                    "tokens_per_s": round(a.prefill_tokens / prefill_s, 1)},
        "decode": decode,
        "peak_rss_bytes": rss.peak,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
