"""vLLM general plugin: registers the InfiniteVL config, model and engine-config rules in every
vLLM process (loaded through the ``vllm.general_plugins`` entry point)."""

from __future__ import annotations

import logging

import torch

from .config import ARCHITECTURE, register_with_transformers

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
            _default_cpu_state_budget(vllm_config)

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


def _validate_local_checkpoint(model: str) -> None:
    """Runs in the user's process before any engine process starts, so a broken checkpoint fails
    with one line naming the file and the tensor, not deep inside a worker or a kernel."""
    import os

    from .checkpoint import validate_checkpoint

    if os.path.isdir(model):
        validate_checkpoint(model)


def _default_cpu_state_budget(vllm_config) -> None:
    """On CPU, vLLM by default reserves 92% of the machine (and refuses to start when page cache
    or other processes hold more than 8%). InfiniteVL's state per sequence is bounded, so unless the
    user set VLLM_CPU_KVCACHE_SPACE or kv_cache_memory_bytes, size the cache from the model:
    max_num_seqs sequences' state, twice over, at least 1 GiB, at most a quarter of the machine."""
    import os

    import psutil
    from vllm.platforms import current_platform

    from .state import sequence_state_bytes

    cache = vllm_config.cache_config
    if not current_platform.is_cpu() or cache.kv_cache_memory_bytes is not None:
        return
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    model = vllm_config.model_config
    cfg = model.hf_config.text_config
    per_seq = sequence_state_bytes(cfg, model.dtype, model.dtype, torch.float32,
                                   kv_tokens=min(cfg.attention_window, model.max_model_len) + 256)
    want = 2 * per_seq * vllm_config.scheduler_config.max_num_seqs
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
    _refuse_remote_media_unless_allowed()
    _refuse_decompression_bombs()
