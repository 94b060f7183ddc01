"""A decode step of the same requests as the step before reuses that step's inputs and attention metadata.

vLLM's V1 runner rebuilds each step's inputs, and the attention metadata of every KV-cache group (four for
InfiniteVL: the ring and three GDN groups), on the host from scratch. A batch-1 decode step of InfiniteVL-4B
on an H200 waits on that host work, not on the GPU (docs/gpu.md, session 13: 2.6 to 3.7 ms of host work a
step against about 2.5 ms of GPU work, of which input preparation and metadata are 1.2 to 1.8 ms).

When a step decodes one token for each request of the step before, in the same order, with no block added
and no request of a streaming session, only four things change: each request's input token (the one just
sampled), its position and its sequence length (each one further), and its ring start (one further). Those
are advanced in place and vLLM gets the previous step's attention metadata back. That is sound because the
ring's and GDN's metadata are views of persistent buffers (a full CUDA graph reads them by address) and a GDN
decode reads only each request's slot, which does not move. Any other step (a request joins, leaves or is
preempted, a prompt chunk, a new block, a session's request, a dummy run in between) takes vLLM's whole
preparation, which rebuilds everything from the host's state; the host copies that whole preparation reads
(``optimistic_seq_lens_cpu``, the input ids) are kept current on the steady path too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadata

from ..config import ARCHITECTURE
from .ring_attention import RingAttentionMetadata, advance_decodes

# the arguments of vLLM's metadata build that decide its result's shape; a reuse needs them unchanged
_METADATA_ARGS = ("num_tokens", "num_tokens_padded", "num_reqs", "num_reqs_padded", "max_query_len",
                  "ubatch_slices", "use_spec_decode")


@dataclass
class _DecodeStep:
    req_ids: tuple[str, ...]
    logits_indices: torch.Tensor
    metadata_args: tuple | None = None
    attn_metadata: dict | None = None


class SteadyDecode:
    """One model runner's record of its last all-decode step, and how many steps reused it."""

    def __init__(self, step_requests) -> None:
        self.step_requests = step_requests  # the model's: requests of a streaming session are never steady
        self.last: _DecodeStep | None = None  # the last step, if all of it decoded and its metadata is reusable
        # this step's, between input preparation and metadata: a reused record (its metadata recorded) or a new one
        self.pending: _DecodeStep | None = None
        self.reused_steps = 0

    def forget(self) -> None:
        self.last = self.pending = None


def steady_decode_of(runner) -> SteadyDecode | None:
    """The runner's record, made on first use; None for a model other than InfiniteVL."""
    steady = runner.__dict__.get("_infinitevl_steady_decode", False)
    if steady is False:
        steady = None
        if runner.model_config.architecture == ARCHITECTURE:
            steady = SteadyDecode(getattr(runner.get_model(), "step_requests", None))
        runner._infinitevl_steady_decode = steady
    return steady


def _decode_batch(runner, scheduler_output, num_scheduled_tokens: np.ndarray) -> tuple[str, ...] | None:
    """The batch's request ids if this step only decodes one token for each of the requests it already had
    (nothing joined, left, resumed or got a block, no prompt token, no draft, no session); else None."""
    so = scheduler_output
    if (so.scheduled_new_reqs or so.finished_req_ids or so.scheduled_spec_decode_tokens
            or so.scheduled_encoder_inputs or so.preempted_req_ids):
        return None
    cached = so.scheduled_cached_reqs
    if cached.resumed_req_ids or any(ids is not None and any(ids) for ids in cached.new_block_ids):
        return None
    batch = runner.input_batch
    n = batch.num_reqs
    if n == 0 or len(num_scheduled_tokens) != n or (num_scheduled_tokens != 1).any() \
            or runner.speculative_config is not None:
        return None
    if runner.lora_config or runner.enable_prompt_embeds or batch.req_prompt_embeds:
        return None
    if (batch.num_computed_tokens_cpu[:n] < batch.num_prompt_tokens[:n]).any():  # a one-token prompt chunk
        return None
    req_ids = tuple(batch.req_ids)
    step = runner._infinitevl_steady_decode.step_requests
    if step is not None and any(r in step.starts for r in req_ids):
        return None
    return req_ids


