"""Readable pure-PyTorch InfiniteVL: the numerical truth (imports nothing from vLLM)."""

from .model import InfiniteVLReference, MultimodalInputs, SequenceState
from .positions import mrope_positions

__all__ = ["InfiniteVLReference", "MultimodalInputs", "SequenceState", "mrope_positions"]
