"""Per-sequence state of InfiniteVL: what one sequence costs, whatever its length.

GDN layer: conv history (K-1) x (2 * key_dim + value_dim) and recurrent state H x Dv x Dk.
SWA layer: keys and values of the last `window` tokens, 2 x kv_heads x head_dim each.
"""

from __future__ import annotations

import torch

from .config import InfiniteVLTextConfig


def gdn_state_bytes(cfg: InfiniteVLTextConfig, conv_dtype: torch.dtype, ssm_dtype: torch.dtype) -> int:
    conv = (cfg.conv_size - 1) * (2 * cfg.num_linear_heads * cfg.linear_head_dim
                                  + cfg.num_linear_heads * cfg.linear_value_head_dim)
    ssm = cfg.num_linear_heads * cfg.linear_value_head_dim * cfg.linear_head_dim
    return conv * conv_dtype.itemsize + ssm * ssm_dtype.itemsize


def swa_state_bytes(cfg: InfiniteVLTextConfig, kv_dtype: torch.dtype, tokens: int) -> int:
    return tokens * 2 * cfg.num_key_value_heads * cfg.head_dim * kv_dtype.itemsize


def sequence_state_bytes(
    cfg: InfiniteVLTextConfig,
    kv_dtype: torch.dtype,
    conv_dtype: torch.dtype,
    ssm_dtype: torch.dtype,
    kv_tokens: int | None = None,
) -> int:
    """Bytes of state one sequence holds; kv_tokens defaults to the window."""
    kv_tokens = cfg.attention_window if kv_tokens is None else kv_tokens
    return (len(cfg.gdn_layers) * gdn_state_bytes(cfg, conv_dtype, ssm_dtype)
            + len(cfg.swa_layers) * swa_state_bytes(cfg, kv_dtype, kv_tokens))
