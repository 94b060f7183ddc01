"""Does a sequence get the same tokens alone as inside a batch? Probes run alone and among fillers in one batch,
on any `vllm.LLM` (ours or a Transformer twin), for the GPU suite's bf16 bar (tests/gpu/test_bf16.py) and for
benchmarks/batch_invariant_mode.py.

bf16 kernels are not batch-invariant by default (a product may sum in another order at another batch size), so
a changed token says little without how far it led its runner-up alone, and whether the prefill already
differed: both are recorded for each probe.
"""

from __future__ import annotations

from typing import Any

import torch

from .workloads import batch_invariance_questions, chat_prompt

Prompt = tuple[str, list | None]  # a chat-formatted prompt string and its images
PROBE_POSITIONS = (0, 9, 20, 31)  # where the 4 probes sit in the batch of 32
PROBE_TOKENS = 16


def vllm_request(prompt: str, images: list | None = None) -> dict:
    """A vLLM prompt dict (one image is passed alone, as vLLM's examples do)."""
    if not images:
        return {"prompt": prompt}
    return {"prompt": prompt, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}


def prompt_logprobs_of(output) -> list[float]:
    """log p(token_t | <t) for t >= 1 from a vLLM RequestOutput with prompt_logprobs=0."""
    return [lp[t].logprob for t, lp in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:])]


def prompt_logprobs(llm, prompts: list[Prompt]) -> list[tuple[list[int], torch.Tensor]]:
    """(prompt token ids, log p(token_t | <t) for t >= 1) of each prompt, all in one batch."""
    from vllm import SamplingParams

    outs = llm.generate([vllm_request(*p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [(list(o.prompt_token_ids), torch.tensor(prompt_logprobs_of(o), dtype=torch.float64)) for o in outs]


def greedy_tokens(llm, prompts: list[Prompt], max_tokens: int) -> list[list[int]]:
    """Greedy continuations (exactly max_tokens each: EOS ignored), all prompts in one batch."""
    from vllm import SamplingParams

    outs = llm.generate([vllm_request(*p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def greedy_margins(llm, prompt: Prompt, max_tokens: int) -> tuple[list[int], list[float]]:
    """One prompt's greedy continuation and, at each token, how far (nats) it led the runner-up: a batch that
    changes a token where that lead is within bf16's noise says nothing about the batching code."""
    from vllm import SamplingParams

    (out,) = llm.generate([vllm_request(*prompt)], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                  ignore_eos=True, logprobs=2), use_tqdm=False)
    tokens = list(out.outputs[0].token_ids)
    leads = []
    for token, top in zip(tokens, out.outputs[0].logprobs):
        others = [lp.logprob for t, lp in top.items() if t != token]
        leads.append(float(top[token].logprob - max(others)) if others else float("inf"))
    return tokens, leads


def probe_prompts(processor) -> tuple[list[Prompt], list[Prompt]]:
    """(probes, fillers) of `batch_invariance_questions`, chat-formatted by `processor`."""
    probes, fillers = ([(chat_prompt(processor, t, n_images=len(images)), images or None) for t, images in part]
                       for part in batch_invariance_questions())
    return probes, fillers


def probes_alone_and_in_a_batch(llm, probes: list[Prompt], fillers: list[Prompt],
                                tokens: int = PROBE_TOKENS) -> dict[str, Any]:
    """The fraction of probes whose greedy tokens inside the batch (probes at PROBE_POSITIONS among the fillers)
    equal their tokens run alone, and for each probe: where the two first differ, how far the alone run's token
    led its runner-up there and at its closest, and how far the batch moved its prompt log-probs (0 when the
    prefill is bit-exact)."""
    batch = list(fillers)
    for pos, probe in zip(PROBE_POSITIONS, probes):
        batch.insert(pos, probe)
    together = greedy_tokens(llm, batch, tokens)
    lps_together = prompt_logprobs(llm, batch)
    details = []
    for pos, probe in zip(PROBE_POSITIONS, probes):
        alone, leads = greedy_margins(llm, probe, tokens)
        first = next((i for i, (a, b) in enumerate(zip(alone, together[pos])) if a != b), None)
        ((_, lps_alone),) = prompt_logprobs(llm, [probe])
        drift = (lps_alone - lps_together[pos][1]).abs()
        details.append({"first_difference": first, "alone_lead_nats": None if first is None else leads[first],
                        "alone_min_lead_nats": min(leads), "prompt_logprob_drift_max": float(drift.max()),
                        "prompt_logprob_drift_mean": float(drift.mean())})
    return {"probes": len(probes), "batch": len(batch), "greedy_tokens": tokens,
            "fraction_identical": sum(d["first_difference"] is None for d in details) / len(probes),
            "per_probe": details}
