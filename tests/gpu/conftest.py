"""GPU suite: one vLLM engine per configuration for the whole session, and the results record.

Every engine runs with vLLM's defaults for compilation (torch.compile in VLLM_COMPILE mode, CUDA
graphs FULL_AND_PIECEWISE): `start_engine` refuses `enforce_eager`, `compilation_config` and
`optimization_level`, and records the modes each engine ended up with, as its workers report them
(vLLM lowers the CUDA-graph mode at start-up when an attention backend cannot be captured whole, and
only the worker's config shows that); servers record the modes their start-up log shows.

A cold start-up compiles for one to two minutes, so the two servers (bf16 with tensor parallel 2, and
with data parallel 2 for the examples) start in the background when the session's first test sets up,
while the in-process engines start one after another. Engines are small (max_model_len 4096, at most
32 sequences) and each gets a fixed KV-cache budget (`kv_cache_memory_bytes`: vLLM then skips its
memory profiling, which would count memory that engines starting beside it take), so all of them fit
on the GPUs side by side.

At the end, when CUDA was available and at least one gpu test ran, the session writes
benchmarks/results/gpu_vllm_checks.json (`build_record` says what is in it), or the path in
$INFINITEVL_GPU_CHECKS: on a lent GPU machine each call re-copies the working tree over the tracked file, so the
record has to be written outside it and copied back.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from infinitevl_vllm.tools.batch_invariance import prompt_logprobs
from infinitevl_vllm.tools.bench import source_revision
from infinitevl_vllm.tools.workloads import hf_prompt_logprobs

from .helpers import F32_CHUNK, Parity, parity_prompts

REPO = Path(__file__).resolve().parents[2]
GPU_TESTS = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("INFINITEVL_GPU_CHECKS", REPO / "benchmarks" / "results" / "gpu_vllm_checks.json"))

GPU_MEMORY_UTILIZATION = 0.12  # of each GPU, per engine: several engines share a GPU
KV_CACHE_BYTES = 2 << 30  # per engine and GPU: hundreds of 4096-token sequences of the tiny preset
BASE_OPTIONS: dict[str, Any] = dict(max_model_len=4096, gpu_memory_utilization=GPU_MEMORY_UTILIZATION, seed=0,
                                    kv_cache_memory_bytes=KV_CACHE_BYTES,
                                    enable_prefix_caching=False)  # ours refuses it anyway; the twin too, for fairness
BF16_OPTIONS: dict[str, Any] = dict(dtype="bfloat16", max_num_seqs=32, limit_mm_per_prompt={"image": 2, "video": 1})
API_KEY = "gpu-test-key"
DEFAULT_MODES = {"mode": "VLLM_COMPILE", "cudagraph_mode": "FULL_AND_PIECEWISE"}

# Process-wide settings while this session's engines live; neither changes what an engine computes.
SESSION_ENV = {
    # The float32 engine runs in this process and initialises CUDA here; engine processes started after
    # that must be spawned, not forked (vLLM would switch with a warning; this does not depend on test order).
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    # Lets `compile_settings` send a function to an engine's workers, to read the modes they run with.
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
}
IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"

RECORD: dict[str, Any] = {"engines": {}}  # measurements, filled by fixtures and tests (fixture gpu_record)
OUTCOMES: dict[str, str] = {}  # nodeid -> passed | failed | skipped, for tests marked gpu
DURATIONS: dict[str, dict[str, float]] = {}  # nodeid -> seconds of its setup, call and teardown


# -- collection: every test here is marked gpu and skipped without CUDA -------------------------------
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if GPU_TESTS in Path(str(item.path)).parents]
    unmarked = [item.nodeid for item in ours if item.get_closest_marker("gpu") is None]
    if unmarked:
        raise pytest.UsageError(f"tests under tests/gpu must be marked gpu: {', '.join(unmarked)}")
    if ours and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false): make test-gpu")
        for item in ours:
            item.add_marker(skip)


# -- engines ----------------------------------------------------------------------------------------
def _mode_names(cc) -> dict[str, str]:
    return {"mode": getattr(cc.mode, "name", str(cc.mode)),
            "cudagraph_mode": getattr(cc.cudagraph_mode, "name", str(cc.cudagraph_mode))}


def _worker_modes():
    """A function for `LLM.collective_rpc`: the compilation and CUDA-graph modes a worker runs with (its
    model runner's config, which start-up may have changed). Defined inside a function so that cloudpickle
    sends it by value: the engine's processes need not import this file."""

    def worker_modes(worker) -> dict[str, str]:
        runner = getattr(worker, "model_runner", None)
        cc = getattr(runner, "compilation_config", None) or worker.vllm_config.compilation_config
        return {"mode": getattr(cc.mode, "name", str(cc.mode)),
                "cudagraph_mode": getattr(cc.cudagraph_mode, "name", str(cc.cudagraph_mode))}

    return worker_modes


def compile_settings(llm) -> dict[str, Any]:
    """What an engine runs with: its config as built (`llm.llm_engine.vllm_config.compilation_config`) and
    as each worker reports it; `defaults` is true when both are VLLM_COMPILE + FULL_AND_PIECEWISE."""
    config = llm.llm_engine.vllm_config
    out: dict[str, Any] = {
        "config": _mode_names(config.compilation_config),
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "async_scheduling": getattr(config.scheduler_config, "async_scheduling", None),
        "use_v2_model_runner": getattr(config, "use_v2_model_runner", None),
    }
    try:
        out["workers"] = llm.collective_rpc(_worker_modes())
    except Exception as e:  # noqa: BLE001 - recorded; `defaults` then rests on the config alone
        out["workers"], out["workers_error"] = None, f"{type(e).__name__}: {e}"[:500]
    seen = [out["config"], *(out["workers"] or [])]
    out["defaults"] = all(m == DEFAULT_MODES for m in seen)
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def start_engine(name: str, model: Path | str, *, in_process: bool = False, **options: Any):
    """`vllm.LLM(model, **BASE_OPTIONS | options)` with vLLM's default compilation, timed; its settings are
    recorded under RECORD["engines"][name]. `in_process`: the engine core runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a test can reach its scheduler."""
    banned = sorted({"enforce_eager", "compilation_config", "optimization_level"} & options.keys())
    assert not banned, f"GPU engines run with vLLM's default compilation: do not pass {banned}"
    from vllm import LLM, envs

    kwargs = {**BASE_OPTIONS, **options}
    entry = RECORD["engines"][name] = {"model": Path(model).name, "options": _jsonable(kwargs),
                                       "in_process": in_process, "defaults": False}
    saved = os.environ.get(IN_PROCESS)
    if in_process:
        os.environ[IN_PROCESS] = "0"
    envs.disable_envs_cache()
    start = time.monotonic()
    try:
        llm = LLM(model=str(model), **kwargs)
    except Exception as e:
        entry["error"] = f"{type(e).__name__}: {e}"[:2000]
        raise
    finally:
        entry["startup_s"] = round(time.monotonic() - start, 1)
        if saved is None:
            os.environ.pop(IN_PROCESS, None)
        else:
            os.environ[IN_PROCESS] = saved
        envs.disable_envs_cache()  # an in-process engine core freezes vLLM's env reads at start-up
    entry.update(compile_settings(llm))
    return llm


def stop_engine(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def vllm_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in SESSION_ENV}
    os.environ.update(SESSION_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        from vllm import envs

        envs.disable_envs_cache()


@pytest.fixture(scope="session")
def gpu_record() -> dict[str, Any]:
    """Measurements that go into benchmarks/results/gpu_vllm_checks.json."""
    return RECORD


@contextlib.contextmanager
def triton_compiles_recorded(into: list[str]) -> Iterator[None]:
    """Append `module.kernel key` to `into` for every Triton compilation in this process while the block runs
    (vLLM's own JIT monitor, hooked in at start-up, still sees each). The key is Triton's cache key: each argument's
    type and specialization (a value of 1, divisibility by 16, alignment), and the options; two compilations of one
    kernel differ in it."""
    from triton import knobs

    previous = knobs.runtime.jit_post_compile_hook

    def hook(**kwargs):
        fn = kwargs["fn"]  # triton.runtime.jit.JitFunctionInfo: the kernel's module name and its name
        into.append(f"{fn.module}.{fn.name} {kwargs.get('key')}")
        return previous(**kwargs) if previous is not None else None

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield
    finally:
        knobs.runtime.jit_post_compile_hook = previous


@pytest.fixture(scope="session")
def llm_f32(vllm_env, small_window_ckpt):
    """Ours, float32, 16-token window, in this process (tests drive its scheduler). Prefill chunks of
    F32_CHUNK tokens; up to 4 images per prompt (a streaming session's question holds 4 frames). Every Triton
    compilation in this process after its start-up is listed in its `triton_compiles_after_start`, those of the
    start-up in `triton_compiles_at_start`."""
    at_start: list[str] = []
    with triton_compiles_recorded(at_start):
        llm = start_engine("infinitevl_f32", small_window_ckpt, in_process=True, dtype="float32", max_num_seqs=8,
                           max_num_batched_tokens=F32_CHUNK, enable_chunked_prefill=True,
                           limit_mm_per_prompt={"image": 4, "video": 1})
    llm.triton_compiles_at_start = at_start
    llm.triton_compiles_after_start = []
    with triton_compiles_recorded(llm.triton_compiles_after_start):
        yield llm
    stop_engine(llm)


@pytest.fixture(scope="session")
def llm_bf16(vllm_env, small_window_ckpt):
    """Ours, bf16, 16-token window, one GPU."""
    llm = start_engine("infinitevl_bf16", small_window_ckpt, **BF16_OPTIONS)
    yield llm
    stop_engine(llm)


@pytest.fixture(scope="session")
def llm_twin_bf16(vllm_env, twin_ckpt):
    """The Qwen2.5-VL twin on vLLM's own Qwen2.5-VL, bf16, one GPU, the same options as `llm_bf16`."""
    llm = start_engine("qwen2_5_vl_twin_bf16", twin_ckpt, **BF16_OPTIONS)
    yield llm
    stop_engine(llm)


# -- servers (started in the background) -------------------------------------------------------------
def server_env() -> dict[str, str]:
    """This process's environment without the test session's engine settings; the repository importable
    (examples/chat_image.py imports infinitevl_vllm)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_ALLOW_INSECURE_SERIALIZATION")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "kernels"), env.get("PYTHONPATH")) if p)
    return env


def modes_in_log(text: str) -> dict[str, Any]:
    """Compilation and CUDA-graph modes of every engine core a server log shows, any lowering it logs, and
    `defaults`: at least one engine seen and all at VLLM_COMPILE + FULL_AND_PIECEWISE, none lowered."""
    modes = re.findall(r"'mode': <CompilationMode\.(\w+)", text)
    graphs = re.findall(r"'cudagraph_mode': <CUDAGraphMode\.(\w+)", text)
    lowered = re.findall(r"setting cudagraph_mode=(\w+)", text)
    return {"modes": modes, "cudagraph_modes": graphs, "lowered_to": lowered,
            "defaults": bool(modes) and set(modes) == {DEFAULT_MODES["mode"]}
            and set(graphs) == {DEFAULT_MODES["cudagraph_mode"]} and not lowered}


def _bf16_server_args(ckpt: Path) -> list[str]:
    """`BASE_OPTIONS` + `BF16_OPTIONS` (what `llm_bf16` runs with) as `infinitevl-vllm serve` arguments."""
    args = [str(ckpt), "--api-key", API_KEY]
    for name, value in {**BASE_OPTIONS, **BF16_OPTIONS}.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return args


class Server:
    """A background server of this session: its process, and its entry in the record."""

    def __init__(self, name: str, args: list[str], log: Path):
        from vllm_helpers import ServerProcess

        self.name, self.log, self.model = name, log, args[0]  # served under the checkpoint's path
        self.entry = RECORD["engines"][name] = {"model": Path(args[0]).name, "server_args": args[1:],
                                                "defaults": False}
        self.process = ServerProcess(args, log, server_env())

    def url(self) -> str:
        """Its base URL once healthy; records its start-up seconds (first healthy answer seen) and modes."""
        try:
            base = self.process.wait_healthy()
        except BaseException:
            self.entry["log_tail"] = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else None
            raise
        finally:
            self.entry["startup_s"] = self.process.ready_after_s
        self.entry.update(modes_in_log(self.log.read_text(errors="replace")))
        return base


@pytest.fixture(scope="session", autouse=True)
def servers(small_window_ckpt, tmp_path_factory) -> Iterator[dict[str, Server]]:
    """Started when the session's first test sets up: `dp` (ours, bf16, data parallel 2 with 2 GPUs or more,
    else 1) and, with 2 GPUs, `tp2` (ours, bf16, tensor parallel 2). Same options as `llm_bf16`."""
    logs = tmp_path_factory.mktemp("servers")
    dp = 2 if torch.cuda.device_count() >= 2 else 1
    RECORD["serve"] = {"data_parallel_size": dp, "examples": {}}
    started = {"dp": Server(f"infinitevl_bf16_dp{dp}_server",
                            [*_bf16_server_args(small_window_ckpt), "--data-parallel-size", str(dp)],
                            logs / "dp.log")}
    if torch.cuda.device_count() >= 2:
        started["tp2"] = Server("infinitevl_bf16_tp2_server",
                                [*_bf16_server_args(small_window_ckpt), "--tensor-parallel-size", "2"],
                                logs / "tp2.log")
    try:
        yield started
    finally:
        for server in started.values():
            server.process.stop()


# -- references (CPU, float32) --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ours_ref(small_window_ckpt):
    from infinitevl_vllm.checkpoint import load_reference

    return load_reference(small_window_ckpt, dtype=torch.float32)  # CPU only: it makes its index tensors there


@pytest.fixture(scope="session")
def ours_processor(small_window_ckpt):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(small_window_ckpt)


@pytest.fixture(scope="session")
def twin_ckpt(tmp_path_factory) -> Path:
    """The Transformer twin of the tiny preset: Qwen2.5-VL with the same vision tower, tokenizer, processor,
    width, depth and MLP, seeded random weights."""
    from infinitevl_vllm.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("qwen2_5_vl_tiny"), "tiny", seed=1, arch="qwen2_5_vl")


@pytest.fixture(scope="session")
def twin_processor(twin_ckpt):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(twin_ckpt)


@pytest.fixture(scope="session")
def twin_f32(twin_ckpt):
    """transformers' Qwen2.5-VL on the twin checkpoint, float32, on the CPU like our reference."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(twin_ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def parity(llm_bf16, llm_twin_bf16, ours_ref, ours_processor, twin_f32, twin_processor, gpu_record) -> Parity:
    """Prompt log-probs of the same prompts from our bf16 engine and our float32 reference, and from the
    twin's bf16 engine and its float32 transformers model, in this one run. Both sides of each pair see the
    same token ids (checked), and ours and the twin see the same prompt strings (same chat template)."""
    from vllm_helpers import reference_inputs

    prompts = parity_prompts(ours_processor)
    assert parity_prompts(twin_processor) == prompts, "the twin's chat template formats the prompts otherwise"
    ours, twin = prompt_logprobs(llm_bf16, prompts), prompt_logprobs(llm_twin_bf16, prompts)
    ours_f32, twin_f32_lps = [], []
    for (prompt, images), (ours_ids, _), (twin_ids, _) in zip(prompts, ours, twin):
        mm = reference_inputs(ours_processor, prompt, images)
        assert ours_ids == mm.input_ids.tolist(), "vLLM and the HF processor tokenised differently (ours)"
        ours_f32.append(ours_ref.prompt_logprobs(mm))
        ids, lp = hf_prompt_logprobs(twin_f32, twin_processor, prompt, images)
        assert twin_ids == ids, "vLLM and the HF processor tokenised differently (twin)"
        twin_f32_lps.append(lp)
    result = Parity(prompts, [ids for ids, _ in ours], [lp for _, lp in ours], ours_f32, [lp for _, lp in twin],
                    twin_f32_lps)
    gpu_record["parity"] = result.summary()
    return result


# -- outcomes and the record ------------------------------------------------------------------------
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """One outcome per gpu test: the call's, or a failed/skipped setup's; a failed teardown fails it. The
    record is rewritten after every test, so a run stopped by a time limit (or an engine whose shutdown
    hangs) still leaves what it found, with each phase's seconds to show where the time went."""
    if "gpu" not in report.keywords:
        return
    DURATIONS.setdefault(report.nodeid, {})[report.when] = round(report.duration, 1)
    if report.when == "call" or (report.when == "setup" and not report.passed):
        OUTCOMES[report.nodeid] = "failed" if report.failed else report.outcome
    elif report.when == "teardown" and report.failed:
        OUTCOMES[report.nodeid] = "failed"
    _write_record()


def _all_passed(module: str) -> bool | None:
    """Whether every test of a module here that ran or failed passed; None when none did."""
    seen = [o for nodeid, o in OUTCOMES.items() if f"/{module}::" in f"/{nodeid}" and o != "skipped"]
    return all(o == "passed" for o in seen) if seen else None


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - not installed or no version: recorded as null
        return None


def build_record(complete: bool = False) -> dict[str, Any]:
    """checks: what the acceptance check reads; measurements: every raw number behind them."""
    counts = {k: sum(o == k for o in OUTCOMES.values()) for k in ("passed", "failed", "skipped")}
    engines = RECORD["engines"]
    gpu_count = torch.cuda.device_count()
    serve = RECORD.get("serve", {})
    checks = {
        "complete": complete,  # false until the session has finished: a record left by a stopped run says so
        "engine_defaults": all(e.get("defaults") is True for e in engines.values()) if engines else None,
        "gpu_tests": counts,
        "parity_bf16_ratio_vs_qwen": RECORD.get("parity", {}).get("ratio"),
        "tp2": _all_passed("test_tensor_parallel.py") if gpu_count >= 2 else None,  # skipped with one GPU
        "dp2": _all_passed("test_serve.py") if serve.get("data_parallel_size") == 2 else None,
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": gpu_count,
        "torch": torch.__version__,
        "vllm": _version("vllm"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
    }
    return {"checks": checks, "measurements": {**RECORD, "outcomes": dict(OUTCOMES), "seconds": dict(DURATIONS)},
            **source_revision(REPO), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _write_record(complete: bool = False) -> bool:
    if not any(o in ("passed", "failed") for o in OUTCOMES.values()) or not torch.cuda.is_available():
        return False
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(_jsonable(build_record(complete)), indent=2) + "\n")
    return True


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if _write_record(complete=True) and reporter is not None:
        reporter.write_line(f"GPU checks written to {RESULTS}")
