"""One sequence of 1,000,000 tokens through the engine on CPU: it runs (no length limit), and the
engine's memory stays flat along the way. Slow (about 10 minutes on 2 cores): `make test-slow`."""

from __future__ import annotations

import pytest

TOKENS = 1_000_000


@pytest.mark.slow
def test_one_million_tokens_with_flat_rss(tiny_ckpt):
    from vllm_helpers import make_llm

    from infinitevl_vllm.tools.workloads import CHUNK, GENERATED, stream_one_sequence

    llm = make_llm(tiny_ckpt, max_num_seqs=1, max_model_len=TOKENS + GENERATED, max_num_batched_tokens=CHUNK,
                   enable_chunked_prefill=True, limit_mm_per_prompt={"image": 0, "video": 0})
    try:
        run = stream_one_sequence(llm, TOKENS)
    finally:
        llm.llm_engine.engine_core.shutdown()
    samples = [rss for _, rss in run["rss_samples"]]
    assert len(samples) > 100
    first_tenth = max(samples[: len(samples) // 10])
    assert max(samples) <= 1.05 * first_tenth, (
        f"RSS grew from {first_tenth / 2**30:.2f} GiB in the first tenth to {max(samples) / 2**30:.2f} GiB")
    assert run["decode_ms_per_token"] > 0
