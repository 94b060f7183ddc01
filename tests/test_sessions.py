"""Streaming video sessions, offline (``StreamSession`` over one in-process ``vllm.LLM``) and the
stream's position rule.

The checkpoint's window is 320 tokens, less than two frames (256 tokens each), so every session
below wraps its SWA rings: the equalities hold only if the rings, the GDN states and the positions
are all carried from request to request.

Tolerance: answers are compared as greedy token ids, exactly (float32 on CPU; the session path and
the single request differ only in how the prefill is cut into chunks). The chosen tokens' logprobs
are compared within 1e-3; against the reference model (its plain matmuls and attention sum in
another order than vLLM's kernels) within 2e-3, the tolerance of test_vllm_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infinitevl_vllm.serving.session_protocol import (
    FRAME_TOKENS,
    SessionError,
    StreamCursor,
    question_text,
    stream_positions,
)

WINDOW = 320
QUESTION = "What happened?"


def frame(seed: int):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((448, 448, 3)) * 255).astype("uint8"))


# -- the position rule, no engine ------------------------------------------------------------------
def test_first_frame_and_following_text_get_qwen_single_image_positions():
    """One frame after text is positioned exactly as Qwen2.5-VL positions one image."""
    prompt = [1] * 5 + [2] * FRAME_TOKENS + [3] * 4
    pos, after = stream_positions(prompt, [(5, 16, 16)], StreamCursor())
    assert pos[:, :5].tolist() == [list(range(5))] * 3
    assert (pos[0, 5:261] == 5).all()
    assert pos[1, 5:261].tolist() == [5 + i for i in range(16) for _ in range(16)]
    assert pos[2, 5:261].tolist() == [5 + j for _ in range(16) for j in range(16)]
    assert pos[:, 261:].tolist() == [[21, 22, 23, 24]] * 3
    assert (after.tokens, after.frames, after.next_pos) == (265, 1, 25)


def test_between_frames_only_the_temporal_row_advances():
    prompt = [2] * (3 * FRAME_TOKENS)
    spans = [(k * FRAME_TOKENS, 16, 16) for k in range(3)]
    pos, _ = stream_positions(prompt, spans, StreamCursor(tokens=7, next_pos=7, next_t=7))
    frames = pos.reshape(3, 3, FRAME_TOKENS)  # rows x frames x tokens
    assert [int(frames[0, k, 0]) for k in range(3)] == [7, 8, 9]
    assert (frames[1:, 1] == frames[1:, 0]).all() and (frames[1:, 2] == frames[1:, 0]).all()


def test_rule_applied_piecewise_equals_rule_applied_at_once():
    """The session's cursor makes frames one by one + question position like one request holding it all."""
    prefix, question = [1] * 6, [4] * 9
    whole = prefix + [2] * (40 * FRAME_TOKENS) + question
    spans = [(6 + k * FRAME_TOKENS, 16, 16) for k in range(40)]
    at_once, end = stream_positions(whole, spans, StreamCursor())
    pieces, cursor = [], StreamCursor()
    p, cursor = stream_positions(prefix, [], cursor)
    pieces.append(p)
    for _ in range(40):
        p, cursor = stream_positions([2] * FRAME_TOKENS, [(0, 16, 16)], cursor)
        pieces.append(p)
    p, cursor = stream_positions(question, [], cursor)
    pieces.append(p)
    assert np.array_equal(np.concatenate(pieces, axis=1), at_once)
    assert cursor == end and end.frames == 40 and end.tokens == len(whole)
    assert int(at_once[:, -len(question)]. max()) == 6 + 40  # text resumes after the last frame's time


