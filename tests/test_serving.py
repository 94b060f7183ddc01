"""`infinitevl-vllm serve`: vLLM's OpenAI server on our model, with images, and refusing bad input.

One real server for the whole module, bound to 127.0.0.1 with an API key, stopped at the end.
Every refused request is followed by a good one that must succeed.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vllm_helpers import running_server

from infinitevl_vllm.tools.workloads import image_data_url

API_KEY = "test-key"
MODEL = "infinitevl"
SERVER_LOG: dict[str, Path] = {}


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    log = SERVER_LOG["path"] = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server([str(tiny_ckpt), "--api-key", API_KEY, "--served-model-name", MODEL, "--max-model-len",
                         "4096", "--enforce-eager", "--dtype", "float32", "--limit-mm-per-prompt",
                         '{"image": 2, "video": 1}', "--max-num-seqs", "8"], log) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


image_url = image_data_url


def ask(client, *urls, text="What is this?", **kw):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    params = {"max_tokens": 8, "temperature": 0, **kw}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **params)


def assert_still_serving(client):
    r = ask(client, image_url())
    assert r.choices[0].message.content and r.usage.completion_tokens > 0


# -- what must work ---------------------------------------------------------------------------------
def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    with urllib.request.urlopen(server + "/health") as r:
        assert r.status == 200
    with urllib.request.urlopen(server + "/metrics") as r:
        assert b"vllm:num_requests_running" in r.read()


def _metric(server, name: str) -> float:
    with urllib.request.urlopen(server + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} metric")


def test_state_pool_in_startup_log_and_metrics(server, client):
    """The pool is visible: the start-up line and infinitevl:state_* gauges (tiny checkpoint, float32:
    68 blocks of 2 x 128 KiB = 17 MiB per sequence, 60 slots in the default 1 GiB pool)."""
    assert "InfiniteVL state pool: 60 sequence slots of 17.00 MiB each" in SERVER_LOG["path"].read_text()
    assert_still_serving(client)
    assert _metric(server, "infinitevl:state_bytes_per_sequence") == 17 * 2**20
    assert _metric(server, "infinitevl:state_slots_total") == 60
    assert _metric(server, "infinitevl:state_slots_used") + _metric(server, "infinitevl:state_slots_free") == 60


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_image_formats(client, fmt):
    r = ask(client, image_url(fmt))
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 20


def test_two_images_and_streaming(client):
    one = ask(client, image_url(seed=1))
    two = ask(client, image_url(seed=1), image_url(seed=2))
    assert two.usage.prompt_tokens > one.usage.prompt_tokens
    chunks = list(ask(client, image_url(), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 2 and text == ask(client, image_url()).choices[0].message.content


def test_text_multi_turn_and_completions(client):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And now?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5
    c = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens == 5


def test_sampling_parameters(client):
    kw = dict(temperature=1.0, top_p=0.9, max_tokens=12, extra_body={"top_k": 50})
    a = ask(client, image_url(), seed=123, **kw).choices[0].message.content
    b = ask(client, image_url(), seed=123, **kw).choices[0].message.content
    assert a == b  # same seed, same text
    many = ask(client, image_url(), n=3, temperature=1.0, max_tokens=6)
    assert len(many.choices) == 3
    lp = ask(client, image_url(), logprobs=True, top_logprobs=2, max_tokens=4)
    assert len(lp.choices[0].logprobs.content) == 4 and len(lp.choices[0].logprobs.content[0].top_logprobs) == 2
    greedy = ask(client, image_url(), max_tokens=12).choices[0].message.content
    stop = greedy[3:6]
    if stop.strip():
        stopped = ask(client, image_url(), max_tokens=12, stop=[stop]).choices[0].message.content
        assert stop not in stopped and greedy.startswith(stopped)


# -- bad input: a clear 4xx, and the server keeps serving ---------------------------------------------
def _png_bomb() -> str:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _truncated_png() -> str:
    full = base64.b64decode(image_url().split(",", 1)[1])
    return "data:image/png;base64," + base64.b64encode(full[:60]).decode()


BAD_IMAGES = {
    "invalid base64": "data:image/png;base64,!!!notbase64",
    "bytes that are no image": "data:image/png;base64," + base64.b64encode(b"hello world" * 10).decode(),
    "truncated png": _truncated_png(),
    "decompression bomb": _png_bomb(),
    "unsupported media type": "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4").decode(),
    "remote url (not fetched by default)": "http://127.0.0.1:9/x.png",
    "local file url": "file:///etc/hostname",
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_images_are_400(client, name):
    import openai

    with pytest.raises(openai.BadRequestError):
        ask(client, BAD_IMAGES[name])
    assert_still_serving(client)


def test_too_many_images_is_400(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="(?i)image"):
        ask(client, image_url(seed=1), image_url(seed=2), image_url(seed=3))
    assert_still_serving(client)


@pytest.mark.parametrize("params", [
    {"max_tokens": 0}, {"max_tokens": -5}, {"max_tokens": 10**9}, {"temperature": -1.0},
])
def test_invalid_sampling_is_400(client, params):
    import openai

    with pytest.raises(openai.BadRequestError):
        ask(client, image_url(), **params)
    assert_still_serving(client)


def test_unknown_model_and_empty_messages(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[])
    assert_still_serving(client)


def test_malformed_json_and_missing_key(server, client):
    req = urllib.request.Request(server + "/v1/chat/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert 400 <= e.value.code < 500
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}).encode()
    req = urllib.request.Request(server + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 401
    assert_still_serving(client)


# -- video ------------------------------------------------------------------------------------------
def _frames(n=4, size=(112, 84), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, size[1], size[0], 3)) * 255).astype("uint8")


def ask_video(client, url: str, **kw):
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          max_tokens=8, temperature=0, **kw)


def test_video_as_mp4_data_url(client, tmp_path):
    import cv2

    path = str(tmp_path / "v.mp4")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (112, 84))
    for frame in _frames(8):
        writer.write(frame[:, :, ::-1])
    writer.release()
    url = "data:video/mp4;base64," + base64.b64encode(Path(path).read_bytes()).decode()
    r = ask_video(client, url)
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 40


def test_video_as_list_of_jpeg_frames(client):
    parts = []
    for frame in _frames(4, seed=3):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, "JPEG")
        parts.append(base64.b64encode(buf.getvalue()).decode())
    r = ask_video(client, "data:video/jpeg;base64," + ",".join(parts))
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 40


# -- concurrency ------------------------------------------------------------------------------------
def _running(server) -> float:
    with urllib.request.urlopen(server + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vllm:num_requests_running{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:num_requests_running metric")


def test_32_concurrent_streams_of_mixed_lengths(client):
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> int:
        urls = [image_url(seed=i)] if i % 3 == 0 else []
        stream = ask(client, *urls, text="word " * (5 + 37 * (i % 7)), max_tokens=4 + i % 13, stream=True)
        return sum(1 for c in stream if c.choices and c.choices[0].delta.content is not None)

    with ThreadPoolExecutor(32) as pool:
        counts = list(pool.map(one, range(32)))
    assert all(c >= 1 for c in counts)
    assert_still_serving(client)


def test_client_disconnect_frees_its_slot(server, client):
    import http.client

    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 3000, "ignore_eos": True, "temperature": 0,
                       "messages": [{"role": "user", "content": "Talk forever."}]})
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event: generation is under way
    assert _running(server) == 1
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.time() + 15
    while _running(server) != 0:
        assert time.time() < deadline, "the disconnected request still holds its slot after 15 s"
        time.sleep(0.2)
    assert_still_serving(client)
