"""InfiniteVL under CUDA vLLM in float32, with vLLM's default compilation (torch.compile, CUDA graphs),
equals the reference model, as tests/test_vllm_model.py checks it on CPU.

One engine (`llm_f32`: the 16-token-window checkpoint, prefill chunks of 128 tokens, in this process) for
every test here. Tolerance: prompt log-probs within 2e-3 absolute, greedy tokens identical. Both sides are
float32; they sum in different orders (vLLM's fused GEMMs and attention kernels, the flash-linear-attention
GDN kernels, against the reference's plain matmuls), which moves a logit by ~1e-5 relative, and a
log-softmax over 151936 logits of magnitude ~10 turns that into ~1e-4. A wrong position, window, state
carry or chunk boundary moves log-probs by nats.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import SMALL_WINDOW
from vllm_helpers import (
    check_batch_of_8_equals_each_alone,
    prompt_logprobs_of,
    reference_inputs,
    video_frames,
    vllm_prompt,
)

from infinitevl_vllm.tools.workloads import chat_prompt, random_image, random_texts

from .helpers import F32_CHUNK, Prompt

pytestmark = pytest.mark.gpu

LOGPROB_ATOL = 2e-3
GREEDY_TOKENS = 12


def _sampling(**kw):
    from vllm import SamplingParams

    return SamplingParams(**{"temperature": 0.0, "max_tokens": GREEDY_TOKENS, "prompt_logprobs": 0, **kw})


def compare(llm, ref, processor, prompts: list[Prompt], video=None) -> list:
    """Run the prompts as one batch; each must match the reference alone (log-probs and greedy tokens)."""
    outs = llm.generate([vllm_prompt(p, images, video) for p, images in prompts], _sampling(), use_tqdm=False)
    for (prompt, images), out in zip(prompts, outs):
        mm = reference_inputs(processor, prompt, images, video)
        assert out.prompt_token_ids == mm.input_ids.tolist(), "vLLM and the HF processor tokenised differently"
        ours = torch.tensor(prompt_logprobs_of(out), dtype=torch.float64)
        torch.testing.assert_close(ours, ref.prompt_logprobs(mm), atol=LOGPROB_ATOL, rtol=0)
        assert list(out.outputs[0].token_ids) == ref.generate(mm, GREEDY_TOKENS)
    return outs


@pytest.mark.parametrize("n_words", [3, SMALL_WINDOW * 5])
def test_text_shorter_and_longer_than_the_window(llm_f32, ours_ref, ours_processor, n_words):
    prompt = chat_prompt(ours_processor, random_texts([n_words], seed=n_words)[0])
    [out] = compare(llm_f32, ours_ref, ours_processor, [(prompt, None)])
    if n_words > 3:
        assert len(out.prompt_token_ids) > 5 * SMALL_WINDOW


def test_one_image(llm_f32, ours_ref, ours_processor):
    compare(llm_f32, ours_ref, ours_processor,
            [(chat_prompt(ours_processor, "Describe it.", n_images=1), [random_image(0)])])


def test_two_images(llm_f32, ours_ref, ours_processor):
    images = [random_image(1, (224, 168)), random_image(2, (168, 280))]
    compare(llm_f32, ours_ref, ours_processor, [(chat_prompt(ours_processor, "Compare them.", n_images=2), images)])


def test_short_video(llm_f32, ours_ref, ours_processor):
    compare(llm_f32, ours_ref, ours_processor, [(chat_prompt(ours_processor, "What happens?", video=True), None)],
            video=video_frames(4))


def test_batch_of_8_equals_each_prompt_alone(llm_f32, ours_processor):
    check_batch_of_8_equals_each_alone(llm_f32, ours_processor, _sampling(max_tokens=10, prompt_logprobs=None))


def test_chunked_prefill_across_the_window_and_the_chunks(llm_f32, ours_ref, ours_processor):
    """Prompts of 2 to 3 prefill chunks (128 tokens each, 8 windows), run together so each step's budget is
    shared between them, and a 256-token image that straddles chunk boundaries."""
    prompts: list[Prompt] = [(chat_prompt(ours_processor, t), None) for t in random_texts((300, 150), seed=31)]
    prompts.append((chat_prompt(ours_processor, "Describe it. " + random_texts([60], seed=32)[0], n_images=1),
                    [random_image(7, (448, 448))]))
    outs = compare(llm_f32, ours_ref, ours_processor, prompts)
    assert max(len(o.prompt_token_ids) for o in outs) > 2 * F32_CHUNK > 8 * SMALL_WINDOW


def test_preemption_with_recompute(llm_f32, ours_ref, ours_processor):
    """The scheduler preempts one request in the middle of its chunked prefill and one after 3 decoded tokens
    (what it does under memory pressure: slot and ring freed, the request recomputed later from its first
    token); both then decode the reference model's greedy tokens."""
    from vllm import SamplingParams, TokensPrompt

    engine = llm_f32.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    texts = dict(zip(("midprefill", "middecode"), random_texts((300, 40), seed=41)))
    inputs = {name: reference_inputs(ours_processor, chat_prompt(ours_processor, t)) for name, t in texts.items()}
    assert len(inputs["midprefill"].input_ids) > 2 * F32_CHUNK
    ready = {"midprefill": lambda r: 0 < r.num_computed_tokens < r.num_prompt_tokens,
             "middecode": lambda r: r.num_output_tokens >= 3}
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    for name, mm in inputs.items():
        engine.add_request(name, TokensPrompt(prompt_token_ids=mm.input_ids.tolist()), params)
    preempted, outputs = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id.split("-")[0]] = list(out.outputs[0].token_ids)
        for request in list(scheduler.running):
            name = request.request_id.split("-")[0]
            if name in ready and name not in preempted and ready[name](request):
                scheduler.running.remove(request)
                scheduler._preempt_request(request, time.monotonic())
                preempted[name] = request
    assert sorted(preempted) == sorted(ready), "a request finished before it could be preempted"
    for name, mm in inputs.items():
        assert preempted[name].num_preemptions == 1
        assert outputs[name] == ours_ref.generate(mm, GREEDY_TOKENS), name


