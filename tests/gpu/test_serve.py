"""`infinitevl-vllm serve` on CUDA (bf16, vLLM's defaults) answers the README's examples, run as a user
runs them: `python examples/X.py --base-url ... --api-key ...` against the live server.

With 2 GPUs or more the server runs with `--data-parallel-size 2` (one engine per GPU behind one API):
the record's `dp2` is true when every example succeeds; with one GPU it runs with DP 1 and `dp2` is null.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from .conftest import API_KEY, REPO, server_env

pytestmark = pytest.mark.gpu

EXAMPLE_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def server(servers) -> str:
    """The session's `dp` server (started in the background with the session)."""
    return servers["dp"].url() + "/v1"


def run_example(name: str, base_url: str, *args: str, record: dict) -> None:
    """Success is exit status 0: the openai client raises on any error response (the answer itself is
    gibberish from random weights)."""
    run = subprocess.run([sys.executable, str(REPO / "examples" / name), *args, "--base-url", base_url,
                          "--api-key", API_KEY], capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S,
                         env=server_env())
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
