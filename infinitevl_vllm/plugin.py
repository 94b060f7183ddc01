"""vLLM general plugin: registers the InfiniteVL config, model and engine-config rules in every
vLLM process (loaded through the ``vllm.general_plugins`` entry point)."""

from __future__ import annotations

import logging

from .config import ARCHITECTURE, register_with_transformers

STATE_BLOCK_SIZE_KEY = "infinitevl_state_block_size"
MODEL_CLASS = "infinitevl_vllm.vllm_model:InfiniteVLQwen2_5_VLForConditionalGeneration"
logger = logging.getLogger("vllm.infinitevl_vllm")  # under vLLM's configured logger

PREFIX_CACHING_REFUSED = (
    "InfiniteVL: prefix caching is turned off. A GDN layer's state after a prefix depends on every "
    "token before it, so vLLM's hybrid prefix caching would have to snapshot each sequence's recurrent "
    "state at every block boundary; recomputing a shared prefix is cheaper for this model."
)


def _patch_once(owner, name: str, wrap) -> None:
    """Replace owner.<name> with wrap(original) once per process (register() may run many times)."""
    original = getattr(owner, name)
    if getattr(original, "_infinitevl", False):
        return
    replacement = wrap(original)
    replacement._infinitevl = True
    setattr(owner, name, replacement)


def _engine_config_rules():
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class InfiniteVLEngineConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            _validate_local_checkpoint(vllm_config.model_config.model)
            cache = vllm_config.cache_config
            if cache.enable_prefix_caching:
                logger.warning(PREFIX_CACHING_REFUSED)
                cache.enable_prefix_caching = False
            _fix_state_block_size(vllm_config)
            _default_cpu_state_budget(vllm_config)
            _use_v1_model_runner()

    return InfiniteVLEngineConfig


def _no_length_limit_for_infinitevl() -> None:
    """vLLM refuses a --max-model-len above the config's max_position_embeddings (RoPE tables and
    KV grow with it). InfiniteVL computes rotary angles from the positions and keeps constant state,
    so any length the user asks for is served; without the flag the config's length is the default."""
    import vllm.config.model as model_config

    def wrap(get_and_verify_max_len):
        def max_len(hf_config, *args, max_model_len=None, **kwargs):
            if getattr(hf_config, "model_type", None) == "infinite_vl_text" and max_model_len not in (None, -1):
                return int(max_model_len)
            return get_and_verify_max_len(hf_config, *args, max_model_len=max_model_len, **kwargs)

        return max_len

    _patch_once(model_config, "_get_and_verify_max_len", wrap)


def _report_state_pool() -> None:
    """One log line when the engine has sized its state pool, and slot gauges in /metrics."""
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from .state_manager import StatePool, record_slot_metrics

    def wrap_init(initialize_kv_caches):
        def initialize_and_log(self, vllm_config):
            kv_cache_config = initialize_kv_caches(self, vllm_config)
            pool = StatePool.from_kv_cache_config(kv_cache_config)
            if pool is not None:
                logger.info(pool.describe())
            return kv_cache_config

        return initialize_and_log

    def wrap_record(record):
        def record_with_slots(self, scheduler_stats, *args, **kwargs):
            record(self, scheduler_stats, *args, **kwargs)
            if scheduler_stats is not None and self.vllm_config.model_config.architecture == ARCHITECTURE:
                record_slot_metrics(self.vllm_config, scheduler_stats.num_running_reqs)

        return record_with_slots

    _patch_once(EngineCore, "_initialize_kv_caches", wrap_init)
    _patch_once(PrometheusStatLogger, "record", wrap_record)


def _use_v1_model_runner() -> None:
    """vLLM 0.32 runs its V2 model runner on CUDA by default; InfiniteVL's per-step hooks (streaming
    sessions: positions, state copies, ring offsets) are written against the V1 runner, the one vLLM's
    CPU backend runs, so an InfiniteVL engine takes V1 on every device. Set before the engine's
    processes start (they inherit it); a user's own VLLM_USE_V2_MODEL_RUNNER is kept."""
    import os

    if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("InfiniteVL: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")


def _validate_local_checkpoint(model: str) -> None:
    """Runs in the user's process before any engine process starts, so a broken checkpoint fails
    with one line naming the file and the tensor, not deep inside a worker or a kernel."""
    import os

    from .checkpoint import validate_checkpoint

    if os.path.isdir(model):
        validate_checkpoint(model)


