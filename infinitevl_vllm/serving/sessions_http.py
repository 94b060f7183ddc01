"""Streaming sessions over HTTP: a vLLM endpoint plugin (entry point group ``vllm.endpoint_plugins``)
adding ``/v1/sessions`` routes to vLLM's own OpenAI server, on the same port, behind the same API key
(vLLM's key check guards every ``/v1`` path). The engine side is the general plugin's worker RPC
(sessions_worker.py), reached through ``engine_client.collective_rpc`` as vLLM's plugin docs advise.

    POST   /v1/sessions                 {"model"?, "system"?, "idle_timeout_s"?}  -> 201 session
    POST   /v1/sessions/{id}/frames     {"frames": [data URL, ...], "text"?}     -> 200 {"frames", "tokens"}
    POST   /v1/sessions/{id}/chat       chat-completion body (stream or not)     -> chat completion / SSE
    GET    /v1/sessions/{id}            -> frames, tokens, state_bytes, idle_s
    GET    /v1/sessions                 -> {"object": "list", "data": [...]}
    DELETE /v1/sessions/{id}            -> 204
"""

from __future__ import annotations

import json
import time
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .session_protocol import DEFAULT_SYSTEM, SessionError
from .sessions import DEFAULT_IDLE_TIMEOUT_S, SessionManager, max_sessions_from_env

PLUGIN_NAME = "infinitevl_sessions"
DEFAULT_MAX_TOKENS = 256
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError", 429: "TooManyRequestsError",
                500: "InternalServerError"}

router = APIRouter()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": None,
                                   "code": status}}, status_code=status)


def _manager(request: Request) -> SessionManager:
    mgr = getattr(request.app.state, "infinitevl_sessions", None)
    if mgr is None:
        raise SessionError(503, "streaming sessions need an engine (this server has none)")
    return mgr


async def _body(request: Request) -> dict:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SessionError(400, f"malformed JSON body: {e}") from e
    if not isinstance(body, dict):
        raise SessionError(400, "the body must be a JSON object")
    return body


def _handles_errors(fn):
    import functools

    @functools.wraps(fn)
    async def wrapped(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except SessionError as e:
            return _error(e.status, e.message)
        except ValueError as e:  # vLLM's input validation (sampling values, prompt too long, ...)
            return _error(400, str(e))

    return wrapped


@router.post("/v1/sessions")
@_handles_errors
async def create_session(request: Request):
    mgr = _manager(request)
    body = await _body(request)
    unknown = set(body) - {"model", "system", "idle_timeout_s"}
    if unknown:
        raise SessionError(400, f"unknown fields: {sorted(unknown)} (allowed: model, system, idle_timeout_s)")
    _check_model(mgr, body.get("model"))
    system = body.get("system", DEFAULT_SYSTEM)
    if system is not None and not isinstance(system, str):
        raise SessionError(400, "system: must be a string or null")
    timeout = body.get("idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise SessionError(400, "idle_timeout_s: must be a positive number of seconds")
    view = await mgr.create(system, float(timeout))
    return JSONResponse(view | {"model": mgr.model_name}, status_code=201)


@router.get("/v1/sessions")
@_handles_errors
async def list_sessions(request: Request):
    mgr = _manager(request)
    return JSONResponse({"object": "list", "data": [m.view() for m in mgr.sessions.values()],
                         "max_sessions": mgr.max_sessions})


@router.get("/v1/sessions/{sid}")
@_handles_errors
async def get_session(sid: str, request: Request):
    return JSONResponse(_manager(request).get(sid).view())


@router.delete("/v1/sessions/{sid}")
@_handles_errors
async def delete_session(sid: str, request: Request):
    await _manager(request).delete(sid)
    return Response(status_code=204)


@router.post("/v1/sessions/{sid}/frames")
@_handles_errors
async def append_frames(sid: str, request: Request):
    mgr = _manager(request)
    mgr.get(sid)
    body = await _body(request)
    unknown = set(body) - {"frames", "text"}
    if unknown:
        raise SessionError(400, f"unknown fields: {sorted(unknown)} (allowed: frames, text)")
    result = await mgr.append(sid, body.get("frames"), body.get("text"))
    return JSONResponse(result)


@router.post("/v1/sessions/{sid}/chat")
@_handles_errors
async def chat(sid: str, request: Request):
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.sampling_params import RequestOutputKind

    mgr = _manager(request)
    mgr.get(sid)
    body = await _body(request)
    body.setdefault("model", mgr.model_name)
    _check_model(mgr, body["model"])
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise SessionError(400, f"invalid chat request: {e.errors(include_url=False)}") from e
    if req.n not in (None, 1):
        raise SessionError(400, "n must be 1 for a session question")
    max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
    params = req.to_sampling_params(max_tokens, mgr.default_sampling_params)
    params.output_kind = RequestOutputKind.CUMULATIVE  # _sse sends the differences itself
    messages = body["messages"]
    model = mgr.model_name
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        gen = mgr.ask(sid, messages, params)
        first = await anext(gen)  # errors in the request (e.g. too long) surface as 400 before streaming
        return StreamingResponse(_sse(gen, first, model, include_usage), media_type="text/event-stream")
    final = None
    async for out in mgr.ask(sid, messages, params):
        final = out
    return JSONResponse(_completion(final, model))


def _completion(out: Any, model: str) -> dict:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatMessage,
    )
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    o = out.outputs[0]
    prompt_tokens, completion_tokens = len(out.prompt_token_ids or []), len(o.token_ids)
    resp = ChatCompletionResponse(
        model=model,
        choices=[ChatCompletionResponseChoice(index=0, message=ChatMessage(role="assistant", content=o.text),
                                              finish_reason=o.finish_reason, stop_reason=o.stop_reason)],
        usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens),
    )
    return resp.model_dump(exclude_none=True)


