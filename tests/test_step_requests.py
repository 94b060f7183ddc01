"""Per-request step data: a session request's ring offset and initial state reach its batch row, whatever
the row order, and rows a CUDA graph pads the batch with get none (they used to drop every row's data)."""

from infinitevl_vllm.model.step_requests import RequestStart, StepRequests


def test_rows_follow_the_batch_order_and_padding_rows_have_no_start():
    step = StepRequests()
    batch = ["a", "session-q", "b"]
    step.bind(lambda: batch)
    step.set("session-q", RequestStart(token_offset=700, initial_state=True))
    assert step.token_offsets(3) == [0, 700, 0]
    assert step.initial_states(3) == [False, True, False]
    # a decode graph captured for 4 rows replays this 3-request batch padded with one dummy row
    assert step.token_offsets(4) == [0, 700, 0, 0]
    assert step.initial_states(4) == [False, True, False, False]
    batch.reverse()  # the runner reorders its batch between steps
    assert step.token_offsets(3) == [0, 700, 0]
    assert step.token_offsets(2) == [0, 700]


def test_no_data_without_session_requests():
    step = StepRequests()
    step.bind(lambda: ["a", "b"])
    assert step.token_offsets(2) is None
    step.set("gone", RequestStart(token_offset=5))
    assert step.token_offsets(2) is None  # only requests of this step count
    step.drop("gone")
    assert step.rows(2) is None
