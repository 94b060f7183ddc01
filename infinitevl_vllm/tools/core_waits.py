"""How long vLLM's engine core waits for the device in each step: is a decode step bound by the GPU or the host?

Under async scheduling (vLLM's default) the core prepares and launches step n+1 while the GPU runs step n, then
blocks for the device: for the sampled tokens (``get_output`` of the async model output), and on vLLM's V1 runner
also before it overwrites the host buffers of its input copies (``synchronize_input_prep``). When the GPU's step is
the longer, the core spends the difference in those waits; when the host's work is the longer, they return at once
and the GPU idles between steps. The bench mixes ``CoreWaits`` into vLLM's worker (``worker_extension_cls``, vLLM's
seam for methods a caller reaches through ``collective_rpc``; for InfiniteVL beside the sessions' extension,
``SessionsAndCoreWaits``) and records the waits for every step of a batch-1 decode, with the runner's host parts
and the step's period: when the host sets the pace, they say which part of its work grew. Both of vLLM's runners
are timed (InfiniteVL runs V1; the Transformer twin runs V2 on CUDA), each by the parts it has.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from ..serving.sessions_worker import SessionsWorkerExtension
from ..vllm_patches import wrap_method

# The model runner's host parts timed beside the waits, by method name: the step's two calls, then what inside
# them prepares inputs and builds the attention metadata (V1: _prepare_inputs, _build_attention_metadata; V2:
# prepare_inputs, prepare_attn). A runner without a part records none.
HOST_PARTS = ("execute_model", "sample_tokens", "_prepare_inputs", "_build_attention_metadata", "prepare_inputs",
              "prepare_attn")
# Where each runner's async output waits for the sampled tokens: (module, class)
OUTPUT_CLASSES = (("vllm.v1.worker.gpu_model_runner", "AsyncGPUModelRunnerOutput"),
                  ("vllm.v1.worker.gpu.async_utils", "AsyncOutput"))

_steps: list[dict[str, float]] = []  # one per output the core took: seconds by wait, part and the step's period
_since_output: dict[str, float] = {}  # input waits and host parts since the last output
_last_output = [0.0]  # when the last output was taken (perf_counter)
_parts: list[str] = []  # the host parts the runner has


def _timed_get_output(get_output):
    def get_output_timed(self):
        t0 = time.perf_counter()
        out = get_output(self)
        now = time.perf_counter()
        step = {"input_wait": 0.0, **{part: 0.0 for part in _parts}, **_since_output, "output_wait": now - t0}
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
        """Time the waits and the host parts from now on, and forget earlier steps. False where there is no async
        output to time (no model runner, or a vLLM without either runner's output class)."""
        import importlib

        runner = getattr(self, "model_runner", None)
        outputs = []
        for module, name in OUTPUT_CLASSES:
            try:
                outputs.append(getattr(importlib.import_module(module), name))
            except (ImportError, AttributeError):
                continue
        if runner is None or not outputs:
            return False
        for cls in outputs:
            wrap_method(cls, "get_output", _timed_get_output)
        if getattr(runner, "synchronize_input_prep", None) is not None:  # V1 only
            wrap_method(runner, "synchronize_input_prep", _timed_input_prep)
        _parts[:] = [part for part in HOST_PARTS if getattr(runner, part, None) is not None]
        for part in _parts:
            wrap_method(runner, part, lambda method, part=part: _timed_part(part, method))
        _steps.clear()
        _since_output.clear()
        _last_output[0] = 0.0
        return True

    def infinitevl_waits_read(self) -> list[dict[str, float]]:
        """Each step since ``infinitevl_waits_start``, oldest first: seconds of its input wait (0 on V2), output
        wait, each host part the runner has and its period (from the previous output taken to this one; 0 for the
        first)."""
        return list(_steps)

    def infinitevl_steady_decode_steps(self) -> int | None:
        """How many steps so far reused the step before's inputs (model/steady_decode.py); None for a model
        other than InfiniteVL."""
        steady = getattr(getattr(self, "model_runner", None), "_infinitevl_steady_decode", None)
        return None if steady is None else steady.reused_steps


class SessionsAndCoreWaits(SessionsWorkerExtension, CoreWaits):
    """InfiniteVL's worker extension (the sessions' RPC) with the waits' methods."""


def worker_extension(kind: str) -> str:
    """The ``worker_extension_cls`` the bench gives a model of this kind (bench.ModelInfo.kind)."""
    cls = SessionsAndCoreWaits if kind == "infinitevl" else CoreWaits
    return f"{__name__}.{cls.__qualname__}"
