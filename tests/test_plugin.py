"""What the vLLM plugin changes in vLLM, checked without starting an engine (the server hardening is
turned on where InfiniteVL is served: here by calling it, as the engine-config rule does)."""

from __future__ import annotations

import pytest
from PIL import Image

from infinitevl_vllm.plugin import register
from infinitevl_vllm.vllm_patches import harden_media


def test_remote_media_refused_without_allow_list(image_server):
    from vllm.multimodal.media.connector import MediaConnector
    from vllm.multimodal.media.image import ImageMediaIO

    register()
    harden_media()
    url, hits = image_server
    with pytest.raises(ValueError, match="remote media URLs are not fetched by default.*--allowed-media-domains"):
        MediaConnector().load_from_url(url, ImageMediaIO())
    assert hits == []


def test_remote_media_fetched_from_allowed_hosts(image_server):
    from vllm.multimodal.media.connector import MediaConnector
    from vllm.multimodal.media.image import ImageMediaIO

    register()
    harden_media()
    url, hits = image_server
    image = MediaConnector(allowed_media_domains=["127.0.0.1"]).load_from_url(url, ImageMediaIO())
    assert image.media.size == (32, 32) and hits == ["/x.png"]
    with pytest.raises(ValueError, match="allowed domains"):
        MediaConnector(allowed_media_domains=["example.org"]).load_from_url(url, ImageMediaIO())


def test_decompression_bomb_is_a_value_error():
    import base64
    import struct
    import zlib

    from vllm.multimodal.media.image import ImageMediaIO

    register()
    harden_media()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="Failed to load image: .*decompression bomb"):
        ImageMediaIO().load_base64("image/png", base64.b64encode(bomb).decode())


def test_local_files_refused_without_allowed_path(tmp_path):
    from vllm.multimodal.media.connector import MediaConnector
    from vllm.multimodal.media.image import ImageMediaIO

    register()
    harden_media()
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="--allowed-local-media-path"):
        MediaConnector().load_from_url(f"file://{tmp_path}/a.png", ImageMediaIO())
    assert MediaConnector(allowed_local_media_path=str(tmp_path)).load_from_url(
        f"file://{tmp_path}/a.png", ImageMediaIO()).media.size == (8, 8)


def test_max_num_seqs_is_lowered_to_the_sequences_a_fixed_budget_holds(tiny_ckpt):
    """A sequence's state is the same at any length, so a fixed budget bounds the batch; vLLM's CUDA-graph
    capture would refuse a larger max_num_seqs. A budget that holds no sequence is named."""
    from vllm import EngineArgs
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    from infinitevl_vllm.checkpoint import load_config
    from infinitevl_vllm.model.state_size import STATE_BLOCK_SIZE_KEY, allocated_sequence_bytes

    config = EngineArgs(model=str(tiny_ckpt), max_num_seqs=256, kv_cache_memory_bytes=40 << 20).create_engine_config()
    dtype = kv_cache_dtype_str_to_dtype(config.cache_config.cache_dtype, config.model_config)
    per_seq = allocated_sequence_bytes(load_config(tiny_ckpt).text_config,
                                       config.additional_config[STATE_BLOCK_SIZE_KEY], dtype)
    assert config.scheduler_config.max_num_seqs == (40 << 20) // per_seq < 256
    with pytest.raises(ValueError, match=r"kv_cache_memory_bytes=1048576 holds no sequence; one sequence's state"):
        EngineArgs(model=str(tiny_ckpt), kv_cache_memory_bytes=1 << 20).create_engine_config()


def test_on_cuda_a_frames_work_runs_in_cuda_graphs_unless_the_user_chose(monkeypatch, tiny_ckpt):
    """A session append was launch-bound on an H200 (128 ms for 16 ms of kernels): with vLLM's compilation on,
    the vision tower is compiled and graphed and the decoder graphed up to 512 tokens. A user's own choices stay,
    eager stays eager, a vision attention that cannot be captured (torch SDPA: float32) keeps the tower eager, and
    the CPU backend is left alone."""
    from types import SimpleNamespace

    from vllm import EngineArgs
    from vllm.config import CompilationConfig, CompilationMode
    from vllm.platforms import current_platform

    from infinitevl_vllm import plugin
    from infinitevl_vllm.plugin import PREFILL_GRAPH_TOKENS, _graphs_for_frames, _vision_attention_graphable

    def rule(eager: bool = False, **comp):
        config = SimpleNamespace(compilation_config=CompilationConfig(**comp),
                                 model_config=SimpleNamespace(enforce_eager=eager),
                                 scheduler_config=SimpleNamespace(max_num_seqs=54))
        _graphs_for_frames(config)
        c = config.compilation_config
        return c.compile_mm_encoder, c.cudagraph_mm_encoder, c.max_cudagraph_capture_size, c.cudagraph_capture_sizes

    cpu = EngineArgs(model=str(tiny_ckpt)).create_engine_config()
    assert not cpu.compilation_config.compile_mm_encoder and not cpu.compilation_config.cudagraph_mm_encoder
    assert not _vision_attention_graphable(cpu)  # vLLM's choice here is torch SDPA
    text_only = EngineArgs(model=str(tiny_ckpt), limit_mm_per_prompt={"image": 0, "video": 0}).create_engine_config()
    assert not _vision_attention_graphable(text_only)
    graphable = True
    monkeypatch.setattr(plugin, "_vision_attention_graphable", lambda config: graphable)
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self=None: True)
    encoder, encoder_graphs, _, sizes = rule()
    assert encoder and encoder_graphs and max(sizes) == PREFILL_GRAPH_TOKENS == 512
    assert rule(mode=CompilationMode.VLLM_COMPILE)[:2] == (True, True)
    assert rule(eager=True) == (False, False, None, None)
    assert rule(mode=CompilationMode.NONE) == (False, False, None, None)
    assert rule(cudagraph_mm_encoder=True)[:2] == (False, True)  # the user's half-choice is kept
    assert rule(max_cudagraph_capture_size=64)[2:] == (64, None)
    assert rule(cudagraph_capture_sizes=[1, 2, 4])[3] == [1, 2, 4]
    graphable = False
    assert rule()[:2] == (False, False) and max(rule()[3]) == 512


