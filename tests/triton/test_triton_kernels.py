"""The Triton kernels against their torch references, on CPU through TRITON_INTERPRET=1 (small shapes).

The same comparisons run on the GPU inside benchmarks/gpu_h100.py at the real shapes.
"""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from infinitevl_kernels.gdn.batch import GDNBatch, GDNLayer, GDNShape, gdn_decode_batch, gdn_forward_batch  # noqa: E402
from infinitevl_kernels.gdn.triton_batch import gdn_decode_slots, gdn_prefill_varlen  # noqa: E402
from infinitevl_kernels.swa.triton_ring import (  # noqa: E402
    swa_paged_decode,
    swa_paged_decode_ref,
    swa_paged_forward,
    swa_paged_prefill,
    swa_paged_prefill_ref,
)

SHAPE = GDNShape(num_heads=2, head_k_dim=16, head_v_dim=32)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def offsets(lens: list[int]) -> list[int]:
    """Each packed sequence's first row, and the total at the end (cu_seqlens / query_start_loc)."""
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu


def random_qkv(T: int, Hq: int, Hkv: int, D: int, g: torch.Generator):
    return (torch.randn(T, Hq, D, generator=g), torch.randn(T, Hkv, D, generator=g),
            torch.randn(T, Hkv, D, generator=g))


def gdn_pools(slots: int, g: torch.Generator):
    C = 2 * SHAPE.key_dim + SHAPE.value_dim
    conv = torch.randn(slots, C, 3, generator=g)
    ssm = torch.randn(slots, SHAPE.num_heads, SHAPE.head_v_dim, SHAPE.head_k_dim, generator=g) * 0.3
    params = dict(
        conv_weight=torch.randn(C, 4, generator=g) * 0.5,
        A_log=torch.rand(SHAPE.num_heads, generator=g),
        dt_bias=torch.randn(SHAPE.num_heads, generator=g),
    )
    return conv, ssm, params


def test_gdn_decode_updates_only_its_slots_in_place():
    g = torch.Generator().manual_seed(1)
    conv, ssm, params = gdn_pools(6, g)
    B, C = 3, conv.shape[1]
    slots = torch.tensor([4, 0, 2])
    x = torch.randn(B, C, generator=g)
    a, b = torch.randn(B, SHAPE.num_heads, generator=g), torch.randn(B, SHAPE.num_heads, generator=g)
    conv_ref, ssm_ref = conv.clone(), ssm.clone()
    conv_ptr, ssm_ptr = conv.data_ptr(), ssm.data_ptr()
    o = gdn_decode_slots(x, a, b, GDNLayer(conv_state=conv, ssm_state=ssm, shape=SHAPE, **params), slots=slots)
    o_ref = gdn_decode_batch(x.double(), a.double(), b.double(),  # the torch reference, in float64
                             GDNLayer(conv_state=conv_ref, ssm_state=ssm_ref, shape=SHAPE, **params), slots=slots)
    assert conv.data_ptr() == conv_ptr and ssm.data_ptr() == ssm_ptr
    assert rel(o, o_ref) < 1e-5
    assert rel(conv, conv_ref) < 1e-6 and rel(ssm, ssm_ref) < 1e-5
    untouched = [1, 3, 5]
    assert torch.equal(conv[untouched], conv_ref[untouched]) and torch.equal(ssm[untouched], ssm_ref[untouched])


def test_gdn_decode_reads_a_transposed_conv_pool_view():
    """vLLM may hand the conv pool as a transposed view; the kernel follows strides."""
    g = torch.Generator().manual_seed(2)
    conv, ssm, params = gdn_pools(3, g)
    conv_t = conv.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    slots = torch.tensor([2, 1])
    x = torch.randn(2, conv.shape[1], generator=g)
    a, b = torch.randn(2, SHAPE.num_heads, generator=g), torch.randn(2, SHAPE.num_heads, generator=g)
    o1 = gdn_decode_slots(x, a, b, GDNLayer(conv_state=conv, ssm_state=ssm.clone(), shape=SHAPE, **params), slots=slots)
    o2 = gdn_decode_slots(x, a, b, GDNLayer(conv_state=conv_t, ssm_state=ssm.clone(), shape=SHAPE, **params),
                          slots=slots)
    assert rel(o1, o2) < 1e-6 and torch.allclose(conv, conv_t)


