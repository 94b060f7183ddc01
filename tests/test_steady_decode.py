"""Which steps reuse the step before's inputs (model/steady_decode.py): only a step that decodes one token for
each request the batch already had, and nothing else changes. Any other step takes vLLM's whole preparation.
(The engine-level check against the reference is in test_vllm_model.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from infinitevl_vllm.model.steady_decode import SteadyDecode, _decode_batch
from infinitevl_vllm.model.step_requests import RequestStart, StepRequests


def _runner(computed=(40, 9), prompt=(30, 9), step=None):
    batch = SimpleNamespace(num_reqs=len(computed), req_ids=[f"r{i}" for i in range(len(computed))],
                            num_computed_tokens_cpu=np.array(computed), num_prompt_tokens=np.array(prompt),
                            req_prompt_embeds={})
    return SimpleNamespace(input_batch=batch, speculative_config=None, lora_config=None, enable_prompt_embeds=False,
                           _infinitevl_steady_decode=SteadyDecode(step or StepRequests()))


def _step(**changes):
    cached = SimpleNamespace(resumed_req_ids=set(), new_block_ids=[None, ([], [], [], [])])
    out = SimpleNamespace(scheduled_new_reqs=[], finished_req_ids=set(), scheduled_spec_decode_tokens={},
                          scheduled_encoder_inputs={}, preempted_req_ids=None, scheduled_cached_reqs=cached)
    for name, value in changes.items():
        setattr(cached if hasattr(cached, name) else out, name, value)
    return out


def test_a_step_of_one_token_for_each_decoding_request_is_steady():
    assert _decode_batch(_runner(), _step(), np.array([1, 1])) == ("r0", "r1")


@pytest.mark.parametrize("change", [
    {"scheduled_new_reqs": ["new"]},
    {"finished_req_ids": {"r1"}},
    {"preempted_req_ids": {"r0"}},
    {"resumed_req_ids": {"r0"}},
    {"new_block_ids": [([7], [], [], []), None]},
    {"scheduled_spec_decode_tokens": {"r0": [5]}},
    {"scheduled_encoder_inputs": {"r0": [0]}},
])
def test_any_change_to_the_batch_or_its_blocks_rebuilds(change):
    assert _decode_batch(_runner(), _step(**change), np.array([1, 1])) is None


def test_prompt_tokens_rebuild_even_one_at_a_time():
    assert _decode_batch(_runner(), _step(), np.array([1, 2])) is None  # a prompt chunk beside a decode
    assert _decode_batch(_runner(), _step(), np.array([1, 0])) is None  # a request with nothing this step
    assert _decode_batch(_runner(computed=(40, 8)), _step(), np.array([1, 1])) is None  # a one-token prompt chunk


def test_a_streaming_sessions_request_rebuilds():
    step = StepRequests()
    step.set("r1", RequestStart(token_offset=500, initial_state=True))
    assert _decode_batch(_runner(step=step), _step(), np.array([1, 1])) is None


def test_a_step_reuses_only_the_record_of_a_step_that_built_or_advanced_all_of_its_metadata(monkeypatch):
    """The record's life: a full decode step records its inputs and metadata; the next step of the same requests
    advances them and hands the same metadata back with the rings one further; a step that never reaches its
    metadata build leaves nothing to reuse, and so does a dummy run."""
    import torch

    from infinitevl_vllm.model import steady_decode
    from infinitevl_vllm.model.ring_attention import RingAttentionMetadata

    advanced = []
    monkeypatch.setattr(steady_decode, "_decode_batch", lambda runner, so, nst: ("r0",))
    monkeypatch.setattr(steady_decode, "_advance_inputs", lambda runner, so, n: advanced.append(n))
    runner = SimpleNamespace(_infinitevl_steady_decode=SteadyDecode(None))
    ring = RingAttentionMetadata(num_decodes=1, starts=torch.tensor([7, 0], dtype=torch.int32),
                                 ring_block_ids=torch.zeros(2, 4, dtype=torch.int32), prefill_query_start_loc=None,
                                 max_prefill_len=1, query_start_loc_cpu=None, starts_cpu=[7, 0])
    calls = []

    def prepare(runner, so, nst):
        calls.append("prepare")
        return torch.tensor([0]), None, 1

    def build(runner, **kwargs):
        calls.append("build")
        return {"layers.3.attn": ring}, None

    args = {"num_tokens": 1, "num_tokens_padded": 2, "num_reqs": 1, "num_reqs_padded": 2, "max_query_len": 1}

    def step(with_build=True):
        steady_decode.prepare_inputs(runner, prepare, None, np.array([1]))
        return steady_decode.build_attention_metadata(runner, build, **args) if with_build else None

    step()  # the first decode step: vLLM's whole preparation, recorded
    assert calls == ["prepare", "build"] and advanced == []
    md, _ = step()  # the same requests: advanced, the same metadata, the ring one further (padding row untouched)
    assert calls == ["prepare", "build"] and advanced == [1] and md["layers.3.attn"] is ring
    assert ring.starts.tolist() == [8, 0] and ring.starts_cpu == [8, 0]
    assert runner._infinitevl_steady_decode.reused_steps == 1
    step(with_build=False)  # inputs advanced, but the metadata never was: nothing is reusable
    step()
    assert calls == ["prepare", "build"] * 2 and ring.starts.tolist() == [8, 0]
    steady_decode.forget_on_dummy_run(runner)  # a dummy run rewrote the buffers
    step()
    assert calls == ["prepare", "build"] * 3
