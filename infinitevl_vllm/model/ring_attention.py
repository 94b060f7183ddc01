"""Attention over the SWA layers' KV rings (state_manager.py allocates them), inside vLLM.

vLLM has no attention that reads a ring (its ring spec has no slot mapping: the layer places its
rows). This is one: a vLLM attention backend whose metadata says which ring blocks each request
owns and how many tokens precede this step, and whose forward runs ``infinitevl_kernels.swa.ring`` on
CPU and the Triton kernels of ``infinitevl_kernels.swa.triton_ring`` (same layout) on CUDA.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from infinitevl_kernels.swa.ring import PagedRing, ring_decode_attention, ring_prefill_attention
from infinitevl_kernels.swa.triton_ring import swa_paged_forward, warm_up_ring
from vllm.config import CacheConfig, VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.utils.platform_utils import is_pin_memory_available
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from .state_manager import RingKVSpec
from .state_size import ring_blocks
from .step_requests import StepRequests, step_requests_of

logger = logging.getLogger("vllm.infinitevl_vllm")


@dataclass
class RingAttentionMetadata(AttentionMetadata):
    num_decodes: int  # the batch's first requests, one token each
    starts: torch.Tensor  # [requests] int32: ring token index of each request's first token in this step
    ring_block_ids: torch.Tensor  # [requests, ring_blocks] int32 (a view of the runner's block table)
    prefill_query_start_loc: torch.Tensor | None  # [prefills + 1], counted from the first prefill token
    max_prefill_len: int
    query_start_loc_cpu: list[int] | None  # host copies, for the CPU path
    starts_cpu: list[int] | None


class RingAttentionMetadataBuilder(AttentionMetadataBuilder[RingAttentionMetadata]):
    """Builds each step's ring metadata into persistent device buffers, so a decode step captured in
    a full CUDA graph reads the current step's values on replay; the forward itself never touches
    the host."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int = 1  # decodes first: they take the decode kernel

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        sched, comp = vllm_config.scheduler_config, vllm_config.compilation_config
        rows = max(sched.max_num_seqs, sched.max_num_batched_tokens, comp.max_cudagraph_capture_size or 0) + 1
        # [starts (one a request) | prefill query starts (one a prefill, + 1)], made on the host and copied in
        # at once, so a step launches no kernel for its ring metadata. The copy is pinned and asynchronous, into
        # one device buffer (a captured graph reads its address), from host buffers taken in turn: a host buffer
        # is rewritten only two builds later, when vLLM has had the output of the step that read it (V1 also
        # fences its input preparation; V2 keeps two steps in flight and rotates its own buffers the same way).
        self.device_buffer = torch.zeros(2 * rows + 1, dtype=torch.int32, device=device)
        pinned = device.type != "cpu" and is_pin_memory_available()
        self.host_buffers = [torch.zeros(2 * rows + 1, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
        self.builds = 0
        self.step_requests = step_requests_of(vllm_config, layer_names)  # per-request data of the step

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RingAttentionMetadata:
        md = common_attn_metadata
        n = md.num_reqs
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(md, decode_threshold=1)
        qsl = md.query_start_loc_cpu[: n + 1].numpy()
        # the runner's host sequence lengths are exact without speculative decoding, which InfiniteVL has not
        seq_lens = md.seq_lens_cpu_upper_bound if md.seq_lens_cpu_upper_bound is not None else md.seq_lens.cpu()
        host_buffer = self.host_buffers[self.builds % len(self.host_buffers)]
        self.builds += 1
        host = host_buffer.numpy()
        starts = host[:n]
        # tokens before this step = tokens after it - this step's; CUDA-graph padding rows (no tokens,
        # no sequence) come out 0 and write into the null block
        np.maximum(seq_lens[:n].numpy() - (qsl[1:] - qsl[:-1]), 0, out=starts)
        # a streaming session's request continues its session's ring: its offset is the request's data
        offsets = self.step_requests.token_offsets(n) if self.step_requests is not None else None
        if offsets is not None:
            starts += np.asarray(offsets, dtype=np.int32)
        end = n + num_prefills + 1 if num_prefills else n
        if num_prefills:
            np.subtract(qsl[num_decodes : num_decodes + num_prefills + 1], num_decode_tokens, out=host[n:end])
        device = self.device_buffer[:end]
        device.copy_(host_buffer[:end], non_blocking=True)
        on_cpu = self.device.type == "cpu"
        return RingAttentionMetadata(
            num_decodes=num_decodes,
            starts=device[:n],
            ring_block_ids=md.block_table_tensor[:n, : self.kv_cache_spec.ring_blocks],
            prefill_query_start_loc=device[n:end] if num_prefills else None,
            max_prefill_len=md.max_query_len,
            query_start_loc_cpu=qsl.tolist() if on_cpu else None,
            starts_cpu=starts.tolist() if on_cpu else None,
        )


def advance_decodes(md: RingAttentionMetadata, num_reqs: int) -> None:
    """The same all-decode batch one step later (model/steady_decode.py): each request's ring start is one
    further, in the device buffer a captured graph reads (padding rows keep writing into the null block)."""
    md.starts[:num_reqs] += 1
    if md.starts_cpu is not None:
        md.starts_cpu[:num_reqs] = [s + 1 for s in md.starts_cpu[:num_reqs]]


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

    kernels_compiled = False  # once a process: every SWA layer launches the same kernels

    def _compile_kernels(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Compile every decode and prefill variant at start-up, on a scratch ring (vLLM's dummy runs skip
        this op, so a server would compile a variant when a batch first needs it)."""
        t0 = time.perf_counter()
        warm_up_ring(query.view(-1, self.num_heads, self.head_size), key.view(-1, self.num_kv_heads, self.head_size),
                     value.view(-1, self.num_kv_heads, self.head_size), self.window, layer.block_size, self.scale)
        RingAttentionImpl.kernels_compiled = True
        logger.info("InfiniteVL: compiled the ring attention kernels in %.1f s", time.perf_counter() - t0)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: RingAttentionMetadata | None, output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        if attn_metadata is None:  # profiling run: no rings yet
            if query.is_cuda and not RingAttentionImpl.kernels_compiled:
                self._compile_kernels(layer, query, key, value)
            return output
        md = attn_metadata
        if query.is_cuda:  # the Triton kernels on the same paged ring
            swa_paged_forward(query.view(-1, self.num_heads, self.head_size),
                              key.view(-1, self.num_kv_heads, self.head_size),
                              value.view(-1, self.num_kv_heads, self.head_size), kv_cache,
                              md.ring_block_ids, md.starts, md.num_decodes, md.prefill_query_start_loc,
                              md.max_prefill_len, self.window, self.scale,
                              output.view(-1, self.num_heads, self.head_size))
            return output
        qsl = md.query_start_loc_cpu
        for i, start in enumerate(md.starts_cpu):
            a, b = qsl[i], qsl[i + 1]
            if a == b:
                continue
            ring = PagedRing(kv_cache, md.ring_block_ids[i].long(), self.head_size)
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
                 cache_config: CacheConfig | None, quant_config, prefix: str,
                 step_requests: StepRequests | None = None):
        super().__init__(num_heads, head_dim, head_dim**-0.5, num_kv_heads=num_kv_heads, cache_config=cache_config,
                         quant_config=quant_config, prefix=prefix, attn_backend=RingAttentionBackend, window=window)
        self.window = window
        self.block_size = cache_config.block_size if cache_config is not None else 16  # the plugin fixed it
        self.step_requests = step_requests  # the model's; the metadata builder finds it through this layer

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