@pytest.mark.parametrize("lens,init", [([5, 1, 9], [True, False, True]), ([2, 3], [False, True])])
def test_gdn_prefill_varlen_from_each_slot(lens, init):
    g = torch.Generator().manual_seed(3)
    conv, ssm, params = gdn_pools(5, g)
    cu = offsets(lens)
    slots = [3, 0, 4][: len(lens)]
    T, C = cu[-1], conv.shape[1]
    x = torch.randn(T, C, generator=g)
    a, b = torch.randn(T, SHAPE.num_heads, generator=g), torch.randn(T, SHAPE.num_heads, generator=g)
    conv_ref, ssm_ref = conv.clone(), ssm.clone()
    o = gdn_prefill_varlen(
        x, a, b, GDNLayer(conv_state=conv, ssm_state=ssm, shape=SHAPE, **params), slots=torch.tensor(slots),
        has_initial_state=torch.tensor(init), cu_seqlens=torch.tensor(cu), max_len=max(lens),
    )
    o_ref = torch.empty(T, SHAPE.num_heads, SHAPE.head_v_dim, dtype=torch.float64)
    gdn_forward_batch(  # the torch reference, in float64
        x.double(), a.double(), b.double(), GDNLayer(conv_state=conv_ref, ssm_state=ssm_ref, shape=SHAPE, **params),
        batch=GDNBatch(cu, slots, init, num_decodes=0), out=o_ref,
    )
    assert rel(o, o_ref) < 1e-4
    assert rel(conv, conv_ref) < 1e-6 and rel(ssm, ssm_ref) < 1e-4


def paged_ring(seqs: int, window: int, block: int, hkv: int, d: int, g: torch.Generator, dtype=torch.float32):
    """A NaN-filled paged cache with one random ring per sequence (random values in its pages).

    Pages owned by no sequence stay NaN, so a wrong block-table lookup shows up in the output."""
    rb = math.ceil(window / block) + 1
    num_blocks = seqs * rb + 3
    cache = torch.full((num_blocks, hkv, block, 2 * d), math.nan, dtype=dtype)
    table = torch.randperm(num_blocks, generator=g)[: seqs * rb].view(seqs, rb)
    cache[table.flatten()] = torch.randn(seqs * rb, hkv, block, 2 * d, generator=g).to(dtype)
    return cache, table


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))


@pytest.mark.parametrize("window,block,nsplit,Hq,D", [(8, 4, 2, 4, 16), (8, 3, 1, 4, 16), (40, 7, 4, 4, 16),
                                                       (16, 16, 3, 4, 16), (64, 16, 8, 8, 64)])
def test_swa_paged_decode_matches_ring_reference(window, block, nsplit, Hq, D):
    """Against ring.py's reference, split and merged; the last case merges head_dim in two slices, 4 heads a group."""
    g = torch.Generator().manual_seed(4)
    Hkv = 2
    positions = [0, 5, window - 1, window, 100, 3 * window + 1]  # fresh, short, full, first wrap, wrapped
    B = len(positions)
    cache, table = paged_ring(B, window, block, Hkv, D, g)
    q = torch.randn(B, Hq, D, generator=g)
    kn, vn = torch.randn(B, Hkv, D, generator=g), torch.randn(B, Hkv, D, generator=g)
    ref_cache = cache.clone()
    o = swa_paged_decode(q, kn, vn, cache, table.int(), torch.tensor(positions), window, nsplit=nsplit)
    o_ref = swa_paged_decode_ref(q, kn, vn, ref_cache, table, positions, window)
    assert rel(o, o_ref) < 1e-5
    assert same(cache, ref_cache), "ring contents differ from ring.py's"


