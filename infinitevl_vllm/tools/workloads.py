"""Workloads and measuring helpers shared by the benchmarks (benchmarks/) and the tests (tests/), so neither
imports the other: process-tree RSS, one long sequence through an engine, a live stream through one session,
synthetic images and texts, chat prompts, and the prompt set of the bf16 parity measurements."""

from __future__ import annotations

import base64
import io
import json
import statistics
import threading
import time

import numpy as np
import psutil
import torch


class TreeRSS:
    """Peak resident memory of this process and all its children (and every sample, timed)."""

    def __init__(self, interval: float = 0.05):
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def current(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self, interval):
        while not self._stop.is_set():
            rss = self.current()
            self.samples.append((time.perf_counter(), rss))
            self.peak = max(self.peak, rss)
            time.sleep(interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


CHUNK = 8192
GENERATED = 96
STEADY = 48  # decode latency: median gap of the last tokens (the client may lag the engine at first)


def stream_one_sequence(llm, n_tokens: int, seed: int = 0) -> dict:
    """Prefill n_tokens of random text ids, then generate; RSS samples and timings."""
    from vllm import SamplingParams, TokensPrompt

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1000, 100000, (n_tokens,), generator=g).tolist()
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=GENERATED, ignore_eos=True)
    token_times = []
    with TreeRSS(interval=0.2) as rss:
        start = time.perf_counter()
        engine.add_request(f"stream-{n_tokens}", TokensPrompt(prompt_token_ids=prompt), params)
        seen = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                new = len(out.outputs[0].token_ids) - seen
                token_times += [time.perf_counter()] * new
                seen += new
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    return {
        "tokens": n_tokens,
        "peak_rss_bytes": rss.peak,
        "prefill_s": token_times[0] - start,
        "prefill_tokens_per_s": n_tokens / (token_times[0] - start),
        "decode_ms_per_token": 1000 * statistics.median(gaps[-STEADY:]),
        "rss_samples": [(round(t - start, 2), b) for t, b in rss.samples],
    }


def distinct_frame(k: int, size: int = 448):
    """Frame k of a synthetic video: a moving gradient plus seeded noise (no two frames alike, so no
    cache in vLLM can reuse one frame's work for another)."""
    from PIL import Image

    x = np.arange(size, dtype=np.int32)
    base = ((x[None, :, None] + x[:, None, None] + 7 * k) % 256).astype(np.uint8)
    noise = np.random.default_rng(k).integers(0, 32, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(np.broadcast_to(base, (size, size, 3)) + noise)


def run_stream(llm, frames: int, every: int = 250, batch: int = 8, log=print, on_point=None,
               seconds: float | None = None) -> dict:
    """Append `frames` frames (or as many as fit in `seconds`), recording a point every `every`."""
    from vllm import SamplingParams

    from infinitevl_vllm.serving.sessions import StreamSession

    question = SamplingParams(max_tokens=16, temperature=0.0)
    points = []
    with TreeRSS(interval=0.5) as rss, StreamSession(llm) as session:
        start = last_t = time.perf_counter()
        last_n, done = 0, 0
        while done < frames:
            n = min(batch, frames - done)
            info = session.append([distinct_frame(done + i) for i in range(n)])
            done += n
            if done // every > (done - n) // every or done == frames:  # crossed a multiple of `every`
                now = time.perf_counter()
                out = session.ask("What happened in the video?", question)
                ask_s = time.perf_counter() - now
                point = {"frames": done, "tokens": info["tokens"], "seconds": round(now - start, 2),
                         "frames_per_s": round((done - last_n) / (now - last_t), 3),
                         "ask_seconds": round(ask_s, 3), "answer_tokens": len(out.outputs[0].token_ids),
                         "rss_bytes": rss.current(), "state_bytes": info["state_bytes"]}
                points.append(point)
                log(json.dumps(point))
                if on_point is not None:
                    on_point(points)
                last_t, last_n = time.perf_counter(), done
                if seconds is not None and now - start > seconds:
                    break
    return {"points": points, "final_frames": done, "peak_rss_bytes": rss.peak}


def random_image(seed: int, size: tuple[int, int] = (224, 224)):
    """A seeded image of uniform noise, size (width, height)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def pil_data_url(image, fmt: str = "PNG") -> str:
    """An image as the data URL a chat message carries."""
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_data_url(fmt: str = "PNG", seed: int = 0, size=(96, 80)) -> str:
    """A seeded random image as a data URL."""
    return pil_data_url(random_image(seed, size), fmt)


def random_texts(lengths, seed: int = 0) -> list[str]:
    """Seeded texts of the given word counts (plain words: a few tokens each)."""
    words = "red cat runs over the blue hill and sings loudly while dogs bark".split()
    g = torch.Generator().manual_seed(seed)
    return [" ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist()) for n in lengths]


def chat_prompt(processor, text: str, n_images: int = 0, video: bool = False) -> str:
    content = [{"type": "image"}] * n_images + ([{"type": "video"}] if video else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


# The bf16 parity prompts (tests/gpu, benchmarks/bf16_sensitivity.py): texts of several lengths (the longest
# is 50x the GPU suite's 16-token window) and one image question.
PARITY_TEXT_WORDS = (5, 40, 200, 800)


def parity_questions() -> list[tuple[str, list]]:
    """(user text, images) of the parity prompts, before the chat template."""
    return [*((t, []) for t in random_texts(PARITY_TEXT_WORDS, seed=11)), ("Describe it.", [random_image(0)])]


@torch.no_grad()
def hf_prompt_logprobs(model, processor, prompt: str, images=None) -> tuple[list[int], torch.Tensor]:
    """(prompt token ids, log p(token_t | <t) for t >= 1) from a transformers model: one forward pass over
    the processor's inputs, logits taken to float64 before the log-softmax. On CPU in float32 it matches
    vLLM's own float32 Qwen2.5-VL on the twin checkpoint to 3e-5 (texts and an image)."""
    batch = processor(text=[prompt], return_tensors="pt", **({"images": images} if images else {}))
    batch = batch.to(model.device)
    if model.dtype != torch.float32:
        batch = batch.to(dtype=model.dtype)
    logits = model(**batch).logits[0]
    ids = batch["input_ids"][0]
    lp = torch.log_softmax(logits[:-1].double(), -1).gather(-1, ids[1:, None]).squeeze(-1)
    return ids.tolist(), lp.cpu()


def batch_invariance_questions() -> tuple[list[tuple[str, list]], list[tuple[str, list]]]:
    """(probes, fillers) of the bf16 batch-invariance check (tests/gpu, benchmarks/bf16_sensitivity.py), as
    (user text, images) before the chat template: 3 texts of 12 to 300 words and an image question, and 28
    texts of 3 to 600 words that fill a batch of 32 around them."""
    probes = [(t, []) for t in random_texts((12, 90, 300), seed=51)]
    probes.append(("What is in this picture?", [random_image(52)]))
    lengths = np.random.default_rng(53).integers(3, 601, size=28).tolist()
    return probes, [(t, []) for t in random_texts(lengths, seed=54)]
