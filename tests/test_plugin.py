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
