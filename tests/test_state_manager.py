"""The state manager: every sequence holds one recurrent slot and one KV ring, fixed at admission,
freed at the end, never shared, never read by another sequence; lengths cost nothing extra.

These tests drive one engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that they can
look at the scheduler's block pool between steps and poison the cache memory.
"""

from __future__ import annotations

import itertools
import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from infinitevl_vllm.config import InfiniteVLConfig
from infinitevl_vllm.model import state_size

SLOTS = 3
MAX_TOKENS = 10
CHUNK_SIZES = [1, 7, 16, 33, 48]  # scheduler token budgets per step: around and across the 16-token window


@pytest.fixture(scope="module")
def engine(small_window_ckpt):
    from vllm import envs
    from vllm_helpers import make_llm

    cfg = InfiniteVLConfig.from_pretrained(small_window_ckpt).text_config
    block_size = 128  # vLLM's hybrid block for the tiny model (a page holds one GDN state)
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING",)}
    threads = torch.get_num_threads()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = make_llm(small_window_ckpt, max_num_seqs=4, max_num_batched_tokens=max(CHUNK_SIZES),
                   enable_chunked_prefill=True, max_model_len=1_000_000,
                   num_gpu_blocks_override=SLOTS * state_size.blocks_per_sequence(cfg, block_size) + 1)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        envs.disable_envs_cache()  # the in-process engine froze vLLM's env reads
        torch.set_num_threads(threads)


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def _managers(llm):
    return _core(llm).scheduler.kv_cache_manager.coordinator.single_type_managers


def _external(request_id: str) -> str:
    return request_id.rsplit("-", 1)[0]  # the engine appends "-<random>" to the id a caller gives


def _running(scheduler, req_id: str):
    return next((r for r in scheduler.running if _external(r.request_id) == req_id), None)


def _held_blocks(llm) -> dict[str, list[int]]:
    """Block ids each request holds, by the id the caller gave it."""
    held: dict[str, list[int]] = {}
    for manager in _managers(llm):
        for req_id, blocks in manager.req_to_blocks.items():
            held.setdefault(_external(req_id), []).extend(b.block_id for b in blocks)
    return held


def _check_pool(llm) -> None:
    """No block is held twice, each live sequence holds exactly its slot and ring, and every block
    is either free or held."""
    from infinitevl_vllm.model.state_manager import RingKVSpec

    held = _held_blocks(llm)
    ids = [b for blocks in held.values() for b in blocks]
    assert len(ids) == len(set(ids)), "two live sequences share a block"
    for manager in _managers(llm):
        want = manager.kv_cache_spec.ring_blocks if isinstance(manager.kv_cache_spec, RingKVSpec) else 1
        for req_id, blocks in manager.req_to_blocks.items():
            assert len(blocks) in (0, want), f"{req_id} holds {len(blocks)} blocks of a {want}-block group"
    pool = _core(llm).scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() + len(ids) == pool.num_gpu_blocks - 1  # block 0 is vLLM's null block


def _run_alone(llm, prompt: list[int], cache: dict) -> list[int]:
    from vllm import SamplingParams, TokensPrompt

    key = tuple(prompt)
    if key not in cache:
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                           SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
        cache[key] = list(out[0].outputs[0].token_ids)
    return cache[key]


_ids = itertools.count()
_alone: dict = {}

