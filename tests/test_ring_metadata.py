"""The ring metadata a step's SWA layers read: where each request's tokens start in its ring and where each
prefill's queries start. It is made on the host from the runner's host copies, so a decode step launches no
kernel for it; these are its values for decodes, CUDA-graph padding, prefills and a streaming session's request."""

from types import SimpleNamespace

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata

from infinitevl_vllm.model.ring_attention import RingAttentionMetadataBuilder
from infinitevl_vllm.model.step_requests import RequestStart, StepRequests


def builder(step_requests: StepRequests | None = None) -> RingAttentionMetadataBuilder:
    layer = SimpleNamespace(step_requests=step_requests)
    config = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=8, max_num_batched_tokens=64),
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=8, static_forward_context={"swa": layer}),
    )
    spec = SimpleNamespace(ring_blocks=3)
    return RingAttentionMetadataBuilder(spec, ["swa"], config, torch.device("cpu"))


def step(query_lens: list[int], seq_lens: list[int]) -> CommonAttentionMetadata:
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    n = len(query_lens)
    return CommonAttentionMetadata(
        query_start_loc=qsl.clone(), query_start_loc_cpu=qsl, seq_lens=lens.clone(), num_reqs=n,
        num_actual_tokens=int(qsl[-1]), max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        block_table_tensor=torch.arange(n * 5, dtype=torch.int32).view(n, 5),
        slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.long), seq_lens_cpu_upper_bound=lens,
    )


def test_decodes_start_after_their_context_and_padding_rows_at_zero():
    # two decodes with 9 and 4,999 tokens before them; a graph pads the batch with a row of no sequence
    md = builder().build(0, step([1, 1, 1], [10, 5000, 0]))
    assert md.num_decodes == 3
    assert md.starts.tolist() == [9, 4999, 0]
    assert md.prefill_query_start_loc is None
    assert md.ring_block_ids.tolist() == [[0, 1, 2], [5, 6, 7], [10, 11, 12]]  # only the ring's blocks


def test_prefills_count_their_queries_from_the_first_prefill_token():
    # one decode, then a 7-token chunk of a prompt 13 tokens in, then a whole 4-token prompt
    md = builder().build(0, step([1, 7, 4], [31, 20, 4]))
    assert md.num_decodes == 1
    assert md.starts.tolist() == [30, 13, 0]
    assert md.prefill_query_start_loc.tolist() == [0, 7, 11]
    assert md.max_prefill_len == 7


def test_a_session_request_continues_its_session_ring():
    requests = StepRequests()
    requests.bind(lambda: ["plain", "session-q"])
    requests.set("session-q", RequestStart(token_offset=700))
    b = builder(requests)
    md = b.build(0, step([1, 5], [12, 5]))
    assert md.starts.tolist() == [11, 700]
    requests.drop("session-q")  # its next step is a plain decode again: no offset left behind
    assert b.build(0, step([1, 1], [13, 6])).starts.tolist() == [12, 5]


def test_consecutive_steps_fill_different_host_buffers_into_one_device_buffer():
    """A step's host values are copied asynchronously: the next step (in flight before the copy has run) must
    not rewrite them; a CUDA graph reads the device buffer's address, which must not change."""
    b = builder()
    first = b.build(0, step([1], [10]))
    second = b.build(0, step([1], [20]))
    assert first.starts.data_ptr() == second.starts.data_ptr()
    assert b.host_buffers[0][0] == 9 and b.host_buffers[1][0] == 19  # the first step's values left as they were
