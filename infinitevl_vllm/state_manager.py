"""The constant-memory state manager: per sequence one recurrent slot (every GDN layer's conv and
recurrent state, vLLM's ``MambaSpec``) plus, per SWA layer, a ring of KV blocks that never grows.

vLLM 0.32's ``CircularBufferSpec`` / ``CircularBufferManager`` already give most of the ring: one
allocation per sequence claimed at admission, freed when it finishes, is preempted or aborted,
never grown, never prefix-cached, and no per-token slot mapping. What they lack: their ring is a
single block whose size is the ring's capacity, and in a hybrid model every group shares one page
size, so a single 8192-token block would pad every GDN layer's state page up to it (4x the memory
of the tiny model). ``RingKVSpec`` keeps vLLM's ordinary attention block size and claims
``ceil(window / block_size) + 1`` blocks per sequence instead.

Every group then costs a fixed number of blocks per sequence, so vLLM's own admission (a request
is scheduled only when its blocks can be claimed) admits by a slot count, whatever the lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.config import VllmConfig
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import CircularBufferManager
from vllm.v1.kv_cache_interface import CircularBufferSpec


def ring_blocks(window: int, block_size: int) -> int:
    """Blocks in one sequence's ring for one SWA layer."""
    return cdiv(window, block_size) + 1


@dataclass(frozen=True, kw_only=True)
class RingKVSpec(CircularBufferSpec):
    """A ring of `ring_blocks` ordinary attention blocks per sequence."""

    ring_blocks: int

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        del vllm_config
        return self.ring_blocks * self.page_size_bytes

    def max_num_blocks_per_req(self, vllm_config: VllmConfig, max_len: int) -> int:
        del vllm_config, max_len
        return self.ring_blocks


class RingKVManager(CircularBufferManager):
    """Claims a sequence's whole ring when it is admitted and nothing after."""

    def _claim_ring_block(self, request_id: str, record_for_zeroing: bool = True) -> list[KVCacheBlock]:
        req_blocks = self.req_to_blocks[request_id]
        if req_blocks:
            return []
        new_blocks = self.block_pool.get_new_blocks(self.kv_cache_spec.ring_blocks)
        req_blocks.extend(new_blocks)
        if self._record_new_block_ids and record_for_zeroing:
            self.new_block_ids.extend(block.block_id for block in new_blocks)
        return new_blocks

    def get_num_blocks_to_allocate(self, request_id: str, *args, **kwargs) -> int:
        return 0 if self.req_to_blocks.get(request_id) else self.kv_cache_spec.ring_blocks


def register_ring_kv_spec() -> None:
    """Tell vLLM's KV-cache registry which manager serves RingKVSpec (built-ins first: the registry
    fills itself only while it is empty)."""
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(RingKVSpec, RingKVManager, uniform_type_base_spec=RingKVSpec)
