"""Where a served session append and a served batch-1 decode step spend their time, on CUDA.

    python3 benchmarks/served_step_anatomy.py CHECKPOINT [--out benchmarks/results/served_step_anatomy.json]

The bench (`infinitevl-vllm bench`) measures how long an append or a decode step takes; this script says why.
The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the one-process executor) so one
profiler sees the front end, the engine core and the model runner together. It keeps vLLM's defaults otherwise
(torch.compile, CUDA graphs) and the bench's KV budget, so the numbers sit beside the bench's. It records:

- session appends of one frame: wall time; the torch profiler's GPU busy time and kernel count per append; the
  host's time by Python function (cProfile); the host-device synchronizations an append makes, by call site;
- appends of 8 frames (what an append costs whatever its size, and what a frame adds);
- batch-1 decode steps after a 4K prompt: the wall time of each ``step()``, GPU busy time per step (torch
  profiler), the host's time by function (cProfile), and the SM and memory clocks (NVML) while decoding.

Not a goal measurement: nothing here enters the bench's summary. Results in one JSON file plus the cProfile
tables beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def host_table(prof: cProfile.Profile, path: Path, calls: int, top: int = 60) -> list[dict]:
    """The profile's functions by cumulative time, per call of the measured thing (ms), and the text table."""
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    path.write_text(buf.getvalue())
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": ncalls / calls,
                     "cum_ms": 1e3 * cumtime / calls, "self_ms": 1e3 * tottime / calls})
    rows.sort(key=lambda r: -r["cum_ms"])
    return [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows[:top]]


