"""Offline batch captioning: a lazy stream of images through one vLLM engine into a JSONL file.

- Inputs stream from a directory walk, a glob or a JSONL manifest; ids are stable across the
  three (a directory's and a glob's ids are paths relative to their root).
- Images are decoded ahead on a thread pool, a bounded number at a time, so the engine never
  waits on decoding and memory stays bounded.
- Requests go to the engine as slots free up (continuous batching); each finished request is
  appended to OUT and flushed at once, in order of completion.
- A rerun with the same OUT skips ids already written, after cutting off a torn last line.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_PROMPT = "Describe this image in one sentence."
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs rather than allocate gigabytes


@dataclass(frozen=True)
class ImageItem:
    id: str
    path: str


# -- inputs --------------------------------------------------------------------------------------
def _walk(root: Path) -> Iterator[ImageItem]:
    """Sorted, lazy directory walk (one directory listing in memory at a time)."""
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                subdirs.append(Path(e.path))
            elif Path(e.name).suffix.lower() in IMAGE_SUFFIXES:
                yield ImageItem(os.path.relpath(e.path, root), e.path)
        stack.extend(reversed(subdirs))


def _glob_root(pattern: str) -> Path:
    """The directory part of a pattern before its first wildcard: ids are relative to it."""
    fixed = []
    for part in Path(pattern).parts:
        if globlib.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _manifest(path: Path) -> Iterator[ImageItem]:
    base = path.parent
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                item_id, item_path = str(row["id"]), str(row["path"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                msg = f"{path}:{n}: manifest lines must be JSON objects with 'id' and 'path' ({e})"
                raise ValueError(msg) from None
            yield ImageItem(item_id, item_path if os.path.isabs(item_path) else str(base / item_path))


def iter_images(spec: str) -> Iterator[ImageItem]:
    """Images named by a directory, a glob pattern, or a .jsonl manifest of {"id", "path"}."""
    p = Path(spec)
    if p.is_dir():
        return _walk(p)
    if p.is_file() and p.suffix == ".jsonl":
        return _manifest(p)
    if globlib.has_magic(spec):
        root = _glob_root(spec)
        return (ImageItem(os.path.relpath(f, root), f) for f in sorted(globlib.iglob(spec, recursive=True))
                if os.path.isfile(f))
    raise FileNotFoundError(f"--images {spec!r}: not a directory, a .jsonl manifest or a glob pattern")


# -- output --------------------------------------------------------------------------------------
def load_done_ids(out: Path) -> set[str]:
    """Ids already in OUT; a torn last line (a write cut by a kill) is cut off the file."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out, "r+b") as f:
            f.truncate(end)
    done = set()
    for line in data[:end].splitlines():
        if line.strip():
            done.add(json.loads(line)["id"])
    return done


