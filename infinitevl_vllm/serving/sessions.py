"""Streaming video sessions, front end: one code path for the HTTP routes (over vLLM's async engine
client) and the offline twin ``StreamSession`` (over ``vllm.LLM``).

Both build the same requests (``append_request``, ``ask_request``) and reach the same worker-side
store (sessions_worker.py) through ``collective_rpc``; the HTTP side adds what a server needs:
capacity (429), one append at a time per session (409), idle timeouts.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncGenerator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm import SamplingParams

from .session_protocol import (
    DEFAULT_SYSTEM,
    EXTRA_ARGS_KEY,
    FRAME_SIZE,
    FRAME_UUID_PREFIX,
    SessionError,
    append_text,
    decode_frame,
    prefix_text,
    question_text,
)
from .sessions_worker import RPC_METHOD

MAX_SESSIONS_ENV = "INFINITEVL_MAX_SESSIONS"
DEFAULT_MAX_SESSIONS = 8
DEFAULT_IDLE_TIMEOUT_S = 600.0
MAX_FRAMES_PER_REQUEST = 8  # an append of more frames runs as several requests, in order
MAX_FRAMES_PER_APPEND = 256  # ~150 MB of decoded frames: a live source sends small appends


def max_sessions_from_env() -> int:
    raw = os.environ.get(MAX_SESSIONS_ENV, str(DEFAULT_MAX_SESSIONS))
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{MAX_SESSIONS_ENV}={raw!r} is not an integer") from None
    if n < 1:
        raise ValueError(f"{MAX_SESSIONS_ENV} must be at least 1 (got {n})")
    return n


def _frame_image(frame: Any, index: int):
    """A frame as a data URL, or (offline) a PIL image / HxWx3 uint8 array -> 448 x 448 RGB."""
    if isinstance(frame, str):
        return decode_frame(frame, index)
    from PIL import Image

    if not isinstance(frame, Image.Image):
        try:
            frame = Image.fromarray(frame)
        except Exception as e:  # noqa: BLE001 - anything that is no image array
            raise SessionError(400, f"frames[{index}]: not an image ({e})") from e
    frame = frame.convert("RGB")
    return frame if frame.size == (FRAME_SIZE, FRAME_SIZE) else frame.resize((FRAME_SIZE, FRAME_SIZE))


def decode_frames(frames: Sequence[Any]) -> list:
    """All frames decoded before any reaches the engine, so a bad one changes nothing."""
    if not isinstance(frames, list | tuple) or not frames:
        raise SessionError(400, "frames: a non-empty list of image data URLs is required")
    if len(frames) > MAX_FRAMES_PER_APPEND:
        raise SessionError(400, f"frames: at most {MAX_FRAMES_PER_APPEND} frames per append (got {len(frames)}); "
                                "send them in several appends, in order")
    return [_frame_image(f, i) for i, f in enumerate(frames)]


def frames_per_request(image_limit: int, max_model_len: int) -> int:
    from .session_protocol import FRAME_TOKENS

    fit = max(1, (max_model_len - 64) // FRAME_TOKENS)
    return max(1, min(MAX_FRAMES_PER_REQUEST, image_limit, fit))


def session_params(sid: str | None, op: str, params: SamplingParams | None = None) -> SamplingParams:
    """The request's sampling params, tagged with its session and op for the worker."""
    if params is None:  # an append: prefill only; its one sampled token is discarded
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    if params.n != 1:
        raise SessionError(400, "n must be 1 for a session question")
    params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: {"id": sid, "op": op}}
    return params


def _frames_prompt(text: str, images: list) -> dict:
    prompt: dict = {"prompt": text}
    if images:
        prompt["multi_modal_data"] = {"image": images}
        prompt["multi_modal_uuids"] = {"image": [FRAME_UUID_PREFIX + uuid.uuid4().hex for _ in images]}
    return prompt


def append_request(sid: str, images: list, text: str | None = None) -> tuple[dict, SamplingParams]:
    return _frames_prompt(append_text(len(images), text), images), session_params(sid, "append")


def ask_request(sid: str, messages: list[dict], params: SamplingParams) -> tuple[dict, SamplingParams]:
    return {"prompt": question_text(messages)}, session_params(sid, "ask", params)


def oneshot_request(images: list, messages: list[dict], params: SamplingParams,
                    system: str | None = DEFAULT_SYSTEM) -> tuple[dict, SamplingParams]:
    """One stand-alone request holding a whole stream and the question, under the stream's position
    rule: what a session that got these frames and this question must answer."""
    text = prefix_text(system) + append_text(len(images)) + question_text(messages)
    return _frames_prompt(text, images), session_params(None, "oneshot", params)


def _new_id() -> str:
    return "sess-" + uuid.uuid4().hex[:16]