def gpu_profile(fn, calls: int) -> dict:
    """GPU busy time and kernels per call of fn, and the largest kernels, from the torch profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time)  # microseconds
    busy = sum(sum(v) for v in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    return {"calls": calls, "wall_ms_per_call_under_profiler": round(1e3 * wall / calls, 3),
            "gpu_busy_ms_per_call": round(busy / calls / 1e3, 3), "kernels_per_call": round(len(kernels) / calls, 1),
            "top_kernels": [{"name": n[:120], "per_call": round(len(v) / calls, 2),
                             "ms_per_call": round(sum(v) / calls / 1e3, 4)} for n, v in top]}


def syncs(fn) -> dict:
    """Host-device synchronizations fn makes, by the Python line that made them (torch's sync debug mode)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                    if "synchroniz" in str(w.message).lower())
    return {"total": sum(sites.values()), "by_site": dict(sites.most_common(25))}


class Clocks:
    """SM and memory clocks (MHz) sampled every 20 ms by NVML while the block runs."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]))
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM),
                                 self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_MEM)))
            time.sleep(0.02)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        sm = [s for s, _ in self.samples]
        mem = [m for _, m in self.samples]
        return {"samples": len(sm), "sm_mhz_min": min(sm), "sm_mhz_median": statistics.median(sm),
                "sm_mhz_max": max(sm), "mem_mhz_min": min(mem), "mem_mhz_max": max(mem),
                "max_sm_mhz": self.nvml.nvmlDeviceGetMaxClockInfo(self.handle, self.nvml.NVML_CLOCK_SM)}


def ms(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"n": len(xs), "p10": round(1e3 * xs[len(xs) // 10], 3), "p50": round(1e3 * statistics.median(xs), 3),
            "p90": round(1e3 * xs[(9 * len(xs)) // 10], 3), "max": round(1e3 * xs[-1], 3)}


def appends(llm, out: Path, doc: dict, save) -> None:
    from infinitevl_vllm.serving.sessions import StreamSession
    from infinitevl_vllm.tools.workloads import distinct_frame as frame

    k = iter(range(10**9))
    with StreamSession(llm) as session:
        for _ in range(3):  # first appends may still warm something up
            session.append([frame(next(k))])
        frames = [frame(next(k)) for _ in range(60)]
        walls = []
        for f in frames[:20]:
            t0 = time.perf_counter()
            session.append([f])
            walls.append(time.perf_counter() - t0)
        doc["append_1_frame_ms"] = ms(walls)
        save()
        prof = cProfile.Profile()
        prof.enable()
        for f in frames[20:30]:
            session.append([f])
        prof.disable()
        doc["append_1_frame_host"] = host_table(prof, out.with_suffix(".append_cprofile.txt"), 10)
        save()
        it = iter(frames[30:40])
        doc["append_1_frame_gpu"] = gpu_profile(lambda: session.append([next(it)]), 5)
        save()
        doc["append_1_frame_syncs"] = syncs(lambda: session.append([frames[45]]))
        save()
        walls = []
        for i in range(5):
            group = [frame(1000 + 8 * i + j) for j in range(8)]
            t0 = time.perf_counter()
            session.append(group)
            walls.append(time.perf_counter() - t0)
        doc["append_8_frames_ms"] = ms(walls)
        save()


def decode(llm, out: Path, doc: dict, save, context: int = 4096, tokens: int = 400) -> None:
    import torch
    from vllm import SamplingParams

    engine = llm.llm_engine
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 150000, (context,), generator=g).tolist()
    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=0.0)
    engine.add_request("anatomy-decode", {"prompt_token_ids": ids}, params)
    walls = []
    while not walls or engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
        if len(walls) > 4:
            break
    # steady decode: timed steps (the clocks sampled meanwhile), then cProfile, then the GPU profile, each over its
    # own steps
    timed = []
    clocks = Clocks() if torch.cuda.is_available() else None
    with clocks or contextlib.nullcontext():
        for _ in range(150):
            t0 = time.perf_counter()
            engine.step()
            timed.append(time.perf_counter() - t0)
    doc["decode_b1_step_ms"] = ms(timed)
    doc["decode_b1_clocks"] = clocks.summary() if clocks else None
    save()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        engine.step()
    prof.disable()
    doc["decode_b1_host"] = host_table(prof, out.with_suffix(".decode_cprofile.txt"), 50)
    doc["decode_b1_gpu"] = gpu_profile(engine.step, 20)
    save()
    engine.abort_request(["anatomy-decode"])
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/served_step_anatomy.json"))
    p.add_argument("--kv-cache-gib", type=float, default=6.0)
    p.add_argument("--compilation-config", default="{}", help="JSON for vLLM's compilation_config (a variant)")
    a = p.parse_args()

    import torch
    import vllm
    from vllm import LLM

    a.out.parent.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    doc: dict = {"what": __doc__.split("\n")[0], "checkpoint": a.checkpoint,
                 "gpu": torch.cuda.get_device_name() if cuda else "none (CPU smoke run)",
                 "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
                 "engine": "in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor 'uni'), vLLM's defaults, "
                           f"bf16, KV budget {a.kv_cache_gib} GiB as the bench"}

    def save() -> None:
        a.out.write_text(json.dumps(doc, indent=1))

    t0 = time.perf_counter()
    llm = LLM(model=a.checkpoint, dtype="bfloat16" if cuda else "auto", enable_prefix_caching=False,
              distributed_executor_backend="uni", kv_cache_memory_bytes=int(a.kv_cache_gib * 2**30),
              max_model_len=131072, limit_mm_per_prompt={"image": 8, "video": 0},
              compilation_config=json.loads(a.compilation_config))
    doc["compilation_config"] = json.loads(a.compilation_config)
    cfg = llm.llm_engine.vllm_config
    doc["startup_s"] = round(time.perf_counter() - t0, 1)
    doc["settings"] = {"max_num_seqs": cfg.scheduler_config.max_num_seqs,
                       "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
                       "cudagraph_mode": str(cfg.compilation_config.cudagraph_mode),
                       "max_cudagraph_capture_size": cfg.compilation_config.max_cudagraph_capture_size}
    save()
    appends(llm, a.out, doc, save)
    decode(llm, a.out, doc, save)
    doc["complete"] = True
    save()
    print(json.dumps({k: v for k, v in doc.items() if not k.endswith(("_host", "_gpu"))}, indent=1))


if __name__ == "__main__":
    main()