def _advance_inputs(runner, scheduler_output, n: int) -> None:
    """The step's inputs, from the previous step's: vLLM's own input-id copy (under async scheduling the
    tokens just sampled, on the device), then positions and sequence lengths one further, in place."""
    batch = runner.input_batch
    # host copies, as vLLM's preparation leaves them: the sequence lengths and this step's input tokens
    torch.add(batch.num_computed_tokens_cpu_tensor[:n], 1, out=runner.optimistic_seq_lens_cpu[:n])
    flat = batch.num_computed_tokens_cpu[:n] + np.arange(n) * batch.token_ids_cpu.shape[1]
    torch.index_select(batch.token_ids_cpu_tensor.flatten(), 0, torch.from_numpy(flat),
                       out=runner.input_ids.cpu[:n])
    runner._compute_prev_positions(n)
    runner._prepare_input_ids(scheduler_output, n, n, runner.query_start_loc.np[1 : n + 1])
    if runner.uses_mrope:  # the model reads these (then nothing reads vLLM's 1-D positions in a decode step)
        runner.mrope_positions.gpu[:, :n] += 1  # a decode token's three M-RoPE rows are its position + delta
    else:
        runner.positions[:n] += 1
    runner.seq_lens[:n] += 1


def _reusable(attn_metadata) -> bool:
    return isinstance(attn_metadata, dict) and all(
        isinstance(md, RingAttentionMetadata | GDNAttentionMetadata) for md in attn_metadata.values())


def prepare_inputs(runner, prepare, scheduler_output, num_scheduled_tokens: np.ndarray):
    """vLLM's ``_prepare_inputs``, or the previous step's inputs one token further (see the module)."""
    steady = steady_decode_of(runner)
    if steady is None:
        return prepare(runner, scheduler_output, num_scheduled_tokens)
    req_ids = _decode_batch(runner, scheduler_output, num_scheduled_tokens)
    last = steady.last
    if req_ids is not None and last is not None and last.req_ids == req_ids:
        _advance_inputs(runner, scheduler_output, len(req_ids))
        steady.pending, steady.last = last, None  # reusable again once its metadata has advanced too
        return last.logits_indices, None, 1
    out = prepare(runner, scheduler_output, num_scheduled_tokens)
    steady.last = None
    steady.pending = _DecodeStep(req_ids, out[0]) if req_ids is not None else None
    return out


def build_attention_metadata(runner, build, *args, **kwargs):
    """vLLM's ``_build_attention_metadata``, or the previous step's metadata with the rings one further."""
    steady = steady_decode_of(runner)
    step = steady.pending if steady is not None else None
    if step is None or args or kwargs.get("for_cudagraph_capture"):
        return build(runner, *args, **kwargs)
    steady.pending = None
    key = tuple(kwargs.get(name) for name in _METADATA_ARGS)
    if key == step.metadata_args:  # a reused record, built with the same arguments (a new one has none)
        n = kwargs["num_reqs"]
        for md in {id(md): md for md in step.attn_metadata.values()}.values():
            if isinstance(md, RingAttentionMetadata):
                advance_decodes(md, n)
        steady.reused_steps += 1
        steady.last = step
        return step.attn_metadata, None
    # a full build reads only the host's state and the buffers kept current above, so it is right either way
    attn_metadata, spec_metadata = build(runner, *args, **kwargs)
    steady.last = None
    if spec_metadata is None and kwargs.get("ubatch_slices") is None and _reusable(attn_metadata):
        step.metadata_args, step.attn_metadata = key, attn_metadata
        steady.last = step
    return attn_metadata, spec_metadata


def forget_on_dummy_run(runner) -> None:
    """A dummy run rewrites the step buffers and the ring builder's device buffer: the next step rebuilds."""
    steady = runner.__dict__.get("_infinitevl_steady_decode")
    if steady is not None:
        steady.forget()
