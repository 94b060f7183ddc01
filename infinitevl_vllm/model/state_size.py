"""Per-sequence state of InfiniteVL: what one sequence costs, whatever its length.

What the model needs (``sequence_state_bytes``):
- GDN layer: conv history (K-1) x (2 * key_dim + value_dim) and recurrent state H x Dv x Dk;
- SWA layer: keys and values of the last `window` tokens, 2 x kv_heads x head_dim each.

What the engine allocates (``allocated_sequence_bytes``): vLLM pages all state in one pool of
equal pages. A page is ``block_size`` tokens of one SWA layer's KV, with ``block_size`` the
smallest vLLM block whose page holds a GDN layer's state. Each SWA layer's ring takes
``ceil(window / block_size) + 1`` pages, each GDN layer one page:

    page  = block_size * 2 * kv_heads * head_dim * kv_dtype_bytes
    bytes = page * (num_swa_layers * (ceil(window / block_size) + 1) + num_gdn_layers)

Layers are grouped so that one block id covers a page in every layer of a group (vLLM's hybrid
grouping: groups of num_swa_layers layers), hence ``blocks_per_sequence`` pool blocks each.
The plugin fixes ``block_size`` from the config (``state_block_size``) so that every process
agrees on it.
"""

from __future__ import annotations

import math

import torch
from infinitevl_kernels.layout import ring_blocks

from ..config import InfiniteVLTextConfig

# the block size chosen by the engine-config rule, kept in vllm_config.additional_config for the front end
STATE_BLOCK_SIZE_KEY = "infinitevl_state_block_size"


def gdn_state_bytes(cfg: InfiniteVLTextConfig, conv_dtype: torch.dtype, ssm_dtype: torch.dtype, tp: int = 1) -> int:
    heads = cfg.num_linear_heads // tp
    conv = (cfg.conv_size - 1) * heads * (2 * cfg.linear_head_dim + cfg.linear_value_head_dim)
    ssm = heads * cfg.linear_value_head_dim * cfg.linear_head_dim
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
    """Bytes of state one sequence needs; kv_tokens defaults to the window."""
    kv_tokens = cfg.attention_window if kv_tokens is None else kv_tokens
    return (len(cfg.gdn_layers) * gdn_state_bytes(cfg, conv_dtype, ssm_dtype)
            + len(cfg.swa_layers) * swa_state_bytes(cfg, kv_dtype, kv_tokens))


def page_bytes(cfg: InfiniteVLTextConfig, block_size: int, kv_dtype: torch.dtype, tp: int = 1) -> int:
    return block_size * 2 * max(1, cfg.num_key_value_heads // tp) * cfg.head_dim * kv_dtype.itemsize


def state_block_size(cfg: InfiniteVLTextConfig, alignment: int, kv_dtype: torch.dtype, conv_dtype: torch.dtype,
                     ssm_dtype: torch.dtype, tp: int = 1) -> int:
    """The smallest multiple of `alignment` tokens whose SWA page holds one GDN layer's state."""
    per_block = page_bytes(cfg, alignment, kv_dtype, tp)
    return alignment * math.ceil(gdn_state_bytes(cfg, conv_dtype, ssm_dtype, tp) / per_block)


def allocated_sequence_bytes(cfg: InfiniteVLTextConfig, block_size: int, kv_dtype: torch.dtype, tp: int = 1) -> int:
    """Bytes of the pool one admitted sequence holds (per tensor-parallel rank)."""
    pages = len(cfg.swa_layers) * ring_blocks(cfg.attention_window, block_size) + len(cfg.gdn_layers)
    return page_bytes(cfg, block_size, kv_dtype, tp) * pages


def blocks_per_sequence(cfg: InfiniteVLTextConfig, block_size: int) -> int:
    """Pool block ids one admitted sequence holds: its rings' blocks plus one per GDN layer group."""
    return ring_blocks(cfg.attention_window, block_size) + len(cfg.gdn_layers) // len(cfg.swa_layers)
