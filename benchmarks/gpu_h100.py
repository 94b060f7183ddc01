"""H100 head-to-head: InfiniteVL-4B decoder on our Triton path (the kernel study, kernel_study_decoder.py, not
the served vLLM model) vs the Qwen2.5-VL-3B text decoder.

One run builds, checks and times everything (issue #7). Needs torch + triton + CUDA, and fla 0.6.0
for the GDN chunked prefill; no vLLM. Random bf16 weights in GPU memory, shapes from the "4b"
preset. Baselines, both Qwen2.5-VL-3B text decoder (hidden 2048, 36 layers, 16/2 heads, head_dim 128,
MLP 11008, vocab 151936, tied embeddings as the 3B release):
  (a) transformers eager, SDPA, DynamicCache;
  (b) our strongest plain-Transformer decode: preallocated KV, SDPA enable_gqa with no mask over
      exactly the filled part, chunked flash prefill (lower-right causal), fused projections and
      Triton norms, CUDA graphs.

    python benchmarks/gpu_h100.py --out DIR [--frames 2000] [--sections checks,decode,...]

Writes DIR/gpu_h100.json and DIR/gpu_h100_*.png. Content of the KV/state does not change the cost
of a step, so contexts are set up by filling caches/states with random values instead of prefilling.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
for p in (os.path.join(HERE, ".."), os.path.join(HERE, "..", "kernels")):
    if p not in sys.path:
        sys.path.insert(0, p)

import triton  # noqa: E402
from infinitevl_kernels import triton_ops  # noqa: E402
from infinitevl_kernels.gdn.batch import GDNBatch, GDNLayer, GDNShape, gdn_decode_batch, gdn_forward_batch  # noqa: E402
from infinitevl_kernels.gdn.triton_batch import gdn_decode_slots, gdn_prefill_varlen  # noqa: E402
from infinitevl_kernels.swa.triton_ring import (  # noqa: E402
    swa_paged_decode,
    swa_paged_decode_ref,
    swa_paged_prefill,
    swa_paged_prefill_ref,
)
from infinitevl_kernels.triton_ops import (  # noqa: E402
    linear,
    norm_linear,
    rmsnorm,
    rmsnorm_ref,
    rope_qk_inplace,
    silu_linear,
    silu_mul,
)
from kernel_study_decoder import DecodeGraphs, DecoderDims, InfiniteVLDecoderGPU  # noqa: E402

DEV = torch.device("cuda")
BF = torch.bfloat16
CONTEXTS = [4096, 16384, 65536, 131072, 262144]
QWEN3B = dict(hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, head_dim=128, vocab=151936,
              rms_eps=1e-6, rope_theta=1e6, mrope_section=[16, 24, 24])
RESULTS: dict = {"errors": {}}


def log(*a):
    print(*a, flush=True)


def free_mem() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def time_ms(fn, iters: int = 20, reps: int = 5, warm: int = 2) -> float:
    """Median over reps of the mean time of `iters` back-to-back calls, by CUDA events."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / iters)
    ts.sort()
    return ts[len(ts) // 2]


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -- configuration -----------------------------------------------------------------------------------


def load_4b():
    """InfiniteVL-4B config from the project's preset (vLLM-free modules only)."""
    from infinitevl_vllm.checkpoint import preset_config
    from infinitevl_vllm.config import InfiniteVLConfig

    raw = preset_config("4b")
    raw.pop("model_type"), raw.pop("architectures")
    return InfiniteVLConfig(**raw)


# -- the strong Transformer baseline (b) ------------------------------------------------------------


class QwenStrong:
    """Qwen2.5-VL-3B text decoder, preallocated KV [L, B, Hkv, maxlen, D], SDPA enable_gqa, no mask."""

    def __init__(self, batch: int, max_len: int, seed: int = 1):
        c = QWEN3B
        g = torch.Generator(device=DEV).manual_seed(seed)

        def r(*s):
            return (torch.randn(*s, generator=g, device=DEV) * 0.02).to(BF)

        H, Hkv, D, h = c["heads"], c["kv_heads"], c["head_dim"], c["hidden"]
        self.embed = r(c["vocab"], h)
        self.final_norm = torch.ones(h, dtype=BF, device=DEV)
        self.layers = []
        for _ in range(c["layers"]):
            qkv = (H + 2 * Hkv) * D
            self.layers.append(dict(
                in_norm=torch.ones(h, dtype=BF, device=DEV), post_norm=torch.ones(h, dtype=BF, device=DEV),
                qkv=r(qkv, h), qkv_bias=r(qkv), o=r(h, H * D), gate_up=r(2 * c["intermediate"], h),
                down=r(h, c["intermediate"])))
        self.k = torch.empty(c["layers"], batch, Hkv, max_len, D, dtype=BF, device=DEV).normal_()
        self.v = torch.empty_like(self.k).normal_()
        half = D // 2
        self.inv_freq = (1.0 / (c["rope_theta"] ** (torch.arange(0, half, device=DEV, dtype=torch.float64) * 2 / D))
                         ).float()
        self.batch, self.max_len = batch, max_len

    def weight_bytes(self) -> int:
        n = self.embed.numel() * 2 + self.final_norm.numel() * 2
        return n + sum(t.numel() * t.element_size() for L in self.layers for t in L.values())

    def cos_sin(self, pos: torch.Tensor):
        ang = pos.float()[:, None] * self.inv_freq[None]
        emb = torch.cat([ang, ang], -1)
        return emb.cos().contiguous(), emb.sin().contiguous()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, start: int, pos: torch.Tensor, head: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x [B, T, hidden] of the tokens at start..start+T-1 (same for every row); returns final hidden
        (or, with ``head``, final hidden @ head^T as [B*T, N])."""
        c = QWEN3B
        B, T, h = x.shape
        H, Hkv, D = c["heads"], c["kv_heads"], c["head_dim"]
        cos, sin = self.cos_sin(pos)
        cos = cos.repeat(B, 1) if B > 1 else cos
        sin = sin.repeat(B, 1) if B > 1 else sin
        x = x.reshape(B * T, h).clone()
        end = start + T
        hres = None
        mask = None
        if T > 1 and start > 0:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(T, end)
        for li, L in enumerate(self.layers):
            qkv, x = norm_linear(x, hres, L["in_norm"], c["rms_eps"], L["qkv"], L["qkv_bias"])
            q = qkv[:, : H * D].view(B * T, H, D)
            k = qkv[:, H * D : (H + Hkv) * D].view(B * T, Hkv, D)
            v = qkv[:, (H + Hkv) * D :].view(B * T, Hkv, D)
            rope_qk_inplace(qkv, H, Hkv, D, cos, sin)
            self.k[li, :B, :, start:end] = k.view(B, T, Hkv, D).transpose(1, 2)
            self.v[li, :B, :, start:end] = v.view(B, T, Hkv, D).transpose(1, 2)
            qh = q.view(B, T, H, D).transpose(1, 2)
            kh, vh = self.k[li, :B, :, :end], self.v[li, :B, :, :end]
            if mask is not None:
                o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
            else:
                o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=T > 1, enable_gqa=True)
            hres = linear(o.transpose(1, 2).reshape(B * T, H * D), L["o"])
            gu, x = norm_linear(x, hres, L["post_norm"], c["rms_eps"], L["gate_up"])
            hres = silu_linear(gu, L["down"])
        if head is not None:  # decode: final norm fused into the LM head
            return norm_linear(x, hres, self.final_norm, c["rms_eps"], head)[0]
        return rmsnorm(x, self.final_norm, c["rms_eps"], add=hres).view(B, T, h)

    def decode(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """Logits [B, vocab] of one token per row; at batch 1 the same fused matvecs as ours."""
        pos = torch.full((1,), n, device=DEV)
        return self.forward(self.embed[ids][:, None], n, pos, head=self.embed)

    def kv_bytes_per_token(self) -> int:
        c = QWEN3B
        return c["layers"] * 2 * c["kv_heads"] * c["head_dim"] * 2


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


# -- sections -----------------------------------------------------------------------------------------


def section_env():
    import transformers

    try:
        import fla

        fla_v = fla.__version__
    except Exception as e:  # noqa: BLE001
        fla_v = f"missing ({e})"
    n = 1 << 30
    x = torch.empty(n // 2, dtype=BF, device=DEV).normal_()
    y = torch.empty_like(x)
    t = time_ms(lambda: y.copy_(x), iters=10)
    bw = 2 * n / (t / 1e3)
    x = y = None
    RESULTS["env"] = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                          transformers=transformers.__version__, fla=fla_v, python=platform.python_version(),
                          sms=torch.cuda.get_device_properties(0).multi_processor_count,
                          total_mem_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
                          copy_bw_gbs=bw / 1e9)
    log("env", RESULTS["env"])
    return bw


MATVEC_SHAPES = [(22016, 2048), (12320, 2048), (2560, 2048), (2048, 4096), (2048, 2048), (2048, 11008),
                 (151936, 2048)]
# shapes whose matvec carries a fused prologue (norm or SwiGLU) that cuBLAS needs one more launch for
FUSED_SHAPES = {(22016, 2048), (12320, 2048), (2560, 2048), (2048, 11008), (151936, 2048)}
PROLOGUE_LAUNCH_MS = 0.0025  # a norm / SwiGLU launch inside a graph, from the first run's profile


def graph_ms(fn, calls: int) -> float:
    """Device time of one call of fn, from replays of a graph of `calls` calls (no host in the loop)."""
    g = graph_of(lambda: [fn() for _ in range(calls)])
    return time_ms(g.replay, iters=5, reps=3) / calls


def section_gemv_sweep():
    """Tunes the batch-1 matvec tiles per weight shape (ours and (b) share them) inside CUDA graphs, as
    decode runs them, against cuBLAS; keeps cuBLAS where it wins. Weights rotate over copies worth
    > 2x L2, as each weight is read once per decode step."""
    bw = RESULTS["env"]["copy_bw_gbs"] * 1e9
    res = {}
    for N, K in MATVEC_SHAPES:
        copies = max(1, -(-200 * 2**20 // (N * K * 2)))
        ws = [(torch.randn(N, K, device=DEV) * 0.02).to(BF) for _ in range(copies)]
        x = torch.randn(1, K, device=DEV).to(BF)
        calls = max(copies, 16)
        nxt = itertools.cycle(ws).__next__
        best, tried = None, {}
        for BN in (4, 8, 16, 32):
            for BK in (256, 512, 1024):
                for warps in (4, 8):
                    if BN * BK > 16384 or BN * BK < 2048:
                        continue
                    cfg = (BN, BK, warps)
                    t = graph_ms(lambda cfg=cfg, x=x, nxt=nxt: triton_ops._matvec(x, nxt(), config=cfg), calls)
                    tried[str(cfg)] = t
                    if best is None or t < best[1]:
                        best = (cfg, t)
        cub = graph_ms(lambda x=x, nxt=nxt: x @ nxt().t(), calls)
        bonus = PROLOGUE_LAUNCH_MS if (N, K) in FUSED_SHAPES else 0.0
        use = best[0] if best[1] < cub + bonus else None
        triton_ops.MATVEC_CONFIGS[(N, K, BF)] = use
        res[f"{N}x{K}"] = dict(best=list(best[0]), ms=best[1], cublas_ms=cub, floor_ms=N * K * 2 / bw * 1e3,
                               uses="triton" if use else "cublas", tried=tried)
        log("matvec", N, K, best, "cublas", cub, "floor", N * K * 2 / bw * 1e3, "->", res[f"{N}x{K}"]["uses"])
        ws = nxt = None
        free_mem()
    RESULTS["gemv_sweep"] = res


def section_checks():
    """Kernels against their references on the GPU at the real 4B head shapes."""
    out = {}
    g = torch.Generator(device=DEV).manual_seed(0)
    sh = GDNShape(16, 128, 256)
    C = 2 * sh.key_dim + sh.value_dim
    conv = torch.randn(8, C, 3, generator=g, device=DEV).to(BF)
    ssm = (torch.randn(8, 16, 256, 128, generator=g, device=DEV) * 0.1).to(BF)
    prm = dict(conv_weight=(torch.randn(C, 4, generator=g, device=DEV) * 0.3).to(BF),
               A_log=torch.rand(16, generator=g, device=DEV), dt_bias=torch.randn(16, generator=g, device=DEV))
    slots = torch.tensor([5, 1, 2, 6], device=DEV)
    x = torch.randn(4, C, generator=g, device=DEV).to(BF)
    a, b = torch.randn(4, 16, generator=g, device=DEV).to(BF), torch.randn(4, 16, generator=g, device=DEV).to(BF)
    c2, s2 = conv.clone(), ssm.clone()
    o = gdn_decode_slots(x, a, b, GDNLayer(conv_state=conv, ssm_state=ssm, shape=sh, **prm), slots=slots)
    o_ref = gdn_decode_batch(x.double(), a.double(), b.double(), GDNLayer(conv_state=c2, ssm_state=s2, shape=sh, **prm),
                             slots=slots)
    out["gdn_decode"] = dict(out=rel(o, o_ref), ssm=rel(ssm, s2), conv=rel(conv, c2))
    # varlen prefill through fla from slot states
    lens = [300, 77, 1]
    cu = [0, 300, 377, 378]
    T = cu[-1]
    x = torch.randn(T, C, generator=g, device=DEV).to(BF)
    a, b = torch.randn(T, 16, generator=g, device=DEV).to(BF), torch.randn(T, 16, generator=g, device=DEV).to(BF)
    c2, s2 = conv.clone(), ssm.clone()
    sl, init = [3, 0, 7], [True, False, True]
    o = gdn_prefill_varlen(x, a, b, GDNLayer(conv_state=conv, ssm_state=ssm, shape=sh, **prm),
                           slots=torch.tensor(sl, device=DEV), has_initial_state=torch.tensor(init, device=DEV),
                           cu_seqlens=torch.tensor(cu, device=DEV), max_len=max(lens))
    o_ref = torch.empty(T, 16, sh.head_v_dim, dtype=torch.float64, device=DEV)
    gdn_forward_batch(x.double(), a.double(), b.double(), GDNLayer(conv_state=c2, ssm_state=s2, shape=sh, **prm),
                      batch=GDNBatch(cu, sl, init, num_decodes=0), out=o_ref)
    out["gdn_prefill_varlen_fla"] = dict(out=rel(o, o_ref), ssm=rel(ssm, s2), conv=rel(conv, c2))
    # SWA on vLLM's paged ring, W = 8192, the vLLM model's block size, pages scattered over the cache
    W, Hq, Hkv, D = 8192, 16, 2, 128
    bs = ring_block_size()
    rb = -(-W // bs) + 1
    cache = torch.randn(4 * rb + 5, Hkv, bs, 2 * D, generator=g, device=DEV).to(BF)
    table = torch.randperm(4 * rb + 5, device=DEV)[: 4 * rb].view(4, rb).int()
    pos = [5, 8191, 20000, 9000]
    q = torch.randn(4, Hq, D, generator=g, device=DEV).to(BF)
    kn, vn = (torch.randn(4, Hkv, D, generator=g, device=DEV).to(BF) for _ in range(2))
    c2 = cache.clone()
    o = swa_paged_decode(q, kn, vn, cache, table, torch.tensor(pos, device=DEV), W)
    o_ref = swa_paged_decode_ref(q, kn, vn, c2, table, pos, W)
    out["swa_paged_decode"] = dict(out=rel(o, o_ref), ring_equal=bool(torch.equal(cache, c2)))
    for name, lens, starts in (("swa_paged_prefill", [700, 300, 1], [0, 9000, 40]),
                               ("swa_paged_prefill_frame_split_keys", [256], [100000])):
        cu = [0]
        for n_ in lens:
            cu.append(cu[-1] + n_)
        T = cu[-1]
        q = torch.randn(T, Hq, D, generator=g, device=DEV).to(BF)
        k, v = (torch.randn(T, Hkv, D, generator=g, device=DEV).to(BF) for _ in range(2))
        c2 = cache.clone()
        tb = table[: len(lens)]
        o = swa_paged_prefill(q, k, v, cache, tb, torch.tensor(cu, device=DEV), torch.tensor(starts, device=DEV),
                              max(lens), W)
        o_ref = swa_paged_prefill_ref(q, k, v, c2, tb, cu, starts, W)
        out[name] = dict(out=rel(o, o_ref), ring_equal=bool(torch.equal(cache, c2)))
    # the batch-1 fused matvecs at the real shapes, against fp32 torch
    mv = {}
    for name, (N, K) in dict(gate_up=(22016, 2048), inp=(12320, 2048), qkv=(2560, 2048), o=(2048, 4096),
                             down=(2048, 11008), lm_head=(151936, 2048)).items():
        w = (torch.randn(N, K, generator=g, device=DEV) * 0.02).to(BF)
        if name == "down":
            gu = torch.randn(1, 2 * K, generator=g, device=DEV).to(BF)
            want = silu_mul(gu).float() @ w.float().t()
            mv[name] = rel(silu_linear(gu, w), want)
        elif name == "o":
            xx = torch.randn(1, K, generator=g, device=DEV).to(BF)
            mv[name] = rel(linear(xx, w), xx.float() @ w.float().t())
        else:
            xx, hh = (torch.randn(1, K, generator=g, device=DEV).to(BF) for _ in range(2))
            nw = (torch.rand(K, generator=g, device=DEV) + 0.5).to(BF)
            bias = (torch.randn(N, generator=g, device=DEV) * 0.1).to(BF) if name == "qkv" else None
            y, xo = norm_linear(xx, hh, nw, 1e-6, w, bias)
            want = rmsnorm_ref(xx + hh, nw, 1e-6).float() @ w.float().t() + (0 if bias is None else bias.float())
            mv[name] = rel(y, want)
            mv[name + "_residual_equal"] = bool(torch.equal(xo, xx + hh))
    out["matvec_bs1"] = mv
    # whole decoder vs the reference model (small preset, window 64, CPU float32 reference)
    out["model_vs_reference"] = check_model()
    tol = 2e-2
    flat = [v for d in out.values() for k_, v in d.items() if isinstance(v, float)]
    bools = [v for d in out.values() for v in d.values() if isinstance(v, bool)]
    out["tolerance_bf16_rel"] = tol
    out["all_matched"] = bool(all(f < tol for f in flat) and all(bools))
    RESULTS["checks"] = out
    log("checks", json.dumps(out, indent=1))


def check_model():
    from infinitevl_vllm.checkpoint import preset_config
    from infinitevl_vllm.config import InfiniteVLConfig
    from infinitevl_vllm.reference import InfiniteVLReference, MultimodalInputs

    raw = preset_config("small", sliding_window=64)
    raw.pop("model_type"), raw.pop("architectures")
    cfg = InfiniteVLConfig(**raw)
    torch.manual_seed(0)
    ref = InfiniteVLReference(cfg).float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                p.uniform_(0.0, 1.0)
    dims = DecoderDims.from_config(cfg.text_config)
    ours = InfiniteVLDecoderGPU(dims, num_slots=3, device=DEV, dtype=BF, ring_block_size=16)
    ours.load_reference_state(ref.state_dict())
    ids = torch.randint(0, 5000, (150,))
    logits_ref, state = ref.prefill(MultimodalInputs(input_ids=ids))
    slot = torch.tensor([1], device=DEV)
    outs = []
    for s, e in [(0, 100), (100, 150)]:
        pos = torch.arange(s, e, device=DEV).expand(3, -1)
        hid = ours.prefill(ours.embed[ids[s:e].to(DEV)], pos, torch.tensor([0, e - s], device=DEV),
                           torch.tensor([s], device=DEV), slot, e - s)
        outs.append(ours.logits(hid).float().cpu())
    res = dict(prefill_logits=rel(torch.cat(outs), logits_ref))
    graphs = DecodeGraphs(ours, [1, 4])
    tok = int(logits_ref[-1].argmax())
    worst, agree = 0.0, 0
    for t in range(150, 160):
        want = ref.step(tok, state)
        got = graphs.step(torch.tensor([tok], device=DEV), torch.full((3, 1), t, device=DEV),
                          torch.tensor([t], device=DEV), slot)[0].float().cpu()
        worst = max(worst, rel(got, want))
        agree += int(got.argmax() == want.argmax())
        tok = int(want.argmax())
    res.update(decode_logits_graph_bs1=worst, greedy_argmax_agree=f"{agree}/10")
    return res


def ring_block_size() -> int:
    """The block size the vLLM model runs the 4B config with (a page holds one GDN layer's state)."""
    from infinitevl_vllm.model.state_size import state_block_size

    return state_block_size(load_4b().text_config, 16, BF, BF, BF)


def our_model(num_slots: int):
    cfg = load_4b()
    dims = DecoderDims.from_config(cfg.text_config)
    m = InfiniteVLDecoderGPU(dims, num_slots=num_slots, device=DEV, dtype=BF, ring_block_size=ring_block_size())
    torch.nn.init.normal_(m.ssm_pool, std=0.05)
    torch.nn.init.normal_(m.conv_pool)
    torch.nn.init.normal_(m.kv_cache)
    return m, dims


def our_step_bytes(m: InfiniteVLDecoderGPU, batch: int, ctx: int) -> int:
    sb = m.state_bytes_per_slot()
    d = m.d
    ring_tok = 2 * d.kv_heads * d.head_dim * 2 * len(m.swa_ids)  # K+V bf16, all SWA layers
    per_seq = 2 * sb["ssm"] + 2 * sb["conv"] + ring_tok * min(ctx, d.window - 1) + ring_tok
    return m.weight_bytes() + batch * per_seq


def section_decode(bw: float):
    res = {"contexts": CONTEXTS, "ours": {}, "b": {}, "a": {}}
    m, dims = our_model(num_slots=2)
    graphs = DecodeGraphs(m, [1])
    _, ids, pos, tpos, slots, _ = graphs.graphs[1]
    slots.fill_(0)
    for ctx in CONTEXTS:
        pos.fill_(ctx)
        tpos.fill_(ctx)
        t = time_ms(lambda: graphs.replay(1), iters=50)
        floor = our_step_bytes(m, 1, ctx) / bw * 1e3
        res["ours"][ctx] = dict(ms=t, floor_ms=floor, over_floor=t / floor)
        log("ours bs1", ctx, res["ours"][ctx])
    res["ours_weight_bytes"] = m.weight_bytes()
    graphs = m = None
    free_mem()
    # (b): one graph per context (the filled length is part of the captured shapes)
    for ctx in CONTEXTS:
        try:
            qb = QwenStrong(1, ctx + 1)
            ids = torch.zeros(1, dtype=torch.long, device=DEV)
            g = graph_of(lambda qb=qb, ctx=ctx, ids=ids: qb.decode(ids, ctx))
            t = time_ms(g.replay, iters=20)
            floor = (qb.weight_bytes() + qb.kv_bytes_per_token() * (ctx + 1)) / bw * 1e3
            res["b"][ctx] = dict(ms=t, floor_ms=floor, over_floor=t / floor)
            res["b_weight_bytes"] = qb.weight_bytes()
            log("b bs1", ctx, res["b"][ctx])
            g = qb = None
        except torch.OutOfMemoryError:
            res["b"][ctx] = "out of memory"
        free_mem()
    # (a): transformers eager
    try:
        res["a"] = decode_eager(bw)
    except Exception as e:  # noqa: BLE001
        RESULTS["errors"]["decode_a"] = traceback.format_exc()
        log("eager failed", e)
    RESULTS["decode_bs1"] = res


def eager_model():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    c = QWEN3B
    cfg = Qwen2_5_VLTextConfig(hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                               num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                               num_key_value_heads=c["kv_heads"], vocab_size=c["vocab"], rms_norm_eps=c["rms_eps"],
                               max_position_embeddings=128000, tie_word_embeddings=True,
                               rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"],
                                                "mrope_section": c["mrope_section"]})
    cfg._attn_implementation = "sdpa"
    with torch.device(DEV):
        model = Qwen2_5_VLTextModel(cfg).to(BF).eval()
    return cfg, model


def decode_eager(bw: float):
    from transformers import DynamicCache

    cfg, model = eager_model()
    lm_head = model.embed_tokens.weight
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"attn_implementation": cfg._attn_implementation}
    c = QWEN3B
    for ctx in CONTEXTS:
        try:
            cache = DynamicCache(config=cfg)
            for li in range(c["layers"]):
                kk = torch.randn(1, c["kv_heads"], ctx, c["head_dim"], device=DEV, dtype=BF)
                cache.update(kk, torch.randn_like(kk), li)
            ids = torch.zeros(1, 1, dtype=torch.long, device=DEV)
            state = {"n": ctx}

            @torch.no_grad()
            def step(cache=cache, ids=ids, state=state):
                p = torch.full((3, 1, 1), state["n"], device=DEV)
                h = model(input_ids=ids, position_ids=p, past_key_values=cache, use_cache=True).last_hidden_state
                state["n"] += 1
                return h[:, -1] @ lm_head.t()

            t = time_ms(step, iters=5, reps=3, warm=1)
            floor = (wbytes + 36864 * (ctx + 1)) / bw * 1e3
            out[ctx] = dict(ms=t, floor_ms=floor, over_floor=t / floor)
            log("a bs1", ctx, out[ctx])
            cache = None
        except torch.OutOfMemoryError:
            out[ctx] = "out of memory"
        free_mem()
    model = None
    free_mem()
    return out


