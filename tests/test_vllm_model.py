"""InfiniteVL inside vLLM (CPU, float32) equals the reference model.

Tolerance: prompt log-probs agree within 2e-3 absolute (float32 end to end; the two sides
sum in different orders: vLLM's fused QKV/gate-up GEMMs and its attention kernel against the
reference's plain matmuls, so per-logit differences of ~1e-5 relative are expected, and a
log-softmax over 151936 logits of magnitude ~10 amplifies that to ~1e-4). Greedy tokens
are compared exactly.
"""

from __future__ import annotations

import math
import os

import psutil
import pytest
import torch
from conftest import SMALL_WINDOW
from transformers import AutoProcessor
from vllm_helpers import (
    check_batch_of_8_equals_each_alone,
    make_llm,
    prompt_logprobs_of,
    reference_inputs,
    video_frames,
    vllm_prompt,
)

from infinitevl_vllm.checkpoint import load_reference
from infinitevl_vllm.tools.batch_invariance import probe_prompts, probes_alone_and_in_a_batch
from infinitevl_vllm.tools.workloads import chat_prompt, random_image, random_texts

LOGPROB_ATOL = 2e-3
GREEDY_TOKENS = 12


@pytest.fixture(scope="module")
def llm(small_window_ckpt):
    # test functions run in the engine's process (collective_rpc) travel pickled
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    engine = make_llm(small_window_ckpt, max_num_seqs=8, enable_prefix_caching=False)
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"]


@pytest.fixture(scope="session")
def ref(small_window_ckpt):
    return load_reference(small_window_ckpt, dtype=torch.float32)


@pytest.fixture(scope="session")
def processor(small_window_ckpt):
    return AutoProcessor.from_pretrained(small_window_ckpt)


def _sampling(**kw):
    from vllm import SamplingParams

    return SamplingParams(**{"temperature": 0.0, "max_tokens": GREEDY_TOKENS, "prompt_logprobs": 0, **kw})


def _compare(llm, ref, processor, prompt, images=None, video=None):
    out = llm.generate([vllm_prompt(prompt, images, video)], _sampling(), use_tqdm=False)[0]
    mm = reference_inputs(processor, prompt, images, video)
    assert out.prompt_token_ids == mm.input_ids.tolist(), "vLLM and the HF processor tokenised differently"
    ours = torch.tensor(prompt_logprobs_of(out), dtype=torch.float64)
    theirs = ref.prompt_logprobs(mm)
    torch.testing.assert_close(ours, theirs, atol=LOGPROB_ATOL, rtol=0)
    assert list(out.outputs[0].token_ids) == ref.generate(mm, GREEDY_TOKENS)
    return out


@pytest.mark.parametrize("n_words", [3, SMALL_WINDOW * 5])
def test_text_shorter_and_longer_than_window(llm, ref, processor, n_words):
    out = _compare(llm, ref, processor, chat_prompt(processor, random_texts([n_words], seed=n_words)[0]))
    if n_words > 3:
        assert len(out.prompt_token_ids) > 4 * SMALL_WINDOW


def test_one_image(llm, ref, processor):
    _compare(llm, ref, processor, chat_prompt(processor, "Describe it.", n_images=1), images=[random_image(0)])


def test_two_images(llm, ref, processor):
    imgs = [random_image(1, (224, 168)), random_image(2, (168, 280))]
    _compare(llm, ref, processor, chat_prompt(processor, "Compare them.", n_images=2), images=imgs)


def test_short_video(llm, ref, processor):
    _compare(llm, ref, processor, chat_prompt(processor, "What happens?", video=True), video=video_frames(4))


def test_batch_of_8_equals_each_alone(llm, processor):
    check_batch_of_8_equals_each_alone(llm, processor, _sampling(max_tokens=10, prompt_logprobs=None))


def _steady_decode_steps(worker) -> int | None:
    steady = worker.model_runner.__dict__.get("_infinitevl_steady_decode")
    return None if steady is None else steady.reused_steps


