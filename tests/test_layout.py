"""One source for the architecture rules (infinitevl_kernels.layout): the config, the state sizes, the vLLM
weight mapping and the GPU decoder all follow it."""

from __future__ import annotations

import json

from infinitevl_kernels.layout import SWA_EVERY, is_swa_layer, ring_blocks, rope_of

from infinitevl_vllm.config import InfiniteVLConfig


def test_layer_kinds_ring_and_rope_from_one_source(tiny_ckpt):
    cfg = InfiniteVLConfig.from_pretrained(tiny_ckpt).text_config
    assert cfg.layer_types == ["sliding_attention" if i % SWA_EVERY == 0 else "linear_attention"
                               for i in range(cfg.num_hidden_layers)]
    assert cfg.swa_layers == [i for i in range(cfg.num_hidden_layers) if is_swa_layer(i)] == [0, 4]
    assert ring_blocks(8192, 128) == 65 and ring_blocks(16, 16) == 2 and ring_blocks(17, 16) == 3
    raw = json.load(open(tiny_ckpt / "config.json"))
    assert rope_of(cfg) == (float(raw["rope_theta"]), raw["rope_scaling"]["mrope_section"])


def test_weights_mapper_stacks_each_layer_by_its_kind(tiny_ckpt):
    from infinitevl_vllm.model.vllm_model import weights_mapper

    cfg = InfiniteVLConfig.from_pretrained(tiny_ckpt).text_config
    m = weights_mapper(cfg)
    assert m._map_name_with_shard("model.layers.0.self_attn.k_proj.weight") == (
        "model.layers.0.self_attn.qkv_proj.weight", "k")
    assert m._map_name_with_shard("model.layers.1.self_attn.g_proj.weight") == (
        "model.layers.1.self_attn.in_proj.weight", 3)
    assert m._map_name_with_shard("model.layers.2.self_attn.b_proj.weight") == (
        "model.layers.2.self_attn.in_proj.weight", 5)
    assert m._map_name_with_shard("model.layers.5.self_attn.v_conv1d.weight") == (
        "model.layers.5.self_attn.conv1d.weight", 2)
    assert m._map_name_with_shard("model.layers.4.mlp.up_proj.weight") == ("model.layers.4.mlp.gate_up_proj.weight", 1)
    assert m._map_name_with_shard("model.layers.1.self_attn.A_log") == ("model.layers.1.self_attn.A_log", None)
