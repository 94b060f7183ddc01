"""10,000 frames (2.56 M tokens) through one streaming session on CPU: memory stays flat and the
session answers along the way. Slow (about 20 min on 2 idle cores): `make test-slow`. The same run with numbers
along the stream: benchmarks/stream_session.py -> benchmarks/results/stream_session.json."""

from __future__ import annotations

import os

import pytest

FRAMES = 10_000


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)  # ~20 min on 2 idle cores; much more on a shared machine
def test_ten_thousand_frames_through_one_session_with_flat_rss(tiny_ckpt):
    from vllm_helpers import make_llm

    from infinitevl_vllm.tools.workloads import run_stream

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = make_llm(tiny_ckpt, max_num_seqs=2, limit_mm_per_prompt={"image": 8, "video": 0})
        run = run_stream(llm, FRAMES, every=250, batch=8, log=lambda line: None)
    finally:
        import vllm.envs

        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        vllm.envs.disable_envs_cache()
    points = run["points"]
    assert run["final_frames"] == FRAMES
    assert all(p["answer_tokens"] > 0 for p in points)  # a question after every 250 frames was answered
    assert len({p["state_bytes"] for p in points}) == 1  # the session's state never grows
    first_tenth = max(p["rss_bytes"] for p in points[: len(points) // 10])
    assert max(p["rss_bytes"] for p in points) <= 1.05 * first_tenth, (
        f"RSS grew from {first_tenth / 2**30:.2f} GiB in the first tenth to "
        f"{max(p['rss_bytes'] for p in points) / 2**30:.2f} GiB")
