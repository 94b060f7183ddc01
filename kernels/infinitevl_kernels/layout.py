"""InfiniteVL's architecture rules, in one place (no vLLM, no transformers): which layers are sliding-window
attention, how many blocks a layer's KV ring holds, where the M-RoPE parameters live in a config, and the
released checkpoint's weight names. The reference model, the vLLM model, the state sizes and the GPU
decoder all read them from here."""

from __future__ import annotations

import math

SWA_EVERY = 4  # layer i is sliding-window attention when i % 4 == 0, else Gated DeltaNet


def is_swa_layer(layer_idx: int) -> bool:
    return layer_idx % SWA_EVERY == 0


def ring_blocks(window: int, block_size: int) -> int:
    """Blocks in one sequence's KV ring for one SWA layer: the window, plus one block so a chunk may
    start anywhere inside a block."""
    return math.ceil(window / block_size) + 1


def rope_of(text_config) -> tuple[float, list[int]]:
    """(rope_theta, mrope_section) of a text config, whether transformers put them in ``rope_parameters``
    or the released config.json in ``rope_scaling`` / ``rope_theta``."""
    rp = getattr(text_config, "rope_parameters", None) or {}
    rs = getattr(text_config, "rope_scaling", None) or {}
    theta = rp.get("rope_theta", getattr(text_config, "rope_theta", None))
    section = rp.get("mrope_section", rs.get("mrope_section"))
    if theta is None or section is None:
        raise ValueError("config has no rope_theta / mrope_section")
    return float(theta), list(section)


# Released checkpoint names, per decoder layer ``model.layers.{i}.``: both mixers live under ``self_attn.``.
LAYER_PREFIX = "model.layers.{i}."
MLP_GATE_UP = ("gate", "up")  # mlp.{gate,up}_proj, fused as [gate; up]
SWA_QKV = ("q", "k", "v")  # self_attn.{q,k,v}_proj (weight and bias), fused as [q; k; v]
GDN_INPUT = ("q", "k", "v", "g")  # self_attn.{q,k,v,g}_proj, fused as [q; k; v; g]
GDN_GATES = ("a", "b")  # self_attn.{a,b}_proj: per-head decay and beta inputs
GDN_CONVS = ("q", "k", "v")  # self_attn.{q,k,v}_conv1d, depthwise, fused as [q; k; v]