def test_question_format_and_refusals():
    assert question_text([{"role": "user", "content": "Hi?"}]) == \
        "<|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n"
    for bad in ([], [{"role": "assistant", "content": "x"}], [{"role": "system", "content": "x"}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(SessionError) as e:
            question_text(bad)
        assert e.value.status == 400


# -- offline twin ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from infinitevl_vllm.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("w320"), "tiny", seed=0, sliding_window=WINDOW)


@pytest.fixture(scope="module")
def llm(ckpt):
    import os

    from tests.vllm_helpers import make_llm

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    engine = make_llm(ckpt, limit_mm_per_prompt={"image": 8, "video": 0}, max_num_batched_tokens=512)
    yield engine
    del engine
    import vllm.envs

    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    vllm.envs.disable_envs_cache()


def greedy(n: int = 8):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, logprobs=0)


def chosen_logprobs(out) -> list[float]:
    o = out.outputs[0]
    return [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]


def test_frames_one_by_one_then_ask_equals_one_request_with_everything(llm):
    from infinitevl_vllm.serving.sessions import StreamSession, oneshot

    frames = [frame(s) for s in range(4)]
    single = oneshot(llm, frames, QUESTION, greedy())
    with StreamSession(llm) as s:
        for f in frames:
            s.append([f])
        info = s.info()
        streamed = s.ask(QUESTION, greedy())
    assert info["frames"] == 4 and info["tokens"] > 4 * FRAME_TOKENS > WINDOW  # the rings wrapped
    assert len(streamed.prompt_token_ids) + info["tokens"] == len(single.prompt_token_ids)
    assert list(streamed.outputs[0].token_ids) == list(single.outputs[0].token_ids)
    torch.testing.assert_close(chosen_logprobs(streamed), chosen_logprobs(single), atol=1e-3, rtol=0)
    # and the frames matter: the same question on the stream without its first frame answers otherwise
    other = oneshot(llm, frames[1:], QUESTION, greedy())
    assert chosen_logprobs(other) != pytest.approx(chosen_logprobs(single), abs=1e-3)


def test_streaming_groups_equals_appending_them_in_turn(llm):
    """``stream`` prepares each group of frames while the engine prefills the group before: the session is the
    one appending the groups in turn makes (its counters after each group, and its answer). A bad frame stops
    the stream with the groups before its own in."""
    from infinitevl_vllm.serving.sessions import StreamSession

    groups = [[frame(50)], [frame(51), frame(52)], [frame(53)]]
    with StreamSession(llm) as s:
        appended = [(i["frames"], i["tokens"]) for i in (s.append(g) for g in groups)]
        answer = s.ask(QUESTION, greedy())
    with StreamSession(llm) as s:
        streamed = [(i["frames"], i["tokens"]) for i in s.stream(iter(groups))]
        assert list(s.ask(QUESTION, greedy()).outputs[0].token_ids) == list(answer.outputs[0].token_ids)
    assert streamed == appended and [f for f, _ in streamed] == [1, 3, 4]
    with StreamSession(llm) as s:
        with pytest.raises(SessionError) as e:
            list(s.stream([[frame(50)], [frame(51), "data:image/png;base64,bm8gaW1hZ2U="], [frame(52)]]))
        assert e.value.status == 400 and s.info()["frames"] == 1


def test_a_session_answers_as_the_reference_model_fed_the_same_stream(llm, ckpt):
    """The truth for a session is the reference model (no vLLM) fed the same pieces in order, its
    state carried from piece to piece, at the stream rule's positions, then decoding greedily."""
    from transformers import AutoProcessor

    from infinitevl_vllm.checkpoint import load_reference
    from infinitevl_vllm.serving.session_protocol import DEFAULT_SYSTEM, append_text, prefix_text
    from infinitevl_vllm.serving.sessions import StreamSession
    from tests.vllm_helpers import reference_inputs

    frames = [frame(s) for s in (30, 31, 32)]
    ref, processor = load_reference(ckpt, dtype=torch.float32), AutoProcessor.from_pretrained(ckpt)
    state, cursor = ref.new_state(), StreamCursor()

    def feed(text: str, images=None) -> torch.Tensor:
        nonlocal cursor
        mm = reference_inputs(processor, text, images)
        ids = mm.input_ids.tolist()
        starts = [i for i, t in enumerate(ids) if t == ref.config.image_token_id
                  and (i == 0 or ids[i - 1] != ref.config.image_token_id)]
        spans = [(o, 16, 16) for o in starts]
        positions, cursor = stream_positions(ids, spans, cursor)
        with torch.no_grad():
            return ref.logits(ref.decode_hidden(ref.embed(mm), torch.from_numpy(positions), state))

    feed(prefix_text(DEFAULT_SYSTEM))
    for f in frames:
        feed(append_text(1), [f])
    streamed_tokens = state.num_tokens
    logits = [feed(question_text([{"role": "user", "content": QUESTION}]))[-1]]
    tokens = [int(logits[-1].argmax())]
    state.rope_delta = cursor.next_pos - state.num_tokens
    while len(tokens) < 8:
        logits.append(ref.step(tokens[-1], state))
        tokens.append(int(logits[-1].argmax()))
    expected = [float(torch.log_softmax(lg.double(), -1)[t]) for lg, t in zip(logits, tokens)]

    with StreamSession(llm) as s:
        for f in frames:
            s.append([f])
        assert s.info()["tokens"] == streamed_tokens  # the same token stream went in
        out = s.ask(QUESTION, greedy())
    assert list(out.outputs[0].token_ids) == tokens
    torch.testing.assert_close(chosen_logprobs(out), expected, atol=2e-3, rtol=0)


def test_asking_does_not_change_the_session(llm):
    """Ask twice: same answer. Frames appended after a question: as if it was never asked."""
    from infinitevl_vllm.serving.sessions import StreamSession

    a, b = [frame(s) for s in (10, 11)], [frame(s) for s in (12, 13)]
    with StreamSession(llm) as asked, StreamSession(llm) as never_asked:
        asked.append(a)
        never_asked.append(a)
        first, second = asked.ask(QUESTION, greedy()), asked.ask(QUESTION, greedy())
        assert list(first.outputs[0].token_ids) == list(second.outputs[0].token_ids)
        assert asked.info()["tokens"] == never_asked.info()["tokens"]
        asked.append(b)
        never_asked.append(b)
        after = asked.ask("And then?", greedy())
        expected = never_asked.ask("And then?", greedy())
    assert list(after.outputs[0].token_ids) == list(expected.outputs[0].token_ids)
    torch.testing.assert_close(chosen_logprobs(after), chosen_logprobs(expected), atol=1e-3, rtol=0)


def test_a_bad_frame_is_refused_before_it_reaches_the_state(llm):
    from infinitevl_vllm.serving.sessions import StreamSession

    with StreamSession(llm) as s:
        s.append([frame(20)])
        before, answer = s.info(), s.ask(QUESTION, greedy())
        with pytest.raises(SessionError) as e:
            s.append([frame(21), "data:image/png;base64,bm8gaW1hZ2U="])
        assert e.value.status == 400 and "frames[1]" in e.value.message
        assert s.info() == before
        assert list(s.ask(QUESTION, greedy()).outputs[0].token_ids) == list(answer.outputs[0].token_ids)
        assert s.append([frame(21)])["frames"] == 2  # and the session goes on


def test_frames_stay_out_of_vllms_multimodal_processor_cache(llm):
    """Frames never repeat: caching them (about 1.2 MB each, up to vLLM's default 4 GiB) would make a
    session's memory grow for thousands of frames. Ordinary images are still cached."""
    from vllm import SamplingParams

    from infinitevl_vllm.serving.sessions import StreamSession

    cache = llm.llm_engine.renderer.mm_processor_cache
    entries = len(cache._cache)  # the LRU cache's entry count (no public accessor)
    with StreamSession(llm) as s:
        s.append([frame(40), frame(41)])
        s.ask(QUESTION, greedy(2))
    assert len(cache._cache) == entries
    image = {"prompt": "<|vision_start|><|image_pad|><|vision_end|>Hi", "multi_modal_data": {"image": frame(42)}}
    llm.generate([image], SamplingParams(max_tokens=1), use_tqdm=False)
    assert len(cache._cache) == entries + 1


def test_a_preempted_question_resumes_on_the_state_it_forked_from(llm):
    """vLLM may preempt a question (its slot freed, recomputed later from its first token). If an append
    of its session finishes in between, the recomputed question must still answer on the state it forked
    from, not on the newer frames."""
    import time

    from infinitevl_vllm.serving.sessions import StreamSession, append_request, ask_request, decode_frames

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    messages = [{"role": "user", "content": QUESTION}]
    with StreamSession(llm) as s:
        s.append([frame(50)])
        expected = s.ask(QUESTION, greedy())
        prompt, params = ask_request(s.id, messages, greedy())
        engine.add_request("q", prompt, params)
        while not any(r.num_computed_tokens for r in scheduler.running):  # the question has forked
            engine.step()
        question = next(r for r in scheduler.running if r.request_id.startswith("q"))
        scheduler.running.remove(question)
        scheduler._preempt_request(question, time.monotonic())
        scheduler.waiting.remove_request(question)  # held back until the append below has finished
        engine.add_request("a", *append_request(s.id, decode_frames([frame(51)])))
        while not any(o.finished and o.request_id.startswith("a") for o in engine.step()):
            pass
        assert s.info()["frames"] == 2  # the session moved on while the question was out
        scheduler.waiting.prepend_request(question)
        out = None
        while engine.has_unfinished_requests():
            out = next((o for o in engine.step() if o.finished), out)
        newer = s.ask(QUESTION, greedy())  # what the newer frames answer, for contrast
    assert question.num_preemptions == 1
    assert list(out.outputs[0].token_ids) == list(expected.outputs[0].token_ids)
    torch.testing.assert_close(chosen_logprobs(out), chosen_logprobs(expected), atol=1e-3, rtol=0)
    assert chosen_logprobs(newer) != pytest.approx(chosen_logprobs(expected), abs=1e-3)
