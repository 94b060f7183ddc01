"""vLLM general plugin: registers the InfiniteVL config, model and engine-config rules in every
vLLM process (loaded through the ``vllm.general_plugins`` entry point)."""

from __future__ import annotations

import logging

from .config import ARCHITECTURE, register_with_transformers

MODEL_CLASS = "infinitevl_vllm.model.vllm_model:InfiniteVLQwen2_5_VLForConditionalGeneration"
logger = logging.getLogger("vllm.infinitevl_vllm")  # under vLLM's configured logger

PREFIX_CACHING_REFUSED = (
    "InfiniteVL: prefix caching is turned off. A GDN layer's state after a prefix depends on every "
    "token before it, so vLLM's hybrid prefix caching would have to snapshot each sequence's recurrent "
    "state at every block boundary; recomputing a shared prefix is cheaper for this model."
)


def _engine_config_rules():
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class InfiniteVLEngineConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            from .vllm_patches import harden_media

            harden_media()  # this process serves InfiniteVL: the server's media hardening (only here)
            _validate_local_checkpoint(vllm_config.model_config.model)
            cache = vllm_config.cache_config
            if cache.enable_prefix_caching:
                logger.warning(PREFIX_CACHING_REFUSED)
                cache.enable_prefix_caching = False
            _fix_state_block_size(vllm_config)
            _default_cpu_state_budget(vllm_config)
            _max_num_seqs_within_budget(vllm_config)
            _graphs_for_frames(vllm_config)
            _use_v1_model_runner()
            _sessions_worker_extension(vllm_config)

    return InfiniteVLEngineConfig


PREFILL_GRAPH_TOKENS = 512  # vLLM's own ceiling on an H100/H200, whatever max_num_seqs is


def _graphs_for_frames(vllm_config) -> None:
    """On CUDA with vLLM's compilation on, run a frame's work in CUDA graphs: the vision tower compiled and
    graphed (vLLM's `compile_mm_encoder` and `cudagraph_mm_encoder`, off by default), and the decoder's pieces
    graphed up to 512 tokens even when the state budget keeps max_num_seqs low (vLLM caps its capture sizes at
    twice max_num_seqs: 54 slots left a frame's 266 tokens eager). A session append is otherwise launch-bound:
    on an H200 one frame took 128 ms for 16 ms of kernels, and 96 ms with these (docs/gpu.md). Applies when the
    user left both encoder switches off and set no capture sizes; a user's own settings are kept."""
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    comp = vllm_config.compilation_config
    if (not current_platform.is_cuda() or vllm_config.model_config.enforce_eager
            or comp.mode not in (None, CompilationMode.VLLM_COMPILE)):  # None: vLLM resolves it later, to compile
        return
    if not (comp.compile_mm_encoder or comp.cudagraph_mm_encoder) and _vision_attention_graphable(vllm_config):
        comp.compile_mm_encoder = comp.cudagraph_mm_encoder = True
        logger.info("InfiniteVL: the vision tower runs compiled and in CUDA graphs (compile_mm_encoder, "
                    "cudagraph_mm_encoder)")
    if comp.max_cudagraph_capture_size is None and comp.cudagraph_capture_sizes is None:
        comp.cudagraph_capture_sizes = _capture_sizes(PREFILL_GRAPH_TOKENS, vllm_config.scheduler_config.max_num_seqs)


def _capture_sizes(ceiling: int, max_num_seqs: int) -> list[int]:
    """vLLM's default grid of CUDA-graph sizes up to `ceiling` (1, 2, 4, every 8 to 256, every 16 after), and
    max_num_seqs itself, which vLLM's default adds too. Graphs of decodes stop at max_num_seqs, so without that
    size a full batch of decodes (54 under the bench's budget) would pad to the next size (56), which has no decode
    graph, and run piecewise: 28 ms a step on an H200 instead of 6.5."""
    sizes = {1, 2, 4, *range(8, min(ceiling + 1, 256), 8), *range(256, ceiling + 1, 16)}
    if max_num_seqs <= ceiling:
        sizes.add(max_num_seqs)
    return sorted(sizes)


