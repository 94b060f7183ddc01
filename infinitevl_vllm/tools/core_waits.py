"""How long vLLM's engine core waits for the device in each step: is a decode step bound by the GPU or the host?

Under async scheduling (vLLM's default) the core prepares and launches step n+1 while the GPU runs step n, then
blocks twice a step: before it overwrites the host buffers of its input copies (``synchronize_input_prep``) and for
the sampled tokens (``get_output`` of the async model output). When the GPU's step is the longer, the core spends
the difference in those waits; when the host's work is the longer, they return at once and the GPU idles between
steps. The bench mixes ``CoreWaits`` into vLLM's worker (``worker_extension_cls``, vLLM's seam for methods a
caller reaches through ``collective_rpc``; for InfiniteVL beside the sessions' extension, ``SessionsAndCoreWaits``)
and records both waits for every step of a batch-1 decode, with the runner's host parts and the step's period:
when the host sets the pace, they say which part of its work grew.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from ..serving.sessions_worker import SessionsWorkerExtension

# The model runner's host parts timed beside the waits, by method name. They say where the host's time goes when
# it sets the pace: preparing inputs, building attention metadata (both inside execute_model), sampling.
HOST_PARTS = ("execute_model", "_prepare_inputs", "_build_attention_metadata", "sample_tokens")

_steps: list[dict[str, float]] = []  # one per output the core took: seconds by wait, part and the step's period
_since_output: dict[str, float] = {}  # input waits and host parts since the last output
_last_output = [0.0]  # when the last output was taken (perf_counter)


def _timed_get_output(get_output):
    def get_output_timed(self):
        t0 = time.perf_counter()
        out = get_output(self)
        now = time.perf_counter()
        step = {"input_wait": 0.0, **{part: 0.0 for part in HOST_PARTS}, **_since_output, "output_wait": now - t0}
        step["period"] = now - _last_output[0] if _last_output[0] else 0.0
        _steps.append(step)
        _since_output.clear()
        _last_output[0] = now
        return out

    get_output_timed.infinitevl_timed = True
    return get_output_timed


def _add(key: str, seconds: float) -> None:
    _since_output[key] = _since_output.get(key, 0.0) + seconds


def _timed_input_prep(synchronize_input_prep):
    @contextmanager
    def synchronize_input_prep_timed():
        t0 = time.perf_counter()
        with synchronize_input_prep():
            _add("input_wait", time.perf_counter() - t0)
            yield

    synchronize_input_prep_timed.infinitevl_timed = True
    return synchronize_input_prep_timed


def _timed_part(name: str, method):
    def part_timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            _add(name, time.perf_counter() - t0)

    part_timed.infinitevl_timed = True
    return part_timed


class CoreWaits:
    """Worker extension (see the module docstring); ``self`` is vLLM's worker."""

    def infinitevl_waits_start(self) -> bool:
        """Time the two waits and the host parts from now on, and forget earlier steps. False where the runner
        lacks the waits (vLLM's V2 runner, which the twin runs on CUDA; another vLLM)."""
        from vllm.v1.worker import gpu_model_runner

        runner = getattr(self, "model_runner", None)
        output_cls = getattr(gpu_model_runner, "AsyncGPUModelRunnerOutput", None)
        if runner is None or output_cls is None or not hasattr(runner, "synchronize_input_prep"):
            return False
        if not getattr(output_cls.get_output, "infinitevl_timed", False):
            output_cls.get_output = _timed_get_output(output_cls.get_output)
        if not getattr(runner.synchronize_input_prep, "infinitevl_timed", False):
            runner.synchronize_input_prep = _timed_input_prep(runner.synchronize_input_prep)
        for part in HOST_PARTS:
            method = getattr(runner, part, None)
            if method is not None and not getattr(method, "infinitevl_timed", False):
                setattr(runner, part, _timed_part(part, method))
        _steps.clear()
        _since_output.clear()
        _last_output[0] = 0.0
        return True

    def infinitevl_waits_read(self) -> list[dict[str, float]]:
        """Each step since ``infinitevl_waits_start``, oldest first: seconds of its input wait, output wait, each
        host part and its period (from the previous output taken to this one; 0 for the first)."""
        return list(_steps)


class SessionsAndCoreWaits(SessionsWorkerExtension, CoreWaits):
    """InfiniteVL's worker extension (the sessions' RPC) with the waits' methods."""


def worker_extension(kind: str) -> str:
    """The ``worker_extension_cls`` the bench gives a model of this kind (bench.ModelInfo.kind)."""
    cls = SessionsAndCoreWaits if kind == "infinitevl" else CoreWaits
    return f"{__name__}.{cls.__qualname__}"
