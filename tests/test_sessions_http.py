"""Streaming video sessions over HTTP: one real `infinitevl-vllm serve` on 127.0.0.1 with an API key and
`--max-sessions 2`, for the whole module. Every refused request is followed by one that must succeed.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from vllm_helpers import running_server

from infinitevl_vllm.tools.workloads import image_data_url

API_KEY = "sessions-key"
MODEL = "infinitevl"
Q = {"messages": [{"role": "user", "content": "What happened?"}], "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from infinitevl_vllm.checkpoint import make_checkpoint

    ckpt = make_checkpoint(tmp_path_factory.mktemp("w320http"), "tiny", seed=0, sliding_window=320)
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    # vLLM pins a CPU engine to core 0; another engine pinned there on a shared host would starve ours
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    with running_server([str(ckpt), "--max-sessions", "2", "--api-key", API_KEY, "--served-model-name", MODEL,
                         "--max-model-len", "4096", "--enforce-eager", "--dtype", "float32", "--max-num-seqs", "8",
                         "--limit-mm-per-prompt", '{"image": 4, "video": 0}'], log, env) as base:
        yield base + "/v1/sessions"


def call(method: str, url: str, body=None, key: str | None = API_KEY, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            text = r.read()
            return r.status, (json.loads(text) if text and "json" in r.headers.get("Content-Type", "") else text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def frame_url(seed: int, size: tuple[int, int] = (400, 300)) -> str:
    """A seeded PNG frame, size (width, height)."""
    return image_data_url(seed=seed, size=size)


def answer(resp) -> str:
    return resp["choices"][0]["message"]["content"]


@pytest.fixture
def session(server):
    st, s = call("POST", server, {})
    assert st == 201, s
    yield s["id"]
    call("DELETE", f"{server}/{s['id']}")


def test_lifecycle_and_a_question_does_not_change_the_state(server, session):
    sid = session
    st, r = call("POST", f"{server}/{sid}/frames", {"frames": [frame_url(1), frame_url(2)]})
    assert st == 200 and r["frames"] == 2 and r["tokens"] > 512
    st, a1 = call("POST", f"{server}/{sid}/chat", Q)
    st2, a2 = call("POST", f"{server}/{sid}/chat", Q)
    assert st == st2 == 200 and a1["object"] == "chat.completion" and answer(a1) == answer(a2)
    assert a1["usage"]["completion_tokens"] == 6
    st, info = call("GET", f"{server}/{sid}")
    assert st == 200 and (info["frames"], info["tokens"]) == (2, r["tokens"]) and info["state_bytes"] > 0
    st, listing = call("GET", server)
    assert st == 200 and sid in [s["id"] for s in listing["data"]]
    st, _ = call("DELETE", f"{server}/{sid}")
    assert st == 204
    st, err = call("GET", f"{server}/{sid}")
    assert st == 404 and "does not exist" in err["error"]["message"]


def test_one_frame_then_a_question_answers_like_a_chat_completion_with_that_image(server, session):
    """For one frame the stream's positions are Qwen2.5-VL's single-image ones and the session's prompt
    is the chat template's, so the session must answer as /v1/chat/completions does (greedy, exactly)."""
    url = frame_url(8, size=(448, 448))  # a frame's own size: neither side resizes it
    assert call("POST", f"{server}/{session}/frames", {"frames": [url]})[0] == 200
    st, streamed = call("POST", f"{server}/{session}/chat", Q)
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": Q["messages"][0]["content"]}]
    chat = Q | {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    st2, plain = call("POST", server.removesuffix("/sessions") + "/chat/completions", chat)
    assert st == st2 == 200
    assert streamed["usage"]["prompt_tokens"] < plain["usage"]["prompt_tokens"]  # the frame was in the state
    assert answer(streamed) == answer(plain) and streamed["usage"]["completion_tokens"] == 6


def test_frames_after_a_question_answer_as_if_it_was_never_asked(server):
    sids = [call("POST", server, {"system": "Watch."})[1]["id"] for _ in range(2)]
    try:
        asked, never = sids
        for sid in sids:
            assert call("POST", f"{server}/{sid}/frames", {"frames": [frame_url(5)]})[0] == 200
        assert call("POST", f"{server}/{asked}/chat", Q)[0] == 200
        for sid in sids:
            assert call("POST", f"{server}/{sid}/frames", {"frames": [frame_url(6), frame_url(7)],
                                                         "text": "<|vision_end|>later<|vision_start|>"})[0] == 200
        a, b = (call("POST", f"{server}/{sid}/chat", Q)[1] for sid in sids)
        assert answer(a) == answer(b)
    finally:
        for sid in sids:
            call("DELETE", f"{server}/{sid}")


def test_streamed_answer_equals_the_plain_one(server, session):
    assert call("POST", f"{server}/{session}/frames", {"frames": [frame_url(3)]})[0] == 200
    plain = answer(call("POST", f"{server}/{session}/chat", Q)[1])
    st, body = call("POST", f"{server}/{session}/chat", Q | {"stream": True,
                                                             "stream_options": {"include_usage": True}})
    assert st == 200
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain and chunks[-1]["usage"]["completion_tokens"] == 6
    assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)