def _vision_attention_graphable(vllm_config) -> bool:
    """Whether the vision tower runs at all and its attention, as vLLM will choose it, can be captured: not torch
    SDPA (vLLM's choice for float32, where FlashAttention has no kernel), which splits the batch by a host copy of
    its sequence lengths and so fails inside a CUDA graph."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    model = vllm_config.model_config
    mm = model.multimodal_config
    if mm is None or mm.language_model_only or not any(mm.get_limit_per_prompt(m) for m in ("image", "video")):
        return False  # text only: vLLM refuses encoder graphs there
    vision = model.hf_config.vision_config
    chosen = current_platform.get_vit_attn_backend(vision.hidden_size // vision.num_heads, model.dtype,
                                                   mm.mm_encoder_attn_backend)
    return chosen != AttentionBackendEnum.TORCH_SDPA


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

    from .model.state_size import STATE_BLOCK_SIZE_KEY, state_block_size
    from .vllm_patches import choose_block_size

    cache, model = vllm_config.cache_config, vllm_config.model_config
    alignment = cache.block_size if cache.user_specified_block_size else (128 if current_platform.is_cpu() else 16)
    conv_dtype, ssm_dtype = MambaStateDtypeCalculator.gated_delta_net_state_dtype(
        model.dtype, cache.mamba_cache_dtype, cache.mamba_ssm_cache_dtype)
    choose_block_size(cache, state_block_size(model.hf_config.text_config, alignment,
                                              kv_cache_dtype_str_to_dtype(cache.cache_dtype, model), conv_dtype,
                                              ssm_dtype, vllm_config.parallel_config.tensor_parallel_size))
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

    from .model.state_manager import StatePool

    cache = vllm_config.cache_config
    if not current_platform.is_cpu() or cache.kv_cache_memory_bytes is not None:
        return
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    per_seq = StatePool.from_vllm_config(vllm_config).bytes_per_sequence
    want = per_seq * vllm_config.scheduler_config.max_num_seqs + (64 << 20)
    budget = int(min(max(want, 1 << 30), psutil.virtual_memory().total // 4))
    cache.kv_cache_memory_bytes = budget
    logger.info("InfiniteVL: state cache budget %.2f GiB (%.1f MiB per sequence); set VLLM_CPU_KVCACHE_SPACE "
                "to override", budget / 2**30, per_seq / 2**20)


def _max_num_seqs_within_budget(vllm_config) -> None:
    """With a fixed state budget (kv_cache_memory_bytes) at most budget // per-sequence state sequences can run
    at once, whatever their lengths; vLLM's CUDA-graph capture refuses a max_num_seqs above the state slots
    there are, so lower it to what fits (and say so)."""
    from .model.state_manager import StatePool

    cache, sched = vllm_config.cache_config, vllm_config.scheduler_config
    if cache.kv_cache_memory_bytes is None:
        return
    per_seq = StatePool.from_vllm_config(vllm_config).bytes_per_sequence
    fits = cache.kv_cache_memory_bytes // per_seq
    if fits < 1:
        raise ValueError(f"InfiniteVL: kv_cache_memory_bytes={cache.kv_cache_memory_bytes} holds no sequence; "
                         f"one sequence's state takes {per_seq} bytes ({per_seq / 2**20:.1f} MiB)")
    if sched.max_num_seqs > fits:
        logger.warning("InfiniteVL: max_num_seqs lowered from %d to %d, the sequences whose state fits "
                       "kv_cache_memory_bytes (%.1f MiB each, at any length)", sched.max_num_seqs, fits,
                       per_seq / 2**20)
        sched.max_num_seqs = fits


def _sessions_worker_extension(vllm_config) -> None:
    """The streaming sessions' RPC is a worker extension class, vLLM's way to add worker methods for
    collective_rpc; a user's own extension class is kept (the sessions' RPC is then unavailable, unless the class
    extends ours)."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from .serving.sessions_worker import WORKER_EXTENSION, SessionsWorkerExtension

    parallel = vllm_config.parallel_config
    if not parallel.worker_extension_cls:
        parallel.worker_extension_cls = WORKER_EXTENSION
    elif not issubclass(resolve_obj_by_qualname(parallel.worker_extension_cls), SessionsWorkerExtension):
        logger.warning("InfiniteVL: --worker-extension-cls %s is kept; streaming sessions need %s (or a class "
                       "extending it)", parallel.worker_extension_cls, WORKER_EXTENSION)


def register() -> None:
    """Runs in every vLLM process: our config with transformers, the model, its engine-config rules, the
    ring's KV-cache manager, and the vLLM patches an InfiniteVL engine needs (vllm_patches.apply)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from . import vllm_patches
    from .model.state_manager import register_ring_kv_spec

    vllm_patches.check_vllm_version()
    register_with_transformers()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, _engine_config_rules())
    register_ring_kv_spec()
    vllm_patches.apply()
