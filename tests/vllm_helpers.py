"""Helpers shared by tests that run vLLM engines against the reference model."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from infinitevl_vllm.reference import MultimodalInputs
from infinitevl_vllm.tools.batch_invariance import prompt_logprobs_of, vllm_request  # noqa: F401 (tests import both here)
from infinitevl_vllm.tools.workloads import chat_prompt, random_image, random_texts

ENGINE_DEFAULTS = dict(
    enforce_eager=True,
    dtype="float32",
    max_model_len=4096,
    enable_prefix_caching=False,
    limit_mm_per_prompt={"image": 2, "video": 1},
    seed=0,
)


VIDEO_FPS = 2.0


def make_llm(ckpt, **overrides):
    from vllm import LLM

    return LLM(model=str(ckpt), **{**ENGINE_DEFAULTS, **overrides})


def video_frames(n: int, seed: int = 0, size=(112, 84)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, size[1], size[0], 3)) * 255).astype("uint8")


def reference_inputs(processor, prompt: str, images=None, video=None) -> MultimodalInputs:
    kwargs = {}
    if images:
        kwargs["images"] = images
    if video is not None:
        from transformers.video_utils import VideoMetadata

        n = len(video)
        kwargs["videos"] = [torch.from_numpy(video).permute(0, 3, 1, 2)]
        kwargs["video_metadata"] = [VideoMetadata(total_num_frames=n, fps=VIDEO_FPS, frames_indices=list(range(n)))]
        kwargs["do_sample_frames"] = False
    return MultimodalInputs.from_processor(processor(text=[prompt], return_tensors="pt", **kwargs))


def vllm_prompt(prompt: str, images=None, video=None) -> dict:
    """`batch_invariance.vllm_request`, with a video (numpy frames at VIDEO_FPS) too."""
    request = vllm_request(prompt, images)
    if video is not None:
        n = len(video)
        request.setdefault("multi_modal_data", {})["video"] = (
            video, {"fps": VIDEO_FPS, "total_num_frames": n, "frames_indices": list(range(n)),
                    "duration": n / VIDEO_FPS, "video_backend": "numpy", "do_sample_frames": False})
    return request


def check_batch_of_8_equals_each_alone(llm, processor, sampling) -> None:
    """Greedy tokens of 8 prompts (1 to 160 words, the third an image question) run together equal each
    run alone, all of sampling.max_tokens long."""
    prompts = [vllm_prompt(chat_prompt(processor, random_texts([n], seed=n)[0])) for n in (1, 5, 17, 40, 90, 3, 160, 8)]
    prompts[2] = vllm_prompt(chat_prompt(processor, "Describe it.", n_images=1), images=[random_image(5)])
    together = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sampling, use_tqdm=False)]
    alone = [list(llm.generate([p], sampling, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]
    assert together == alone
    assert all(len(t) == sampling.max_tokens for t in together)


class ServerProcess:
    """`infinitevl-vllm serve ...` (with stock=True: vLLM's own server module, `vllm serve`'s twin, given CKPT as
    --model) started in the background on a free 127.0.0.1 port, so that several servers can start while
    other work runs. `wait_healthy` blocks until /health answers; `stop` ends the whole process group."""

    def __init__(self, serve_args: list[str], log: Path, env: dict | None = None, stock: bool = False):
        from infinitevl_vllm.tools.demo import free_port

        port = free_port()
        if stock:
            head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", serve_args[0]]
        else:  # `python -m` rather than the console script: pip may put scripts away from sys.executable
            head = [sys.executable, "-m", "infinitevl_vllm", "serve", serve_args[0]]
        self.log, self.base = log, f"http://127.0.0.1:{port}"
        self.started = time.monotonic()
        self.ready_after_s: float | None = None  # seconds from start to its first healthy answer
        with open(log, "w") as f:
            self.proc = subprocess.Popen([*head, *serve_args[1:], "--host", "127.0.0.1", "--port", str(port)],
                                         stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self._watch = threading.Thread(target=self._poll_health, daemon=True)  # so ready_after_s is exact
        self._watch.start()

    def _poll_health(self) -> None:
        while self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2):
                    self.ready_after_s = round(time.monotonic() - self.started, 1)
                    return
            except OSError:
                time.sleep(1)

    def wait_healthy(self, timeout_s: float = 600) -> str:
        """The base URL, once /health answers."""
        self._watch.join(max(0.0, timeout_s - (time.monotonic() - self.started)))
        assert self.ready_after_s is not None or self.proc.poll() is None, (
            f"server exited: {self.log.read_text()[-3000:]}")
        assert self.ready_after_s is not None, f"server did not become healthy in {timeout_s:.0f} s"
        return self.base

    def stop(self) -> None:
        try:  # the group, even when the server itself has exited: its engine processes may not have
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def running_server(serve_args: list[str], log: Path, env: dict | None = None, stock: bool = False):
    """A `ServerProcess` for the duration of a with-block: yields its base URL once healthy."""
    server = ServerProcess(serve_args, log, env, stock)
    try:
        yield server.wait_healthy()
    finally:
        server.stop()
