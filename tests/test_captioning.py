"""`infinitevl-vllm caption`: one record per input, errors as records, resumable after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infinitevl_vllm.tools.captioning import CaptionConfig, iter_images, load_done_ids, run_caption_job

BATCH = 4
ENGINE = dict(batch_size=BATCH, dtype="float32", enforce_eager=True)  # the same engine for every run here


def _write_images(d: Path, n: int, seed: int = 0) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")]
    for i in range(n):
        ext, fmt = formats[i % 3]
        Image.fromarray((rng.random((64 + 8 * i, 96, 3)) * 255).astype("uint8")).save(d / f"img{i:03d}.{ext}", fmt)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    _write_images(d / "good", 6)
    (d / "good" / "nested").mkdir()
    _write_images(d / "good" / "nested", 2, seed=1)
    (d / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (d / "good" / "notes.jpg").write_bytes(b"not a jpeg at all")
    (d / "good" / "readme.txt").write_text("not an input: no image suffix")
    return d / "good"


@pytest.fixture(scope="module")
def caption_llm(tiny_ckpt):
    from vllm import LLM

    llm = LLM(**CaptionConfig(model=str(tiny_ckpt), images="", out=Path("unused"), **ENGINE).engine_kwargs())
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _run(tiny_ckpt, llm, images, out, **kw) -> list[dict]:
    cfg = CaptionConfig(model=str(tiny_ckpt), images=str(images), out=out, max_tokens=8, quiet=True, **ENGINE, **kw)
    run_caption_job(cfg, llm=llm)
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_one_record_per_file_errors_as_records(tiny_ckpt, caption_llm, image_dir, tmp_path):
    rows = _run(tiny_ckpt, caption_llm, image_dir, tmp_path / "out.jsonl")
    ids = sorted(r["id"] for r in rows)
    assert ids == sorted([f"img{i:03d}.{e}" for i, e in zip(range(6), ["png", "jpg", "webp"] * 2)]
                         + ["nested/img000.png", "nested/img001.jpg", "broken.png", "notes.jpg"])
    errors = {r["id"]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {"broken.png", "notes.jpg"}
    assert all("Error" in e or "cannot identify" in e for e in errors.values())
    good = [r for r in rows if "error" not in r]
    assert all(r["caption"] and r["tokens"] == 8 and r["seconds"] > 0 for r in good)
    assert all(Path(r["path"]).exists() for r in rows)


def test_same_seed_same_captions(tiny_ckpt, caption_llm, image_dir, tmp_path):
    a = _run(tiny_ckpt, caption_llm, image_dir, tmp_path / "a.jsonl", seed=7, temperature=1.0)
    b = _run(tiny_ckpt, caption_llm, image_dir, tmp_path / "b.jsonl", seed=7, temperature=1.0)
    captions = lambda rows: {r["id"]: r.get("caption") for r in rows}
    assert captions(a) == captions(b)


def test_rerun_skips_written_ids(tiny_ckpt, caption_llm, image_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    first = _run(tiny_ckpt, caption_llm, image_dir, out)
    again = _run(tiny_ckpt, caption_llm, image_dir, out)
    assert again == first


def test_manifest_and_glob_give_directory_ids(image_dir, tmp_path):
    by_dir = [i.id for i in iter_images(str(image_dir))]
    by_glob = [i.id for i in iter_images(str(image_dir) + "/**/*.*") if not i.id.endswith(".txt")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "path": str(image_dir / i)}) + "\n" for i in by_dir))
    by_manifest = [i.id for i in iter_images(str(manifest))]
    assert by_manifest == by_dir
    assert sorted(by_glob) == sorted(by_dir)
    assert "readme.txt" not in by_dir


def test_torn_last_line_is_cut_on_resume(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "caption": "x"}\n{"id": "b", "capt')
    assert load_done_ids(out) == {"a"}
    assert out.read_text() == '{"id": "a", "caption": "x"}\n'


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        iter_images(str(tmp_path / "missing"))
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:1: .*'path'"):
        list(iter_images(str(bad)))


def test_sigkill_then_rerun_gives_every_id_once(tiny_ckpt, tmp_path):
    n = 120  # enough that the job is still running when the kill lands, even if this process is starved a few seconds
    images = tmp_path / "many"
    _write_images(images, n)
    out = tmp_path / "out.jsonl"
    cmd = [str(Path(sys.executable).with_name("infinitevl-vllm")), "caption", "--model", str(tiny_ckpt),
           "--images", str(images), "--out", str(out), "--max-tokens", "24", "--batch-size", "2", "--quiet",
           "--enforce-eager"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 5):
            assert proc.poll() is None, "caption job ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = len(out.read_bytes().splitlines())
    assert 5 <= partial < n, "the kill did not land mid-run"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"img{i:03d}.{['png', 'jpg', 'webp'][i % 3]}" for i in range(n))


@pytest.mark.slow
def test_ray_two_workers_match_single_engine(tiny_ckpt, caption_llm, image_dir, tmp_path):
    """`--ray --workers 2` on a local Ray cluster: same ids and (greedy) captions as one engine."""
    from infinitevl_vllm.tools.captioning import run_on_ray

    single = _run(tiny_ckpt, caption_llm, image_dir, tmp_path / "single.jsonl")
    out = tmp_path / "ray.jsonl"
    cfg = CaptionConfig(model=str(tiny_ckpt), images=str(image_dir), out=out, max_tokens=8, quiet=True, **ENGINE)
    counts = run_on_ray(cfg, workers=2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["merged"] == len(rows) == len(single)
    as_map = lambda rs: {r["id"]: r.get("caption", "ERROR") for r in rs}
    assert as_map(rows) == as_map(single)
    assert not list(tmp_path.glob("ray.shard*"))
    assert run_on_ray(cfg, workers=2)["captioned"] == 0  # a rerun finds everything done
