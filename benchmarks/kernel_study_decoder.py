"""Kernel study: the InfiniteVL decoder on the Triton kernels (slot-pool states, ring KV, CUDA-graph decode),
timed by gpu_h100.py. Nothing serves it (the served model is infinitevl_vllm/model/vllm_model.py); it shows
what the kernels of infinitevl_kernels reach without vLLM around them. Self-check: kernel_study_check.py.

No vLLM and no project config import: the shapes come in as ``DecoderDims`` (``from_config`` reads
any object with the text-config attribute names). Weights use the checkpoint's names through
``load_reference_state``; the input projections of each layer are concatenated into one matrix
(q|k|v|g|a|b for GDN, q|k|v for SWA, gate|up for the MLP) so a decode step reads each weight once
in as few launches as possible.

State pools (per model, all sequences): conv ``[Lg, slots, C, K-1]``, recurrent
``[Lg, slots, H, Dv, Dk]``; a sequence is a slot index. The SWA KV is vLLM's paged ring (see
``infinitevl_kernels/swa/ring.py``): per SWA layer a cache ``[num_blocks, Hkv, block_size, 2D]``, and per slot a
block-table row of ``ceil(W / block_size) + 1`` pages (shared by the SWA layers, as vLLM's block table is), so
the kernels here are the ones the vLLM model runs on CUDA.

At batch 1 the products run as fused Triton matrix-vector passes (``triton_ops.norm_linear`` /
``silu_linear``), so the norms and SwiGLU cost no launch of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from infinitevl_kernels.gdn.batch import GDNLayer, GDNShape
from infinitevl_kernels.gdn.triton_batch import gdn_decode_slots, gdn_prefill_varlen
from infinitevl_kernels.layout import (
    GDN_CONVS,
    GDN_GATES,
    GDN_INPUT,
    LAYER_PREFIX,
    MLP_GATE_UP,
    SWA_QKV,
    is_swa_layer,
    ring_blocks,
    rope_of,
)
from infinitevl_kernels.rope import mrope_frequencies
from infinitevl_kernels.swa.triton_ring import swa_paged_decode, swa_paged_prefill
from infinitevl_kernels.triton_ops import (
    gated_norm_linear,
    linear,
    mrope_qk,
    norm_linear,
    rmsnorm,
    silu_linear,
)


@dataclass
class DecoderDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    lin_heads: int
    dk: int
    dv: int
    conv: int
    window: int
    vocab: int
    rms_eps: float
    norm_eps: float
    rope_theta: float
    mrope_section: list[int]

    @classmethod
    def from_config(cls, tc) -> DecoderDims:
        """From an InfiniteVL text config (attribute names of ``InfiniteVLTextConfig``)."""
        rope_theta, mrope_section = rope_of(tc)
        return cls(
            hidden=tc.hidden_size, intermediate=tc.intermediate_size, layers=tc.num_hidden_layers,
            heads=tc.num_attention_heads, kv_heads=tc.num_key_value_heads, head_dim=tc.head_dim,
            lin_heads=tc.num_linear_heads, dk=tc.linear_head_dim, dv=tc.linear_head_dim * tc.expand_v,
            conv=tc.conv_size, window=int(tc.sliding_window), vocab=tc.vocab_size, rms_eps=tc.rms_norm_eps,
            norm_eps=tc.norm_eps, rope_theta=rope_theta, mrope_section=mrope_section,
        )

    def is_swa(self, i: int) -> bool:
        return is_swa_layer(i)

    @property
    def gdn(self) -> GDNShape:
        return GDNShape(self.lin_heads, self.dk, self.dv)

    @property
    def conv_channels(self) -> int:
        return 2 * self.lin_heads * self.dk + self.lin_heads * self.dv


class InfiniteVLDecoderGPU:
    """Decoder forward over many sequences at once; every state lives in a pool indexed by slot."""

    def __init__(self, dims: DecoderDims, num_slots: int, device: torch.device | str, dtype=torch.bfloat16,
                 ring_block_size: int = 64, state_dtype=None, seed: int = 0):
        self.d, self.dtype, self.device = dims, dtype, torch.device(device)
        self.num_slots = num_slots
        self.ring_block_size = ring_block_size
        self.ring_blocks = ring_blocks(dims.window, ring_block_size)
        sdt = state_dtype or dtype
        self.swa_ids = [i for i in range(dims.layers) if dims.is_swa(i)]
        self.gdn_ids = [i for i in range(dims.layers) if not dims.is_swa(i)]
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(seed)
        self.layers: list[dict] = []
        self._init_random(g)
        C = dims.conv_channels
        self.conv_pool = torch.zeros(len(self.gdn_ids), num_slots, C, dims.conv - 1, dtype=sdt, device=dev)
        self.ssm_pool = torch.zeros(len(self.gdn_ids), num_slots, dims.lin_heads, dims.dv, dims.dk, dtype=sdt,
                                    device=dev)
        pages = num_slots * self.ring_blocks
        self.kv_cache = torch.zeros(len(self.swa_ids), pages, dims.kv_heads, ring_block_size, 2 * dims.head_dim,
                                    dtype=dtype, device=dev)
        # pages scattered over the cache, as vLLM's block pool hands them out
        perm = torch.randperm(pages, generator=torch.Generator().manual_seed(seed))
        self.block_table = perm.view(num_slots, self.ring_blocks).to(dev, torch.int32)
        self.inv_freq, self.rope_rows = mrope_frequencies(dims.head_dim, dims.rope_theta, dims.mrope_section, dev)

    # -- weights ------------------------------------------------------------------------------
    def _rand(self, g, *shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32) * std).to(self.dtype)

    def _init_random(self, g) -> None:
        d = self.d
        self.embed = self._rand(g, d.vocab, d.hidden)
        self.final_norm = torch.ones(d.hidden, dtype=self.dtype, device=self.device)
        H, key, val = d.lin_heads, d.lin_heads * d.dk, d.lin_heads * d.dv
        for i in range(d.layers):
            L = dict(in_norm=torch.ones(d.hidden, dtype=self.dtype, device=self.device),
                     post_norm=torch.ones(d.hidden, dtype=self.dtype, device=self.device),
                     gate_up=self._rand(g, 2 * d.intermediate, d.hidden), down=self._rand(g, d.hidden, d.intermediate))
            if d.is_swa(i):
                qkv = (d.heads + 2 * d.kv_heads) * d.head_dim
                L.update(qkv=self._rand(g, qkv, d.hidden), qkv_bias=self._rand(g, qkv),
                         o=self._rand(g, d.hidden, d.heads * d.head_dim))
            else:
                L.update(
                    inp=self._rand(g, 2 * key + 2 * val + 2 * H, d.hidden), o=self._rand(g, d.hidden, val),
                    conv_w=(torch.randn(2 * key + val, d.conv, generator=g, device=self.device) * 0.3).to(self.dtype),
                    A_log=torch.rand(H, generator=g, device=self.device) * 2.0,
                    dt_bias=torch.randn(H, generator=g, device=self.device) * 0.5,
                    o_norm=torch.ones(d.dv, dtype=self.dtype, device=self.device),
                )
            self.layers.append(L)

    @torch.no_grad()
    def load_reference_state(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in the checkpoint / reference model (``model.layers.N...``)."""
        d = self.d

        def t(name):
            return sd[name].to(self.device, self.dtype)

        self.embed = t("model.embed_tokens.weight")
        self.final_norm = t("model.norm.weight")
        for i, L in enumerate(self.layers):
            p = LAYER_PREFIX.format(i=i)
            a = p + "self_attn."
            L["in_norm"], L["post_norm"] = t(p + "input_layernorm.weight"), t(p + "post_attention_layernorm.weight")
            L["gate_up"] = torch.cat([t(p + f"mlp.{n}_proj.weight") for n in MLP_GATE_UP])
            L["down"] = t(p + "mlp.down_proj.weight")
            if d.is_swa(i):
                L["qkv"] = torch.cat([t(a + f"{n}_proj.weight") for n in SWA_QKV])
                L["qkv_bias"] = torch.cat([t(a + f"{n}_proj.bias") for n in SWA_QKV])
                L["o"] = t(a + "o_proj.weight")
            else:
                L["inp"] = torch.cat([t(a + f"{n}_proj.weight") for n in GDN_INPUT + GDN_GATES])
                L["o"] = t(a + "o_proj.weight")
                L["conv_w"] = torch.cat([t(a + f"{n}_conv1d.weight")[:, 0] for n in GDN_CONVS])
                L["A_log"] = sd[a + "A_log"].to(self.device, torch.float32)
                L["dt_bias"] = sd[a + "dt_bias"].to(self.device, torch.float32)
                L["o_norm"] = t(a + "o_norm.weight")

    def weight_bytes(self) -> int:
        """Bytes of every weight a decode step reads (the embedding matrix once, as the tied LM head)."""
        n = self.embed.numel() * self.embed.element_size() + self.final_norm.numel() * self.final_norm.element_size()
        for L in self.layers:
            n += sum(v.numel() * v.element_size() for v in L.values())
        return n

    def state_bytes_per_slot(self) -> dict[str, int]:
        def per(t):
            return t[:, 0].numel() * t.element_size()

        ring = self.kv_cache[:, : self.ring_blocks].numel() * self.kv_cache.element_size()
        return dict(conv=per(self.conv_pool), ssm=per(self.ssm_pool), ring=ring)

    # -- pieces -------------------------------------------------------------------------------
    def _mlp(self, L, x, h):
        gu, x = norm_linear(x, h, L["post_norm"], self.d.rms_eps, L["gate_up"])
        return silu_linear(gu, L["down"]), x

    def _gdn(self, L, j, x, h, decode: bool, slots, meta):
        d, sh = self.d, self.d.gdn
        key, val, H = d.lin_heads * d.dk, d.lin_heads * d.dv, d.lin_heads
        proj, x = norm_linear(x, h, L["in_norm"], d.rms_eps, L["inp"])
        mixed = proj[:, : 2 * key + val]
        gate = proj[:, 2 * key + val : 2 * key + 2 * val]
        a = proj[:, 2 * key + 2 * val : 2 * key + 2 * val + H]
        b = proj[:, 2 * key + 2 * val + H :]
        layer = GDNLayer(conv_weight=L["conv_w"], A_log=L["A_log"], dt_bias=L["dt_bias"],
                         conv_state=self.conv_pool[j], ssm_state=self.ssm_pool[j], shape=sh)
        if decode:
            o = gdn_decode_slots(mixed, a, b, layer, slots=slots)
        else:
            cu, _, has_init, max_len = meta
            o = gdn_prefill_varlen(mixed, a, b, layer, slots=slots, has_initial_state=has_init, cu_seqlens=cu,
                                   max_len=max_len)
        return gated_norm_linear(o, gate, L["o_norm"], d.norm_eps, L["o"]), x

    def _swa(self, L, j, x, h, positions, decode: bool, table, meta, token_pos):
        d = self.d
        T = x.shape[0]
        qkv, x = norm_linear(x, h, L["in_norm"], d.rms_eps, L["qkv"], L["qkv_bias"])
        qd, kd = d.heads * d.head_dim, d.kv_heads * d.head_dim
        qk = mrope_qk(qkv, d.heads, d.kv_heads, d.head_dim, positions, self.inv_freq, self.rope_rows)
        q = qk[:, :qd].view(T, d.heads, d.head_dim)
        k = qk[:, qd:].view(T, d.kv_heads, d.head_dim)
        v = qkv[:, qd + kd :].view(T, d.kv_heads, d.head_dim)
        if decode:
            o = swa_paged_decode(q, k, v, self.kv_cache[j], table, token_pos, d.window)
        else:
            cu, start, _, max_len = meta
            o = swa_paged_prefill(q, k, v, self.kv_cache[j], table, cu, start, max_len, d.window)
        return linear(o.reshape(T, -1), L["o"]), x

    def _layers(self, x, positions, decode, slots, meta, token_pos, head=None):
        """All layers, then the final norm and (if given) the product with ``head``."""
        table = self.block_table[slots]  # ring pages of each sequence, once for all SWA layers
        h = None
        gi = si = 0
        for i, L in enumerate(self.layers):
            if self.d.is_swa(i):
                h, x = self._swa(L, si, x, h, positions, decode, table, meta, token_pos)
                si += 1
            else:
                h, x = self._gdn(L, gi, x, h, decode, slots, meta)
                gi += 1
            h, x = self._mlp(L, x, h)
        if head is not None:
            return norm_linear(x, h, self.final_norm, self.d.rms_eps, head)[0]
        return rmsnorm(x, self.final_norm, self.d.rms_eps, add=h)

    # -- entry points -------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, ids: torch.Tensor, positions: torch.Tensor, token_pos: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
        """One token for each of B sequences. ids, token_pos (index in the sequence), slots: [B];
        positions: M-RoPE [3, B]. Returns logits [B, vocab]. Graph-capturable (no host syncs)."""
        x = self.embed[ids]
        return self._layers(x, positions, True, slots, None, token_pos, head=self.embed)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, start_pos: torch.Tensor,
                slots: torch.Tensor, max_len: int) -> torch.Tensor:
        """A packed varlen batch of embeddings x [T, hidden] at M-RoPE positions [3, T]; each sequence
        continues its slot from token index ``start_pos`` (0 = fresh). Returns final hidden [T, hidden]."""
        has_init = start_pos > 0
        meta = (cu_seqlens, start_pos, has_init, max_len)
        return self._layers(x.clone(), positions, False, slots, meta, None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.embed.t()


class DecodeGraphs:
    """``model.decode`` captured in a CUDA graph per batch size; ``step`` pads up to the next size.

    Padding rows run on the model's last slot, which must therefore never hold a sequence.
    """

    def __init__(self, model: InfiniteVLDecoderGPU, batch_sizes: list[int], warmup: int = 2):
        self.model = model
        self.graphs: dict[int, tuple] = {}
        dev = model.device
        self.pool = torch.cuda.graph_pool_handle()
        for bs in sorted(batch_sizes, reverse=True):
            ids = torch.zeros(bs, dtype=torch.long, device=dev)
            pos = torch.zeros(3, bs, dtype=torch.long, device=dev)
            tpos = torch.zeros(bs, dtype=torch.long, device=dev)
            # warm-up and capture run on the padding slot only: real sequences' states stay untouched
            slots = torch.full((bs,), model.num_slots - 1, dtype=torch.long, device=dev)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(warmup):
                    model.decode(ids, pos, tpos, slots)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = model.decode(ids, pos, tpos, slots)
            self.graphs[bs] = (g, ids, pos, tpos, slots, out)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, token_pos: torch.Tensor,
             slots: torch.Tensor) -> torch.Tensor:
        """Copies the inputs into the graph's buffers, replays, returns logits [B, vocab]."""
        B = ids.shape[0]
        bs = min(b for b in self.graphs if b >= B)
        g, gi, gp, gt, gs, out = self.graphs[bs]
        gi[:B].copy_(ids)
        gp[:, :B].copy_(positions)
        gt[:B].copy_(token_pos)
        gs[:B].copy_(slots)
        gs[B:].fill_(self.model.num_slots - 1)
        g.replay()
        return out[:B]

    def replay(self, bs: int) -> torch.Tensor:
        """Replay the graph of batch size bs on whatever its buffers hold (for timing)."""
        g, *_, out = self.graphs[bs]
        g.replay()
        return out
