"""Shared fixtures: checkpoints are made once per test session (they take seconds)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A window this small makes "prompts several times longer than the window" cheap.
SMALL_WINDOW = 16


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from infinitevl_vllm.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def small_window_ckpt(tmp_path_factory):
    from infinitevl_vllm.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny_w16"), "tiny", seed=1, sliding_window=SMALL_WINDOW)


def random_image(seed: int, size: tuple[int, int] = (224, 224)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))

# Triton's interpreter tests run in a process of their own (tests/test_triton_interpreter.py): once vLLM is
# imported into a process, kernels run under TRITON_INTERPRET=1 there no longer resolve their helpers.
collect_ignore = ["triton"]
