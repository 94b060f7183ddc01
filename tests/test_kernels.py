"""The torch kernels agree with each other and implement the release's semantics exactly."""

import pytest
import torch
from infinitevl_kernels import (
    causal_conv1d,
    gdn_chunked,
    gdn_gates,
    gdn_recurrent,
    mrope_cos_sin,
    sliding_window_attention,
)


def random_gdn_inputs(T, H=3, Dk=16, Dv=32, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, Dk, generator=g, dtype=dtype)
    k = torch.randn(T, H, Dk, generator=g, dtype=dtype)
    v = torch.randn(T, H, Dv, generator=g, dtype=dtype)
    a = torch.randn(T, H, generator=g, dtype=dtype)
    b = torch.randn(T, H, generator=g, dtype=dtype)
    A_log = torch.rand(H, generator=g, dtype=dtype) * 2.7
    dt_bias = torch.randn(H, generator=g, dtype=dtype)
    gate, beta = gdn_gates(a, b, A_log, dt_bias)
    s0 = torch.randn(H, Dk, Dv, generator=g, dtype=dtype)
    return q, k, v, gate, beta, s0


@pytest.mark.parametrize("T,chunk", [(1, 64), (37, 8), (130, 64), (64, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent_float64(T, chunk, with_state):
    q, k, v, g, beta, s0 = random_gdn_inputs(T, seed=T + chunk)
    init = s0 if with_state else None
    o_r, s_r = gdn_recurrent(q, k, v, g, beta, initial_state=init)
    o_c, s_c = gdn_chunked(q, k, v, g, beta, initial_state=init, chunk_size=chunk)
    # Same math in two orders of summation: float64 rounding only.
    torch.testing.assert_close(o_c, o_r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s_c, s_r, atol=1e-10, rtol=1e-10)


def test_chunked_equals_recurrent_float32():
    q, k, v, g, beta, s0 = random_gdn_inputs(200, dtype=torch.float32, seed=7)
    o_r, s_r = gdn_recurrent(q, k, v, g, beta, initial_state=s0)
    o_c, s_c = gdn_chunked(q, k, v, g, beta, initial_state=s0, chunk_size=32)
    # float32: 200 steps of accumulation, values O(1); 1e-4 is ~1000 ulps of headroom.
    torch.testing.assert_close(o_c, o_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_c, s_r, atol=1e-4, rtol=1e-4)


def test_state_carries_across_calls():
    q, k, v, g, beta, _ = random_gdn_inputs(50, seed=3)
    o_all, s_all = gdn_chunked(q, k, v, g, beta, chunk_size=16)
    o1, s1 = gdn_chunked(q[:23], k[:23], v[:23], g[:23], beta[:23], chunk_size=16)
    o2, s2 = gdn_recurrent(q[23:], k[23:], v[23:], g[23:], beta[23:], initial_state=s1)
    torch.testing.assert_close(torch.cat([o1, o2]), o_all, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s2, s_all, atol=1e-10, rtol=1e-10)


def test_delta_rule_single_step_by_hand():
    # One head, Dk=2, Dv=1, zero state: S = beta * k v^T, o = scale * S^T q.
    q = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    k = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    v = torch.tensor([[[2.0]]], dtype=torch.float64)
    g = torch.zeros(1, 1, dtype=torch.float64)
    beta = torch.full((1, 1), 0.5, dtype=torch.float64)
    o, S = gdn_recurrent(q, k, v, g, beta, scale=1.0)
    assert S[0, 0, 0].item() == pytest.approx(1.0)
    assert o.item() == pytest.approx(1.0)


def test_gates_formula():
    a, b = torch.tensor([[0.3]]), torch.tensor([[-1.0]])
    A_log, dt_bias = torch.tensor([0.5]), torch.tensor([0.2])
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    expected_g = -torch.exp(torch.tensor(0.5)) * torch.nn.functional.softplus(torch.tensor(0.5))
    assert g.item() == pytest.approx(expected_g.item(), rel=1e-6)
    assert beta.item() == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item(), rel=1e-6)


def test_causal_conv_matches_torch_conv_and_streams():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ref = torch.nn.functional.conv1d(x.t()[None], w[:, None, :], padding=3, groups=6)[0, :, :20].t()
    y, state = causal_conv1d(x, w)
    torch.testing.assert_close(y, torch.nn.functional.silu(ref))
    assert state.shape == (6, 3)
    torch.testing.assert_close(state, x[-3:].t())
    y1, s1 = causal_conv1d(x[:9], w)
    y2, _ = causal_conv1d(x[9:], w, s1)
    torch.testing.assert_close(torch.cat([y1, y2]), y)


def _attn_inputs(T, Hq=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, Hq, D, generator=g, dtype=torch.float64),
            torch.randn(T, Hkv, D, generator=g, dtype=torch.float64),
            torch.randn(T, Hkv, D, generator=g, dtype=torch.float64))


def test_window_larger_than_sequence_is_full_causal():
    q, k, v = _attn_inputs(30)
    pos = torch.arange(30)
    out = sliding_window_attention(q, k, v, pos, pos, window=1000)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True,
    ).transpose(0, 1)
    torch.testing.assert_close(out, ref)