def test_unknown_session_404_then_a_known_one_answers(server, session):
    for method, path, body in [("POST", "/nope/chat", Q), ("POST", "/nope/frames", {"frames": [frame_url(1)]}),
                               ("GET", "/nope", None), ("DELETE", "/nope", None)]:
        st, err = call(method, server + path, body)
        assert st == 404 and err["error"]["code"] == 404
    assert call("POST", f"{server}/{session}/chat", Q)[0] == 200


def test_bad_frame_400_leaves_the_session_unchanged(server, session):
    assert call("POST", f"{server}/{session}/frames", {"frames": [frame_url(4)]})[0] == 200
    before, ans = call("GET", f"{server}/{session}")[1], answer(call("POST", f"{server}/{session}/chat", Q)[1])
    not_image = "data:image/png;base64," + base64.b64encode(b"no image").decode()
    for frames in ([frame_url(8), not_image], ["http://example.com/x.png"], "not a list", []):
        st, err = call("POST", f"{server}/{session}/frames", {"frames": frames})
        assert st == 400, (frames, err)
    after = call("GET", f"{server}/{session}")[1]
    assert (after["frames"], after["tokens"]) == (before["frames"], before["tokens"])
    assert answer(call("POST", f"{server}/{session}/chat", Q)[1]) == ans
    assert call("POST", f"{server}/{session}/frames", {"frames": [frame_url(8)]})[1]["frames"] == 2


def test_bad_fields_400_then_good_ones_succeed(server, session):
    bad = [("POST", "", {"idle_timeout_s": -1}), ("POST", "", {"colour": "red"}), ("POST", "", {"system": 3}),
           ("POST", f"/{session}/frames", {"frames": [frame_url(1)], "speed": 2}),
           ("POST", f"/{session}/frames", {"frames": [frame_url(1)] * 257}),  # over the per-append limit
           ("POST", f"/{session}/chat", {"max_tokens": 3}),
           ("POST", f"/{session}/chat", Q | {"temperature": -1}),
           ("POST", f"/{session}/chat", {"messages": [{"role": "assistant", "content": "hi"}]})]
    for method, path, body in bad:
        st, err = call(method, server + path, body)
        assert st == 400, (path, body, st, err)
        assert err["error"]["message"]
    assert call("POST", server + f"/{session}/chat", raw=b"{not json")[0] == 400
    assert call("POST", f"{server}/{session}/chat", Q)[0] == 200
    assert call("POST", f"{server}/{session}/frames", {"frames": [frame_url(1)]})[0] == 200


def test_the_api_key_guards_the_routes(server, session):
    assert call("GET", f"{server}/{session}", key=None)[0] == 401
    assert call("GET", f"{server}/{session}")[0] == 200


def test_concurrent_append_409_then_the_next_append_succeeds(server, session):
    results = {}

    def long_append():
        results["first"] = call("POST", f"{server}/{session}/frames", {"frames": frames})

    frames = [frame_url(k) for k in range(12)]  # 3 engine requests of 4 frames: seconds of prefill
    t = threading.Thread(target=long_append)
    t.start()
    deadline = time.time() + 60
    while not call("GET", f"{server}/{session}")[1]["appending"]:
        assert time.time() < deadline and t.is_alive(), "the first append never showed as running"
        time.sleep(0.02)
    st, err = call("POST", f"{server}/{session}/frames", {"frames": [frame_url(99)]})
    t.join()
    assert st == 409 and "previous append" in err["error"]["message"], err
    assert results["first"][0] == 200 and results["first"][1]["frames"] == 12
    assert call("POST", f"{server}/{session}/frames", {"frames": [frame_url(99)]})[1]["frames"] == 13


def test_no_free_slot_429_until_one_is_deleted(server):
    sids = [call("POST", server, {})[1]["id"] for _ in range(2)]
    st, err = call("POST", server, {})
    assert st == 429 and "session slots" in err["error"]["message"]
    assert call("DELETE", f"{server}/{sids.pop()}")[0] == 204
    st, s = call("POST", server, {})
    assert st == 201
    for sid in [*sids, s["id"]]:
        call("DELETE", f"{server}/{sid}")


def test_idle_sessions_are_closed_and_their_slots_freed(server):
    st, s = call("POST", server, {"idle_timeout_s": 1})
    assert st == 201
    time.sleep(3.5)
    assert call("GET", f"{server}/{s['id']}")[0] == 404
    sids = [call("POST", server, {})[1]["id"] for _ in range(2)]  # both slots are free again
    assert all(sids)
    for sid in sids:
        call("DELETE", f"{server}/{sid}")


def test_the_live_session_example_runs_against_the_server(server):
    """examples/live_session.py, as the README shows it: appends, asks along the way, deletes its session."""
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "live_session.py")
    run = subprocess.run([sys.executable, example, "--base-url", server.removesuffix("/sessions"), "--api-key",
                          API_KEY, "--frames", "6", "--batch", "3", "--ask-every", "3", "--max-tokens", "4"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    sid = lines[0].removeprefix("session ")
    assert [ln.split(":")[0] for ln in lines[1:3]] == ["after 3 frames", "after 6 frames"]
    assert lines[3].startswith("6 frames, ")
    assert sid not in [s["id"] for s in call("GET", server)[1]["data"]]  # it deleted its session
