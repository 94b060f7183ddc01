"""GDN decode on CUDA, the two candidates for the served path, at InfiniteVL-4B's shapes (bf16):

- ours: ``infinitevl_kernels.gdn.triton_batch.gdn_decode_slots`` (conv + recurrence in place on the slot pool);
- vLLM's: what its OLMo-hybrid GDN layer runs for a decode batch (``causal_conv1d_update``, the fused
  gating kernel, fla's ``fused_recurrent_gated_delta_rule`` with state indices).

Both are captured in a CUDA graph (the served decode step runs in one) and timed over replays; both are
checked against ``gdn.batch.gdn_decode_batch`` in float64. Writes benchmarks/results/gdn_decode_paths.json.

    python3 benchmarks/gdn_decode_paths.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
from infinitevl_kernels.gdn.batch import GDNLayer, GDNShape, gdn_decode_batch
from infinitevl_kernels.gdn.triton_batch import gdn_decode_slots

H, DK, DV, K = 16, 128, 256, 4  # InfiniteVL-4B's GDN layer
SHAPE = GDNShape(H, DK, DV)
C = 2 * H * DK + H * DV
SLOTS = 1024


def vllm_decode(x, a, b, conv_weight, A_log, dt_bias, conv_state, ssm_state, slots):
    from vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn import fused_olmo_hybrid_gdn_gating
    from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_update
    from vllm.third_party.flash_linear_attention.ops import fused_recurrent_gated_delta_rule

    B = x.shape[0]
    y = causal_conv1d_update(x, conv_state, conv_weight, None, "silu", conv_state_indices=slots, validate_data=False)
    q, k, v = y.split([H * DK, H * DK, H * DV], dim=-1)
    q, k, v = (t.reshape(1, B, H, -1).contiguous() for t in (q, k, v))
    g, beta = fused_olmo_hybrid_gdn_gating(A_log, a, b, dt_bias, False)
    qsl = torch.arange(B + 1, dtype=torch.int32, device=x.device)
    o, _ = fused_recurrent_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, initial_state=ssm_state,
                                            inplace_final_state=True, cu_seqlens=qsl, ssm_state_indices=slots,
                                            use_qk_l2norm_in_kernel=True)
    return o.view(B, H, DV)


def ours_decode(x, a, b, conv_weight, A_log, dt_bias, conv_state, ssm_state, slots):
    layer = GDNLayer(conv_weight=conv_weight, A_log=A_log, dt_bias=dt_bias, conv_state=conv_state,
                     ssm_state=ssm_state, shape=SHAPE)
    return gdn_decode_slots(x, a, b, layer, slots=slots)


def graph_time_us(fn, iters: int = 200) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gdn_decode_paths.json")
    ap.add_argument("--batches", default="1,16,64,256")
    args = ap.parse_args()
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    conv_weight = (torch.randn(C, K, device=dev, generator=g) * 0.3).to(bf)
    A_log = torch.rand(H, device=dev, generator=g)
    dt_bias = torch.randn(H, device=dev, generator=g)
    rows = []
    for B in [int(x) for x in args.batches.split(",")]:
        x = torch.randn(B, C, device=dev, generator=g).to(bf)
        a, b = torch.randn(B, H, device=dev, generator=g).to(bf), torch.randn(B, H, device=dev, generator=g).to(bf)
        slots = torch.randperm(SLOTS - 1, device=dev, generator=g)[:B].int() + 1
        # vLLM's layout: [slots, K-1, C] in memory, seen as [slots, C, K-1]
        conv0 = torch.randn(SLOTS, K - 1, C, device=dev, generator=g).to(bf)
        ssm0 = (torch.randn(SLOTS, H, DV, DK, device=dev, generator=g) * 0.1).to(bf)
        conv_ref, ssm_ref = conv0.double().transpose(-1, -2), ssm0.double()
        ref_layer = GDNLayer(conv_weight=conv_weight.double(), A_log=A_log.double(), dt_bias=dt_bias.double(),
                             conv_state=conv_ref, ssm_state=ssm_ref, shape=SHAPE)
        want = gdn_decode_batch(x.double(), a.double(), b.double(), ref_layer, slots=slots.long())
        row = {"batch": B}
        for name, fn in (("ours", ours_decode), ("vllm", vllm_decode)):
            conv, ssm = conv0.clone().transpose(-1, -2), ssm0.clone()
            try:
                o = fn(x, a, b, conv_weight, A_log, dt_bias, conv, ssm, slots)
                err = float((o.double() - want).norm() / want.norm())
                state_err = float((ssm.double() - ssm_ref).norm() / ssm_ref.norm())
                us = graph_time_us(partial(fn, x, a, b, conv_weight, A_log, dt_bias, conv, ssm, slots))
                row[name] = {"us": round(us, 2), "rel_err_out": err, "rel_err_state": state_err}
            except Exception as e:  # a failing candidate is a result too
                row[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(row, flush=True)
        rows.append(row)
    import triton

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                          "shapes": {"heads": H, "key_dim": DK, "value_dim": DV, "conv": K},
                                          "decode": rows}, indent=1))


if __name__ == "__main__":
    main()