# -- offline twin -------------------------------------------------------------------------------
class StreamSession:
    """A streaming session over an offline ``vllm.LLM`` (scripts, tests, benchmarks).

    >>> s = StreamSession(llm); s.append([frame0, frame1]); out = s.ask("What happened?")
    >>> for info in s.stream(groups_of_frames): ...  # appends that overlap their preprocessing with the engine
    """

    def __init__(self, llm, system: str | None = DEFAULT_SYSTEM, max_sessions: int | None = None):
        self.llm = llm
        self.id = _new_id()
        cfg = llm.llm_engine.model_config
        self._per_request = frames_per_request(cfg.multimodal_config.get_limit_per_prompt("image"),
                                               cfg.max_model_len)
        self._rpc("create", self.id, max_sessions or max_sessions_from_env())
        self.closed = False
        self._run(*append_request(self.id, [], prefix_text(system)))

    def _rpc(self, op: str, *args):
        return self.llm.collective_rpc(RPC_METHOD, args=(op, *args))[0]

    def _render(self, prompt: dict, params: SamplingParams) -> tuple[Any, SamplingParams]:
        """The prompt as the engine takes it: tokenized, its images through the image processor."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        engine = self.llm.llm_engine
        return engine.renderer.render_cmpl([parse_model_prompt(engine.model_config, prompt)])[0], params

    def _submit(self, rendered: Any, params: SamplingParams) -> set[str]:
        """The request's ids: ours, and the one the engine may make of it (its outputs carry either)."""
        given = f"{self.id}-{uuid.uuid4().hex[:8]}"
        return {given, self.llm.llm_engine.add_request(given, rendered, params)}

    def _wait(self, request_ids: set[str]):
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id in request_ids and out.finished:
                    return out
        raise RuntimeError(f"the engine finished request {min(request_ids)} without an output")

    def _run(self, prompt: dict, params: SamplingParams):
        return self._wait(self._submit(*self._render(prompt, params)))

    def _append_requests(self, frames: Sequence[Any], text: str | None) -> list[tuple[Any, SamplingParams]]:
        images = decode_frames(frames)
        return [self._render(*append_request(self.id, images[i:i + self._per_request], text if i == 0 else None))
                for i in range(0, len(images), self._per_request)]

    def append(self, frames: Sequence[Any], text: str | None = None) -> dict:
        """Prefill frames (data URLs, PIL images or arrays) in order; returns the session's counters."""
        for request in self._append_requests(frames, text):
            self._wait(self._submit(*request))
        return self.info()

    def stream(self, groups: Iterable[Sequence[Any]]) -> Iterator[dict]:
        """``append`` for each group of frames in turn, yielding the counters after each. While the engine
        prefills one group, the next is taken from `groups`, decoded and run through the image processor (a few
        milliseconds a frame), as a live source's frames keep coming during a prefill; vLLM's engine runs in
        a process of its own, so the two overlap. Between yields nothing runs: a question then sees every
        group yielded so far. A bad frame raises once the groups before its own are in."""
        groups = iter(groups)
        first = next(groups, None)
        requests = self._append_requests(first, None) if first is not None else None
        while requests is not None:
            *head, tail = requests or [None]
            for request in head:
                self._wait(self._submit(*request))
            last = self._submit(*tail) if tail is not None else None
            try:
                group = next(groups, None)
                requests = self._append_requests(group, None) if group is not None else None
            finally:  # a bad frame in the next group is raised once this group is in
                if last is not None:
                    self._wait(last)
            yield self.info()

    def ask(self, question: str | list[dict], params: SamplingParams | None = None):
        """Answer on a fork of the state (the session is unchanged); a RequestOutput."""
        messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
        params = params or SamplingParams(max_tokens=32, temperature=0.0)
        return self._run(*ask_request(self.id, messages, params.clone()))

    def info(self) -> dict:
        return self._rpc("info", self.id)

    def close(self) -> None:
        if not self.closed:
            self._rpc("delete", self.id)
            self.closed = True

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def oneshot(llm, frames: Sequence[Any], question: str, params: SamplingParams | None = None,
            system: str | None = DEFAULT_SYSTEM):
    """The single-request equivalent of a session fed `frames` then asked `question`."""
    params = params or SamplingParams(max_tokens=32, temperature=0.0)
    prompt, sp = oneshot_request(decode_frames(frames), [{"role": "user", "content": question}], params.clone(),
                                 system)
    return llm.generate([prompt], sp, use_tqdm=False)[0]


# -- server side --------------------------------------------------------------------------------
@dataclass
class _Meta:
    id: str
    created: float
    idle_timeout_s: float
    system: str | None
    last_used: float = field(default_factory=time.monotonic)
    appending: bool = False
    in_flight: int = 0
    frames: int = 0
    tokens: int = 0
    state_bytes: int = 0

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def view(self) -> dict:
        return {"id": self.id, "object": "session", "created": int(self.created), "frames": self.frames,
                "tokens": self.tokens, "state_bytes": self.state_bytes, "idle_timeout_s": self.idle_timeout_s,
                "appending": self.appending,
                "idle_s": round(0.0 if self.in_flight else time.monotonic() - self.last_used, 3)}


