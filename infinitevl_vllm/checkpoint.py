"""Checkpoints in the released format: presets, the seeded random-weight maker, and a loader
that checks a checkpoint before anything runs on it.

On disk: a flat ``config.json``, ``model-0000i-of-0000n.safetensors`` shards with
``model.safetensors.index.json``, the tokenizer and processor configs.  Weight names are the
released ones: ``model.embed_tokens``, ``model.layers.N.{self_attn,mlp,...}``, ``model.norm``,
``visual.*``; the LM head is tied to the embeddings and not stored.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ARCHITECTURE, InfiniteVLConfig, register_with_transformers

INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 2 * 1024**3

_TEXT_4B = dict(
    hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, head_dim=128, num_linear_heads=16, num_linear_key_value_heads=16,
    linear_head_dim=128, mrope_section=[16, 24, 24],
)
_VISION_4B = dict(
    depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, fullatt_block_indexes=[7, 15, 23, 31],
)
PRESETS: dict[str, dict] = {
    # Real structure, toy widths: 8 layers (SWA at 0 and 4), v head dim = 2 x k head dim, the real vocab.
    "tiny": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, num_linear_heads=2, num_linear_key_value_heads=2,
                  linear_head_dim=64, mrope_section=[8, 12, 12]),
        vision=dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=128, fullatt_block_indexes=[1, 3]),
        pixels=(16 * 28 * 28, 256 * 28 * 28),
        dtype="float32",
    ),
    "small": dict(
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, num_linear_heads=4, num_linear_key_value_heads=4,
                  linear_head_dim=128, mrope_section=[8, 12, 12]),
        vision=dict(depth=8, hidden_size=256, num_heads=4, intermediate_size=512, fullatt_block_indexes=[3, 7]),
        pixels=(64 * 28 * 28, 1024 * 28 * 28),
        dtype="bfloat16",
    ),
    "4b": dict(text=_TEXT_4B, vision=_VISION_4B, pixels=(128 * 28 * 28, 2304 * 28 * 28), dtype="bfloat16"),
}


# Transformer twins for comparisons: vLLM's own Qwen2.5-VL with the same vision tower, tokenizer and
# processor, and a decoder of the same width, depth and MLP as the InfiniteVL preset it names.
TWIN_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
TWIN_PRESETS: dict[str, dict] = {
    # vLLM's Qwen2 attention takes head_dim = hidden / heads, so tiny's 64-wide heads mean 2 of them
    # (2 KV heads of 64: the same KV bytes per token and layer as tiny's SWA layers).
    "tiny": dict(base="tiny", text=dict(num_attention_heads=2)),
    "small": dict(base="small", text={}),
    "3b": dict(base="4b", text={}),  # Qwen2.5-VL-3B's released decoder and vision tower
}
ARCHES = ("infinitevl", "qwen2_5_vl")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the tensor."""


def preset_config(preset: str, sliding_window: int = 8192) -> dict:
    """The flat config.json dict of a preset (the released file's layout and fields)."""
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    text = dict(p["text"])
    mrope = text.pop("mrope_section")
    vision = dict(p["vision"])
    cfg = {
        "architectures": [ARCHITECTURE],
        "model_type": "infinite_vl",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "image_token_id": 151655,
        "initializer_range": 0.02,
        "max_position_embeddings": 128000,
        "max_window_layers": 70,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_section": mrope, "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0,
        "sliding_window": sliding_window,
        "tie_word_embeddings": True,
        "torch_dtype": p["dtype"],
        "transformers_version": "4.50.0",
        "use_cache": False,
        "use_sliding_window": True,
        "video_token_id": 151656,
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
        "vision_token_id": 151654,
        "vocab_size": 151936,
        **text,
        "vision_config": {
            "hidden_act": "silu", "in_channels": 3, "model_type": "qwen2_5_vl_vision", "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2, "window_size": 112,
            "out_hidden_size": text["hidden_size"], **vision,
        },
    }
    return cfg


def twin_config(preset: str) -> dict:
    """The flat config.json of a Qwen2.5-VL twin (the layout of Qwen2.5-VL-3B's released file)."""
    if preset not in TWIN_PRESETS:
        raise CheckpointError(f"unknown qwen2_5_vl preset {preset!r}; choose one of {', '.join(TWIN_PRESETS)}")
    twin = TWIN_PRESETS[preset]
    cfg = preset_config(twin["base"], sliding_window=32768)
    for key in ("num_linear_heads", "num_linear_key_value_heads", "linear_head_dim", "head_dim"):
        cfg.pop(key, None)
    cfg.update(twin["text"], architectures=[TWIN_ARCHITECTURE], model_type="qwen2_5_vl", use_sliding_window=False,
               max_window_layers=cfg["num_hidden_layers"])
    return cfg


