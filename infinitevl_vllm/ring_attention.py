"""Attention over the SWA layers' KV rings (state_manager.py allocates them), inside vLLM.

vLLM has no attention that reads a ring (its ring spec has no slot mapping: the layer places its
rows). This is one: a vLLM attention backend whose metadata says which ring blocks each request
owns and how many tokens precede this step, and whose forward runs ``infinitevl_kernels.ring`` on
CPU and the Triton kernels of ``infinitevl_kernels.triton_swa`` (same layout) on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from infinitevl_kernels.ring import PagedRing, ring_decode_attention, ring_prefill_attention
from infinitevl_kernels.triton_swa import swa_paged_forward
from vllm.config import CacheConfig, VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)

from .sessions_worker import ring_token_offsets
from .state import ring_blocks
from .state_manager import RingKVSpec


@dataclass
class RingAttentionMetadata(AttentionMetadata):
    query_start_loc: list[int]
    starts: list[int]  # ring token index of each sequence's first token in this step
    ring_block_ids: torch.Tensor  # [num_reqs, ring_blocks]


class RingAttentionMetadataBuilder(AttentionMetadataBuilder[RingAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RingAttentionMetadata:
        md = common_attn_metadata
        n = md.num_reqs
        qsl = md.query_start_loc_cpu[: n + 1].tolist()
        seq_lens = md.seq_lens[:n].cpu().tolist()  # tokens of each sequence after this step
        starts = [seq_lens[i] - (qsl[i + 1] - qsl[i]) for i in range(n)]
        offsets = ring_token_offsets(n)  # a streaming session's request continues its session's ring
        if offsets is not None:
            starts = [s + o for s, o in zip(starts, offsets)]
        return RingAttentionMetadata(
            query_start_loc=qsl,
            starts=starts,
            ring_block_ids=md.block_table_tensor[:n, : self.kv_cache_spec.ring_blocks].long(),
        )


class RingAttentionImpl(AttentionImpl[RingAttentionMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap=None, attn_type: str = "decoder", kv_sharing_target_layer_name=None,
                 *, window: int) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.window = window

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: RingAttentionMetadata | None, output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        if attn_metadata is None:  # profiling run: no rings yet
            return output
        md = attn_metadata
        if query.is_cuda:  # the Triton kernels on the same paged ring (benchmarks/gpu_h100.py times them)
            swa_paged_forward(query.view(-1, self.num_heads, self.head_size),
                              key.view(-1, self.num_kv_heads, self.head_size),
                              value.view(-1, self.num_kv_heads, self.head_size), kv_cache,
                              md.ring_block_ids, md.query_start_loc, md.starts, self.window, self.scale,
                              output.view(-1, self.num_heads, self.head_size))
            return output
        for i, start in enumerate(md.starts):
            a, b = md.query_start_loc[i], md.query_start_loc[i + 1]
            if a == b:
                continue
            ring = PagedRing(kv_cache, md.ring_block_ids[i], self.head_size)
            attend = ring_decode_attention if b - a == 1 else ring_prefill_attention
            output[a:b] = attend(query[a:b], key[a:b], value[a:b], ring, start, self.window, self.scale)
        return output


class RingAttentionBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    forward_includes_kv_cache_update = True

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[RingAttentionImpl]:
        return RingAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[RingAttentionMetadataBuilder]:
        return RingAttentionMetadataBuilder


class RingSlidingWindowAttention(Attention):
    """vLLM attention layer (so it sits in vLLM's opaque attention op under torch.compile) whose KV
    is a fixed ring of blocks instead of a growing block table."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, window: int,
                 cache_config: CacheConfig | None, quant_config, prefix: str):
        super().__init__(num_heads, head_dim, head_dim**-0.5, num_kv_heads=num_kv_heads, cache_config=cache_config,
                         quant_config=quant_config, prefix=prefix, attn_backend=RingAttentionBackend, window=window)
        self.window = window

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> RingKVSpec:
        block_size = vllm_config.cache_config.block_size
        return RingKVSpec(
            block_size=block_size,
            ring_blocks=ring_blocks(self.window, block_size),
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            head_size_v=self.head_size_v,
            dtype=self.kv_cache_torch_dtype,
        )
