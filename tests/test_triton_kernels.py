"""The Triton kernels against their torch references, on CPU through TRITON_INTERPRET=1 (small shapes).

The same comparisons run on the GPU inside benchmarks/gpu_h100.py at the real shapes.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from infinitevl_kernels.gdn_batch import GDNShape  # noqa: E402
from infinitevl_kernels.triton_gdn import (  # noqa: E402
    gdn_decode_slots,
    gdn_decode_slots_ref,
    gdn_prefill_varlen,
    gdn_prefill_varlen_ref,
)
from infinitevl_kernels.triton_swa import (  # noqa: E402
    swa_ring_decode,
    swa_ring_decode_ref,
    swa_ring_prefill,
    swa_ring_prefill_ref,
)

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels in Triton's interpreter", allow_module_level=True)

SHAPE = GDNShape(num_heads=2, head_k_dim=16, head_v_dim=32)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


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
    o = gdn_decode_slots(x, a, b, conv_state=conv, ssm_state=ssm, slots=slots, shape=SHAPE, **params)
    o_ref = gdn_decode_slots_ref(x, a, b, conv_state=conv_ref, ssm_state=ssm_ref, slots=slots, shape=SHAPE, **params)
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
    o1 = gdn_decode_slots(x, a, b, conv_state=conv, ssm_state=ssm.clone(), slots=slots, shape=SHAPE, **params)
    o2 = gdn_decode_slots(x, a, b, conv_state=conv_t, ssm_state=ssm.clone(), slots=slots, shape=SHAPE, **params)
    assert rel(o1, o2) < 1e-6 and torch.allclose(conv, conv_t)


@pytest.mark.parametrize("lens,init", [([5, 1, 9], [True, False, True]), ([2, 3], [False, True])])
def test_gdn_prefill_varlen_from_each_slot(lens, init):
    g = torch.Generator().manual_seed(3)
    conv, ssm, params = gdn_pools(5, g)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    slots = [3, 0, 4][: len(lens)]
    T, C = cu[-1], conv.shape[1]
    x = torch.randn(T, C, generator=g)
    a, b = torch.randn(T, SHAPE.num_heads, generator=g), torch.randn(T, SHAPE.num_heads, generator=g)
    conv_ref, ssm_ref = conv.clone(), ssm.clone()
    o = gdn_prefill_varlen(
        x, a, b, conv_state=conv, ssm_state=ssm, slots=torch.tensor(slots), has_initial_state=torch.tensor(init),
        cu_seqlens=torch.tensor(cu), max_len=max(lens), shape=SHAPE, **params,
    )
    o_ref = gdn_prefill_varlen_ref(
        x, a, b, conv_state=conv_ref, ssm_state=ssm_ref, slots=slots, has_initial_state=init, cu_seqlens=cu,
        shape=SHAPE, **params,
    )
    assert rel(o, o_ref) < 1e-4
    assert rel(conv, conv_ref) < 1e-6 and rel(ssm, ssm_ref) < 1e-4


def ring_setup(slots: int, cap: int, hkv: int, d: int, g: torch.Generator):
    k_ring = torch.randn(slots, cap, hkv, d, generator=g)
    return k_ring, torch.randn(slots, cap, hkv, d, generator=g)


@pytest.mark.parametrize("window,cap", [(8, 7), (8, 12), (40, 39)])
def test_swa_ring_decode_exact_window(window, cap):
    g = torch.Generator().manual_seed(4)
    Hq, Hkv, D = 4, 2, 16
    k_ring, v_ring = ring_setup(4, cap, Hkv, D, g)
    positions, slots = [0, 5, 7, 100], [1, 3, 0, 2]  # fresh, short, exactly W-1 before, wrapped
    B = len(slots)
    q = torch.randn(B, Hq, D, generator=g)
    kn, vn = torch.randn(B, Hkv, D, generator=g), torch.randn(B, Hkv, D, generator=g)
    kr_ref, vr_ref = k_ring.clone(), v_ring.clone()
    o = swa_ring_decode(q, kn, vn, k_ring, v_ring, torch.tensor(positions), torch.tensor(slots), window, nsplit=2)
    o_ref = swa_ring_decode_ref(q, kn, vn, kr_ref, vr_ref, positions, slots, window)
    assert rel(o, o_ref) < 1e-5
    assert torch.equal(k_ring, kr_ref) and torch.equal(v_ring, vr_ref)


def test_swa_ring_decode_sees_nothing_outside_the_window():
    """Poison every ring row outside the window: the output must not change."""
    g = torch.Generator().manual_seed(5)
    window, cap, Hq, Hkv, D = 6, 10, 2, 1, 16
    k_ring, v_ring = ring_setup(1, cap, Hkv, D, g)
    p = 23
    q = torch.randn(1, Hq, D, generator=g)
    kn, vn = torch.randn(1, Hkv, D, generator=g), torch.randn(1, Hkv, D, generator=g)
    inside = {pos % cap for pos in range(p - window + 1, p)}
    kp, vp = k_ring.clone(), v_ring.clone()
    for r in range(cap):
        if r not in inside:
            kp[0, r], vp[0, r] = 1e4, float("nan")
    args = (torch.tensor([p]), torch.tensor([0]), window)
    o1 = swa_ring_decode(q, kn, vn, k_ring, v_ring, *args, nsplit=2)
    o2 = swa_ring_decode(q, kn, vn, kp, vp, *args, nsplit=2)
    assert torch.isfinite(o2).all() and rel(o2, o1) < 1e-6


@pytest.mark.parametrize("window,cap", [(8, 7), (16, 20)])
def test_swa_ring_prefill_chunks(window, cap):
    g = torch.Generator().manual_seed(6)
    Hq, Hkv, D = 4, 2, 16
    k_ring, v_ring = ring_setup(3, cap, Hkv, D, g)
    lens, starts, slots = [21, 3, 9], [0, 30, 5], [2, 0, 1]  # fresh and long; a few after many; mid-window
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    T = cu[-1]
    q = torch.randn(T, Hq, D, generator=g)
    k, v = torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g)
    kr_ref, vr_ref = k_ring.clone(), v_ring.clone()
    o = swa_ring_prefill(q, k, v, k_ring, v_ring, torch.tensor(cu), torch.tensor(starts), torch.tensor(slots),
                         max(lens), window)
    o_ref = swa_ring_prefill_ref(q, k, v, kr_ref, vr_ref, cu, starts, slots, window)
    assert rel(o, o_ref) < 1e-5
    assert torch.equal(k_ring, kr_ref) and torch.equal(v_ring, vr_ref)


def test_swa_prefill_then_decode_equals_one_long_prefill():
    """Chunk boundaries are invisible: prefill in pieces plus decodes = attention over the whole sequence."""
    g = torch.Generator().manual_seed(7)
    window, cap, Hq, Hkv, D, T = 8, 7, 2, 1, 16, 30
    q = torch.randn(T, Hq, D, generator=g)
    k, v = torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g)
    k_ring, v_ring = torch.zeros(1, cap, Hkv, D), torch.zeros(1, cap, Hkv, D)
    slot = torch.tensor([0])
    outs = []
    for s, e in [(0, 11), (11, 12), (12, 27)]:
        outs.append(swa_ring_prefill(q[s:e], k[s:e], v[s:e], k_ring, v_ring, torch.tensor([0, e - s]),
                                     torch.tensor([s]), slot, e - s, window))
    for t in range(27, T):
        outs.append(swa_ring_decode(q[t : t + 1], k[t : t + 1], v[t : t + 1], k_ring, v_ring, torch.tensor([t]),
                                    slot, window, nsplit=2))
    pos = torch.arange(T)
    from infinitevl_kernels import sliding_window_attention

    ref = sliding_window_attention(q.double(), k.double(), v.double(), pos, pos, window)
    assert rel(torch.cat(outs), ref) < 1e-5
