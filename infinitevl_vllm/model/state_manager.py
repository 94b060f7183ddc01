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
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import CircularBufferManager
from vllm.v1.kv_cache_interface import CircularBufferSpec, KVCacheConfig, UniformTypeKVCacheSpecs

from . import state_size


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


@dataclass(frozen=True)
class StatePool:
    """The engine's state pool seen as sequence slots."""

    num_blocks: int
    blocks_per_sequence: int
    bytes_per_sequence: int

    @property
    def slots(self) -> int:
        return self.num_blocks // self.blocks_per_sequence

    @classmethod
    def from_kv_cache_config(cls, kv_cache_config: KVCacheConfig) -> StatePool | None:
        """What the engine actually allocated (None for a model without rings)."""
        blocks = nbytes = 0
        has_ring = False
        for group in kv_cache_config.kv_cache_groups:
            spec = group.kv_cache_spec
            if isinstance(spec, UniformTypeKVCacheSpecs):
                spec = next(iter(spec.kv_cache_specs.values()))
            has_ring |= isinstance(spec, RingKVSpec)
            per_seq = spec.ring_blocks if isinstance(spec, RingKVSpec) else 1  # GDN: one state block
            blocks += per_seq
            nbytes += per_seq * spec.page_size_bytes * len(group.layer_names)
        return cls(kv_cache_config.num_blocks, blocks, nbytes) if has_ring else None

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig) -> StatePool:
        """The same from the config and the block count alone (where the allocation is not at hand)."""
        cfg = vllm_config.model_config.hf_config.text_config
        cache = vllm_config.cache_config
        block_size = vllm_config.additional_config[state_size.STATE_BLOCK_SIZE_KEY]
        kv_dtype = kv_cache_dtype_str_to_dtype(cache.cache_dtype, vllm_config.model_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        return cls(cache.num_gpu_blocks or 0, state_size.blocks_per_sequence(cfg, block_size),
                   state_size.allocated_sequence_bytes(cfg, block_size, kv_dtype, tp))

    def describe(self) -> str:
        return (f"InfiniteVL state pool: {self.slots} sequence slots of {self.bytes_per_sequence / 2**20:.2f} MiB "
                f"each ({self.blocks_per_sequence} of {self.num_blocks} blocks per sequence, whatever its length); "
                "--max-num-seqs caps running sequences, the state cache size sets the slots")


_gauges: dict[str, object] = {}


def record_slot_metrics(vllm_config: VllmConfig, num_running: int) -> None:
    """Prometheus gauges of the slot pool, next to vLLM's own (``infinitevl:state_*``)."""
    if not _gauges:
        from prometheus_client import Gauge

        for name, doc in [("slots_total", "Sequence slots in the state pool."),
                          ("slots_used", "Sequence slots held by running sequences."),
                          ("slots_free", "Sequence slots free for new sequences."),
                          ("bytes_per_sequence", "State bytes one sequence holds, whatever its length.")]:
            _gauges[name] = Gauge(f"infinitevl:state_{name}", doc, labelnames=["model_name"],
                                  multiprocess_mode="mostrecent")
    pool = StatePool.from_vllm_config(vllm_config)
    model = vllm_config.model_config.served_model_name
    for name, value in [("slots_total", pool.slots), ("slots_used", num_running),
                        ("slots_free", max(0, pool.slots - num_running)),
                        ("bytes_per_sequence", pool.bytes_per_sequence)]:
        _gauges[name].labels(model_name=model).set(value)
