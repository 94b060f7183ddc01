"""The reference model: vision tower, M-RoPE ids, and decoding consistency."""

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from infinitevl_vllm.checkpoint import load_reference
from infinitevl_vllm.reference import MultimodalInputs
from infinitevl_vllm.tools.workloads import random_image


@pytest.fixture(scope="module")
def ref64(tiny_ckpt):
    return load_reference(tiny_ckpt, dtype=torch.float64)


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return AutoProcessor.from_pretrained(tiny_ckpt)


def image_batch(processor, n_images=1, text="Describe it."):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    imgs = [random_image(i, (224 + 56 * i, 168)) for i in range(n_images)]
    return processor(text=[prompt], images=imgs, return_tensors="pt")


def test_vision_tower_matches_transformers(ref64, processor):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    hf = Qwen2_5_VisionTransformerPretrainedModel._from_config(ref64.config.vision_config).double()
    hf.load_state_dict({k[7:]: v for k, v in ref64.state_dict().items() if k.startswith("visual.")})
    b = image_batch(processor, n_images=2)
    with torch.no_grad():
        ours = ref64.visual(b["pixel_values"].double(), b["image_grid_thw"])
        theirs = hf(b["pixel_values"].double(), grid_thw=b["image_grid_thw"])
    theirs = getattr(theirs, "pooler_output", theirs)
    # transformers rounds its rotary inv_freq to float32 (angle error ~1e-7 relative); any real
    # difference in window order, rotary or merging shows up at O(1e-2) or more.
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _hf_rope_index(cfg, b):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    with torch.device("meta"):
        hf = Qwen2_5_VLModel(Qwen2_5_VLConfig(vision_config=cfg.vision_config.to_dict(),
                                              text_config=cfg.text_config.to_dict()))
    pos, delta = hf.get_rope_index(
        b["input_ids"], b["mm_token_type_ids"], image_grid_thw=b.get("image_grid_thw"),
        video_grid_thw=b.get("video_grid_thw"), second_per_grid_ts=b.get("second_per_grid_ts"),
        attention_mask=b["attention_mask"],
    )
    return pos[:, 0], int(delta.flatten()[0])


def test_mrope_ids_mixed_images_and_text_match_qwen_rule(ref64, processor):
    b = image_batch(processor, n_images=2, text="Compare these two pictures, please.")
    ours, delta = ref64.positions(MultimodalInputs.from_processor(b))
    theirs, their_delta = _hf_rope_index(ref64.config, b)
    assert torch.equal(ours, theirs)
    assert delta == their_delta
    # The rule by hand for the first image: text, then a t/h/w grid starting after it.
    ids = b["input_ids"][0]
    first = int((ids == 151655).nonzero()[0])
    h, w = (b["image_grid_thw"][0, 1:] // 2).tolist()
    assert ours[:, first].tolist() == [first, first, first]
    assert ours[:, first + w].tolist() == [first, first + 1, first]  # next row of patches
    assert ours[:, first + h * w - 1].tolist() == [first, first + h - 1, first + w - 1]


def test_mrope_ids_video_match_qwen_rule(ref64, processor):
    frames = torch.stack([torch.tensor(np.asarray(random_image(i, (112, 84)))) for i in range(4)])
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True, tokenize=False)
    b = processor(text=[prompt], videos=[frames.permute(0, 3, 1, 2)], return_tensors="pt",
                  videos_kwargs={"do_sample_frames": False, "fps": 2.0})
    assert b["video_grid_thw"][0, 0] == 2
    ours, delta = ref64.positions(MultimodalInputs.from_processor(b))
    theirs, their_delta = _hf_rope_index(ref64.config, b)
    assert torch.equal(ours, theirs) and delta == their_delta


def test_prefill_then_decode_equals_one_prefill(ref64, processor):
    """Decoding token by token from a state equals prefilling the whole sequence (chunked GDN)."""
    b = image_batch(processor)
    mm = MultimodalInputs.from_processor(b)
    gen = ref64.generate(mm, max_new_tokens=6)
    full = MultimodalInputs(**{**mm.__dict__, "input_ids": torch.cat([mm.input_ids, torch.tensor(gen[:-1])])})
    logits, _ = ref64.prefill(full)
    assert logits[-len(gen):].argmax(-1).tolist() == gen


def test_chunked_and_recurrent_model_agree(small_window_ckpt):
    model = load_reference(small_window_ckpt, dtype=torch.float64)
    ids = torch.randint(0, 151643, (70,), generator=torch.Generator().manual_seed(0))
    mm = MultimodalInputs(input_ids=ids)
    a, _ = model.prefill(mm)
    b, _ = model.prefill(mm, recurrent=True)
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_state_is_constant_size_past_the_window(small_window_ckpt):
    model = load_reference(small_window_ckpt, dtype=torch.float64)
    ids = torch.randint(0, 151643, (40,), generator=torch.Generator().manual_seed(1))
    _, state = model.prefill(MultimodalInputs(input_ids=ids))

    def size(s):
        n = 0
        for layer in s.layers:
            if hasattr(layer, "k"):
                n += layer.k.numel() + layer.v.numel()
            else:
                n += layer.recurrent.numel() + sum(c.numel() for c in layer.conv.values())
        return n

    before = size(state)
    for t in range(30):
        model.step(t, state)
    assert size(state) == before
    assert state.layers[0].k.shape[0] == 16 - 1  # the window minus the current token


def test_window_limits_what_swa_sees(small_window_ckpt):
    """Tokens older than the window reach the output only through GDN state: zeroing the GDN
    contribution, changing a token > W positions back leaves SWA-layer outputs unchanged."""
    model = load_reference(small_window_ckpt, dtype=torch.float64)
    layer = model.model.layers[0]
    assert layer.is_swa
    x = torch.randn(40, model.text_config.hidden_size, dtype=torch.float64)
    from infinitevl_kernels import mrope_cos_sin

    from infinitevl_vllm.reference.layers import SWAState

    pos = torch.arange(40)
    cos, sin = mrope_cos_sin(pos.expand(3, -1), 64, 1e6, [8, 12, 12])
    out1 = layer.self_attn(x, cos, sin, pos, SWAState())
    x2 = x.clone()
    x2[39 - 16] += 1.0  # exactly W positions before the last token: outside its window
    out2 = layer.self_attn(x2, cos, sin, pos, SWAState())
    torch.testing.assert_close(out1[-1], out2[-1])
    x3 = x.clone()
    x3[39 - 15] += 1.0  # W-1 back: inside
    out3 = layer.self_attn(x3, cos, sin, pos, SWAState())
    assert not torch.allclose(out1[-1], out3[-1])
