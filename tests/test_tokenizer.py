"""The checkpoint's tokenizer is the real Qwen2.5-VL one, loadable with no network."""

from transformers import AutoProcessor, AutoTokenizer


def test_golden_ids(tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert tok.encode("<|im_start|>user", add_special_tokens=False) == [151644, 872]
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok.convert_tokens_to_ids("<|video_pad|>") == 151656
    assert tok.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.eos_token_id == 151645


def test_digits_split_one_by_one(tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    ids = tok.encode("12345", add_special_tokens=False)
    assert len(ids) == 5
    assert tok.decode(ids) == "12345"


def test_roundtrip_unicode(tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    text = "Ünïcödé 你好，世界! <|im_end|>\n\tTabs"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template_chatml(tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_custom_system_prompt_replaces_default(tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "helpful assistant" not in text


def test_processor_expands_image_pad(tiny_ckpt):
    from infinitevl_vllm.tools.workloads import random_image

    proc = AutoProcessor.from_pretrained(tiny_ckpt)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    batch = proc(text=[text], images=[random_image(0)], return_tensors="pt")
    t, h, w = batch["image_grid_thw"][0].tolist()
    assert int((batch["input_ids"][0] == 151655).sum()) == t * h * w // 4