def test_steady_decode_steps_reuse_the_last_steps_inputs_and_equal_the_reference(llm, ref, processor):
    """A step that decodes the same requests as the step before advances that step's inputs and metadata
    instead of rebuilding them (model/steady_decode.py). Three requests that stop at different steps (so the
    batch shrinks twice and rebuilds), decoding past the ring's window (so the reused ring starts wrap), give
    the reference's greedy tokens, and most of their decode steps were reused ones."""
    lengths = [3 * SMALL_WINDOW, 2 * SMALL_WINDOW, 5]
    prompts = [chat_prompt(processor, t) for t in random_texts([20, 45, 8], seed=11)]
    (before,) = llm.collective_rpc(_steady_decode_steps)
    outs = llm.generate([vllm_prompt(p) for p in prompts],
                        [_sampling(max_tokens=n, prompt_logprobs=None, ignore_eos=True) for n in lengths],
                        use_tqdm=False)
    (after,) = llm.collective_rpc(_steady_decode_steps)
    assert after - (before or 0) >= max(lengths) // 2, (before, after)
    for prompt, out, n in zip(prompts, outs, lengths):
        assert list(out.outputs[0].token_ids) == ref.generate(reference_inputs(processor, prompt), n)


def _count_gdn_metadata_builds(worker) -> int:
    """In the engine's process: counts, on the worker, each GDN builder's full builds and block-table updates."""
    from infinitevl_vllm.model.vllm_model import InfiniteVLGDNMetadataBuilder

    counts = worker.gdn_metadata_counts = {"build": 0, "update_block_table": 0}
    builders = [g.get_metadata_builder() for groups in worker.model_runner.attn_groups for g in groups]
    builders = [b for b in builders if isinstance(b, InfiniteVLGDNMetadataBuilder)]
    def counted(method, name):
        def call(*args, **kwargs):
            counts[name] += 1
            return method(*args, **kwargs)
        return call

    for builder in builders:
        for name in counts:
            setattr(builder, name, counted(getattr(builder, name), name))
    worker.gdn_metadata_builders = builders
    return len(builders)


def _gdn_metadata_counts(worker) -> dict[str, int]:
    for builder in worker.gdn_metadata_builders:
        del builder.build, builder.update_block_table
    return worker.gdn_metadata_counts


def test_gdn_groups_share_one_metadata_build_a_step(llm, ref, processor):
    """The tiny model's six GDN layers are three KV-cache groups: a step builds their metadata once, and
    re-gathers the two other groups' slots. The results stay the reference's (here, and in the other tests)."""
    assert llm.collective_rpc(_count_gdn_metadata_builds) == [3]
    prompts = [chat_prompt(processor, t) for t in random_texts([30, 50], seed=4)]
    outs = llm.generate([vllm_prompt(p) for p in prompts], _sampling(max_tokens=4, prompt_logprobs=None),
                        use_tqdm=False)
    (counts,) = llm.collective_rpc(_gdn_metadata_counts)
    assert counts["build"] > 0 and counts["update_block_table"] == 2 * counts["build"]
    for prompt, out in zip(prompts, outs):
        mm = reference_inputs(processor, prompt)
        assert list(out.outputs[0].token_ids) == ref.generate(mm, 4)


def test_bfloat16_close_to_reference(small_window_ckpt, ref, processor, llm_bf16):
    """bf16 weights and activations: greedy text may differ late, log-probs agree loosely."""
    prompt = chat_prompt(processor, "Describe it.", n_images=1)
    img = [random_image(0)]
    out = llm_bf16.generate([vllm_prompt(prompt, img)], _sampling(), use_tqdm=False)[0]
    ours = torch.tensor(prompt_logprobs_of(out), dtype=torch.float64)
    theirs = ref.prompt_logprobs(reference_inputs(processor, prompt, img))
    # bf16 keeps 8 mantissa bits (~0.4% per rounding); log-probs here are ~-17 nats, so bf16
    # end to end moves them by ~0.1 (measured 0.11 mean). A wrong layer moves them by nats.
    assert (ours - theirs).abs().mean() < 0.3
    assert torch.corrcoef(torch.stack([ours, theirs]))[0, 1] > 0.99
    assert out.outputs[0].token_ids[0] == ref.generate(reference_inputs(processor, prompt, img), 1)[0]


@pytest.fixture(scope="module")
def llm_bf16(small_window_ckpt):
    """Also the engine with vLLM's defaults for prefix caching and the CPU cache budget."""
    saved = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    try:
        engine = make_llm(small_window_ckpt, dtype="bfloat16", max_num_seqs=32, enable_prefix_caching=None)
    finally:
        if saved is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_bfloat16_probes_keep_their_tokens_alone_and_in_a_batch_of_32(llm_bf16, processor):
    """The GPU suite's batch-invariance probes (tests/gpu/test_bf16.py) on the CPU engine, whose products and
    per-sequence attention and GDN sum each sequence the same way at any batch size: every probe's prefill is
    the same bit for bit alone and in the batch, and so are its 16 greedy tokens (ties included)."""
    probes, fillers = probe_prompts(processor)
    result = probes_alone_and_in_a_batch(llm_bf16, probes, fillers)
    assert [p["prompt_logprob_drift_max"] for p in result["per_probe"]] == [0.0] * 4
    assert result["fraction_identical"] == 1.0, result["per_probe"]