def _fix_state_block_size(vllm_config) -> None:
    """vLLM picks the hybrid block size (the smallest aligned block whose attention page holds a
    GDN state) in the worker, after the front end has its config; the slot pool's size in the
    front end (metrics) needs it too. So choose it here, from the config, the same way, and keep
    it: a block size the user set only sets the alignment."""
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateDtypeCalculator
    from vllm.platforms import current_platform
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    from .state import state_block_size

    cache, model = vllm_config.cache_config, vllm_config.model_config
    alignment = cache.block_size if cache.user_specified_block_size else (128 if current_platform.is_cpu() else 16)
    conv_dtype, ssm_dtype = MambaStateDtypeCalculator.gated_delta_net_state_dtype(
        model.dtype, cache.mamba_cache_dtype, cache.mamba_ssm_cache_dtype)
    cache.block_size = state_block_size(model.hf_config.text_config, alignment,
                                        kv_cache_dtype_str_to_dtype(cache.cache_dtype, model), conv_dtype, ssm_dtype,
                                        vllm_config.parallel_config.tensor_parallel_size)
    cache.user_specified_block_size = True  # keeps the platform's default from replacing it
    if vllm_config.additional_config is None:
        vllm_config.additional_config = {}
    vllm_config.additional_config[STATE_BLOCK_SIZE_KEY] = cache.block_size


def _default_cpu_state_budget(vllm_config) -> None:
    """On CPU, vLLM by default reserves 92% of the machine (and refuses to start when page cache
    or other processes hold more than 8%). InfiniteVL's state per sequence is bounded, so unless the
    user set VLLM_CPU_KVCACHE_SPACE or kv_cache_memory_bytes, size the cache from the model:
    max_num_seqs sequence slots, at least 1 GiB, at most a quarter of the machine."""
    import os

    import psutil
    from vllm.platforms import current_platform
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    from .state import allocated_sequence_bytes

    cache = vllm_config.cache_config
    if not current_platform.is_cpu() or cache.kv_cache_memory_bytes is not None:
        return
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    model = vllm_config.model_config
    cfg = model.hf_config.text_config
    per_seq = allocated_sequence_bytes(cfg, cache.block_size, kv_cache_dtype_str_to_dtype(cache.cache_dtype, model),
                                       vllm_config.parallel_config.tensor_parallel_size)
    want = per_seq * vllm_config.scheduler_config.max_num_seqs + (64 << 20)
    budget = int(min(max(want, 1 << 30), psutil.virtual_memory().total // 4))
    cache.kv_cache_memory_bytes = budget
    logger.info("InfiniteVL: state cache budget %.2f GiB (%.1f MiB per sequence); set VLLM_CPU_KVCACHE_SPACE "
                "to override", budget / 2**30, per_seq / 2**20)


REMOTE_MEDIA_REFUSED = (
    "remote media URLs are not fetched by default: send the image as a data: URL, or start the server "
    "with --allowed-media-domains HOST [HOST ...] to fetch from those hosts"
)


def _refuse_remote_media_unless_allowed() -> None:
    """vLLM fetches any http(s) media URL a client names unless --allowed-media-domains is given (an
    empty list means every host). A server should not fetch arbitrary URLs for anonymous clients:
    with no allow-list, refuse; naming hosts with vLLM's own flag is the opt-in."""
    from vllm.multimodal.media.connector import MediaConnector

    def wrap_allow_list(check_allow_list):
        def assert_allowed(self, url_spec) -> None:
            if not self.allowed_media_domains:
                raise ValueError(f"{REMOTE_MEDIA_REFUSED} (got {url_spec.scheme}://{url_spec.hostname})")
            check_allow_list(self, url_spec)

        return assert_allowed

    def wrap_file_url(load_file_url):
        def load_file_url_or_refuse(self, url_spec, media_io):
            # vLLM raises RuntimeError here, which its server answers with a 500.
            if self.allowed_local_media_path is None:
                raise ValueError("file:// media URLs are not read by default: start the server with "
                                 "--allowed-local-media-path DIR to read files under DIR")
            return load_file_url(self, url_spec, media_io)

        return load_file_url_or_refuse

    _patch_once(MediaConnector, "_assert_url_in_allowed_media_domains", wrap_allow_list)
    _patch_once(MediaConnector, "_load_file_url", wrap_file_url)


def _refuse_decompression_bombs() -> None:
    """PIL refuses images that declare absurd sizes with DecompressionBombError, which is not an
    OSError, so vLLM's image loader lets it through as a server error (500). Make it a bad request."""
    from PIL import Image
    from vllm.multimodal.media.image import ImageMediaIO

    def wrap(load_bytes):
        def load_bytes_or_refuse(self, data: bytes):
            try:
                return load_bytes(self, data)
            except Image.DecompressionBombError as e:
                raise ValueError(f"Failed to load image: {e}") from e

        return load_bytes_or_refuse

    _patch_once(ImageMediaIO, "load_bytes", wrap)


def register() -> None:
    register_with_transformers()
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, _engine_config_rules())
    _no_length_limit_for_infinitevl()
    from .state_manager import register_ring_kv_spec

    register_ring_kv_spec()
    _report_state_pool()
    _refuse_remote_media_unless_allowed()
    _refuse_decompression_bombs()
    from .sessions_worker import install as install_sessions

    install_sessions()
