"""`infinitevl-vllm serve` on CUDA (bf16, vLLM's defaults) answers the README's examples, run as a user
runs them: `python examples/X.py --base-url ... --api-key ...` against the live server.

With 2 GPUs or more the server runs with `--data-parallel-size 2` (one engine per GPU behind one API):
the record's `dp2` is true when every example succeeds; with one GPU it runs with DP 1 and `dp2` is null.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
from vllm_helpers import running_server

from .conftest import GPU_MEMORY_UTILIZATION, REPO

pytestmark = pytest.mark.gpu

API_KEY = "gpu-test-key"
EXAMPLE_TIMEOUT_S = 300


def _server_env() -> dict[str, str]:
    """This process's environment without the test session's engine settings; the repository importable
    (examples/chat_image.py imports infinitevl_vllm)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_ALLOW_INSECURE_SERIALIZATION")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _modes_in_log(text: str) -> dict[str, str | None]:
    """Compilation and CUDA-graph modes as the engine logs them at start-up, and any lowering it logs."""
    mode = re.search(r"'mode': <CompilationMode\.(\w+)", text)
    graphs = re.search(r"'cudagraph_mode': <CUDAGraphMode\.(\w+)", text)
    lowered = re.findall(r"setting cudagraph_mode=(\w+)", text)
    return {"mode": mode and mode.group(1), "cudagraph_mode": graphs and graphs.group(1),
            "lowered_to": lowered[-1] if lowered else None}


@pytest.fixture(scope="module")
def server(small_window_ckpt, tmp_path_factory, gpu_record) -> Iterator[str]:
    """The bf16 engine's checkpoint and sizes (so vLLM may reuse its compiled graphs), as a server."""
    import torch

    dp = 2 if torch.cuda.device_count() >= 2 else 1
    record = gpu_record["serve"] = {"data_parallel_size": dp, "examples": {}}
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = [str(small_window_ckpt), "--api-key", API_KEY, "--dtype", "bfloat16", "--max-model-len", "4096",
            "--max-num-seqs", "32", "--gpu-memory-utilization", str(GPU_MEMORY_UTILIZATION),
            "--limit-mm-per-prompt", '{"image": 2, "video": 1}', "--data-parallel-size", str(dp)]
    record["args"] = args[1:]
    start = time.monotonic()
    try:
        with running_server(args, log, _server_env()) as base:
            record["startup_s"] = round(time.monotonic() - start, 1)
            record["compile_settings_from_log"] = _modes_in_log(log.read_text(errors="replace"))
            yield base + "/v1"
    except Exception:
        record["log_tail"] = log.read_text(errors="replace")[-3000:] if log.exists() else None
        raise


def run_example(name: str, base_url: str, *args: str, record: dict) -> None:
    """Success is exit status 0: the openai client raises on any error response (the answer itself is
    gibberish from random weights)."""
    run = subprocess.run([sys.executable, str(REPO / "examples" / name), *args, "--base-url", base_url,
                          "--api-key", API_KEY], capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S,
                         env=_server_env())
    record["examples"][name] = {"ok": run.returncode == 0, "stdout": run.stdout[-300:], "stderr": run.stderr[-1000:]}
    assert run.returncode == 0, run.stderr[-3000:]


def test_chat_image_example(server, gpu_record):
    """A generated picture as a PNG data URL, one question."""
    run_example("chat_image.py", server, record=gpu_record["serve"])


def test_stream_chat_example(server, gpu_record):
    """A text question answered as a server-sent event stream."""
    run_example("stream_chat.py", server, record=gpu_record["serve"])


def test_video_chat_example(server, gpu_record, tmp_path):
    """An 8-frame mp4 (4 fps) sent as a data URL; vLLM decodes and samples it."""
    import cv2

    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (112, 84))
    rng = np.random.default_rng(0)
    for _ in range(8):
        writer.write((rng.random((84, 112, 3)) * 255).astype("uint8"))
    writer.release()
    assert path.stat().st_size > 0
    run_example("video_chat.py", server, str(path), record=gpu_record["serve"])
