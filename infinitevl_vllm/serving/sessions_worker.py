"""Streaming sessions, engine side: a store of per-session state in the worker, and the hooks that
let an ordinary vLLM request start from a session's state.

Sessions live outside vLLM's scheduler: every append and every question is an ordinary request, so
batching, admission, preemption and slots stay vLLM's. A request names its session in
``SamplingParams.extra_args["infinitevl_session"] = {"id": sid, "op": "append" | "ask" | "oneshot"}``.
In the worker:

- on a session request's first chunk (``num_computed_tokens == 0``: new, or recomputed after a
  preemption) the session's state is copied into the request's own GDN slot and SWA ring blocks,
  and its M-RoPE positions are rewritten by the stream rule (session_protocol.py) from the session's cursor;
- every step, its ring token index is offset by the session's token count (ring attention) and its
  GDN state counts as initial even on its first chunk (``has_initial_state``): both are this request's
  data in the model's ``StepRequests`` (step_requests.py), which the metadata builders look up by id;
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
``before_step`` / ``after_step`` run around vLLM's model runner step (vllm_patches.py hooks them in);
the RPC is the worker extension class ``SessionsWorkerExtension``.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch
from vllm.utils.torch_utils import async_tensor_h2d

from ..model.step_requests import RequestStart
from .session_protocol import EXTRA_ARGS_KEY, StreamCursor, stream_positions

logger = logging.getLogger("vllm.infinitevl_vllm.sessions")

RPC_METHOD = "infinitevl_session_rpc"
# The model runner classes whose steps call before_step / after_step (vllm_patches.session_hooks_in_model_runner
# adds vLLM's V1 runner). On any other runner (vLLM's V2, chosen with VLLM_USE_V2_MODEL_RUNNER=1) a session
# request would run on an empty state, so the sessions' RPC refuses there.
HOOKED_RUNNERS: set[type] = set()


@dataclass
class _Session:
    gdn: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (conv, recurrent) of one sequence
    rings: dict[str, torch.Tensor]  # layer -> [ring_blocks, kv_heads, block_size, Dk + Dv]
    cursor: StreamCursor = field(default_factory=StreamCursor)

    @property
    def nbytes(self) -> int:
        return (sum(c.nbytes + s.nbytes for c, s in self.gdn.values())
                + sum(r.nbytes for r in self.rings.values()))

    def copy(self) -> _Session:
        return _Session({k: (c.clone(), r.clone()) for k, (c, r) in self.gdn.items()},
                        {k: r.clone() for k, r in self.rings.items()}, self.cursor)


@dataclass
class _Plan:
    """What one session request does in the worker, fixed at its first chunk."""

    session_id: str | None
    op: str
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
        self.step = runner.get_model().step_requests  # read by the ring and GDN metadata builders
        self.step.bind(lambda: runner.input_batch.req_ids)
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
        # ring token offset and initial GDN state reach the attention builders as this request's data
        self.step.set(req_id, RequestStart(token_offset=cursor.tokens, initial_state=session is not None))
        self.plans[req_id] = _Plan(sid if session is not None else None, op, after,
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
        rows = self._ring_rows(req.block_ids)
        for name, (g, _) in self.ring_layers.items():
            torch.index_select(self._kv(name), 0, rows[g], out=session.rings[name])
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
        rows = self._ring_rows(block_ids)
        for name, (g, _) in self.ring_layers.items():
            self._kv(name).index_copy_(0, rows[g], session.rings[name])

    def _ring_rows(self, block_ids) -> dict[int, torch.Tensor]:
        """Each ring group's blocks of a request, as one device index a group. It is copied in pinned and
        asynchronous: indexing by a Python list would copy it from pageable memory, which waits for the GPU to
        drain, once a layer."""
        rows = {}
        for name, (g, blocks) in self.ring_layers.items():
            if g not in rows:
                rows[g] = async_tensor_h2d(block_ids[g][:blocks], device=self._kv(name).device, dtype=torch.long)
        return rows

    def finish(self, req_id: str) -> None:
        self.plans.pop(req_id, None)
        self.step.drop(req_id)


_stores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model runner -> its sessions' store


def store_of(runner, create: bool = True) -> SessionStore | None:
    """The store of this model runner (made on its first session request or RPC)."""
    store = _stores.get(runner)
    if store is None and create:
        store = _stores[runner] = SessionStore(runner)
    return store


def _session_args(req) -> dict | None:
    sp = getattr(req, "sampling_params", None)
    extra = getattr(sp, "extra_args", None) or {}
    return extra.get(EXTRA_ARGS_KEY)


def before_step(runner, scheduler_output) -> None:
    """After the runner took the step's requests in: start each session request's first chunk from its
    session's state, and note the appends whose prompt this step finishes (their state is written back)."""
    store = store_of(runner, create=False)
    if store is None:
        if not any(_session_args(runner.requests.get(r)) for r in scheduler_output.num_scheduled_tokens):
            return
        if getattr(runner.get_model(), "step_requests", None) is None:
            return  # not InfiniteVL: a request naming a session is an ordinary request there
        store = store_of(runner)
    for rid in scheduler_output.finished_req_ids:
        store.finish(rid)
    store.pending_writeback = []
    for rid, n in scheduler_output.num_scheduled_tokens.items():
        req = runner.requests.get(rid)
        args = _session_args(req)
        if args is None:
            continue
        if req.num_computed_tokens == 0:
            store.begin(rid, req, args)
        plan = store.plans.get(rid)
        if (plan is not None and plan.op == "append" and not plan.written
                and req.num_computed_tokens + n >= len(req.prompt_token_ids)):
            store.pending_writeback.append(rid)


def after_step(runner) -> None:
    """After the step ran: copy the finished appends' states back into their sessions."""
    store = store_of(runner, create=False)
    if store is not None and store.pending_writeback:
        for rid in store.pending_writeback:
            store.write_back(rid)
        store.pending_writeback = []


class SessionsWorkerExtension:
    """vLLM's worker extension class (``parallel_config.worker_extension_cls``, set by InfiniteVL's
    engine-config rule): the sessions' RPC, reached through ``collective_rpc(RPC_METHOD, ...)``."""

    def infinitevl_session_rpc(self, op: str, *args):
        runner = self.model_runner
        if not isinstance(runner, tuple(HOOKED_RUNNERS)):
            cls = type(runner)
            raise RuntimeError(f"streaming sessions need vLLM's V1 model runner, whose steps InfiniteVL hooks; this "
                               f"engine runs {cls.__module__}.{cls.__qualname__} (unset VLLM_USE_V2_MODEL_RUNNER)")
        return getattr(store_of(runner), op)(*args)


WORKER_EXTENSION = f"{__name__}.{SessionsWorkerExtension.__qualname__}"
