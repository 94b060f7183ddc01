"""vLLM general plugin: registers the InfiniteVL config and model in every vLLM process."""

from __future__ import annotations

from .config import ARCHITECTURE, register_with_transformers

MODEL_CLASS = "infinitevl_vllm.vllm_model:InfiniteVLQwen2_5_VLForConditionalGeneration"


def register() -> None:
    register_with_transformers()
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
