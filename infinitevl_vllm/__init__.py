"""infinitevl-vllm: serve InfiniteVL on vLLM with constant per-sequence memory."""

from .config import ARCHITECTURE, InfiniteVLConfig, InfiniteVLTextConfig, register_with_transformers

register_with_transformers()

__all__ = ["ARCHITECTURE", "InfiniteVLConfig", "InfiniteVLTextConfig", "register_with_transformers"]
__version__ = "0.1.0"
