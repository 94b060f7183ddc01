"""InfiniteVL as a vLLM model: Qwen2.5-VL's vision tower and multimodal plumbing (reused as they
are) around our hybrid decoder of sliding-window attention and Gated DeltaNet layers.

What is ours and why:
- The GDN layer reuses vLLM's OLMo-hybrid GDN layer (same shape family: separate q/k/v short
  convolutions fused into one, value head dim != key head dim, gated RMSNorm output), whose
  per-sequence conv and recurrent states live in vLLM's mamba state cache.  vLLM's CPU GDN ops
  need value head dim == key head dim, so on CPU the core runs our torch code from
  ``infinitevl_kernels`` (chunked prefill, batched recurrent decode, slot-indexed states); on
  CUDA the parent's flash-linear-attention kernels run.
- The SWA layer is Qwen2 attention with a per-layer window whose KV is a fixed ring per sequence
  (ring_attention.py), and M-RoPE computed from the positions rather than from a table sized by a
  maximum position, so no sequence length is out of range.
- Weight loading is vLLM's ``AutoWeightsLoader``; a ``WeightsMapper`` built from the layer rule
  (infinitevl_kernels.layout) stacks the released names (both layer kinds under ``self_attn.*``) into the
  fused parameters of each layer's kind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from types import SimpleNamespace

import torch
from infinitevl_kernels.gdn.batch import GDNBatch, GDNLayer, GDNShape, gdn_forward_batch
from infinitevl_kernels.gdn.triton_batch import gdn_decode_slots, gdn_prefill_varlen, warm_up_prefill
from infinitevl_kernels.layout import (
    GDN_CONVS,
    GDN_GATES,
    GDN_INPUT,
    LAYER_PREFIX,
    MLP_GATE_UP,
    SWA_QKV,
    is_swa_layer,
    rope_of,
)
from infinitevl_kernels.rope import apply_rope, mrope_cos_sin, mrope_frequencies
from infinitevl_kernels.triton_ops import mrope_qk
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.fusion.mm_input_norm import build_mm_input_norm
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn import OlmoHybridGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
    is_conv_state_dim_first,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.qwen2 import Qwen2MLP
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VisionTransformer,
    Qwen2_5_VLForConditionalGeneration,
)
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    make_empty_intermediate_tensors_factory,
    maybe_prefix,
)
from vllm.platforms import current_platform
from vllm.utils.torch_utils import async_tensor_h2d, direct_register_custom_op
from vllm.v1.attention.backends.gdn_attn import (
    GDNAttentionBackend,
    GDNAttentionMetadata,
    GDNAttentionMetadataBuilder,
)

from ..config import InfiniteVLTextConfig
from ..vllm_patches import keep_conv_weight_layout, without_triton_allocator
from .batch_one_linear import gated_norm_linear_into, linear_into, norm_linear, norm_mlp, use_batch_one_products
from .ring_attention import RingSlidingWindowAttention
from .step_requests import StepRequests, step_requests_of

logger = logging.getLogger("vllm.infinitevl_vllm")


def _gdn_layer_config(cfg: InfiniteVLTextConfig) -> SimpleNamespace:
    """The field names vLLM's hybrid GDN layer reads, filled from our config."""
    return SimpleNamespace(
        hidden_size=cfg.hidden_size,
        hidden_act=cfg.hidden_act,
        rms_norm_eps=cfg.rms_norm_eps,
        linear_num_key_heads=cfg.num_linear_heads,
        linear_num_value_heads=cfg.num_linear_heads,
        linear_key_head_dim=cfg.linear_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim,
        linear_conv_kernel_dim=cfg.conv_size,
        linear_use_gate=cfg.use_gate,
        linear_allow_neg_eigval=False,
        torch_dtype=None,
    )


def _check_gdn_config(cfg: InfiniteVLTextConfig) -> None:
    if cfg.num_linear_key_value_heads != cfg.num_linear_heads:
        raise ValueError("InfiniteVL GDN layers have no grouped heads: num_linear_key_value_heads must equal "
                         f"num_linear_heads ({cfg.num_linear_key_value_heads} != {cfg.num_linear_heads})")
    if cfg.conv_bias or not cfg.use_short_conv or not cfg.use_gate:
        raise ValueError("InfiniteVL GDN layers need use_short_conv=True, use_gate=True, conv_bias=False")


