"""Gated DeltaNet over a continuous batch whose states live in a slot pool.

This is the CPU serving path: a packed batch of decode tokens (one per sequence, computed
together) followed by prefill chunks (each from its own slot's state, chunked form).  States
are read and written by slot index, in the pool's own layout:

- conv_state: [slots, C, K-1] (may be a transposed view), channels q | k | v;
- ssm_state:  [slots, H, Dv, Dk] (value-major, the layout vLLM's GDN kernels use; our
  reference math is key-major, so we work on ``.transpose(-1, -2)`` views).

Math is done in float32 (or wider) whatever the model and state dtypes are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .reference import causal_conv1d, gdn_chunked, gdn_gates, l2norm


@dataclass
class GDNBatch:
    """Where each sequence of a packed batch sits. Decodes come first, one token each."""

    query_start_loc: list[int]  # len num_seqs + 1
    state_indices: list[int]  # slot per sequence
    has_initial_state: list[bool]  # per sequence (decodes always True)
    num_decodes: int


@dataclass
class GDNShape:
    num_heads: int
    head_k_dim: int
    head_v_dim: int

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_heads * self.head_v_dim


@dataclass
class GDNLayer:
    """One GDN layer as the slot-pool functions take it: conv and gate weights, state pools, head shape."""

    conv_weight: torch.Tensor  # [C, K], depthwise
    A_log: torch.Tensor  # [H]
    dt_bias: torch.Tensor  # [H]
    conv_state: torch.Tensor  # [slots, C, K-1]
    ssm_state: torch.Tensor  # [slots, H, Dv, Dk]
    shape: GDNShape


def _split_heads(y: torch.Tensor, shape: GDNShape):
    q, k, v = y.split([shape.key_dim, shape.key_dim, shape.value_dim], dim=-1)
    lead = y.shape[:-1]
    return (
        q.reshape(*lead, shape.num_heads, shape.head_k_dim),
        k.reshape(*lead, shape.num_heads, shape.head_k_dim),
        v.reshape(*lead, shape.num_heads, shape.head_v_dim),
    )


def gdn_decode_batch(
    mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, layer: GDNLayer, *, slots: torch.Tensor
) -> torch.Tensor:
    """One token for each of B sequences at once. mixed_qkv [B, C]; returns o [B, H, Dv]."""
    conv_weight, conv_state, ssm_state, shape = layer.conv_weight, layer.conv_state, layer.ssm_state, layer.shape
    dt = torch.promote_types(mixed_qkv.dtype, torch.float32)
    hist = conv_state[slots].to(dt)  # [B, C, K-1]
    window = torch.cat([hist, mixed_qkv.to(dt)[:, :, None]], dim=-1)  # [B, C, K]
    y = F.silu((window * conv_weight.to(dt)).sum(-1))
    conv_state[slots] = window[:, :, 1:].to(conv_state.dtype)
    q, k, v = _split_heads(y, shape)
    q, k = l2norm(q), l2norm(k)
    g, beta = gdn_gates(a, b, layer.A_log, layer.dt_bias)
    S = ssm_state[slots].to(dt).transpose(-1, -2)  # [B, H, Dk, Dv]
    S = S * g.exp()[..., None, None]
    pred = torch.einsum("bhkv,bhk->bhv", S, k)
    S = S + torch.einsum("bhk,bhv->bhkv", k, beta[..., None] * (v - pred))
    o = torch.einsum("bhkv,bhk->bhv", S, q) * shape.head_k_dim**-0.5
    ssm_state[slots] = S.transpose(-1, -2).to(ssm_state.dtype)
    return o


def gdn_forward_batch(
    mixed_qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    layer: GDNLayer,
    *,
    batch: GDNBatch,
    out: torch.Tensor,
    chunk_size: int = 64,
) -> None:
    """Fills out [T, H, Dv] for the packed batch and advances every sequence's slot state.

    mixed_qkv [T, C] are the q|k|v projections before the short convolution; a, b [T, H].
    """
    conv_weight, conv_state, ssm_state, shape = layer.conv_weight, layer.conv_state, layer.ssm_state, layer.shape
    qsl, nd = batch.query_start_loc, batch.num_decodes
    if nd:
        end = qsl[nd]
        if end != nd:
            raise ValueError(f"decode sequences must have one token each, got {end} tokens for {nd}")
        slots = torch.tensor(batch.state_indices[:nd], dtype=torch.long, device=mixed_qkv.device)
        out[:nd] = gdn_decode_batch(mixed_qkv[:nd], a[:nd], b[:nd], layer, slots=slots).to(out.dtype)
    dt = torch.promote_types(mixed_qkv.dtype, torch.float32)
    for r in range(nd, len(qsl) - 1):
        s, e = qsl[r], qsl[r + 1]
        if e == s:
            continue
        slot = batch.state_indices[r]
        init = batch.has_initial_state[r]
        y, new_conv = causal_conv1d(
            mixed_qkv[s:e].to(dt), conv_weight.to(dt), conv_state[slot].to(dt) if init else None
        )
        conv_state[slot] = new_conv.to(conv_state.dtype)
        q, k, v = _split_heads(y, shape)
        g, beta = gdn_gates(a[s:e], b[s:e], layer.A_log, layer.dt_bias)
        S0 = ssm_state[slot].to(dt).transpose(-1, -2) if init else None
        o, S = gdn_chunked(q, k, v, g, beta, initial_state=S0, chunk_size=chunk_size)
        ssm_state[slot] = S.transpose(-1, -2).to(ssm_state.dtype)
        out[s:e] = o.to(out.dtype)
