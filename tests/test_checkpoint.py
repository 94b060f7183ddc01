"""The checkpoint maker writes the released format; broken checkpoints fail with one clear line."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infinitevl_vllm.checkpoint import (
    CheckpointError,
    expected_shapes,
    iter_weights,
    load_config,
    load_reference,
    make_checkpoint,
    preset_config,
    validate_checkpoint,
)


def test_tiny_has_released_names_and_layout(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["InfiniteVLQwen2_5_VLForConditionalGeneration"]
    assert cfg["model_type"] == "infinite_vl" and "text_config" not in cfg
    names = {}
    for f in tiny_ckpt.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            names.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    assert "lm_head.weight" not in names  # tied
    assert names["model.embed_tokens.weight"] == (151936, 128)
    for i in (0, 4):  # SWA layers: biased q/k/v
        assert f"model.layers.{i}.self_attn.q_proj.bias" in names
        assert f"model.layers.{i}.self_attn.A_log" not in names
    for i in (1, 2, 3, 5, 6, 7):  # GDN layers
        p = f"model.layers.{i}.self_attn."
        assert names[p + "q_conv1d.weight"] == (128, 1, 4)
        assert names[p + "v_conv1d.weight"] == (256, 1, 4)  # value dim = 2 x key dim
        assert names[p + "o_norm.weight"] == (128,)  # value head dim
        assert names[p + "A_log"] == (2,) and names[p + "dt_bias"] == (2,)
        assert p + "q_proj.bias" not in names
    assert any(k.startswith("visual.blocks.3.attn.qkv") for k in names)
    assert "visual.merger.mlp.2.weight" in names
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
              "model.safetensors.index.json", "processor_config.json"):
        assert (tiny_ckpt / f).exists(), f


def test_4b_preset_has_real_shapes_and_size():
    from infinitevl_vllm.checkpoint import PRESETS
    from infinitevl_vllm.config import InfiniteVLConfig

    flat = preset_config("4b")
    flat.pop("model_type"), flat.pop("architectures")
    shapes = expected_shapes(InfiniteVLConfig(**flat))
    n = sum(torch.Size(s).numel() for s in shapes.values())
    assert 4.2e9 < n < 4.6e9, n
    assert shapes["model.layers.1.self_attn.v_proj.weight"] == (4096, 2048)
    assert shapes["model.layers.1.self_attn.g_proj.weight"] == (4096, 2048)
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (2048, 4096)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (256, 2048)
    assert shapes["visual.merger.mlp.0.weight"] == (5120, 5120)
    assert sum(".self_attn.A_log" in k for k in shapes) == 27
    assert sum(".self_attn.q_proj.bias" in k for k in shapes) == 9
    assert PRESETS["4b"]["dtype"] == "bfloat16"


def test_config_defaults_for_absent_fields(tiny_ckpt):
    cfg = load_config(tiny_ckpt).text_config
    assert (cfg.expand_v, cfg.conv_size, cfg.norm_eps, cfg.use_gate, cfg.mode) == (2, 4, 1e-5, True, "chunk")
    assert cfg.layer_types[:5] == ["sliding_attention"] + ["linear_attention"] * 3 + ["sliding_attention"]


def test_loads_back_bit_identical(tiny_ckpt):
    model = load_reference(tiny_ckpt)
    state = model.state_dict()
    stored = dict(iter_weights(tiny_ckpt))
    assert set(stored) == set(state)
    for k, v in stored.items():
        assert torch.equal(state[k], v), k


def test_same_seed_same_weights(tmp_path, tiny_ckpt):
    other = make_checkpoint(tmp_path / "again", "tiny", seed=0)
    a = load_file(next(tiny_ckpt.glob("*.safetensors")))
    b = load_file(next(other.glob("*.safetensors")))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def broken(tmp_path, tiny_ckpt):
    dst = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def test_missing_shard(broken):
    next(broken.glob("*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors: shard missing"):
        validate_checkpoint(broken)


def test_wrong_shape_names_file_and_tensor(broken):
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.A_log"] = torch.zeros(3)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError) as e:
        validate_checkpoint(broken)
    msg = str(e.value)
    assert shard.name in msg and "model.layers.1.self_attn.A_log" in msg and "[3]" in msg and "\n" not in msg


def test_missing_tensor(broken):
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    del tensors["model.layers.2.self_attn.o_norm.weight"]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.o_norm\.weight is missing"):
        validate_checkpoint(broken)


def test_unknown_architecture(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture \['LlamaForCausalLM'\]"):
        validate_checkpoint(broken)


def test_missing_config_field(broken):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["hidden_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: missing config field 'hidden_size'"):
        validate_checkpoint(broken)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        validate_checkpoint(tmp_path)


def test_newer_transformers_layout_is_accepted(broken):
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else "model." + k): v
               for k, v in tensors.items()}
    save_file(renamed, shard)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: shard.name for k in renamed}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    validate_checkpoint(broken)