def _prefill_uses_fla(x: torch.Tensor) -> bool:
    """fla's chunked kernel runs the CUDA prefill, except in float32, which it refuses."""
    return x.dtype != torch.float32


class InfiniteVLGDNMetadataBuilder(GDNAttentionMetadataBuilder):
    """vLLM's GDN metadata, plus: a request whose state was copied into its slot before its first chunk
    (a streaming session's) starts from that state (its per-request data in the model's StepRequests)."""

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.step_requests = step_requests_of(vllm_config, layer_names)
        # The model's GDN layers form three KV-cache groups that differ only in their slots. vLLM then builds
        # a step's metadata once and re-gathers each other group's slots (update_block_table), which saves two
        # of three builds of host time a step. vLLM allows that only under its V2 runner, because there the
        # other groups' full-graph buffers of batch-level data go stale; our decode core reads only the slots,
        # which each group refills in its own buffer.
        if vllm_config.cache_config.mamba_cache_mode != "align":
            self.supports_update_block_table = True

    def build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
        md = super().build(common_prefix_len, common_attn_metadata, *args, **kwargs)
        if self.step_requests is None or md.has_initial_state is None or md.spec_sequence_masks is not None:
            return md
        rows = self.step_requests.initial_states(md.has_initial_state.shape[0])
        if rows is not None and any(rows):
            # pinned and asynchronous: a plain host tensor copied in would block the host until the GPU drains
            mask = async_tensor_h2d(rows, device=md.has_initial_state.device, dtype=torch.bool)
            md.has_initial_state = md.has_initial_state | mask
            if md.prefill_has_initial_state is not None:
                md.prefill_has_initial_state = md.has_initial_state[md.num_decodes:]
        return md


class InfiniteVLGDNBackend(GDNAttentionBackend):
    @staticmethod
    def get_builder_cls() -> type[InfiniteVLGDNMetadataBuilder]:
        return InfiniteVLGDNMetadataBuilder


