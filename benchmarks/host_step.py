"""The engine's host work in a batch-1 decode step, by part, against the prompt's length (CPU, tiny preset).

On an H200 the served batch-1 step of InfiniteVL-4B is bound by the engine core's host work, not the GPU
(docs/gpu.md, session 13: 2.6 to 3.7 ms of host work a step against about 2.5 ms of GPU work), until steady decode
(model/steady_decode.py, session 14) let a step of the same decodes skip vLLM's input preparation and metadata
builds. This script asks which host parts a step has, whether any grows with the context, and what steady decode
saves: at each context the same engine decodes once with it and once without. vLLM's engine core runs in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) under cProfile while one request decodes; each part's time is
divided by the steps. Only the decode steps are
profiled (the prefill runs first, unprofiled). The model's forward and the logits are the CPU's compute here, not
host overhead on a GPU; they are listed to show what is left.

    python benchmarks/host_step.py [--contexts 512,8192,65536] [--tokens 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import platform
import pstats
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

# (label, file suffix, function name) of the parts of a step, as cProfile names them
PARTS = [
    ("engine core step", "v1/engine/core.py", "step"),
    ("scheduler.schedule", "v1/core/sched/scheduler.py", "schedule"),
    ("scheduler.update_from_output", "v1/core/sched/scheduler.py", "update_from_output"),
    # as vllm_patches installs them: steady decode's, which call vLLM's own when a step is not steady
    ("runner._prepare_inputs", "infinitevl_vllm/vllm_patches.py", "prepare_inputs_steady"),
    ("  vLLM's whole input preparation", "v1/worker/gpu_model_runner.py", "_prepare_inputs"),
    ("  steady decode (ours): inputs advanced in place", "infinitevl_vllm/model/steady_decode.py", "_advance_inputs"),
    ("runner._build_attention_metadata", "infinitevl_vllm/vllm_patches.py", "build_attention_metadata_steady"),
    ("  vLLM's metadata builds", "v1/worker/gpu_model_runner.py", "_build_attention_metadata"),
    ("  ring metadata builder (ours)", "infinitevl_vllm/model/ring_attention.py", "build"),
    ("  GDN metadata builders (vLLM's, under our subclass)", "infinitevl_vllm/model/vllm_model.py", "build"),
    ("sessions hooks (ours)", "infinitevl_vllm/serving/sessions_worker.py", "before_step"),
    ("model forward (CPU compute here)", "v1/worker/gpu_model_runner.py", "_model_forward"),
    ("logits (CPU compute here)", "infinitevl_vllm/model/vllm_model.py", "compute_logits"),
    ("runner.sample_tokens", "v1/worker/gpu_model_runner.py", "sample_tokens"),
    ("front end: output processing", "v1/engine/output_processor.py", "process_outputs"),
]


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    return sum(v[3] for (path, _, fn), v in stats.stats.items() if fn == name and path.endswith(suffix))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="ckpt/infinitevl-tiny")
    ap.add_argument("--contexts", default="512,8192,65536")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/host_step_cpu.json")
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    from vllm import LLM, SamplingParams

    llm = LLM(a.ckpt, max_model_len=max(contexts) + a.tokens + 16, max_num_seqs=4, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True)
    engine = llm.llm_engine
    runner = engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    rows = []
    for c, steady in itertools.product(contexts, (True, False)):
        # the same engine with and without steady decode, one after the other at each context: a record of
        # None makes the runner take vLLM's whole preparation every step (model/steady_decode.py)
        runner.__dict__.pop("_infinitevl_steady_decode", None)
        if not steady:
            runner._infinitevl_steady_decode = None
        prompt = {"prompt_token_ids": [1000 + (i * 7919) % 100000 for i in range(c)]}
        engine.add_request(f"ctx-{c}-{steady}", prompt, params)
        while not any(o.outputs[0].token_ids for o in engine.step()):  # the prefill, unprofiled
            pass
        prof, steps = cProfile.Profile(), 0
        t0 = time.perf_counter()
        prof.enable()
        while engine.has_unfinished_requests():  # the decode steps
            engine.step()
            steps += 1
        prof.disable()
        wall = (time.perf_counter() - t0) / steps
        stats = pstats.Stats(prof)
        parts = {label: round(1e3 * _cumulative(stats, suffix, fn) / steps, 3) for label, suffix, fn in PARTS}
        reused = runner._infinitevl_steady_decode.reused_steps if steady else 0
        rows.append({"context": c, "steady_decode": steady, "decode_steps": steps, "steady_decode_steps": reused,
                     "ms_per_step_wall_under_cprofile": round(1e3 * wall, 3), "ms_per_step": parts})
        print(json.dumps(rows[-1]), flush=True)
    import vllm

    out = {"tool": "benchmarks/host_step.py", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
           "versions": {"vllm": vllm.__version__}, "checkpoint": a.ckpt, "note": __doc__.split("\n\n")[1],
           "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
