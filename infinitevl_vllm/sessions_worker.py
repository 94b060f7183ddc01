"""Streaming sessions, engine side: a store of per-session state in the worker, and the hooks that
let an ordinary vLLM request start from a session's state.

Sessions live outside vLLM's scheduler: every append and every question is an ordinary request, so
batching, admission, preemption and slots stay vLLM's. A request names its session in
``SamplingParams.extra_args["infinitevl_session"] = {"id": sid, "op": "append" | "ask" | "oneshot"}``.
In the worker:

- on a session request's first chunk (``num_computed_tokens == 0``: new, or recomputed after a
  preemption) the session's state is copied into the request's own GDN slot and SWA ring blocks,
  and its M-RoPE positions are rewritten by the stream rule (streaming.py) from the session's cursor;
- every step, its ring token index is offset by the session's token count (ring attention) and its
  GDN state counts as initial even on its first chunk (``has_initial_state``);
- right after the step that finishes an append's prompt, the request's state is copied back into
  the store and the cursor advances. A question never writes back: it runs on a fork.

A question must stay on the state it forked from even if vLLM preempts it (its slot is freed and it is
recomputed from its first token later): when an append is about to overwrite a session that has
questions in flight, their state is kept aside first (one copy, shared by them, freed when they finish),
and a recomputed question starts from that copy.

The store holds, per session, exactly one sequence's state (each GDN layer's conv + recurrent
state, each SWA layer's ring blocks, copied whole so the ring's token -> row map is kept), so its
memory is ``sessions x bytes_per_sequence``, allocated when a session is created.
All of this runs in the worker's one thread (steps and RPCs are serialized), so there is no lock.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .streaming import EXTRA_ARGS_KEY, FRAME_UUID_PREFIX, StreamCursor, stream_positions

logger = logging.getLogger("vllm.infinitevl_vllm.sessions")

RPC_METHOD = "infinitevl_session_rpc"


@dataclass
class _Session:
    gdn: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (conv, recurrent) of one sequence
    rings: dict[str, torch.Tensor]  # layer -> [ring_blocks, kv_heads, block_size, Dk + Dv]
    cursor: StreamCursor = field(default_factory=StreamCursor)
    created: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return (sum(c.nbytes + s.nbytes for c, s in self.gdn.values())
                + sum(r.nbytes for r in self.rings.values()))

    def copy(self) -> _Session:
        return _Session({k: (c.clone(), r.clone()) for k, (c, r) in self.gdn.items()},
                        {k: r.clone() for k, r in self.rings.items()}, self.cursor, self.created)


@dataclass
class _Plan:
    """What one session request does in the worker, fixed at its first chunk."""

    session_id: str | None
    op: str
    token_offset: int  # ring token index of the request's first token
    initial: bool  # its GDN state starts from the copied session state
    cursor_after: StreamCursor
    forked_from: _Session | None = None  # a question's state, kept once the session moved on
    written: bool = False


class SessionStore:
    """The sessions' states in the worker, laid out like one sequence of the runner's KV cache."""

    def __init__(self, runner):
        self.runner = runner
        self.sessions: dict[str, _Session] = {}
        self.plans: dict[str, _Plan] = {}
        self.pending_writeback: list[str] = []
        ctx = runner.compilation_config.static_forward_context
        self.gdn_layers: dict[str, int] = {}  # layer -> kv cache group
        self.ring_layers: dict[str, tuple[int, int]] = {}  # layer -> (group, ring blocks)
        for g, group in enumerate(runner.kv_cache_config.kv_cache_groups):
            spec = group.kv_cache_spec
            for name in group.layer_names:
                kv = ctx[name].kv_cache
                if isinstance(kv, torch.Tensor):
                    sub = getattr(spec, "kv_cache_specs", {}).get(name, spec)
                    self.ring_layers[name] = (g, sub.ring_blocks)
                else:
                    self.gdn_layers[name] = g

    def _kv(self, name: str):
        return self.runner.compilation_config.static_forward_context[name].kv_cache

    # -- RPC ----------------------------------------------------------------------------------
    def create(self, sid: str, max_sessions: int) -> dict:
        if sid in self.sessions:
            raise ValueError(f"session {sid} exists")
        if len(self.sessions) >= max_sessions:
            raise RuntimeError(f"all {max_sessions} session slots are taken")
        gdn = {}
        for name in self.gdn_layers:
            conv, ssm = self._kv(name)[:2]
            gdn[name] = (torch.zeros_like(conv[0]), torch.zeros_like(ssm[0]))
        rings = {}
        for name, (_, blocks) in self.ring_layers.items():
            cache = self._kv(name)
            rings[name] = torch.zeros((blocks, *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
        self.sessions[sid] = s = _Session(gdn, rings)
        return self.info(sid) | {"state_bytes": s.nbytes}

    def delete(self, sid: str) -> bool:
        return self.sessions.pop(sid, None) is not None

    def info(self, sid: str) -> dict:
        s = self.sessions[sid]
        return {"id": sid, "state_bytes": s.nbytes, **s.cursor.to_dict()}

    def list(self) -> list[dict]:
        return [self.info(sid) for sid in self.sessions]

    # -- per step -----------------------------------------------------------------------------
    def begin(self, req_id: str, req, args: dict) -> None:
        """A session request's first chunk: rewrite its positions and start it from the session state."""
        sid, op = args.get("id"), args.get("op")
        session = self.sessions.get(sid) if op != "oneshot" else None
        earlier = self.plans.get(req_id)  # set when this is a recompute after a preemption
        if earlier is not None and earlier.forked_from is not None:
            session = earlier.forked_from
        if op != "oneshot" and session is None:
            logger.warning("request %s names unknown session %s: runs on an empty state, writes nothing", req_id, sid)
        cursor = session.cursor if session is not None else StreamCursor()
        model = self.runner.get_model()
        spans = []
        for offset, t, h, w, *_ in model.iter_mm_grid_thw(req.mm_features):
            if t != 1:
                raise ValueError("session frames are single images (grid t == 1)")
            spans.append((offset, h, w))
        prompt = req.prompt_token_ids
        positions, after = stream_positions(prompt, spans, cursor)
        req.mrope_positions = torch.from_numpy(positions)
        req.mrope_position_delta = after.next_pos - len(prompt)
        if session is not None:
            self._copy_in(session, req.block_ids)
        self.plans[req_id] = _Plan(sid if session is not None else None, op, cursor.tokens, session is not None, after,
                                   forked_from=earlier.forked_from if earlier is not None else None)

    def write_back(self, req_id: str) -> None:
        plan = self.plans.get(req_id)
        req = self.runner.requests.get(req_id)
        if plan is None or req is None or plan.written or plan.session_id is None:
            return
        session = self.sessions.get(plan.session_id)
        if session is None:  # deleted while the append ran
            return
        self._keep_forks(plan.session_id, session)
        for name, g in self.gdn_layers.items():
            conv, ssm = self._kv(name)[:2]
            slot = req.block_ids[g][0]
            session.gdn[name][0].copy_(conv[slot])
            session.gdn[name][1].copy_(ssm[slot])
        for name, (g, blocks) in self.ring_layers.items():
            session.rings[name].copy_(self._kv(name)[list(req.block_ids[g][:blocks])])
        session.cursor = plan.cursor_after
        plan.written = True

    def _keep_forks(self, sid: str, session: _Session) -> None:
        """Before an append overwrites `session`: its questions in flight keep the state they forked from.
        A question without a kept state has seen no write-back since it began, so it forked from this one."""
        asking = [p for p in self.plans.values() if p.op == "ask" and p.session_id == sid and p.forked_from is None]
        if asking:
            kept = session.copy()
            for p in asking:
                p.forked_from = kept

    def _copy_in(self, session: _Session, block_ids) -> None:
        for name, g in self.gdn_layers.items():
            conv, ssm = self._kv(name)[:2]
            slot = block_ids[g][0]
            conv[slot].copy_(session.gdn[name][0])
            ssm[slot].copy_(session.gdn[name][1])
        for name, (g, blocks) in self.ring_layers.items():
            cache = self._kv(name)
            cache[list(block_ids[g][:blocks])] = session.rings[name]

    def rows(self, n: int) -> list[_Plan | None] | None:
        """The plans of the batch's first n rows (None when no session request runs)."""
        if not self.plans:
            return None
        req_ids = self.runner.input_batch.req_ids
        if len(req_ids) < n:
            return None
        return [self.plans.get(r) for r in req_ids[:n]]