class InfiniteVLGatedDeltaNet(OlmoHybridGatedDeltaNetAttention):
    """GDN mixer; its conv + recurrent state is the sequence's slot in vLLM's mamba cache."""

    def __init__(self, cfg: InfiniteVLTextConfig, vllm_config: VllmConfig, prefix: str,
                 step_requests: StepRequests | None = None):
        _check_gdn_config(cfg)
        if current_platform.is_cpu():
            with without_triton_allocator():
                super().__init__(_gdn_layer_config(cfg), vllm_config, prefix=prefix)
        else:
            super().__init__(_gdn_layer_config(cfg), vllm_config, prefix=prefix)
        keep_conv_weight_layout(self.conv1d)
        self._fuse_input_projections(vllm_config, prefix)
        self.o_norm.eps = cfg.norm_eps
        self.step_requests = step_requests  # the model's; the metadata builder finds it through this layer

    def get_attn_backend(self):
        return InfiniteVLGDNBackend

    def _fuse_input_projections(self, vllm_config: VllmConfig, prefix: str) -> None:
        """One GEMM for q, k, v, g, a and b: the parent keeps a and b apart (two more GEMMs a layer,
        a few microseconds each at batch 1, 54 of them a decode step in the 4B model)."""
        del self.in_proj_qkvg, self.a_proj, self.b_proj
        heads = self.num_v_heads
        self.in_proj = MergedColumnParallelLinear(
            self.hidden_size, [self.key_dim, self.key_dim, self.value_dim, self.value_dim, heads, heads],
            bias=False, quant_config=vllm_config.quant_config, prefix=f"{prefix}.in_proj")

    input_projected = False  # set by the decoder layer when it computes in_proj (with the norm before it)

    def _full_forward(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        """The parent's order (projections, core, gated norm, output projection) over the fused input
        projection; the core writes every row, so its output needs no zeroing. The gated norm reads the
        gate where the projection put it (the parent copies it out first). With ``input_projected``,
        hidden_states is already that projection."""
        n = hidden_states.size(0)
        heads, dv = self.num_v_heads // self.tp_size, self.head_v_dim
        proj = hidden_states if self.input_projected else self.in_proj(hidden_states)[0]
        mixed_qkv, gate, a, b = proj.split([self.conv_dim // self.tp_size, heads * dv, heads, heads], dim=-1)
        core = torch.empty(n, heads, dv, dtype=hidden_states.dtype, device=hidden_states.device)
        self._forward_core(mixed_qkv=mixed_qkv, b=b, a=a, core_attn_out=core)
        if core.is_cuda:  # o_norm would run as ~10 torch ops inside this op, which inductor never sees
            gated_norm_linear_into(self.o_norm, self.o_proj, core, gate, output[:n])
        else:
            normed = self.o_norm(core.view(n * heads, dv), gate.reshape(n * heads, dv)).view(n, heads * dv)
            linear_into(self.o_proj, normed, output[:n])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loader, except the fused conv: its loader takes the shard id the WeightsMapper put on each
        q/k/v conv tensor as an argument (a ColumnParallelLinear has no load_weights to read it)."""
        conv = self.conv1d.weight
        loaded: set[str] = set()

        def others():
            for name, w in weights:
                if name == "conv1d.weight":
                    conv.weight_loader(conv, w, w.shard_id)
                    loaded.add(name)
                else:
                    yield name, w

        rest = set(AutoWeightsLoader(self).load_weights(others()))
        return loaded | rest

    def _forward_core(self, mixed_qkv, b, a, core_attn_out):
        """Our slot-pool GDN on every device: decodes (first in the batch) in one batched recurrence,
        prefill chunks each from its own slot's state. vLLM's parent runs a mixed batch's decodes
        through the chunked kernel too, so a sequence's tokens would depend on its neighbours."""
        md = get_forward_context().attn_metadata
        md = md.get(self.prefix) if isinstance(md, dict) else None
        if md is None or md.num_actual_tokens == 0:  # profiling / dummy runs
            if md is None and mixed_qkv.is_cuda and not InfiniteVLGatedDeltaNet.prefill_compiled:
                self._compile_prefill(mixed_qkv, a, b)  # vLLM's first dummy run: a whole prefill chunk
            return
        assert isinstance(md, GDNAttentionMetadata)
        if md.spec_sequence_masks is not None:
            raise NotImplementedError("speculative decoding is not supported for InfiniteVL")
        conv_state, ssm_state = self.kv_cache
        if not is_conv_state_dim_first():
            conv_state = conv_state.transpose(-1, -2)  # -> [slots, C, K-1]
        layer = self._gdn_layer(conv_state, ssm_state)
        if not mixed_qkv.is_cuda:
            self._forward_core_cpu(md, mixed_qkv, a, b, core_attn_out, layer)
            return
        nd, num_prefills = md.num_decodes, md.num_prefills
        if nd:  # captured in full CUDA graphs: device tensors only
            gdn_decode_slots(mixed_qkv[:nd], a[:nd], b[:nd], layer, slots=md.non_spec_state_indices_tensor[:nd],
                             out=core_attn_out[:nd])
        if num_prefills:
            end = nd + md.num_prefill_tokens
            core_attn_out[nd:end] = gdn_prefill_varlen(
                mixed_qkv[nd:end], a[nd:end], b[nd:end], layer, slots=md.prefill_state_indices[:num_prefills],
                has_initial_state=md.prefill_has_initial_state[:num_prefills],
                cu_seqlens=md.prefill_query_start_loc[: num_prefills + 1], max_len=md.num_prefill_tokens,
                use_fla=_prefill_uses_fla(mixed_qkv))

    def _gdn_layer(self, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> GDNLayer:
        weight = self.conv1d.weight
        return GDNLayer(conv_weight=weight.view(weight.size(0), weight.size(-1)), A_log=self.A_log,
                        dt_bias=self.dt_bias, conv_state=conv_state, ssm_state=ssm_state,
                        shape=GDNShape(self.num_v_heads // self.tp_size, self.head_k_dim, self.head_v_dim))

    prefill_compiled = False  # once a process: every GDN layer launches the same kernels

    def _compile_prefill(self, mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """Compile the prefill kernels at start-up (vLLM's dummy runs skip this op's core, so a server would
        compile them on its first long prompt); on scratch state, as vLLM has not allocated the pools yet."""
        t0 = time.perf_counter()
        conv_dtype, ssm_dtype = self.get_state_dtype()[:2]
        scratch = self._gdn_layer(torch.empty(0, dtype=conv_dtype), torch.empty(0, dtype=ssm_dtype))
        warm_up_prefill(mixed_qkv, a, b, scratch, use_fla=_prefill_uses_fla(mixed_qkv))
        InfiniteVLGatedDeltaNet.prefill_compiled = True
        logger.info("InfiniteVL: compiled the GDN prefill kernels in %.1f s (%d-token chunks)",
                    time.perf_counter() - t0, mixed_qkv.shape[0])

    @staticmethod
    def _forward_core_cpu(md: GDNAttentionMetadata, mixed_qkv, a, b, core_attn_out, layer: GDNLayer) -> None:
        """vLLM's CPU GDN ops need value head dim == key head dim; ours run the torch code."""
        n = md.num_actual_tokens
        num_seqs = md.num_decodes + md.num_prefills
        has_init = md.has_initial_state.tolist() if md.has_initial_state is not None else []
        batch = GDNBatch(
            query_start_loc=md.non_spec_query_start_loc[: num_seqs + 1].tolist(),
            state_indices=md.non_spec_state_indices_tensor[:num_seqs].tolist(),
            has_initial_state=[True] * md.num_decodes + [bool(x) for x in has_init[md.num_decodes : num_seqs]],
            num_decodes=md.num_decodes,
        )
        gdn_forward_batch(mixed_qkv[:n], a[:n], b[:n], layer, batch=batch, out=core_attn_out)


def _mrope_qk(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rows: torch.Tensor, heads: int,
              kv_heads: int, head_dim: int) -> torch.Tensor:
    return mrope_qk(qkv, heads, kv_heads, head_dim, positions, inv_freq, rows)


def _mrope_qk_fake(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rows: torch.Tensor,
                   heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    return qkv.new_empty((qkv.shape[0], (heads + kv_heads) * head_dim))


# The SWA layer's M-RoPE on CUDA: one launch of ours, which makes the angles from the positions and takes part in
# the programmatic launches of the products around it (infinitevl_kernels.launch). Inductor's kernels for the same
# torch ops (three for the cos/sin tables at the top of the step, one per layer for the rotation) waited for the
# kernel before them to finish, and made the one after wait too.
direct_register_custom_op("infinitevl_mrope_qk", _mrope_qk, fake_impl=_mrope_qk_fake)


class MRoPE(nn.Module):
    """M-RoPE computed from the positions themselves (in float64), not looked up in a table sized by a maximum
    position: sequences have no length limit. Made once a step for every SWA layer (``rotate_qk``). The rotation
    runs in float32 whatever the model dtype: bf16 angles would add a rounding the reference has not."""

    def __init__(self, cfg: InfiniteVLTextConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.theta, self.section = rope_of(cfg)
        inv_freq, rows = mrope_frequencies(cfg.head_dim, self.theta, self.section)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("rows", rows, persistent=False)

    def kernel_inputs(self, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the SWA layers' launch makes its angles from, in the order ``infinitevl_mrope_qk`` takes them."""
        return positions, self.inv_freq, self.rows

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """This step's rotation inputs for positions [3, T]: on CUDA ``kernel_inputs``, elsewhere cos/sin tables."""
        if positions.is_cuda:
            return self.kernel_inputs(positions)
        dtype = torch.promote_types(dtype, torch.float32)
        return tuple(t.to(dtype) for t in mrope_cos_sin(positions, self.head_dim, self.theta, self.section))


def rotate_qk(qkv: torch.Tensor, rope: tuple[torch.Tensor, ...], heads: int, kv_heads: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of a fused q|k|v projection [T, ...], rotated by this step's ``MRoPE`` inputs."""
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    if qkv.is_cuda:
        qk = torch.ops.vllm.infinitevl_mrope_qk(qkv, *rope, heads, kv_heads, head_dim)
        return qk.split([q_size, kv_size], dim=-1)
    n = qkv.shape[0]
    cos, sin = rope
    q, k = qkv[:, :q_size], qkv[:, q_size : q_size + kv_size]
    return (apply_rope(q.reshape(n, heads, head_dim), cos, sin).view(n, q_size),
            apply_rope(k.reshape(n, kv_heads, head_dim), cos, sin).view(n, kv_size))


class InfiniteVLSlidingAttention(nn.Module):
    """Qwen2.5 attention (q/k/v bias, GQA, M-RoPE) over the last `attention_window` tokens, whose KV
    is a fixed ring per sequence (see ring_attention.py)."""

    def __init__(self, cfg: InfiniteVLTextConfig, vllm_config: VllmConfig, prefix: str,
                 step_requests: StepRequests | None = None):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_attention_heads // tp
        self.num_kv_heads = max(1, cfg.num_key_value_heads // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        quant = vllm_config.quant_config
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, self.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias=True, quant_config=quant,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias=False,
                                        quant_config=quant, prefix=f"{prefix}.o_proj")
        self.attn = RingSlidingWindowAttention(self.num_heads, self.head_dim, self.num_kv_heads, cfg.attention_window,
                                               vllm_config.cache_config, quant, prefix=f"{prefix}.attn",
                                               step_requests=step_requests)

    def forward(self, rope: tuple[torch.Tensor, ...], hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        return self.forward_projected(rope, qkv)

    def forward_projected(self, rope: tuple[torch.Tensor, ...], qkv: torch.Tensor) -> torch.Tensor:
        q, k = rotate_qk(qkv, rope, self.num_heads, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :]
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class InfiniteVLDecoderLayer(nn.Module):
    def __init__(self, cfg: InfiniteVLTextConfig, vllm_config: VllmConfig, layer_idx: int, prefix: str,
                 step_requests: StepRequests | None = None):
        super().__init__()
        self.is_swa = is_swa_layer(layer_idx)
        mixer_prefix = f"{prefix}.self_attn"
        if self.is_swa:
            self.self_attn = InfiniteVLSlidingAttention(cfg, vllm_config, mixer_prefix, step_requests)
        else:
            self.self_attn = InfiniteVLGatedDeltaNet(cfg, vllm_config, mixer_prefix, step_requests)
        self.mlp = Qwen2MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                            quant_config=vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        # On one GPU the layer's norms fold into the products after them (batch_one_linear.py), and the GDN
        # mixer's op receives its input projection instead of computing it
        self.norms_in_products = (current_platform.is_cuda() and vllm_config.quant_config is None
                                  and get_tensor_model_parallel_world_size() == 1)
        if self.norms_in_products and not self.is_swa:
            self.self_attn.input_projected = True

    def forward(self, rope, hidden_states, residual):
        if self.norms_in_products:
            return self._forward_norms_in_products(rope, hidden_states, residual)
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        if self.is_swa:
            hidden_states = self.self_attn(rope, hidden_states)
        else:
            out = torch.empty_like(hidden_states)
            self.self_attn(hidden_states, out)
            hidden_states = out
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual

    def _forward_norms_in_products(self, rope, hidden_states, residual):
        # the first layer (residual None): the op returns a copy of its input as the stream (a custom op's output
        # may not alias its input), written by its own pass rather than by a zeros launch to add
        attn = self.self_attn
        proj, residual = norm_linear(self.input_layernorm, attn.qkv_proj if self.is_swa else attn.in_proj,
                                     hidden_states, residual)
        if self.is_swa:
            hidden_states = attn.forward_projected(rope, proj)
        else:
            hidden_states = torch.empty_like(residual)
            attn(proj, hidden_states)
        return norm_mlp(self.post_attention_layernorm, self.mlp, hidden_states, residual)


@support_torch_compile(
    dynamic_arg_dims={"input_ids": {0: "b"}, "positions": {-1: "b"}, "intermediate_tensors": {0: "b"},
                      "inputs_embeds": {0: "b"}}
)
class InfiniteVLTextModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg: InfiniteVLTextConfig = vllm_config.model_config.hf_config.text_config
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.step_requests = StepRequests()  # per-request data of each step, read by the layers' builders
        self.layers = nn.ModuleList(
            InfiniteVLDecoderLayer(cfg, vllm_config, i, prefix=f"{prefix}.layers.{i}", step_requests=self.step_requests)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rope = MRoPE(cfg)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        positions = positions if positions.dim() == 2 else positions[None].expand(3, -1)  # text-only: one row
        rope = self.rope(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(rope, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


def weights_mapper(cfg: InfiniteVLTextConfig) -> WeightsMapper:
    """Released names -> (fused vLLM parameter, shard id), by each layer's kind (the layer rule and the
    weight names of infinitevl_kernels.layout)."""
    stacked = {}
    for i in range(cfg.num_hidden_layers):
        layer = LAYER_PREFIX.format(i=i)
        for shard, n in enumerate(MLP_GATE_UP):
            stacked[f"{layer}mlp.{n}_proj."] = (f"{layer}mlp.gate_up_proj.", shard)
        mixer = f"{layer}self_attn."
        if is_swa_layer(i):
            for n in SWA_QKV:
                stacked[f"{mixer}{n}_proj."] = (f"{mixer}qkv_proj.", n)
        else:
            for shard, n in enumerate(GDN_INPUT + GDN_GATES):
                stacked[f"{mixer}{n}_proj."] = (f"{mixer}in_proj.", shard)
            for shard, n in enumerate(GDN_CONVS):
                stacked[f"{mixer}{n}_conv1d."] = (f"{mixer}conv1d.", shard)
    return WeightsMapper(orig_to_new_stacked=stacked)


class InfiniteVLForCausalLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg = vllm_config.model_config.hf_config.text_config
        self.config = cfg
        self.model = InfiniteVLTextModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        if current_platform.is_cuda() and vllm_config.quant_config is None:
            # the GDN layers' conv weights are read by the conv kernels, never multiplied
            use_batch_one_products((m for name, m in self.model.named_modules() if not name.endswith("conv1d")),
                                   self.lm_head)
        self.logits_processor = LogitsProcessor(cfg.vocab_size)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], cfg.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)


class InfiniteVLQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration, IsHybrid, HasInnerState):
    """Qwen2.5-VL with the InfiniteVL decoder (processor, vision tower, M-RoPE inherited)."""

    packed_modules_mapping = {
        **Qwen2_5_VLForConditionalGeneration.packed_modules_mapping,
        "in_proj": [f"{n}_proj" for n in GDN_INPUT + GDN_GATES],
        "conv1d": ["q_conv1d", "k_conv1d", "v_conv1d"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)  # the parent would build a Qwen2 decoder
        config = vllm_config.model_config.hf_config
        multimodal_config = vllm_config.model_config.get_multimodal_config()
        self.use_data_parallel = multimodal_config.mm_encoder_tp_mode == "data"
        self.config = config
        self.model_config = vllm_config.model_config
        self.vllm_config = vllm_config
        self.multimodal_config = multimodal_config
        self.video_pruning_rate = multimodal_config.video_pruning_rate
        self.is_multimodal_pruning_enabled = multimodal_config.is_multimodal_pruning_enabled()
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.visual = Qwen2_5_VisionTransformer(
                vision_config=config.vision_config,
                norm_eps=getattr(config, "rms_norm_eps", 1e-6),
                quant_config=self.quant_config,
                input_norm=build_mm_input_norm(self.model_config),
                prefix=maybe_prefix(prefix, "visual"),
            )
        with self._mark_language_model(vllm_config):
            self.language_model = InfiniteVLForCausalLM(
                vllm_config=vllm_config, prefix=maybe_prefix(prefix, "language_model")
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        mapper = weights_mapper(self.config.text_config) | self.hf_to_vllm_mapper
        return AutoWeightsLoader(self).load_weights(weights, mapper=mapper)  # lm_head: tied, skipped as an alias

    @property
    def step_requests(self) -> StepRequests:
        return self.language_model.model.step_requests

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.language_model.model(input_ids=input_ids, positions=positions,
                                         intermediate_tensors=intermediate_tensors, inputs_embeds=inputs_embeds)

    # -- hybrid state declarations (one recurrent slot per sequence for every GDN layer) ------
    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
        cache = vllm_config.cache_config
        return MambaStateDtypeCalculator.gated_delta_net_state_dtype(
            vllm_config.model_config.dtype, cache.mamba_cache_dtype, cache.mamba_ssm_cache_dtype
        )

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        cfg = vllm_config.model_config.hf_config.text_config
        spec = vllm_config.speculative_config
        return MambaStateShapeCalculator.gated_delta_net_state_shape(
            vllm_config.parallel_config.tensor_parallel_size, cfg.num_linear_heads, cfg.num_linear_heads,
            cfg.linear_head_dim, cfg.linear_value_head_dim, cfg.conv_size,
            spec.num_speculative_tokens if spec else 0,
        )

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.gated_delta_net_state_copy_func()


__all__ = ["InfiniteVLQwen2_5_VLForConditionalGeneration"]