async def _sse(gen, first, model: str, include_usage: bool):
    from vllm.entrypoints.generate.base.protocol import DeltaMessage
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponseStreamChoice,
        ChatCompletionStreamResponse,
    )
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    chunk_id, created = f"chatcmpl-{first.request_id}", int(time.time())

    def event(delta: DeltaMessage, finish_reason=None, usage=None) -> str:
        choice = ChatCompletionResponseStreamChoice(index=0, delta=delta, finish_reason=finish_reason)
        chunk = ChatCompletionStreamResponse(id=chunk_id, created=created, model=model, choices=[choice],
                                             usage=usage)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    yield event(DeltaMessage(role="assistant", content=""))
    sent = 0
    out = first
    try:
        while True:
            o = out.outputs[0]
            if len(o.text) > sent:
                yield event(DeltaMessage(content=o.text[sent:]))
                sent = len(o.text)
            if out.finished:
                yield event(DeltaMessage(), finish_reason=o.finish_reason)
                if include_usage:
                    p, c = len(out.prompt_token_ids or []), len(o.token_ids)
                    usage = UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
                    chunk = ChatCompletionStreamResponse(id=chunk_id, created=created, model=model, choices=[],
                                                         usage=usage)
                    yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
                break
            out = await anext(gen)
    finally:
        await gen.aclose()
    yield "data: [DONE]\n\n"


def _check_model(mgr: SessionManager, model: object) -> None:
    if model is None:
        return
    if model not in mgr.served_models:
        raise SessionError(404, f"The model `{model}` does not exist (served: {', '.join(mgr.served_models)})")


class SessionsEndpointPlugin:
    """vLLM endpoint plugin: the /v1/sessions routes (name it in VLLM_PLUGINS with `infinitevl`)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None:
            return
        model_config = engine_client.model_config
        mgr = SessionManager(engine_client, max_sessions_from_env(),
                             model_config.multimodal_config.get_limit_per_prompt("image"),
                             model_config.max_model_len,
                             served_models=getattr(args, "served_model_name", None) or [args.model],
                             default_sampling_params=model_config.get_diff_sampling_param())
        mgr.start_reaper()
        state.infinitevl_sessions = mgr