def section_throughput(bw: float):
    res = {}
    m, dims = our_model(num_slots=2)
    per_slot = sum(m.state_bytes_per_slot().values())
    act_per_seq = 4 * (dims.vocab + 2 * dims.intermediate + 4 * dims.hidden * 4)  # logits + MLP + scratch, bf16
    m = None
    free = free_mem()
    wbytes = res_w = None
    bmax = int((free - 8.5e9 - 3 * 2**30) // (per_slot + act_per_seq))
    bmax = max(1, bmax)
    for _ in range(4):
        try:
            m, _ = our_model(num_slots=bmax + 1)
            graphs = DecodeGraphs(m, [bmax], warmup=1)
            break
        except torch.OutOfMemoryError:
            m = graphs = None
            free_mem()
            bmax = int(bmax * 0.9)
    _, ids, pos, tpos, slots, _ = graphs.graphs[bmax]
    slots.copy_(torch.arange(bmax, device=DEV))  # one distinct slot per sequence
    wbytes = m.weight_bytes()
    res["ours"] = {"batch": bmax, "state_bytes_per_seq": per_slot}
    for ctx in (32768, 131072):
        pos.fill_(ctx)
        tpos.fill_(ctx)
        t = time_ms(lambda: graphs.replay(bmax), iters=5, reps=3)
        floor = our_step_bytes(m, bmax, ctx) / bw * 1e3
        res["ours"][ctx] = dict(step_ms=t, tok_s=bmax / t * 1e3, floor_ms=floor, over_floor=t / floor)
        log("ours tput", ctx, res["ours"][ctx])
    res_w = wbytes
    graphs = m = None
    free_mem()
    res["b"] = {}
    for ctx in (32768, 131072):
        free = free_mem()
        per_seq = 36864 * (ctx + 1)
        b = max(1, int((free - 6.5e9 - 3 * 2**30) // (per_seq + 4 * (151936 + 2 * 11008 + 16 * 2048))))
        while b >= 1:
            try:
                qb = QwenStrong(b, ctx + 1)
                ids = torch.zeros(b, dtype=torch.long, device=DEV)
                g = graph_of(lambda qb=qb, ctx=ctx, ids=ids: qb.decode(ids, ctx))
                break
            except torch.OutOfMemoryError:
                qb = g = None
                free_mem()
                b -= max(1, b // 20)
        t = time_ms(g.replay, iters=5, reps=3)
        floor = (qb.weight_bytes() + b * qb.kv_bytes_per_token() * (ctx + 1)) / bw * 1e3
        res["b"][ctx] = dict(batch=b, step_ms=t, tok_s=b / t * 1e3, floor_ms=floor, over_floor=t / floor)
        log("b tput", ctx, res["b"][ctx])
        g = qb = None
        free_mem()
    res["ours_weight_bytes"] = res_w
    RESULTS["throughput"] = res


def section_prefill(T: int = 131072, chunk: int = 16384):
    res = {"tokens": T, "chunk": chunk}
    m, dims = our_model(num_slots=2)
    x_all = torch.randn(T, dims.hidden, device=DEV, dtype=BF) * 0.02
    slot = torch.tensor([0], device=DEV)

    def ours():
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            pos = torch.arange(s, e, device=DEV).expand(3, -1)
            h = m.prefill(x_all[s:e], pos, torch.tensor([0, e - s], device=DEV), torch.tensor([s], device=DEV),
                          slot, e - s)
        return m.logits(h[-1:])

    ours()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ours()
    torch.cuda.synchronize()
    res["ours_s"] = time.perf_counter() - t0
    log("ours prefill", res["ours_s"])
    m = x_all = None
    free_mem()
    qb = QwenStrong(1, T)
    x_all = torch.randn(1, T, QWEN3B["hidden"], device=DEV, dtype=BF) * 0.02
    for ch in (chunk, 32768):

        def base(ch=ch):
            for s in range(0, T, ch):
                e = min(T, s + ch)
                h = qb.forward(x_all[:, s:e], s, torch.arange(s, e, device=DEV))
            return h[:, -1] @ qb.embed.t()

        try:
            base()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            base()
            torch.cuda.synchronize()
            res[f"b_chunk{ch}_s"] = time.perf_counter() - t0
            log("b prefill", ch, res[f"b_chunk{ch}_s"])
        except torch.OutOfMemoryError:
            res[f"b_chunk{ch}_s"] = "out of memory"
            free_mem()
    bt = [v for k, v in res.items() if k.startswith("b_chunk") and isinstance(v, float)]
    res["b_s"] = min(bt)
    qb = x_all = None
    free_mem()
    RESULTS["prefill"] = res


class FastVision:
    """The reference vision tower's weights, run for one fixed frame grid: windows batched into one
    SDPA call, RoPE/permutations precomputed, capturable in a CUDA graph."""

    def __init__(self, tower, grid=(1, 32, 32)):
        from infinitevl_vllm.reference.vision import patch_hw_positions, window_order

        self.t = tower
        cfg = tower.cfg
        gt = torch.tensor([grid])
        merge, group = cfg.spatial_merge_size, cfg.spatial_merge_size**2
        pos = patch_hw_positions(gt, merge).to(DEV)
        ang = (pos[..., None].float() * tower.inv_freq.float().to(DEV)).flatten(1)
        emb = torch.cat([ang, ang], -1)
        wu = cfg.window_size // merge // cfg.patch_size
        order, sizes = window_order(gt, merge, wu)
        assert len(set(sizes)) == 1, "batched windows need equal sizes"
        order = order.to(DEV)
        self.perm = (order[:, None] * group + torch.arange(group, device=DEV)).flatten()
        self.unperm = torch.argsort(order)
        self.cos = emb.cos()[self.perm].float().contiguous()
        self.sin = emb.sin()[self.perm].float().contiguous()
        self.win = sizes[0] * group
        self.pe_w = tower.patch_embed.proj.weight.reshape(cfg.hidden_size, -1)
        self.heads = cfg.num_heads
        self.full = set(cfg.fullatt_block_indexes)
        # The MLP width 3420 is not a multiple of 8, which sends cuBLAS to a slow unaligned kernel;
        # zero-padded rows/columns to 3456 compute exactly the same function.
        self.mlp = []
        for blk in tower.blocks:
            mm = blk.mlp
            n = mm.gate_proj.weight.shape[0]
            pad = (-n) % 64

            def rows(w, pad=pad):
                return F.pad(w, (0, 0, 0, pad)) if w.dim() == 2 else F.pad(w, (0, pad))

            # gate and up in one GEMM whose output silu_mul splits in the middle
            self.mlp.append((torch.cat([rows(mm.gate_proj.weight), rows(mm.up_proj.weight)]),
                             torch.cat([rows(mm.gate_proj.bias), rows(mm.up_proj.bias)]),
                             F.pad(mm.down_proj.weight, (0, pad)), mm.down_proj.bias))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels @ self.pe_w.t())[self.perm]
        N, Dm = x.shape
        hd = Dm // self.heads
        for i, blk in enumerate(self.t.blocks):
            h = rmsnorm(x, blk.norm1.weight, blk.norm1.eps)
            qkv = blk.attn.qkv(h)
            rope_qk_inplace(qkv, self.heads, self.heads, hd, self.cos, self.sin)  # q and k in one launch
            q, k, v = qkv.view(N, 3, self.heads, hd).unbind(1)
            seg = N if i in self.full else self.win

            def heads_first(t, seg=seg):
                return t.view(N // seg, seg, self.heads, hd).transpose(1, 2)

            o = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v))
            x = x + blk.attn.proj(o.transpose(1, 2).reshape(N, Dm))
            guw, gub, dw, db = self.mlp[i]
            h = rmsnorm(x, blk.norm2.weight, blk.norm2.eps)
            x = x + F.linear(silu_mul(F.linear(h, guw, gub)), dw, db)
        return self.t.merger(x)[self.unperm]


def section_streaming(frames: int, base_points: list[int]):
    from infinitevl_vllm.reference.vision import VisionTower

    cfg = load_4b()
    res = {"frames_requested": frames, "frame": "448x448 -> 1024 patches -> 256 tokens"}
    with torch.device(DEV):
        tower = VisionTower(cfg.vision_config).to(BF).eval()
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else None
    fv = FastVision(tower)
    pix = torch.randn(1024, 3 * 2 * 14 * 14, device=DEV, dtype=BF)
    with torch.no_grad():
        want = tower(pix, torch.tensor([[1, 32, 32]]))
        got = fv(pix)
    res["fast_vision_vs_reference_rel"] = rel(got, want)
    m, dims = our_model(num_slots=2)
    m.ssm_pool.zero_(), m.conv_pool.zero_()
    slot = torch.tensor([0], device=DEV)
    cu = torch.tensor([0, 256], device=DEV)
    start = torch.zeros(1, dtype=torch.long, device=DEV)
    hw = torch.stack(torch.meshgrid(torch.arange(16, device=DEV), torch.arange(16, device=DEV), indexing="ij")
                     ).flatten(1)
    positions = torch.zeros(3, 256, dtype=torch.long, device=DEV)

    @torch.no_grad()
    def frame():
        emb = fv(pix)
        h = m.prefill(emb, positions, cu, start, slot, 256)
        start.add_(256)
        positions[0].add_(1)
        positions[1:].copy_(hw + positions[0, :1])
        return h

    for _ in range(2):
        frame()
    m.ssm_pool.zero_(), m.conv_pool.zero_(), start.zero_(), positions.zero_()
    graph = None
    try:
        graph = graph_of(frame)
        m.ssm_pool.zero_(), m.conv_pool.zero_(), start.zero_(), positions.zero_()
        run = graph.replay
        res["cuda_graph"] = True
    except Exception as e:  # noqa: BLE001
        res["cuda_graph"] = f"not captured: {type(e).__name__}: {str(e)[:200]}"
        torch.cuda.synchronize()
        m.ssm_pool.zero_(), m.conv_pool.zero_(), start.zero_(), positions.zero_()
        run = frame
    torch.cuda.reset_peak_memory_stats()
    per = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tl_ = t0
    for f in range(frames):
        run()
        if (f + 1) % 100 == 0:
            torch.cuda.synchronize()
            now = time.perf_counter()
            per.append(dict(frame=f + 1, fps_last100=100 / (now - tl_),
                            peak_gib=torch.cuda.max_memory_allocated() / 2**30))
            tl_ = now
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    res["ours"] = dict(frames=frames, seconds=total, fps=frames / total, peak_mem_gib=torch.cuda.max_memory_allocated()
                       / 2**30, tokens_in_state=int(start.item()), curve=per)
    log("ours streaming", {k: v for k, v in res["ours"].items() if k != "curve"})
    graph = m = None
    free_mem()
    # baseline: growing KV (preallocated to the largest sampled frame), per-frame time sampled
    maxf = max(base_points)
    base = {}
    try:
        qb = QwenStrong(1, maxf * 256)
        for f in sorted(base_points):
            s = (f - 1) * 256

            @torch.no_grad()
            def bframe(s=s):
                emb = fv(pix)
                return qb.forward(emb[None], s, torch.arange(s, s + 256, device=DEV))

            torch.cuda.reset_peak_memory_stats()
            t = time_ms(bframe, iters=3, reps=3, warm=1)
            base[f] = dict(ms=t, fps=1e3 / t, kv_gib=36864 * f * 256 / 2**30,
                           peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
            log("b streaming frame", f, base[f])
        qb = None
    except torch.OutOfMemoryError:
        base["out_of_memory_at_prealloc"] = maxf
    free_mem()
    pts = sorted(k for k in base if isinstance(k, int))
    if pts:
        import numpy as np

        # a run of `frames` frames: sampled per-frame times, linearly interpolated and summed
        n = min(frames, pts[-1])
        per_frame = np.interp(np.arange(1, n + 1), pts, [base[p]["ms"] for p in pts])
        base["estimated_fps_over_run"] = float(n / (per_frame.sum() / 1e3))
        base["estimated_frames"] = n
        kv_frame = 36864 * 256
        base["frames_until_kv_fills_gpu_estimate"] = int(
            (torch.cuda.get_device_properties(0).total_memory - 6.5e9 - 2 * 2**30) // kv_frame)
    res["b"] = base
    RESULTS["streaming"] = res


def kernel_table(prof, limit: int = 25) -> list[dict]:
    """CUDA kernels of a torch.profiler run, summed by name, longest first."""
    agg: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            a = agg.setdefault(e.name, [0.0, 0])
            a[0] += e.device_time
            a[1] += 1
    rows = sorted(agg.items(), key=lambda kv: -kv[1][0])
    return [dict(kernel=k[:90], us=v[0], calls=v[1]) for k, v in rows[:limit]]


def kernel_groups(rows: list[dict]) -> dict[str, float]:
    g: dict[str, float] = {}
    for r in rows:
        n = r["kernel"].lower()
        key = next((k for k, pats in (
            ("gemm/gemv (cuBLAS)", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "splitk")),
            ("gdn recurrent/conv (ours)", ("_gdn_decode", "_conv_decode", "_conv_varlen")),
            ("swa ring (ours)", ("_swa_", "_ring_write")),
            ("fla chunked gdn", ("chunk", "fla", "recompute", "solve", "kkt", "cumsum")),
            ("norms/rope/silu (ours)", ("_rmsnorm", "_silu_mul", "_gated_rmsnorm", "_rope")),
            ("attention (sdpa)", ("flash", "fmha", "attention", "cudnn")),
        ) if any(p in n for p in pats)), "other")
        g[key] = g.get(key, 0.0) + r["us"]
    return g


def section_profile():
    """Where the time goes: our batch-1 decode step and one streaming frame, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    res = {}
    m, dims = our_model(num_slots=2)
    ids = torch.zeros(1, dtype=torch.long, device=DEV)
    pos = torch.full((3, 1), 65536, device=DEV)
    tpos = torch.full((1,), 65536, device=DEV)
    slots = torch.zeros(1, dtype=torch.long, device=DEV)
    for _ in range(3):
        m.decode(ids, pos, tpos, slots)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            m.decode(ids, pos, tpos, slots)
        torch.cuda.synchronize()
    rows = kernel_table(prof, limit=200)
    for r in rows:
        r["us"] /= 5
        r["calls"] //= 5
    res["decode_bs1_kernels_per_step"] = rows[:25]
    res["decode_bs1_kernel_sum_ms"] = sum(r["us"] for r in rows) / 1e3
    res["decode_bs1_groups_ms"] = {k: v / 1e3 for k, v in kernel_groups(rows).items()}
    res["decode_bs1_kernel_count"] = sum(r["calls"] for r in rows)
    # every GEMV of a decode step alone, against its own byte floor
    bw = RESULTS["env"]["copy_bw_gbs"] * 1e9
    x = torch.randn(1, dims.hidden, device=DEV, dtype=BF)
    gem = []
    for name in ("inp", "o", "gate_up", "down"):
        w = m.layers[1][name]
        xi = torch.randn(1, w.shape[1], device=DEV, dtype=BF)
        t = time_ms(lambda w=w, xi=xi: xi @ w.t(), iters=50)
        gem.append(dict(weight=name, shape=list(w.shape), ms=t, floor_ms=w.numel() * 2 / bw * 1e3))
    t = time_ms(lambda: x @ m.embed.t(), iters=20)
    gem.append(dict(weight="lm_head", shape=list(m.embed.shape), ms=t, floor_ms=m.embed.numel() * 2 / bw * 1e3))
    res["gemv_bs1"] = gem
    m = None
    free_mem()
    RESULTS["profile"] = res
    log("profile", json.dumps(res, indent=1))


def section_stream_profile():
    """One streaming frame: vision tower and decoder prefill timed apart, and the frame's kernels."""
    from torch.profiler import ProfilerActivity, profile

    from infinitevl_vllm.reference.vision import VisionTower

    cfg = load_4b()
    with torch.device(DEV):
        tower = VisionTower(cfg.vision_config).to(BF).eval()
    fv = FastVision(tower)
    pix = torch.randn(1024, 3 * 2 * 14 * 14, device=DEV, dtype=BF)
    m, dims = our_model(num_slots=2)
    slot = torch.tensor([0], device=DEV)
    cu = torch.tensor([0, 256], device=DEV)
    start = torch.full((1,), 100000, dtype=torch.long, device=DEV)
    positions = torch.zeros(3, 256, dtype=torch.long, device=DEV)
    emb = torch.no_grad()(fv)(pix)
    res = {}
    with torch.no_grad():
        res["vision_ms"] = time_ms(lambda: fv(pix), iters=10)
        res["decoder_prefill_256_ms"] = time_ms(lambda: m.prefill(emb, positions, cu, start, slot, 256), iters=10)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                m.prefill(fv(pix), positions, cu, start, slot, 256)
            torch.cuda.synchronize()
    rows = kernel_table(prof, limit=300)
    for r in rows:
        r["us"] /= 3
        r["calls"] //= 3
    res["frame_kernels"] = rows[:25]
    res["frame_groups_ms"] = {k: v / 1e3 for k, v in kernel_groups(rows).items()}
    m = None
    free_mem()
    RESULTS["stream_profile"] = res
    log("stream profile", json.dumps(res, indent=1))


def summarize():
    s = {}
    d = RESULTS.get("decode_bs1", {})
    ours, a, b = d.get("ours", {}), d.get("a", {}), d.get("b", {})

    def ms(tab, c):
        v = tab.get(c)
        return v["ms"] if isinstance(v, dict) else None

    if ours:
        s["decode_bs1_over_floor_max"] = max(v["over_floor"] for v in ours.values())
        s["latency_ratio_256k_4k"] = ms(ours, 262144) / ms(ours, 4096)
    if ms(a, 65536) and ms(ours, 65536):
        s["speedup_vs_eager_64k_bs1"] = ms(a, 65536) / ms(ours, 65536)
    if ms(b, 262144) and ms(ours, 262144):
        s["decode_speedup_256k_bs1"] = ms(b, 262144) / ms(ours, 262144)
    t = RESULTS.get("throughput", {})
    for ctx, key in ((32768, "throughput_ratio_32k"), (131072, "throughput_ratio_128k")):
        try:
            s[key] = t["ours"][ctx]["tok_s"] / t["b"][ctx]["tok_s"]
        except (KeyError, TypeError):
            pass
    try:
        s["baseline_over_floor_32k"] = t["b"][32768]["over_floor"]
    except (KeyError, TypeError):
        pass
    p = RESULTS.get("prefill", {})
    if "ours_s" in p and "b_s" in p:
        s["prefill_speedup_128k"] = p["b_s"] / p["ours_s"]
    st = RESULTS.get("streaming", {})
    if "ours" in st:
        s["streaming_fps"] = st["ours"]["fps"]
    s["kernels_matched_reference"] = RESULTS.get("checks", {}).get("all_matched")
    goals = dict(decode_bs1_over_floor_max=("<=", 1.3), latency_ratio_256k_4k=("<=", 1.1),
                 speedup_vs_eager_64k_bs1=(">=", 10), decode_speedup_256k_bs1=(">=", 1.8),
                 throughput_ratio_32k=(">=", 7), throughput_ratio_128k=(">=", 28), baseline_over_floor_32k=("<=", 1.5),
                 prefill_speedup_128k=(">=", 2.5), streaming_fps=(">=", 60))
    RESULTS["goals"] = {k: dict(goal=f"{op} {g}", value=s.get(k),
                                met=None if s.get(k) is None else (s[k] <= g if op == "<=" else s[k] >= g))
                        for k, (op, g) in goals.items()}
    RESULTS["summary"] = s


def plots(out_dir: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        RESULTS["plots"] = "matplotlib missing"
        return
    made = []
    d = RESULTS.get("decode_bs1")
    if d:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, lab in (("ours", "InfiniteVL-4B (ours)"), ("b", "Qwen2.5-VL-3B strong (b)"),
                          ("a", "Qwen2.5-VL-3B transformers eager (a)")):
            pts = [(c, v["ms"], v["floor_ms"]) for c, v in d.get(name, {}).items() if isinstance(v, dict)]
            if pts:
                ax.plot([p[0] / 1024 for p in pts], [p[1] for p in pts], "o-", label=lab)
                ax.plot([p[0] / 1024 for p in pts], [p[2] for p in pts], ":", color=ax.lines[-1].get_color(),
                        label=f"{lab.split(' (')[0]} byte floor" if name != "a" else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("ms / token, batch 1")
        ax.set_title(f"Decode latency, {RESULTS['env']['gpu']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "gpu_h100_decode_bs1.png"), dpi=110)
        made.append("gpu_h100_decode_bs1.png")
    t = RESULTS.get("throughput")
    if t:
        fig, ax = plt.subplots(figsize=(6, 4))
        ctxs = [32768, 131072]
        w = 0.35
        for i, (name, lab) in enumerate((("ours", "InfiniteVL-4B (ours)"), ("b", "Qwen2.5-VL-3B strong (b)"))):
            vals = [t[name][c]["tok_s"] if isinstance(t[name].get(c), dict) else 0 for c in ctxs]
            bars = ax.bar([j + i * w for j in range(2)], vals, w, label=lab)
            for bar, c in zip(bars, ctxs):
                bs = t[name]["batch"] if name == "ours" else t[name][c]["batch"]
                ax.annotate(f"bs {bs}", (bar.get_x() + w / 2, bar.get_height()), ha="center", fontsize=7)
        ax.set_xticks([j + w / 2 for j in range(2)], ["32K context", "128K context"])
        ax.set_ylabel("decode tokens / s (largest batch that fits)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "gpu_h100_throughput.png"), dpi=110)
        made.append("gpu_h100_throughput.png")
    st = RESULTS.get("streaming")
    if st and "ours" in st:
        fig, ax = plt.subplots(figsize=(7, 4))
        c = st["ours"]["curve"]
        ax.plot([p["frame"] for p in c], [p["fps_last100"] for p in c], "o-", label="InfiniteVL-4B (ours)")
        b = {k: v for k, v in st.get("b", {}).items() if isinstance(k, int)}
        if b:
            ax.plot(sorted(b), [b[k]["fps"] for k in sorted(b)], "s--", label="Qwen2.5-VL-3B strong (b), growing KV")
        ax.set_xlabel("frame")
        ax.set_ylabel("frames / s")
        ax.set_title("Streaming 448x448 frames (vision tower + decoder)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "gpu_h100_streaming.png"), dpi=110)
        made.append("gpu_h100_streaming.png")
    RESULTS["plots"] = made


def int_keys(o):
    """JSON turned our integer keys (contexts, frames) into strings; turn them back."""
    if isinstance(o, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): int_keys(v) for k, v in o.items()}
    return o


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--base-frames", default="1,250,500,1000,2000")
    ap.add_argument("--sections",
                    default="gemv_sweep,checks,decode,throughput,prefill,streaming,profile,stream_profile")
    ap.add_argument("--merge", default=None, help="an earlier results JSON whose sections this run keeps")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.merge and os.path.exists(args.merge):
        RESULTS.update(int_keys(json.load(open(args.merge))))
        RESULTS.setdefault("errors", {})
    bw = section_env()
    torch.backends.cuda.matmul.allow_tf32 = False
    fns = dict(gemv_sweep=section_gemv_sweep, checks=section_checks,
               decode=lambda: section_decode(bw), throughput=lambda: section_throughput(bw),
               prefill=section_prefill,
               streaming=lambda: section_streaming(args.frames, [int(x) for x in args.base_frames.split(",")]),
               profile=section_profile, stream_profile=section_stream_profile)
    path = os.path.join(args.out, "gpu_h100.json")
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            fns[name]()
        except Exception:  # noqa: BLE001
            RESULTS["errors"][name] = traceback.format_exc()
            log("SECTION FAILED", name, RESULTS["errors"][name])
        free_mem()
        RESULTS.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        summarize()
        json.dump(RESULTS, open(path, "w"), indent=1, default=str)
    plots(args.out)
    json.dump(RESULTS, open(path, "w"), indent=1, default=str)
    log("SUMMARY", json.dumps(RESULTS["summary"], indent=1))
    log("GOALS", json.dumps(RESULTS["goals"], indent=1))


if __name__ == "__main__":
    main()