class SessionManager:
    """Sessions of one API server: creation within capacity, serialized appends, forked questions."""

    def __init__(self, engine, max_sessions: int, image_limit: int, max_model_len: int,
                 served_models: Sequence[str] = ("model",), default_sampling_params: dict | None = None):
        self.engine = engine
        self.served_models = list(served_models)
        self.model_name = self.served_models[0]
        self.default_sampling_params = default_sampling_params or {}
        self.max_sessions = max_sessions
        self.per_request = frames_per_request(image_limit, max_model_len)
        self.sessions: dict[str, _Meta] = {}
        self._reserved = 0
        self._reaper: asyncio.Task | None = None

    async def _rpc(self, op: str, *args):
        return (await self.engine.collective_rpc(RPC_METHOD, args=(op, *args)))[0]

    async def _run(self, prompt: dict, params: SamplingParams, tag: str) -> Any:
        final = None
        async for out in self.engine.generate(prompt, params, f"{tag}-{uuid.uuid4().hex[:8]}"):
            final = out
        return final

    def get(self, sid: str) -> _Meta:
        meta = self.sessions.get(sid)
        if meta is None:
            raise SessionError(404, f"session {sid!r} does not exist (or was closed)")
        return meta

    async def create(self, system: str | None, idle_timeout_s: float) -> dict:
        if len(self.sessions) + self._reserved >= self.max_sessions:
            raise SessionError(429, f"all {self.max_sessions} session slots are in use: delete a session or wait "
                                    f"for an idle one to time out (the server's limit is {MAX_SESSIONS_ENV} / "
                                    "--max-sessions)")
        self._reserved += 1
        sid = _new_id()
        try:
            await self._rpc("create", sid, self.max_sessions)
            try:
                await self._run(*append_request(sid, [], prefix_text(system)), tag=f"{sid}-create")
                info = await self._rpc("info", sid)
            except BaseException:
                await self._rpc("delete", sid)
                raise
            meta = _Meta(sid, time.time(), idle_timeout_s, system, tokens=info["tokens"],
                         state_bytes=info["state_bytes"])
            self.sessions[sid] = meta
            return meta.view()
        finally:
            self._reserved -= 1

    async def append(self, sid: str, frames: list, text: str | None) -> dict:
        meta = self.get(sid)
        if meta.appending:
            raise SessionError(409, f"session {sid} is still prefilling a previous append; send frames in order, "
                                    "one append at a time")
        if text is not None and not isinstance(text, str):
            raise SessionError(400, "text: must be a string")
        meta.appending = True
        meta.in_flight += 1
        try:
            images = await asyncio.to_thread(decode_frames, frames)  # off the event loop: other clients go on
            for i in range(0, len(images), self.per_request):
                await self._run(*append_request(sid, images[i:i + self.per_request], text if i == 0 else None),
                                tag=f"{sid}-append")
            info = await self._rpc("info", sid)
            meta.frames, meta.tokens, meta.state_bytes = info["frames"], info["tokens"], info["state_bytes"]
            return {"id": sid, "frames": meta.frames, "tokens": meta.tokens}
        finally:
            meta.appending = False
            meta.in_flight -= 1
            meta.touch()

    async def ask(self, sid: str, messages: list[dict], params: SamplingParams) -> AsyncGenerator[Any, None]:
        """RequestOutputs of a question answered on a fork of the session's state."""
        meta = self.get(sid)
        prompt, params = ask_request(sid, messages, params)
        meta.in_flight += 1
        try:
            async for out in self.engine.generate(prompt, params, f"{sid}-ask-{uuid.uuid4().hex[:8]}"):
                yield out
        finally:
            meta.in_flight -= 1
            meta.touch()

    async def delete(self, sid: str) -> None:
        self.get(sid)
        del self.sessions[sid]
        await self._rpc("delete", sid)

    async def close_idle(self) -> list[str]:
        now = time.monotonic()
        idle = [m.id for m in self.sessions.values()
                if not m.in_flight and now - m.last_used > m.idle_timeout_s]
        for sid in idle:
            if sid in self.sessions:
                await self.delete(sid)
        return idle

    def start_reaper(self, period_s: float = 1.0) -> None:
        async def loop():
            while True:
                await asyncio.sleep(period_s)
                try:
                    await self.close_idle()
                except Exception:  # noqa: BLE001 - keep reaping; the next round retries
                    import logging

                    logging.getLogger("vllm.infinitevl_vllm.sessions").exception("closing idle sessions failed")

        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(loop())
