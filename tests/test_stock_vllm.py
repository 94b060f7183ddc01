"""Installing the plugin leaves other models on stock vLLM: the Qwen2.5-VL twin served by vLLM's own server
from this environment (the plugin loaded, as in every vLLM process here) fetches remote images with no
allow-list and answers a file:// URL with vLLM's own error, where an InfiniteVL server refuses both
(tests/test_serving.py, tests/test_plugin.py)."""

from __future__ import annotations

import os

import pytest
from vllm_helpers import running_server

from infinitevl_vllm.vllm_patches import FILE_URL_REFUSED, HARDEN_MEDIA_ENV, REMOTE_MEDIA_REFUSED

pytestmark = pytest.mark.timeout(900)


def test_qwen_twin_gets_stock_vllm_media_handling(tmp_path_factory, image_server):
    from openai import BadRequestError, InternalServerError, OpenAI

    from infinitevl_vllm.checkpoint import make_checkpoint

    ckpt = make_checkpoint(tmp_path_factory.mktemp("qwen_twin"), "tiny", seed=0, arch="qwen2_5_vl", progress=False)
    log = tmp_path_factory.mktemp("stock") / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in (HARDEN_MEDIA_ENV, "VLLM_PLUGINS")}
    url, hits = image_server
    with running_server([str(ckpt), "--served-model-name", "twin", "--max-model-len", "2048", "--enforce-eager",
                         "--dtype", "float32", "--max-num-seqs", "2", "--kv-cache-memory-bytes", str(1 << 30)],
                        log, env=env, stock=True) as base:
        client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)

        def ask(image_url: str):
            content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "What?"}]
            return client.chat.completions.create(model="twin", messages=[{"role": "user", "content": content}],
                                                  max_tokens=2, temperature=0)

        r = ask(url)  # stock vLLM: no allow-list means every host
        assert r.usage.completion_tokens > 0 and hits == ["/x.png"]
        with pytest.raises((BadRequestError, InternalServerError)) as e:
            ask("file:///etc/hostname")
        message = str(e.value)
        assert FILE_URL_REFUSED not in message and REMOTE_MEDIA_REFUSED not in message
        assert "allowed-local-media-path" in message or e.type is InternalServerError, message
    assert "InfiniteVL" not in log.read_text()