def test_stream_session_frame_by_frame_equals_one_request_with_everything(llm_f32):
    """tests/test_sessions.py's check on CUDA: 4 frames appended one request each, then a question, answer
    with the greedy tokens of one request holding the frames and the question (chosen-token log-probs within
    1e-3: the two differ only in how the prefill is cut), and the first frame matters."""
    import numpy as np
    from PIL import Image
    from vllm import SamplingParams

    from infinitevl_vllm.serving.session_protocol import FRAME_TOKENS
    from infinitevl_vllm.serving.sessions import StreamSession, oneshot

    def frame(seed: int) -> Image.Image:
        return Image.fromarray((np.random.default_rng(seed).random((448, 448, 3)) * 255).astype("uint8"))

    def chosen_logprobs(out) -> list[float]:
        o = out.outputs[0]
        return [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]

    question, greedy = "What happened?", SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
    frames = [frame(s) for s in range(4)]
    single = oneshot(llm_f32, frames, question, greedy)
    with StreamSession(llm_f32) as s:
        for f in frames:
            s.append([f])
        info = s.info()
        streamed = s.ask(question, greedy)
    assert info["frames"] == 4 and info["tokens"] > 4 * FRAME_TOKENS > SMALL_WINDOW  # the rings wrapped
    assert len(streamed.prompt_token_ids) + info["tokens"] == len(single.prompt_token_ids)
    assert list(streamed.outputs[0].token_ids) == list(single.outputs[0].token_ids)
    torch.testing.assert_close(chosen_logprobs(streamed), chosen_logprobs(single), atol=1e-3, rtol=0)
    other = oneshot(llm_f32, frames[1:], question, greedy)
    assert chosen_logprobs(other) != pytest.approx(chosen_logprobs(single), abs=1e-3)


def test_serving_compiles_none_of_our_kernels_after_start_up(llm_f32, gpu_record):
    """Start-up compiles every variant of our Triton kernels (each token-count class, conv tile height and split
    count): prompts of every length class, alone and batched, longer than a chunk, and decodes at every batch
    size, after all the tests above on this engine, compile none of them again."""
    from vllm import SamplingParams

    g = torch.Generator().manual_seed(41)
    prompts = [{"prompt_token_ids": torch.randint(1000, 100000, (n,), generator=g).tolist()}
               for n in (1, 15, 16, 17, 100, F32_CHUNK + 1, 3 * F32_CHUNK + 7)]
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    for prompt in prompts:  # one at a time: a single sequence's prefill, then batch-1 decode
        llm_f32.generate([prompt], greedy, use_tqdm=False)
    for batch in range(2, 9):  # batched prefill (varlen) and decode at every batch size up to max_num_seqs
        llm_f32.generate([prompts[i % len(prompts)] for i in range(batch)], greedy, use_tqdm=False)
    assert any(e.startswith("infinitevl_kernels") for e in llm_f32.triton_compiles_at_start), "the recorder saw none"
    compiled = llm_f32.triton_compiles_after_start
    ours = sorted({entry for entry in compiled if entry.startswith("infinitevl_kernels")})
    kernels = {entry.split()[0] for entry in ours}
    at_start = sorted({entry for entry in llm_f32.triton_compiles_at_start if entry.split()[0] in kernels})
    gpu_record["triton_compiles_after_start_up"] = {"ours": ours, "all": sorted(set(compiled)),
                                                    "the same kernels at start-up": at_start}
    assert not ours, "compiled while serving:\n" + "\n".join(ours) + "\nat start-up:\n" + "\n".join(at_start)