request_st = st.fixed_dictionaries({
    "length": st.integers(1, 90),
    "max_tokens": st.integers(1, MAX_TOKENS),
    "arrival": st.integers(0, 8),
    "abort_at": st.one_of(st.none(), st.integers(1, 20)),
    "preempt_at": st.one_of(st.none(), st.integers(1, 20)),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(requests=st.lists(request_st, min_size=1, max_size=6),
       chunks=st.lists(st.sampled_from(CHUNK_SIZES), min_size=1, max_size=8))
def test_random_schedules_leak_nothing_share_nothing_and_match_each_sequence_alone(engine, requests, chunks):
    from vllm import SamplingParams, TokensPrompt

    llm_engine, scheduler = engine.llm_engine, _core(engine).scheduler
    budget = scheduler.max_num_scheduled_tokens
    prompts, outputs, aborted, preempted = {}, {}, set(), set()
    pending = sorted(((r["arrival"], str(next(_ids)), r) for r in requests), key=lambda x: x[0])
    try:
        for step in itertools.count():
            while pending and pending[0][0] <= step:
                _, req_id, r = pending.pop(0)
                g = torch.Generator().manual_seed(r["seed"])
                prompts[req_id] = (torch.randint(1000, 50000, (r["length"],), generator=g).tolist(), r)
                llm_engine.add_request(req_id, TokensPrompt(prompt_token_ids=prompts[req_id][0]),
                                       SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True))
            for req_id, (_, r) in prompts.items():
                if r["abort_at"] == step and req_id not in outputs:
                    llm_engine.abort_request([req_id])
                    aborted.add(req_id)
                live = _running(scheduler, req_id)
                if r["preempt_at"] == step and live is not None:  # what the scheduler does under pressure
                    scheduler.running.remove(live)
                    scheduler._preempt_request(live, time.monotonic())
                    preempted.add(req_id)
            scheduler.max_num_scheduled_tokens = chunks[step % len(chunks)]
            for out in llm_engine.step():
                if out.finished:
                    outputs[out.request_id] = list(out.outputs[0].token_ids)
            _check_pool(engine)
            if not pending and not llm_engine.has_unfinished_requests():
                break
    finally:
        scheduler.max_num_scheduled_tokens = budget
    assert _held_blocks(engine) == {} or all(not b for b in _held_blocks(engine).values()), "blocks leaked"
    for req_id, (prompt, r) in prompts.items():
        if req_id in aborted and req_id not in outputs:
            continue
        assert outputs[req_id] == _run_alone(engine, prompt, _alone)[: r["max_tokens"]], f"request {r}"
    event(f"preempted {len(preempted)}, aborted {len(aborted)}")


def test_preemption_and_abort_free_slot_and_ring_at_once(engine):
    """A preempted sequence gives back all its blocks in that step and, recomputed, the same tokens;
    an aborted one gives back all its blocks at once."""
    from vllm import SamplingParams, TokensPrompt

    llm_engine, scheduler = engine.llm_engine, _core(engine).scheduler
    prompt = [3000 + (7 * j) % 4000 for j in range(60)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = _run_alone(engine, prompt, _alone)[:8]
    llm_engine.add_request("victim", TokensPrompt(prompt_token_ids=prompt), params)
    llm_engine.add_request("aborted", TokensPrompt(prompt_token_ids=prompt[:30]), params)
    while len([r for r in scheduler.running if r.num_computed_tokens]) < 2:
        llm_engine.step()
    held = _held_blocks(engine)
    assert len(held["victim"]) == len(held["aborted"]) > 1
    victim = _running(scheduler, "victim")
    scheduler.running.remove(victim)
    scheduler._preempt_request(victim, time.monotonic())
    llm_engine.abort_request(["aborted"])
    assert not any(_held_blocks(engine).values()), "preempted or aborted blocks still held"
    out = None
    while llm_engine.has_unfinished_requests():
        out = next((o for o in llm_engine.step() if o.finished), out)
        _check_pool(engine)
    assert victim.num_preemptions == 1
    assert list(out.outputs[0].token_ids) == alone


def test_admission_is_by_slot_count_whatever_the_lengths(engine):
    """With SLOTS slots, SLOTS+2 sequences of very different lengths: at most SLOTS run at once, the
    others wait for a slot (no preemption), and all finish."""
    from vllm import SamplingParams, TokensPrompt

    llm_engine, scheduler = engine.llm_engine, _core(engine).scheduler
    lengths = [3, 500, 40, 1200, 9]
    for i, n in enumerate(lengths):
        llm_engine.add_request(f"adm{i}", TokensPrompt(prompt_token_ids=[1000 + (j % 5000) for j in range(n)]),
                               SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    most, done = 0, set()
    while llm_engine.has_unfinished_requests():
        done |= {o.request_id for o in llm_engine.step() if o.finished}
        most = max(most, len(scheduler.running))
        _check_pool(engine)
    assert most == SLOTS
    assert done == {f"adm{i}" for i in range(len(lengths))}


def test_pool_matches_the_documented_bytes_per_sequence(engine, small_window_ckpt):
    """docs: page = block_size * 2 * kv_heads * head_dim * dtype bytes; a sequence holds one page per
    GDN layer and ceil(W / block_size) + 1 pages per SWA layer."""
    from infinitevl_vllm.model.state_manager import StatePool

    core = _core(engine)
    kv_config = core.scheduler.kv_cache_config
    actual = StatePool.from_kv_cache_config(kv_config)
    from_config = StatePool.from_vllm_config(core.vllm_config)
    assert actual == from_config
    assert actual.slots == SLOTS
    cfg = InfiniteVLConfig.from_pretrained(small_window_ckpt).text_config
    page = 128 * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # float32 engine
    assert actual.bytes_per_sequence == page * (len(cfg.swa_layers) * (math.ceil(16 / 128) + 1) + len(cfg.gdn_layers))
    # ... and it is what the allocation holds: every layer's cache tensor is num_blocks pages
    runner = core.model_executor.driver_worker.worker.model_runner
    for tensor in runner.kv_caches:
        for t in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
            assert t.shape[0] == kv_config.num_blocks
            assert t[0].numel() * t.element_size() <= page


def test_no_sequence_reads_state_it_did_not_write(engine):
    """Fill the whole state pool with NaN: results stay finite and equal, because a new sequence's
    recurrent state starts from zero without reading its slot and its ring is read only where it
    has written."""
    from vllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(range(2000, 2000 + n))) for n in (5, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
    before = engine.generate(prompts, params, use_tqdm=False)
    runner = _core(engine).model_executor.driver_worker.worker.model_runner
    poisoned = 0
    for layer in runner.compilation_config.static_forward_context.values():
        cache = getattr(layer, "kv_cache", None)
        for part in cache if isinstance(cache, (list, tuple)) else [cache] if cache is not None else []:
            if part.is_floating_point():
                part.fill_(math.nan)
                poisoned += 1
    assert poisoned >= 8  # 2 rings + 6 GDN layers x (conv, recurrent)
    after = engine.generate(prompts, params, use_tqdm=False)
    for a, b in zip(before, after):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        lp_a = [next(iter(d.values())).logprob for d in a.prompt_logprobs[1:]]
        lp_b = [next(iter(d.values())).logprob for d in b.prompt_logprobs[1:]]
        assert all(math.isfinite(x) for x in lp_b) and lp_a == lp_b
