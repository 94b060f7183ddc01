"""Prompt sets and measurements shared by the GPU tests and their fixtures.

Nothing here imports vLLM at module level: the CPU suite collects this folder (and skips it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from infinitevl_vllm.tools.batch_invariance import Prompt
from infinitevl_vllm.tools.workloads import chat_prompt, parity_questions, pil_data_url

F32_CHUNK = 128  # the float32 engine's max_num_batched_tokens: longer prompts are prefilled in chunks

# Our bf16 error (against our float32 reference) may be at most this multiple of the Transformer twin's
# (vLLM's Qwen2.5-VL in bf16 against transformers in float32) on the same prompts.
PARITY_MAX_RATIO = 1.5


def parity_prompts(processor) -> list[Prompt]:
    return [(chat_prompt(processor, text, n_images=len(images)), images or None)
            for text, images in parity_questions()]


def server_prompt_logprobs(base_url: str, model: str, questions: list[tuple[str, list[Image.Image]]],
                           api_key: str) -> list[tuple[list[int], torch.Tensor]]:
    """`batch_invariance.prompt_logprobs` through a server's /v1/chat/completions (`prompt_logprobs: 0`, images as
    PNG data URLs), one request per question; the server applies the checkpoint's chat template itself."""
    import json
    import urllib.request

    out = []
    for text, images in questions:
        content = [*({"type": "image_url", "image_url": {"url": pil_data_url(im)}} for im in images),
                   {"type": "text", "text": text}]
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": 0}
        request = urllib.request.Request(base_url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
        with urllib.request.urlopen(request, timeout=300) as response:
            positions = json.load(response)["prompt_logprobs"][1:]  # the first token has none
        # prompt_logprobs=0: each position holds only the prompt's own token, keyed by its id
        assert all(len(p) == 1 for p in positions), "more than the prompt token's log-prob came back"
        ids = [int(next(iter(p))) for p in positions]
        out.append((ids, torch.tensor([next(iter(p.values()))["logprob"] for p in positions], dtype=torch.float64)))
    return out


def mean_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean absolute difference over every position of every prompt (prompts weigh by their length)."""
    return float((torch.cat(a) - torch.cat(b)).abs().mean())


@dataclass
class Parity:
    """Prompt log-probs of the parity prompts, measured in one run (see the `parity` fixture)."""

    prompts: list[Prompt]
    token_ids: list[list[int]]  # of each prompt, the same on all four sides
    ours_bf16: list[torch.Tensor]  # InfiniteVL on vLLM (CUDA, bf16, vLLM's defaults)
    ours_f32: list[torch.Tensor]  # the reference model, float32
    twin_bf16: list[torch.Tensor]  # the Qwen2.5-VL twin on vLLM's Qwen2.5-VL (CUDA, bf16, vLLM's defaults)
    twin_f32: list[torch.Tensor]  # the twin in transformers, float32

    @property
    def ours_mean_abs(self) -> float:
        return mean_abs(self.ours_bf16, self.ours_f32)

    @property
    def twin_mean_abs(self) -> float:
        return mean_abs(self.twin_bf16, self.twin_f32)

    @property
    def ratio(self) -> float:
        return self.ours_mean_abs / self.twin_mean_abs

    def summary(self) -> dict[str, Any]:
        return {
            "prompt_tokens": [len(t) + 1 for t in self.ours_f32],
            "ours_mean_abs": self.ours_mean_abs,
            "twin_mean_abs": self.twin_mean_abs,
            "ratio": self.ratio if self.twin_mean_abs > 0 else None,
            "ours_mean_abs_per_prompt": [mean_abs([a], [b]) for a, b in zip(self.ours_bf16, self.ours_f32)],
            "twin_mean_abs_per_prompt": [mean_abs([a], [b]) for a, b in zip(self.twin_bf16, self.twin_f32)],
            "ours_max_abs": float((torch.cat(self.ours_bf16) - torch.cat(self.ours_f32)).abs().max()),
            "twin_max_abs": float((torch.cat(self.twin_bf16) - torch.cat(self.twin_f32)).abs().max()),
        }