class RecordWriter:
    """Appends one JSON line per record and flushes it to the OS at once (survives SIGKILL)."""

    def __init__(self, out: Path):
        out.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(out, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


# -- decoding ------------------------------------------------------------------------------------
def decode_image(path: str):
    """RGB PIL image, fully loaded, or an exception naming what is wrong."""
    import warnings

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")


def decoded_ahead(items: Iterable[ImageItem], workers: int, ahead: int) -> Iterator[tuple[ImageItem, Future]]:
    """(item, future of its decoded image), in input order, at most `ahead` decodes in flight."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    pending: deque[tuple[ImageItem, Future]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(decode_image, item.path)))
            if len(pending) >= ahead:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


# -- the job -------------------------------------------------------------------------------------
@dataclass
class CaptionConfig:
    model: str
    images: str
    out: Path
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 64
    batch_size: int = 16
    seed: int = 0
    temperature: float = 0.0
    quiet: bool = False
    shard: tuple[int, int] | None = None  # (index, count): take ids whose crc32 % count == index
    done_in: tuple[Path, ...] = ()  # more files whose ids count as done (a Ray shard reads the merged OUT)
    max_model_len: int = 4096
    decode_workers: int = 4
    dtype: str = "auto"
    enforce_eager: bool = False

    def engine_kwargs(self) -> dict:
        # Each image is captioned once, so vLLM's multimodal processor cache (4 GiB by default) would
        # only fill with images that never come back; without it vLLM also skips hashing them.
        return dict(model=self.model, max_model_len=self.max_model_len, max_num_seqs=self.batch_size,
                    limit_mm_per_prompt={"image": 1, "video": 0}, seed=self.seed, dtype=self.dtype,
                    enforce_eager=self.enforce_eager, mm_processor_cache_gb=0)


def in_shard(item_id: str, shard: tuple[int, int] | None) -> bool:
    return shard is None or zlib.crc32(item_id.encode()) % shard[1] == shard[0]


def caption_prompt(model: str, prompt: str) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def _progress(cfg: CaptionConfig, done: int):
    from tqdm import tqdm

    bar = tqdm(desc="captioning", unit="img", disable=cfg.quiet, initial=0, dynamic_ncols=True, smoothing=0.1)
    bar.set_postfix(skipped=done)

    def count():  # a total (hence an ETA) without making the job wait for a full walk
        try:
            total = sum(1 for i in iter_images(cfg.images) if in_shard(i.id, cfg.shard))
            bar.total = max(total - done, 0)
            bar.refresh()
        except Exception:
            pass

    threading.Thread(target=count, daemon=True).start()
    return bar


def run_caption_job(cfg: CaptionConfig, llm=None) -> dict:
    """Caption every image of cfg.images not yet in cfg.out. Returns counts."""
    from vllm import LLM, SamplingParams

    done = load_done_ids(cfg.out).union(*(load_done_ids(p) for p in cfg.done_in))
    todo = (i for i in iter_images(cfg.images) if i.id not in done and in_shard(i.id, cfg.shard))
    llm = llm or LLM(**cfg.engine_kwargs())
    engine = llm.llm_engine
    prompt = caption_prompt(cfg.model, cfg.prompt)
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed)
    writer = RecordWriter(cfg.out)
    bar = _progress(cfg, len(done))
    in_flight: dict[str, tuple[ImageItem, float]] = {}
    counts = {"captioned": 0, "errors": 0, "skipped": len(done)}

    def finish(record: dict) -> None:
        writer.write(record)
        counts["errors" if "error" in record else "captioned"] += 1
        bar.update()

    def step() -> None:
        for out in engine.step():
            if out.finished:
                item, started = in_flight.pop(out.request_id)
                c = out.outputs[0]
                finish({"id": item.id, "path": item.path, "caption": c.text, "tokens": len(c.token_ids),
                        "seconds": round(time.perf_counter() - started, 4)})

    try:
        for n, (item, fut) in enumerate(decoded_ahead(todo, cfg.decode_workers, ahead=2 * cfg.batch_size)):
            while len(in_flight) >= cfg.batch_size:
                step()
            try:
                image = fut.result()
                rid = f"cap-{n}"
                engine.add_request(rid, {"prompt": prompt, "multi_modal_data": {"image": image}}, params)
            except Exception as e:  # unreadable image, or one the processor refuses
                finish({"id": item.id, "path": item.path, "error": _error_text(e)})
                continue
            in_flight[rid] = (item, time.perf_counter())
        while in_flight:
            step()
    finally:
        bar.close()
        writer.close()
    return counts


# -- scaling out on Ray ----------------------------------------------------------------------------
def shard_path(out: Path, index: int, count: int) -> Path:
    return out.with_name(f"{out.stem}.shard{index}-of-{count}{out.suffix}")


def merge_shards(out: Path, shards: list[Path]) -> int:
    """Append to OUT every shard record whose id OUT lacks (so a merge can itself be resumed)."""
    done = load_done_ids(out)
    writer = RecordWriter(out)
    added = 0
    try:
        for shard in shards:
            load_done_ids(shard)  # repairs a torn last line
            with open(shard, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        record = json.loads(line)
                        if record["id"] not in done:
                            writer.write(record)
                            done.add(record["id"])
                            added += 1
    finally:
        writer.close()
    return added


def run_on_ray(cfg: CaptionConfig, workers: int) -> dict:
    """One engine per Ray worker (one per GPU on a CUDA host), each on a deterministic shard of the
    ids, writing and resuming its own shard file; the shards are merged into cfg.out at the end.
    Joins the cluster named by RAY_ADDRESS, else starts a local one."""
    import dataclasses

    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True,
             log_to_driver=not cfg.quiet)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= workers else 0

        @ray.remote(num_gpus=gpus, num_cpus=1)
        def caption_shard(shard_cfg: CaptionConfig) -> dict:
            return run_caption_job(shard_cfg)

        shard_cfgs = [dataclasses.replace(cfg, out=shard_path(cfg.out, i, workers), shard=(i, workers), quiet=True,
                                          done_in=(cfg.out,))
                      for i in range(workers)]
        results = ray.get([caption_shard.remote(c) for c in shard_cfgs])
    finally:
        ray.shutdown()
    merged = merge_shards(cfg.out, [c.out for c in shard_cfgs])
    for c in shard_cfgs:  # everything is in OUT now; a rerun reads OUT, not the shards
        c.out.unlink(missing_ok=True)
    totals = {k: sum(r[k] for r in results) for k in ("captioned", "errors")}
    return {**totals, "merged": merged}
