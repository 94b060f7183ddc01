"""How long vLLM's engine core waits for the device in each step: is a decode step bound by the GPU or the host?

Under async scheduling (vLLM's default) the core prepares and launches step n+1 while the GPU runs step n, then
blocks twice a step: before it overwrites the host buffers of its input copies (``synchronize_input_prep``) and for
the sampled tokens (``get_output`` of the async model output). When the GPU's step is the longer, the core spends
the difference in those waits; when the host's work is the longer, they return at once and the GPU idles between
steps. The bench mixes ``CoreWaits`` into vLLM's worker (``worker_extension_cls``, vLLM's seam for methods a
caller reaches through ``collective_rpc``; for InfiniteVL beside the sessions' extension, ``SessionsAndCoreWaits``)
and records both waits for every step of a batch-1 decode.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from ..serving.sessions_worker import SessionsWorkerExtension

_steps: list[tuple[float, float]] = []  # (input wait, output wait) in seconds, one per output the core took
_input_wait = [0.0]  # input waits since the last output


def _timed_get_output(get_output):
    def get_output_timed(self):
        t0 = time.perf_counter()
        out = get_output(self)
        _steps.append((_input_wait[0], time.perf_counter() - t0))
        _input_wait[0] = 0.0
        return out

    get_output_timed.infinitevl_timed = True
    return get_output_timed


def _timed_input_prep(synchronize_input_prep):
    @contextmanager
    def synchronize_input_prep_timed():
        t0 = time.perf_counter()
        with synchronize_input_prep():
            _input_wait[0] += time.perf_counter() - t0
            yield

    synchronize_input_prep_timed.infinitevl_timed = True
    return synchronize_input_prep_timed


class CoreWaits:
    """Worker extension (see the module docstring); ``self`` is vLLM's worker."""

    def infinitevl_waits_start(self) -> bool:
        """Time the two waits from now on, and forget earlier steps. False where the runner lacks them (vLLM's V2
        runner, which the twin runs on CUDA; another vLLM)."""
        from vllm.v1.worker import gpu_model_runner

        runner = getattr(self, "model_runner", None)
        output_cls = getattr(gpu_model_runner, "AsyncGPUModelRunnerOutput", None)
        if runner is None or output_cls is None or not hasattr(runner, "synchronize_input_prep"):
            return False
        if not getattr(output_cls.get_output, "infinitevl_timed", False):
            output_cls.get_output = _timed_get_output(output_cls.get_output)
        if not getattr(runner.synchronize_input_prep, "infinitevl_timed", False):
            runner.synchronize_input_prep = _timed_input_prep(runner.synchronize_input_prep)
        _steps.clear()
        _input_wait[0] = 0.0
        return True

    def infinitevl_waits_read(self) -> list[tuple[float, float]]:
        """(input wait, output wait) in seconds for each step since ``infinitevl_waits_start``, oldest first."""
        return list(_steps)


class SessionsAndCoreWaits(SessionsWorkerExtension, CoreWaits):
    """InfiniteVL's worker extension (the sessions' RPC) with the waits' methods."""


def worker_extension(kind: str) -> str:
    """The ``worker_extension_cls`` the bench gives a model of this kind (bench.ModelInfo.kind)."""
    cls = SessionsAndCoreWaits if kind == "infinitevl" else CoreWaits
    return f"{__name__}.{cls.__qualname__}"
