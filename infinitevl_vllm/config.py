"""InfiniteVL configuration.

Released checkpoints ship a *flat* ``config.json`` (text fields at the top level, no
``text_config``).  We subclass transformers' Qwen2.5-VL configs so that everything that
already understands Qwen2.5-VL (its processor, vLLM's multimodal plumbing) accepts ours,
and add the linear-attention fields with the defaults of the release.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from infinitevl_kernels.layout import SWA_EVERY, is_swa_layer  # noqa: F401 - re-exported: the layer rule
from transformers import AutoConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)

ARCHITECTURE = "InfiniteVLQwen2_5_VLForConditionalGeneration"


@strict
class InfiniteVLTextConfig(Qwen2_5_VLTextConfig):
    model_type = "infinite_vl_text"

    # Defaults of the release for fields its config.json leaves out.
    head_dim: int = 128
    expand_v: int = 2
    use_gate: bool = True
    use_short_conv: bool = True
    conv_size: int = 4
    conv_bias: bool = False
    num_linear_heads: int = 16
    num_linear_key_value_heads: int = 16
    linear_head_dim: int = 128
    norm_eps: float = 1e-5
    mode: str = "chunk"

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention" if is_swa_layer(i) else "linear_attention"
                for i in range(self.num_hidden_layers)
            ]
        super().__post_init__(**kwargs)

    @property
    def linear_value_head_dim(self) -> int:
        return self.linear_head_dim * self.expand_v

    @property
    def swa_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if is_swa_layer(i)]

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not is_swa_layer(i)]

    @property
    def attention_window(self) -> int:
        """Tokens a SWA query sees, itself included (flash-attn window (W-1, 0))."""
        return int(self.sliding_window)


@strict
class InfiniteVLConfig(Qwen2_5_VLConfig):
    model_type = "infinite_vl"
    sub_configs = {"vision_config": Qwen2_5_VLVisionConfig, "text_config": InfiniteVLTextConfig}


def register_with_transformers() -> None:
    """Make ``AutoConfig`` understand ``model_type: infinite_vl`` (idempotent)."""
    for cls in (InfiniteVLTextConfig, InfiniteVLConfig):
        AutoConfig.register(cls.model_type, cls, exist_ok=True)