@pytest.mark.parametrize("max_num_seqs", [54, 8, 1024])
def test_on_cuda_a_full_batch_of_decodes_has_its_own_graph(monkeypatch, tiny_ckpt, max_num_seqs):
    """With the plugin's graph sizes, as vLLM resolves them: a frame (266 tokens) runs in a graph, and so does a
    batch of max_num_seqs decodes, whose graphs vLLM captures only up to max_num_seqs (run 3 of the H200 bench
    padded 54 decodes to 56 and ran them piecewise, 4.4 times slower)."""
    from vllm import EngineArgs
    from vllm.config import CompilationMode, CUDAGraphMode
    from vllm.platforms import current_platform

    from infinitevl_vllm import plugin

    config = EngineArgs(model=str(tiny_ckpt), max_num_seqs=max_num_seqs).create_engine_config()
    comp = config.compilation_config  # as on CUDA: vLLM's compilation and graph modes
    config.model_config.enforce_eager = False
    comp.mode, comp.cudagraph_mode = CompilationMode.VLLM_COMPILE, CUDAGraphMode.FULL_AND_PIECEWISE
    comp.max_cudagraph_capture_size = comp.cudagraph_capture_sizes = None
    monkeypatch.setattr(plugin, "_vision_attention_graphable", lambda config: True)
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self=None: True)
    plugin._graphs_for_frames(config)
    config._set_cudagraph_sizes()  # vLLM's own resolution of the sizes
    sizes = comp.cudagraph_capture_sizes
    assert max(sizes) == min(512, config.scheduler_config.max_num_batched_tokens) >= 266
    decode_graphs = [n for n in sizes if n <= max_num_seqs]  # as vLLM's CUDA-graph dispatcher keys FULL decodes
    assert max(decode_graphs) == min(max_num_seqs, 512)


def test_the_sessions_worker_extension_is_set_kept_or_extended(caplog):
    """vLLM takes one worker extension class. Ours carries the sessions' RPC; a user's own is kept, with a warning
    unless it extends ours (the bench's does, to time the engine core's waits beside the sessions)."""
    from types import SimpleNamespace

    from infinitevl_vllm.plugin import _sessions_worker_extension
    from infinitevl_vllm.serving.sessions_worker import WORKER_EXTENSION
    from infinitevl_vllm.tools.core_waits import worker_extension

    def resolved(cls: str) -> str:
        config = SimpleNamespace(parallel_config=SimpleNamespace(worker_extension_cls=cls))
        _sessions_worker_extension(config)
        return config.parallel_config.worker_extension_cls

    with caplog.at_level("WARNING", logger="vllm.infinitevl_vllm"):
        assert resolved("") == WORKER_EXTENSION
        assert resolved(worker_extension("infinitevl")) == worker_extension("infinitevl")
        assert not caplog.records
        assert resolved(worker_extension("transformer")) == worker_extension("transformer")
    assert "streaming sessions need" in caplog.text


def test_sessions_refuse_a_model_runner_without_their_step_hooks():
    """The sessions' hooks are on vLLM's V1 runner. Under V2 (VLLM_USE_V2_MODEL_RUNNER=1) a session request would
    silently run on an empty state, so the sessions' RPC refuses there, naming the runner and the way out."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from infinitevl_vllm import vllm_patches
    from infinitevl_vllm.serving.sessions_worker import HOOKED_RUNNERS, SessionsWorkerExtension

    vllm_patches.session_hooks_in_model_runner()
    assert GPUModelRunner in HOOKED_RUNNERS

    class V2Runner:  # stands for vllm.v1.worker.gpu.model_runner.GPUModelRunner
        pass

    worker = SimpleNamespace(model_runner=V2Runner())
    with pytest.raises(RuntimeError, match="V1 model runner.*V2Runner.*unset VLLM_USE_V2_MODEL_RUNNER"):
        SessionsWorkerExtension.infinitevl_session_rpc(worker, "list")