def test_prefix_caching_is_refused_and_budget_defaults(llm_bf16):
    cache = llm_bf16.llm_engine.vllm_config.cache_config
    assert cache.enable_prefix_caching is False
    assert 1 << 30 <= cache.kv_cache_memory_bytes <= psutil.virtual_memory().total // 4


def test_reused_cache_blocks_never_leak_between_sequences(llm_bf16, processor):
    """A block that held another sequence's state (or KV) must not change a later result: the same
    prompt before and after other traffic gives the same, finite log-probs and tokens."""
    text = vllm_prompt(chat_prompt(processor, "word " * 40))
    first = llm_bf16.generate([text], _sampling(), use_tqdm=False)[0]
    image = vllm_prompt(chat_prompt(processor, "Describe it.", n_images=1), [random_image(9)])
    llm_bf16.generate([image, vllm_prompt(chat_prompt(processor, "other " * 300))], _sampling(), use_tqdm=False)
    again = llm_bf16.generate([text], _sampling(), use_tqdm=False)[0]
    lp1, lp2 = prompt_logprobs_of(first), prompt_logprobs_of(again)
    assert all(math.isfinite(x) for x in lp1 + lp2)
    assert lp1 == lp2
    assert first.outputs[0].token_ids == again.outputs[0].token_ids


def test_broken_checkpoint_fails_before_engine_start(tmp_path, tiny_ckpt):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.5.self_attn.v_conv1d.weight"] = torch.zeros(7, 1, 4)
    save_file(tensors, shard)
    # vLLM wraps it in its config validation error (a ValueError) with our line as the reason.
    with pytest.raises(ValueError, match=r"model-00001-of-00001\.safetensors: tensor "
                                         r"model\.layers\.5\.self_attn\.v_conv1d\.weight has shape \[7, 1, 4\]"):
        make_llm(broken)


def test_the_swa_mrope_op_rotates_what_the_cpu_path_rotates(tiny_ckpt, monkeypatch):
    """On CUDA the SWA layers rotate q and k through the custom op ``infinitevl_mrope_qk``, whose Triton kernel makes
    the angles from the step's ``MRoPE.kernel_inputs`` (the kernel itself is checked under Triton's interpreter,
    tests/triton, and at the 4B shapes on a GPU). Here the kernel is a torch stand-in, so this checks the op's seam:
    the positions and the module's frequency buffers reach it in the order the kernel takes them, with the head
    counts, and q and k come back where the CPU path (one cos/sin table a step) puts them."""
    from infinitevl_kernels.rope import apply_rope, mrope_cos_sin

    from infinitevl_vllm.checkpoint import load_config
    from infinitevl_vllm.model import vllm_model

    cfg = load_config(tiny_ckpt).text_config
    heads, kv_heads, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rope = vllm_model.MRoPE(cfg)

    def stand_in(qkv, h, kvh, head_dim, positions, inv_freq, rows):  # mrope_qk in torch, from the same inputs
        half = positions.double()[rows] * inv_freq[:, None]
        emb = torch.cat([half, half]).t()
        qk = qkv[:, : (h + kvh) * head_dim].reshape(-1, h + kvh, head_dim)
        return apply_rope(qk, emb.cos().float(), emb.sin().float()).reshape(qkv.shape[0], -1)

    monkeypatch.setattr(vllm_model, "mrope_qk", stand_in)
    g = torch.Generator().manual_seed(8)
    T = 6
    qkv = torch.randn(T, (heads + 2 * kv_heads) * D, generator=g)
    positions = torch.randint(0, 10**5, (3, T + 2), generator=g)[:, :T]  # a view of a wider buffer, as vLLM's
    qk = torch.ops.vllm.infinitevl_mrope_qk(qkv, *rope.kernel_inputs(positions), heads, kv_heads, D)
    q, k = vllm_model.rotate_qk(qkv, rope(positions, qkv.dtype), heads, kv_heads, D)  # the CPU path
    torch.testing.assert_close(qk, torch.cat([q, k], dim=1), rtol=1e-6, atol=1e-6)
    cos, sin = (t.float() for t in mrope_cos_sin(positions, D, rope.theta, rope.section))
    torch.testing.assert_close(q.view(T, heads, D), apply_rope(qkv[:, : heads * D].view(T, heads, D), cos, sin))