def test_swa_paged_decode_sees_nothing_outside_the_window():
    """Poison every ring row outside the window: the output must not change."""
    g = torch.Generator().manual_seed(5)
    window, block, Hq, Hkv, D = 6, 4, 2, 1, 16
    cache, table = paged_ring(1, window, block, Hkv, D, g)
    cap = table.shape[1] * block
    p = 23
    q = torch.randn(1, Hq, D, generator=g)
    kn, vn = torch.randn(1, Hkv, D, generator=g), torch.randn(1, Hkv, D, generator=g)
    poisoned = cache.clone()
    inside = {t % cap for t in range(p - window + 1, p)}
    for r in set(range(cap)) - inside:
        poisoned[table[0, r // block], :, r % block] = math.nan
    args = (table, torch.tensor([p]), window)
    o1 = swa_paged_decode(q, kn, vn, cache, *args, nsplit=2)
    o2 = swa_paged_decode(q, kn, vn, poisoned, *args, nsplit=2)
    assert torch.isfinite(o2).all() and rel(o2, o1) < 1e-6


@pytest.mark.parametrize("window,block,nsplit", [(8, 3, 1), (16, 5, 3), (16, 16, 2)])
def test_swa_paged_prefill_matches_ring_reference(window, block, nsplit):
    g = torch.Generator().manual_seed(6)
    Hq, Hkv, D = 4, 2, 16
    # fresh and longer than the ring; a few after many; mid-window; a single token; empty
    lens, starts = [41, 3, 9, 1, 0], [0, 30, 5, 12, 7]
    cu = offsets(lens)
    cache, table = paged_ring(len(lens), window, block, Hkv, D, g)
    q, k, v = random_qkv(cu[-1], Hq, Hkv, D, g)
    ref_cache = cache.clone()
    o = swa_paged_prefill(q, k, v, cache, table, torch.tensor(cu), torch.tensor(starts), max(lens), window,
                          nsplit=nsplit)
    o_ref = swa_paged_prefill_ref(q, k, v, ref_cache, table, cu, starts, window)
    assert rel(o, o_ref) < 1e-5
    assert same(cache, ref_cache), "ring contents differ from ring.py's"


def test_swa_paged_prefill_then_decode_equals_one_long_attention():
    """Chunk boundaries are invisible: prefill in pieces plus decodes = attention over the whole sequence."""
    g = torch.Generator().manual_seed(7)
    window, block, Hq, Hkv, D, T = 8, 3, 2, 1, 16, 40
    q, k, v = random_qkv(T, Hq, Hkv, D, g)
    cache, table = paged_ring(1, window, block, Hkv, D, g)
    outs = []
    for s, e in [(0, 11), (11, 12), (12, 30)]:
        outs.append(swa_paged_prefill(q[s:e], k[s:e], v[s:e], cache, table, torch.tensor([0, e - s]),
                                      torch.tensor([s]), e - s, window, nsplit=2))
    for t in range(30, T):
        outs.append(swa_paged_decode(q[t : t + 1], k[t : t + 1], v[t : t + 1], cache, table, torch.tensor([t]),
                                     window, nsplit=2))
    pos = torch.arange(T)
    from infinitevl_kernels import sliding_window_attention

    ref = sliding_window_attention(q.double(), k.double(), v.double(), pos, pos, window)
    assert rel(torch.cat(outs), ref) < 1e-5


def test_swa_paged_forward_mixed_vllm_batch():
    """What RingAttentionImpl runs on CUDA: decodes first, then prefills and an empty request."""
    g = torch.Generator().manual_seed(8)
    window, block, Hq, Hkv, D = 8, 3, 4, 2, 16
    lens, starts = [1, 1, 6, 0, 13], [9, 2, 4, 3, 0]
    qsl = offsets(lens)
    cache, table = paged_ring(len(lens), window, block, Hkv, D, g)
    q, k, v = random_qkv(qsl[-1], Hq, Hkv, D, g)
    ref_cache = cache.clone()
    out = torch.full_like(q, math.nan)
    # key and value as views of one fused projection (their strides differ from a roped key's)
    kv = torch.cat([k, v], dim=-1)
    k_rope, v_view = k.clone(), kv[..., D:]
    prefill_qsl = torch.tensor(qsl[2:]) - qsl[2]
    swa_paged_forward(q, k_rope, v_view, cache, table.int(), torch.tensor(starts, dtype=torch.int32), 2,
                      prefill_qsl, max(lens[2:]), window, D**-0.5, out)
    want = swa_paged_prefill_ref(q, k, v, ref_cache, table, qsl, starts, window)
    assert rel(out, want) < 1e-5 and same(cache, ref_cache)


def test_swa_paged_ring_smaller_than_window_is_refused():
    cache = torch.zeros(4, 1, 3, 32)
    q = torch.zeros(1, 2, 16)
    kv = torch.zeros(1, 1, 16)
    with pytest.raises(ValueError, match="cannot hold a window"):
        swa_paged_decode(q, kv, kv, cache, torch.tensor([[0, 1]]), torch.tensor([0]), 8)


@pytest.mark.parametrize("T", [1, 3])  # one matrix-vector pass, and a norm launch + torch's product
@pytest.mark.parametrize("N,K", [(37, 40), (16, 64)])  # ragged and even tiles
def test_fused_matvecs_match_torch(N, K, T):
    from infinitevl_kernels.triton_ops import add_rmsnorm_ref, linear, norm_linear, rmsnorm_ref, silu_linear

    g = torch.Generator().manual_seed(9)
    x, h = torch.randn(T, K, generator=g), torch.randn(T, K, generator=g)
    w, bias, nw = torch.randn(N, K, generator=g), torch.randn(N, generator=g), torch.rand(K, generator=g) + 0.5
    x0 = x.clone()
    y, x_new = norm_linear(x, h, nw, 1e-6, w, bias)
    assert torch.equal(x, x0), "x stays as it was (at batch 1 every program of the fused pass reads it)"
    assert rel(x_new, x0 + h) < 1e-7
    assert rel(y, rmsnorm_ref(x0 + h, nw, 1e-6) @ w.t() + bias) < 1e-5
    y, stream = norm_linear(x, None, nw, 1e-6, w)  # the first layer: its stream starts as a copy of its input
    assert stream.data_ptr() != x.data_ptr() and torch.equal(stream, x)
    assert rel(y, rmsnorm_ref(x, nw, 1e-6) @ w.t()) < 1e-5
    assert rel(linear(x, w), x @ w.t()) < 1e-5
    rows = torch.full((T + 2, N), float("nan"))
    out = linear(x, w, bias, out=rows[1 : T + 1])  # a block of an op's output rows, as the GDN layer passes
    assert out.data_ptr() == rows[1].data_ptr() and rel(out, x @ w.t() + bias) < 1e-5
    assert rows[0].isnan().all() and rows[T + 1].isnan().all()
    gu = torch.randn(T, 2 * K, generator=g)
    assert rel(silu_linear(gu, w), (torch.nn.functional.silu(gu[:, :K]) * gu[:, K:]) @ w.t()) < 1e-5
    # bf16, rounded as vLLM's fused add + RMSNorm: the float32 sum is normed, the stream keeps it rounded
    xb, hb, nwb, wb = x.bfloat16(), h.bfloat16(), nw.bfloat16(), w.bfloat16()
    y, s = norm_linear(xb, hb, nwb, 1e-6, wb)
    n_ref, s_ref = add_rmsnorm_ref(xb, hb, nwb, 1e-6)
    torch.testing.assert_close(s.float(), s_ref.float(), rtol=2**-7, atol=0)  # the interpreter may truncate
    assert rel(y, n_ref.float() @ wb.float().t()) < 1e-2


def test_a_weight_shapes_chosen_product_belongs_to_its_dtype():
    """One process may serve a float32 and a bf16 engine: where cuBLAS won for bf16, float32 keeps its own choice."""
    from infinitevl_kernels import triton_ops

    w, x = torch.randn(16, 64), torch.randn(1, 64)
    triton_ops.MATVEC_CONFIGS[(16, 64, torch.bfloat16)] = None  # cuBLAS, for bf16 only
    try:
        assert not triton_ops._use_matvec(x.bfloat16(), w.bfloat16())
        assert triton_ops._use_matvec(x, w)
    finally:
        del triton_ops.MATVEC_CONFIGS[(16, 64, torch.bfloat16)]


def test_gated_rmsnorm_reads_the_gate_in_place_in_a_wider_projection():
    """The served GDN layer's output norm: the gate is a column slice of the fused input projection."""
    from infinitevl_kernels.gdn.reference import gated_rmsnorm
    from infinitevl_kernels.triton_ops import gated_rmsnorm_heads

    g = torch.Generator().manual_seed(11)
    T, H, D = 3, 2, 32
    o = torch.randn(T, H, D, generator=g, dtype=torch.float64)
    proj = torch.randn(T, 7 + H * D + 5, generator=g, dtype=torch.float64)
    gate = proj[:, 7 : 7 + H * D]
    w = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    y = gated_rmsnorm_heads(o, gate, w, 1e-6)
    ref = gated_rmsnorm(o, gate.reshape(T, H, D), w, 1e-6).reshape(T, H * D)
    assert y.shape == (T, H * D) and rel(y, ref) < 1e-6
    with pytest.raises(ValueError, match="power-of-two head dim"):
        gated_rmsnorm_heads(o[..., :24], gate[:, : H * 24], w[:24], 1e-6)


@pytest.mark.parametrize("T", [1, 2])  # one matrix-vector pass with the norm in its prologue; a norm launch + torch's
@pytest.mark.parametrize("H,D,N", [(4, 32, 24), (3, 32, 16)])  # tiles of whole heads, and a ragged last tile
def test_gdn_output_norm_inside_the_output_projection_equals_the_two_launches(T, H, D, N):
    """The served GDN layer's gated norm and output projection, in one pass at batch 1: the same product as the
    norm launch (its bf16 rounding included) followed by the projection, with the gate read in place."""
    from infinitevl_kernels.gdn.reference import gated_rmsnorm
    from infinitevl_kernels.triton_ops import gated_norm_linear, gated_rmsnorm_heads, linear

    g = torch.Generator().manual_seed(13)
    o = torch.randn(T, H, D, generator=g)
    proj = torch.randn(T, 5 + H * D + 3, generator=g)
    gate, nw = proj[:, 5 : 5 + H * D], torch.rand(D, generator=g) + 0.5
    w = torch.randn(N, H * D, generator=g)
    ref = gated_rmsnorm(o.double(), gate.double().reshape(T, H, D), nw.double(), 1e-6).reshape(T, H * D)
    assert rel(gated_norm_linear(o, gate, nw, 1e-6, w), ref @ w.double().t()) < 1e-5
    ob, gb, nwb, wb = o.bfloat16(), proj.bfloat16()[:, 5 : 5 + H * D], nw.bfloat16(), w.bfloat16()
    rows = torch.full((T + 1, N), float("nan"), dtype=torch.bfloat16)
    fused = gated_norm_linear(ob, gb, nwb, 1e-6, wb, out=rows[:T])
    two = linear(gated_rmsnorm_heads(ob, gb, nwb, 1e-6), wb)
    assert fused.data_ptr() == rows.data_ptr() and rows[T].isnan().all()
    torch.testing.assert_close(fused.float(), two.float(), rtol=2**-7, atol=1e-2)


def test_mrope_of_a_fused_projection_equals_the_torch_rope_on_float64_tables():
    """The served SWA layer's M-RoPE: q and k of the fused q|k|v projection rotated in one launch that makes the
    angles from the 3-row positions (a view into a wider buffer, as vLLM's), into a new tensor, the projection left as
    it is (a custom op may not write its input). Positions near a million need the float64 angles the tables have."""
    from infinitevl_kernels.rope import apply_rope, mrope_cos_sin, mrope_frequencies
    from infinitevl_kernels.triton_ops import mrope_qk

    g = torch.Generator().manual_seed(17)
    T, Hq, Hkv, D, section = 5, 4, 2, 16, [2, 3, 3]
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g)
    before = qkv.clone()
    positions = torch.randint(10**6 - 1000, 10**6, (3, T + 3), generator=g)[:, :T]
    qk = mrope_qk(qkv, Hq, Hkv, D, positions, *mrope_frequencies(D, 10000.0, section))
    cos, sin = (t.float() for t in mrope_cos_sin(positions, D, 10000.0, section))
    q, k = qkv[:, : Hq * D].view(T, Hq, D), qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    ref = torch.cat([apply_rope(q, cos, sin), apply_rope(k, cos, sin)], dim=1)
    assert qk.shape == (T, (Hq + Hkv) * D) and torch.equal(qkv, before)
    torch.testing.assert_close(qk.view(T, Hq + Hkv, D), ref, rtol=1e-6, atol=1e-6)


def test_start_up_compilation_runs_every_prefill_variant_on_scratch_state_only():
    """The warm-ups a server runs at start-up (every split count and token-count class) touch no real state."""
    from infinitevl_kernels.gdn.triton_batch import warm_up_prefill
    from infinitevl_kernels.swa.triton_ring import warm_up_ring

    g = torch.Generator().manual_seed(12)
    T, C = 40, 2 * SHAPE.key_dim + SHAPE.value_dim
    pools = (torch.randn(3, C, 3, generator=g), torch.randn(3, SHAPE.num_heads, SHAPE.head_v_dim, SHAPE.head_k_dim,
                                                               generator=g))
    layer = GDNLayer(conv_weight=torch.randn(C, 4, generator=g), A_log=torch.rand(SHAPE.num_heads, generator=g),
                     dt_bias=torch.rand(SHAPE.num_heads, generator=g), conv_state=pools[0].clone(),
                     ssm_state=pools[1].clone(), shape=SHAPE)
    mixed, a, b = (torch.randn(T, C, generator=g), torch.randn(T, SHAPE.num_heads, generator=g),
                   torch.randn(T, SHAPE.num_heads, generator=g))
    inputs = [x.clone() for x in (mixed, a, b)]
    warm_up_prefill(mixed, a, b, layer, use_fla=False)
    assert torch.equal(layer.conv_state, pools[0]) and torch.equal(layer.ssm_state, pools[1])
    assert all(torch.equal(x, y) for x, y in zip((mixed, a, b), inputs))

    q, kv = torch.randn(T, 4, 16, generator=g), torch.randn(T, 2, 16, generator=g)
    before = (q.clone(), kv.clone())
    warm_up_ring(q, kv, kv, window=32, block_size=16, scale=0.25)
    assert torch.equal(q, before[0]) and torch.equal(kv, before[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_start_up_compiles_the_conv_at_every_row_alignment_and_tile_a_mixed_batch_reaches(monkeypatch, dtype):
    """A mixed batch's prefill rows follow its decodes' in the packed projection, so the conv reads from any row;
    Triton compiles a 16-byte-aligned pointer apart from another, and each tile height apart. The tiny model's
    projection (772 columns) has unaligned rows in bf16: the H200 bf16 engine compiled the conv while serving."""
    from infinitevl_kernels.gdn import triton_batch

    T, width, C = 2048, 772, 512  # the smallest prefill chunk vLLM schedules
    proj = torch.zeros(T, width, dtype=dtype)
    mixed, a, b = proj[:, :C], proj[:, -4:-2], proj[:, -2:]

    def variant(x: torch.Tensor, max_len: int) -> tuple[bool, int]:
        return x.data_ptr() % 16 == 0, triton_batch.conv_tile_rows(max_len)

    compiled = set()
    monkeypatch.setattr(triton_batch, "gdn_prefill_varlen",
                        lambda x, *args, max_len, **kw: compiled.add(variant(x, max_len)))
    shape = GDNShape(num_heads=2, head_k_dim=64, head_v_dim=128)
    layer = GDNLayer(conv_weight=torch.zeros(C, 4), A_log=torch.zeros(2), dt_bias=torch.zeros(2),
                     conv_state=torch.zeros(0), ssm_state=torch.zeros(0), shape=shape)
    triton_batch.warm_up_prefill(mixed, a, b, layer, use_fla=False)
    served = {variant(mixed[decodes:], prefill) for decodes in range(16) for prefill in [*range(1, 80), T - decodes]}
    assert served <= compiled
    assert len({aligned for aligned, _ in served}) == (2 if dtype == torch.bfloat16 else 1)


def test_decode_split_counts_are_the_ones_measured_fastest_at_the_4b_shape():
    """benchmarks/results/swa_decode_merge.json (H200, 4B's SWA layers: 2 KV heads, window 8192): batch 1 ran
    fastest in 64 pieces, batch 54 in 16 (8 and 32 were slower, the former default of 2 slowest)."""
    from infinitevl_kernels.swa.triton_ring import decode_splits

    assert decode_splits(1, 2, 8192) == 64 and decode_splits(54, 2, 8192) == 16
    assert all(decode_splits(b, 2, 8192) >= decode_splits(b + 1, 2, 8192) for b in range(1, 1024))


def test_start_up_compilation_launches_each_split_count_a_batch_can_pick(monkeypatch):
    """Decode cuts a 512-token window into 1, 2 or 4 pieces depending on the batch: all three are launched once,
    and prefill runs one token, a multiple of 16 and another count."""
    from infinitevl_kernels.swa import triton_ring

    launched = []
    monkeypatch.setattr(triton_ring, "swa_paged_decode", lambda *a, nsplit, **k: launched.append(("decode", nsplit)))
    monkeypatch.setattr(triton_ring, "swa_paged_prefill",
                        lambda q, *a, nsplit, **k: launched.append(("prefill", nsplit, q.shape[0])))
    q, kv = torch.zeros(20, 4, 16), torch.zeros(20, 2, 16)
    triton_ring.warm_up_ring(q, kv, kv, window=512, block_size=16, scale=0.25)
    assert sorted({triton_ring.decode_splits(b, 2, 512) for b in range(1, 5000)}) == [1, 2, 4]
    assert launched == [("decode", 1), ("decode", 2), ("decode", 4),
                        ("prefill", 1, 1), ("prefill", 1, 16), ("prefill", 1, 17)]  # the interpreter: one split
