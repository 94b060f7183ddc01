"""Streaming video sessions: the protocol every side shares (no vLLM imports here).

A session is one long token stream whose state (GDN slots + SWA rings) is kept between requests:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|>   (prefilled at create)
    frame 0 (256 <|image_pad|>), frame 1, ..., [text an append carries], frame n-1, ...       (appends)
    <|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n  -> answer                    (a question, on a fork)

Position rule (M-RoPE rows t, h, w), applied token by token with a cursor that the session keeps:
- a text token takes ``next_pos`` in all three rows; after text, ``next_t = next_pos``;
- a frame of h x w merged patches (16 x 16 at 448 x 448) takes ``t = next_t`` for all its tokens and
  ``h = hw_base + i``, ``w = hw_base + j``, where ``hw_base`` is ``next_pos`` at the stream's first
  frame and then never moves; after a frame ``next_t += 1`` and
  ``next_pos = max(next_pos, next_t, hw_base + max(h, w))``.
So between frames only the temporal row advances (facts: "Streaming video"), and the first frame and
the text after it get exactly Qwen2.5-VL's single-image positions. The rule is a fold over tokens, so
applying it to a whole prompt at once or piece by piece with the cursor carried gives the same
positions: that is what makes "frames one by one, then ask" equal to one request holding it all.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import asdict, dataclass

import numpy as np

FRAME_SIZE = 448  # pixels; 448 / 14 / 2 = 16 merged patches a side -> 256 tokens
FRAME_TOKENS = 256
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
EXTRA_ARGS_KEY = "infinitevl_session"
# Frames never repeat, so vLLM's multimodal processor cache (default 4 GiB, filled at about 1.2 MB a
# frame) would only grow with them: frames carry ids with this prefix, which the cache skips.
FRAME_UUID_PREFIX = "infinitevl-frame-"


def is_session_frame_key(key: object) -> bool:
    """A multimodal cache key of a session frame (they never repeat, so they are not cached)."""
    return isinstance(key, str) and key.startswith(FRAME_UUID_PREFIX)


class SessionError(Exception):
    """A client error with the HTTP status it maps to (400, 404, 409, 429)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class StreamCursor:
    """Where a session's stream stands: the counters the position rule and the ring need."""

    tokens: int = 0  # tokens in the state = the ring's token index of the next token
    frames: int = 0
    next_pos: int = 0
    next_t: int = 0
    hw_base: int = -1  # -1: no frame yet

    def to_dict(self) -> dict:
        return asdict(self)


def stream_positions(token_ids: list[int], frame_spans: list[tuple[int, int, int]],
                     cursor: StreamCursor) -> tuple[np.ndarray, StreamCursor]:
    """M-RoPE positions [3, len(token_ids)] of a prompt under the stream rule, and the cursor after it.

    frame_spans: (offset, grid_h, grid_w) of each frame's tokens in the prompt (grid in merged patches).
    """
    n = len(token_ids)
    out = np.empty((3, n), dtype=np.int64)
    c = StreamCursor(**cursor.to_dict())
    spans = sorted(frame_spans)
    i = 0
    for offset, gh, gw in [*spans, (n, 0, 0)]:
        if offset < i or offset + gh * gw > n:
            raise ValueError(f"frame span at {offset} ({gh}x{gw}) overlaps another or runs past the prompt ({n})")
        if offset > i:  # text tokens
            out[:, i:offset] = np.arange(c.next_pos, c.next_pos + offset - i)
            c.next_pos += offset - i
            c.next_t = c.next_pos
        if gh == 0:
            break
        if c.hw_base < 0:
            c.hw_base = c.next_pos
        out[0, offset:offset + gh * gw] = c.next_t
        out[1, offset:offset + gh * gw] = np.repeat(np.arange(gh), gw) + c.hw_base
        out[2, offset:offset + gh * gw] = np.tile(np.arange(gw), gh) + c.hw_base
        c.next_t += 1
        c.next_pos = max(c.next_pos, c.next_t, c.hw_base + max(gh, gw))
        c.frames += 1
        i = offset + gh * gw
    c.tokens += n
    return out, c


def prefix_text(system: str | None) -> str:
    """The text prefilled when a session is created: the chat's opening and an open vision segment."""
    sys_part = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
    return f"{sys_part}<|im_start|>user\n{VISION_START}"


def append_text(num_frames: int, text: str | None = None) -> str:
    """An append's prompt: its text (if any, prefilled as is) then one placeholder per frame."""
    return (text or "") + IMAGE_PAD * num_frames


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise SessionError(400, f"{where}: only text parts are accepted in a session question (the "
                                        "session's frames are the visual context; append images as frames)")
            parts.append(p["text"])
        return "".join(parts)
    raise SessionError(400, f"{where}: content must be a string or a list of text parts")


def question_text(messages: list[dict]) -> str:
    """A question's prompt: closes the vision segment, then the conversation in Qwen's chat format.

    The first message must be the user's: its text continues the user turn the frames are in.
    Later messages (assistant / user turns) follow as ordinary turns; the assistant answers last.
    """
    if not isinstance(messages, list) or not messages:
        raise SessionError(400, "messages: a non-empty list of {role, content} is required")
    out = [VISION_END]
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise SessionError(400, f"messages[{k}]: role must be 'user' or 'assistant' (the system prompt is "
                                    "the session's, set when it is created)")
        if k == 0 and m["role"] != "user":
            raise SessionError(400, "messages[0] must be the user's question")
        text = _content_text(m.get("content"), f"messages[{k}].content")
        out.append(text + "<|im_end|>\n" if k == 0 else f"<|im_start|>{m['role']}\n{text}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def decode_frame(url: object, index: int = 0):
    """A frame given as a data URL -> RGB PIL image resized to 448 x 448 (ValueError-free: SessionError 400)."""
    from PIL import Image, UnidentifiedImageError

    where = f"frames[{index}]"
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise SessionError(400, f"{where}: a frame must be a data URL 'data:image/<fmt>;base64,...'")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError) as e:
        raise SessionError(400, f"{where}: invalid base64 ({e})") from e
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
        raise SessionError(400, f"{where}: not a readable image ({e})") from e
    return rgb if rgb.size == (FRAME_SIZE, FRAME_SIZE) else rgb.resize((FRAME_SIZE, FRAME_SIZE), Image.BICUBIC)