def twin_shapes(flat: dict) -> dict[str, tuple[int, ...]]:
    """Every stored tensor of a twin, named as transformers' own Qwen2.5-VL names it (released layout)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    fields = {k: v for k, v in flat.items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**fields))
    return {canonical_name(n): tuple(t.shape) for n, t in model.state_dict().items() if n != "lm_head.weight"}


def load_config(ckpt: str | os.PathLike) -> InfiniteVLConfig:
    register_with_transformers()
    path = Path(ckpt) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a checkpoint directory?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    arch = raw.get("architectures")
    if arch != [ARCHITECTURE]:
        raise CheckpointError(f"{path}: unknown architecture {arch!r}, expected [{ARCHITECTURE!r}]")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "intermediate_size", "vision_config"):
        if key not in raw:
            raise CheckpointError(f"{path}: missing config field {key!r}")
    raw.pop("model_type", None)
    raw.pop("architectures", None)
    try:
        cfg = InfiniteVLConfig(**raw)
    except Exception as e:  # strict dataclass validation messages are good but long
        raise CheckpointError(f"{path}: invalid config: {str(e).splitlines()[0]}") from None
    cfg.architectures = [ARCHITECTURE]
    return cfg


def expected_shapes(cfg: InfiniteVLConfig) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's name and shape, derived from the reference model's structure."""
    from .reference.model import InfiniteVLReference

    with torch.device("meta"):
        model = InfiniteVLReference(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def canonical_name(name: str) -> str:
    """Map the newer transformers layout (model.language_model.*, model.visual.*) to the released one."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def _shard_files(ckpt: Path) -> dict[str, str]:
    """tensor name -> shard file, from the index (or the single-file layout)."""
    index = ckpt / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        for shard in sorted(set(weight_map.values())):
            if not (ckpt / shard).is_file():
                name = next(n for n, s in weight_map.items() if s == shard)
                raise CheckpointError(f"{ckpt / shard}: shard missing (holds {name} and others)")
        return weight_map
    single = ckpt / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return {k: single.name for k in f.keys()}
    raise CheckpointError(f"{ckpt}: no {INDEX_FILE} and no model.safetensors")


def tensor_shapes(ckpt: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every stored tensor's shard and shape, from the safetensors headers (no weights are read)."""
    from safetensors import safe_open

    ckpt = Path(ckpt)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in sorted(set(_shard_files(ckpt).values())):
        try:
            with safe_open(ckpt / shard, "pt") as f:
                for k in f.keys():
                    found[k] = (shard, tuple(f.get_slice(k).get_shape()))
        except Exception as e:
            raise CheckpointError(f"{ckpt / shard}: not a readable safetensors file ({e})") from None
    return found


def validate_checkpoint(ckpt: str | os.PathLike) -> InfiniteVLConfig:
    """Check config, shards, names and shapes (headers only; no weights are read)."""
    ckpt = Path(ckpt)
    cfg = load_config(ckpt)
    expected = expected_shapes(cfg)
    found = {canonical_name(k): v for k, v in tensor_shapes(ckpt).items()}
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"{ckpt}: tensor {name} is missing from every shard")
        shard, got = found[name]
        if got != shape:
            raise CheckpointError(f"{ckpt / shard}: tensor {name} has shape {list(got)}, expected {list(shape)}")
    unknown = sorted(set(found) - set(expected) - {"lm_head.weight"})
    if unknown:
        shard = found[unknown[0]][0]
        raise CheckpointError(f"{ckpt / shard}: unexpected tensor {unknown[0]} (and {len(unknown) - 1} more)")
    return cfg


def iter_weights(ckpt: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(released name, tensor) for every stored tensor, shard by shard."""
    from safetensors import safe_open

    ckpt = Path(ckpt)
    for shard in sorted(set(_shard_files(ckpt).values())):
        with safe_open(ckpt / shard, "pt") as f:
            for k in f.keys():
                yield canonical_name(k), f.get_tensor(k)


def load_reference(ckpt: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The reference model with a checkpoint's weights (validated first)."""
    from .reference.model import InfiniteVLReference

    cfg = validate_checkpoint(ckpt)
    model = InfiniteVLReference(cfg)
    state = {k: v for k, v in iter_weights(ckpt) if k != "lm_head.weight"}
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


# -- the maker --------------------------------------------------------------------------------
def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Seeded values that keep activations in a sane range (so greedy decoding is not a coin toss)."""
    leaf = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name.rsplit(".", 2)[-2]
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log()
    if name.endswith("dt_bias"):
        dt = torch.empty(shape).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp()
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if "norm" in leaf or leaf in ("ln_q",):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name == "model.embed_tokens.weight":  # tied head: this std gives peaked yet varied greedy text
        return 0.3 * torch.randn(shape, generator=gen)
    if "conv1d" in name:
        return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def make_checkpoint(
    out: str | os.PathLike,
    preset: str = "tiny",
    seed: int = 0,
    sliding_window: int = 8192,
    dtype: str | None = None,
    progress: bool = False,
    arch: str = "infinitevl",
) -> Path:
    """Write a complete checkpoint directory with seeded random weights; returns its path.

    ``arch="qwen2_5_vl"`` writes the Transformer twin of a preset (TWIN_PRESETS) for comparisons.
    Tensors are made and written one shard at a time, so the 4b preset never holds the model twice.
    """
    from safetensors.torch import save_file

    from .tokenizer import save_processor, save_tokenizer

    if arch not in ARCHES:
        raise CheckpointError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHES)}")
    register_with_transformers()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = preset_config(preset, sliding_window) if arch == "infinitevl" else twin_config(preset)
    if dtype:
        flat["torch_dtype"] = dtype
    torch_dtype = getattr(torch, flat["torch_dtype"])
    (out / "config.json").write_text(json.dumps(flat, indent=2) + "\n")
    shapes = expected_shapes(load_config(out)) if arch == "infinitevl" else twin_shapes(flat)

    # Plan shards by size, then make each shard's tensors just before writing it.
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(shapes), desc=f"make-checkpoint {preset}", unit="tensor")
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            tensors[name] = _init_tensor(name, shapes[name], gen).to(torch_dtype).contiguous()
            total += tensors[name].numel() * itemsize
            weight_map[name] = fname
            if bar:
                bar.update()
        save_file(tensors, out / fname, metadata={"format": "pt"})
        del tensors
    if bar:
        bar.close()
    (out / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                    "do_sample": False}, indent=2) + "\n"
    )
    save_tokenizer(out)
    min_px, max_px = PRESETS[preset if arch == "infinitevl" else TWIN_PRESETS[preset]["base"]]["pixels"]
    save_processor(out, min_px, max_px)
    return out
