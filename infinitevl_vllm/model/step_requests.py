"""Per-request data of a step that our attention metadata builders read, keyed by request id.

A request of a streaming session continues its session's sequence: its ring token index starts at the
session's token count, and its GDN state counts as initial even on its first chunk. Whoever starts such a
request (the sessions' runner hook) records that here under the request's id; the ring and GDN metadata
builders look the step's rows up by the request ids of the runner's input batch, in the batch's order at
build time. One ``StepRequests`` belongs to one model (its layers share it), so engines never mix.

The builders find it through vLLM's static forward context (layer name -> layer): every InfiniteVL
attention and GDN layer carries the model's ``step_requests``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestStart:
    token_offset: int = 0  # ring token index of the request's token 0
    initial_state: bool = False  # its GDN state starts from a state copied into its slot


class StepRequests:
    def __init__(self) -> None:
        self.starts: dict[str, RequestStart] = {}
        self._batch_req_ids: Callable[[], Sequence[str]] | None = None

    def bind(self, batch_req_ids: Callable[[], Sequence[str]]) -> None:
        """Where the step's request ids are, in batch order (the model runner's input batch)."""
        self._batch_req_ids = batch_req_ids

    def set(self, req_id: str, start: RequestStart) -> None:
        self.starts[req_id] = start

    def drop(self, req_id: str) -> None:
        self.starts.pop(req_id, None)

    def rows(self, n: int) -> list[RequestStart | None] | None:
        """The starts of the batch's first n rows (None when no request of the step has one). Rows past the
        batch's requests are CUDA-graph padding: they have none."""
        if not self.starts or self._batch_req_ids is None:
            return None
        req_ids = list(self._batch_req_ids())[:n]
        rows = [self.starts.get(r) for r in req_ids] + [None] * (n - len(req_ids))
        return rows if any(r is not None for r in rows) else None

    def token_offsets(self, n: int) -> list[int] | None:
        rows = self.rows(n)
        return None if rows is None else [r.token_offset if r is not None else 0 for r in rows]

    def initial_states(self, n: int) -> list[bool] | None:
        rows = self.rows(n)
        return None if rows is None else [r is not None and r.initial_state for r in rows]


def step_requests_of(vllm_config, layer_names: Sequence[str]) -> StepRequests | None:
    """The StepRequests of the model whose layers a metadata builder serves."""
    ctx = vllm_config.compilation_config.static_forward_context
    for name in layer_names:
        step = getattr(ctx.get(name), "step_requests", None)
        if step is not None:
            return step
    return None
