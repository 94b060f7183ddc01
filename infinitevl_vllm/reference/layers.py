"""Decoder layers of the reference model, one sequence at a time ([T, hidden] tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from infinitevl_kernels import (
    apply_rope,
    causal_conv1d,
    gated_rmsnorm,
    gdn_chunked,
    gdn_gates,
    gdn_recurrent,
    sliding_window_attention,
)
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dt)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class SWAState:
    """Keys/values (after RoPE) of the last window-1 tokens and their token indices."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    pos: torch.Tensor | None = None


@dataclass
class GDNState:
    conv: dict[str, torch.Tensor] = field(default_factory=dict)  # q/k/v -> [C, K-1]
    recurrent: torch.Tensor | None = None  # [H, Dk, Dv]


class SlidingWindowAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.attention_window
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)

    def forward(self, x, cos, sin, token_pos: torch.Tensor, state: SWAState) -> torch.Tensor:
        T = x.shape[0]
        q = apply_rope(self.q_proj(x).view(T, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(T, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(T, self.kv_heads, self.head_dim)
        if state.k is not None:
            k_all, v_all = torch.cat([state.k, k]), torch.cat([state.v, v])
            pos_all = torch.cat([state.pos, token_pos])
        else:
            k_all, v_all, pos_all = k, v, token_pos
        out = sliding_window_attention(q, k_all, v_all, token_pos, pos_all, self.window)
        keep = self.window - 1  # all a future token can ever see from the past
        state.k, state.v, state.pos = k_all[-keep:], v_all[-keep:], pos_all[-keep:]
        return self.o_proj(out.reshape(T, -1))


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = cfg.hidden_size
        self.heads, self.dk, self.dv = cfg.num_linear_heads, cfg.linear_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.heads * self.dk, self.heads * self.dv
        self.eps = cfg.norm_eps
        self.q_proj = nn.Linear(h, self.key_dim, bias=False)
        self.k_proj = nn.Linear(h, self.key_dim, bias=False)
        self.v_proj = nn.Linear(h, self.value_dim, bias=False)
        self.g_proj = nn.Linear(h, self.value_dim, bias=False)
        self.a_proj = nn.Linear(h, self.heads, bias=False)
        self.b_proj = nn.Linear(h, self.heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.heads))
        def conv(ch: int) -> nn.Conv1d:  # depthwise short convolution
            return nn.Conv1d(ch, ch, cfg.conv_size, groups=ch, bias=False)

        self.q_conv1d, self.k_conv1d, self.v_conv1d = conv(self.key_dim), conv(self.key_dim), conv(self.value_dim)
        self.o_norm = RMSNorm(self.dv, self.eps)
        self.o_proj = nn.Linear(self.value_dim, h, bias=False)

    def forward(self, x: torch.Tensor, state: GDNState, recurrent: bool = False) -> torch.Tensor:
        T = x.shape[0]
        branches = {}
        for name in "qkv":
            proj = getattr(self, f"{name}_proj")(x)
            conv = getattr(self, f"{name}_conv1d")
            branches[name], state.conv[name] = causal_conv1d(proj, conv.weight[:, 0], state.conv.get(name))
        q = branches["q"].view(T, self.heads, self.dk)
        k = branches["k"].view(T, self.heads, self.dk)
        v = branches["v"].view(T, self.heads, self.dv)
        g, beta = gdn_gates(self.a_proj(x), self.b_proj(x), self.A_log, self.dt_bias)
        rule = gdn_recurrent if recurrent else gdn_chunked
        o, state.recurrent = rule(q, k, v, g, beta, initial_state=state.recurrent)
        gate = self.g_proj(x).view(T, self.heads, self.dv)
        o = gated_rmsnorm(o.to(x.dtype), gate, self.o_norm.weight, self.eps)
        return self.o_proj(o.reshape(T, self.value_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, swa: bool):
        super().__init__()
        self.is_swa = swa
        self.self_attn = SlidingWindowAttention(cfg) if swa else GatedDeltaNet(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, token_pos, state, recurrent: bool = False):
        h = self.input_layernorm(x)
        if self.is_swa:
            h = self.self_attn(h, cos, sin, token_pos, state)
        else:
            h = self.self_attn(h, state, recurrent=recurrent)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))