_active: SessionStore | None = None  # the store of this process's runner (one runner per worker process)


def store_of(runner) -> SessionStore:
    global _active
    store = getattr(runner, "_infinitevl_sessions", None)
    if store is None:
        store = runner._infinitevl_sessions = SessionStore(runner)
    _active = store
    return store


def ring_token_offsets(n: int) -> list[int] | None:
    """Per batch row, the ring token index of the request's token 0 (None: all zero)."""
    rows = _active.rows(n) if _active is not None else None
    if rows is None:
        return None
    return [p.token_offset if p is not None else 0 for p in rows]


def initial_state_rows(n: int) -> list[bool] | None:
    """Per batch row, whether its GDN state starts from a session's (None: no session request)."""
    rows = _active.rows(n) if _active is not None else None
    if rows is None:
        return None
    return [p is not None and p.initial for p in rows]


def _session_args(req) -> dict | None:
    sp = getattr(req, "sampling_params", None)
    extra = getattr(sp, "extra_args", None) or {}
    return extra.get(EXTRA_ARGS_KEY)


def install() -> None:
    """Patch vLLM's runner, worker and GDN metadata builder, and keep session frames out of the
    multimodal processor caches (once per process; the front end's and the engine's caches skip the
    same keys, so they stay mirrored)."""
    from vllm.multimodal.cache.base import BaseMultiModalCache
    from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadataBuilder
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from .plugin import _patch_once

    def wrap_update_states(update_states):
        def update_states_with_sessions(self, scheduler_output):
            global _active
            result = update_states(self, scheduler_output)
            store = getattr(self, "_infinitevl_sessions", None)
            _active = store  # this runner's sessions only: another engine of this process must not leak in
            if store is None and not any(_session_args(self.requests.get(r))
                                         for r in scheduler_output.num_scheduled_tokens):
                return result
            store = store_of(self)
            for rid in scheduler_output.finished_req_ids:
                store.plans.pop(rid, None)
            store.pending_writeback = []
            for rid, n in scheduler_output.num_scheduled_tokens.items():
                req = self.requests.get(rid)
                args = _session_args(req)
                if args is None:
                    continue
                if req.num_computed_tokens == 0:
                    store.begin(rid, req, args)
                plan = store.plans.get(rid)
                if (plan is not None and plan.op == "append" and not plan.written
                        and req.num_computed_tokens + n >= len(req.prompt_token_ids)):
                    store.pending_writeback.append(rid)
            return result

        return update_states_with_sessions

    def wrap_execute(execute_model):
        def execute_model_with_sessions(self, scheduler_output, *args, **kwargs):
            out = execute_model(self, scheduler_output, *args, **kwargs)
            store = getattr(self, "_infinitevl_sessions", None)
            if store is not None and store.pending_writeback:
                for rid in store.pending_writeback:
                    store.write_back(rid)
                store.pending_writeback = []
            return out

        return execute_model_with_sessions

    def wrap_gdn_build(build):
        def build_with_sessions(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
            md = build(self, common_prefix_len, common_attn_metadata, *args, **kwargs)
            if md.has_initial_state is None or md.spec_sequence_masks is not None:
                return md
            rows = initial_state_rows(md.has_initial_state.shape[0])
            if rows is not None and any(rows):
                mask = torch.tensor(rows, dtype=torch.bool, device=md.has_initial_state.device)
                md.has_initial_state = md.has_initial_state | mask
                if md.prefill_has_initial_state is not None:
                    md.prefill_has_initial_state = md.has_initial_state[md.num_decodes:]
            return md

        return build_with_sessions

    def session_rpc(self, op: str, *args):
        store = store_of(self.model_runner)
        return getattr(store, op)(*args)

    def wrap_cache_if_fits(cache_if_fits):
        def cache_unless_session_frame(self, cache, key, value):
            if isinstance(key, str) and key.startswith(FRAME_UUID_PREFIX):
                return False
            return cache_if_fits(self, cache, key, value)

        return cache_unless_session_frame

    _patch_once(BaseMultiModalCache, "cache_if_fits", wrap_cache_if_fits)
    _patch_once(GPUModelRunner, "_update_states", wrap_update_states)
    _patch_once(GPUModelRunner, "execute_model", wrap_execute)
    _patch_once(GDNAttentionMetadataBuilder, "build", wrap_gdn_build)
    if not hasattr(Worker, RPC_METHOD):
        setattr(Worker, RPC_METHOD, session_rpc)
