"""InfiniteVL compute kernels: torch references (and faster paths beside them), no vLLM import."""

from .gdn.reference import causal_conv1d, gated_rmsnorm, gdn_chunked, gdn_gates, gdn_recurrent, l2norm
from .rope import apply_rope, mrope_cos_sin
from .swa.reference import sliding_window_attention, window_mask

__all__ = [
    "apply_rope",
    "causal_conv1d",
    "gated_rmsnorm",
    "gdn_chunked",
    "gdn_gates",
    "gdn_recurrent",
    "l2norm",
    "mrope_cos_sin",
    "sliding_window_attention",
    "window_mask",
]