def test_window_boundary_token_t_sees_t_minus_w_plus_1_to_t():
    W, T = 5, 12
    q, k, v = _attn_inputs(T, seed=1)
    pos = torch.arange(T)
    out = sliding_window_attention(q, k, v, pos, pos, window=W)
    t = 10
    # Attending only keys t-W+1..t must equal the windowed result; adding key t-W must not.
    lo = t - W + 1
    only = sliding_window_attention(q[t : t + 1], k[lo : t + 1], v[lo : t + 1], pos[t : t + 1], pos[lo : t + 1], None)
    torch.testing.assert_close(out[t : t + 1], only)
    wider = sliding_window_attention(
        q[t : t + 1], k[lo - 1 : t + 1], v[lo - 1 : t + 1], pos[t : t + 1], pos[lo - 1 : t + 1], None
    )
    assert not torch.allclose(out[t : t + 1], wider)


def test_mrope_equal_rows_is_plain_rope():
    pos = torch.arange(10)
    cos, sin = mrope_cos_sin(pos.expand(3, -1), 16, 10000.0, [2, 3, 3])
    inv = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    ang = pos[:, None].double() * inv
    torch.testing.assert_close(cos, torch.cat([ang, ang], -1).cos())
    torch.testing.assert_close(sin, torch.cat([ang, ang], -1).sin())


def test_mrope_section_must_match_head_dim():
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_cos_sin(torch.zeros(3, 2, dtype=torch.long), 16, 1e6, [2, 2, 2])


@pytest.mark.parametrize("tokens,heads", [(16384, 16), (16384, 8), (8192, 32), (2048, 16), (1, 16)])
def test_start_up_reaches_every_l2norm_bucket_of_a_chunk(tokens, heads):
    """fla autotunes its q/k L2 norm once for each bucket of 65,536 rows (tokens x heads) it sees. The start-up
    compilation (the whole chunk, the small batches, then one length per bucket between) reaches every bucket
    a prefill chunk of this size can; the H200 bench's third run autotuned bucket 3 for 11 s while serving."""
    from infinitevl_kernels.gdn.triton_batch import L2NORM_BUCKET_ROWS, PREFILL_WARM_UP, _l2norm_buckets

    def bucket(n: int) -> int:  # fla.modules.norm.l2norm's NB for n tokens
        return -(-n * heads // L2NORM_BUCKET_ROWS)

    batches = [*PREFILL_WARM_UP, *_l2norm_buckets(tokens, heads)]
    lengths = [tokens] + [sum(lens) for lens in batches if sum(lens) <= tokens]
    assert {bucket(n) for n in lengths} == set(range(1, bucket(tokens) + 1))
