"""Load on the real server: 200 requests, 32 in flight, mixed text / image / lengths.

    .venv/bin/python benchmarks/serve_load.py [--requests 200] [--concurrency 32]
        [--out benchmarks/results/serve_load.json]

Starts `infinitevl-vllm serve` on the tiny checkpoint (127.0.0.1, a free port), drives it with
streaming chat requests through the official openai client, and stops it. Time to first token
(TTFT) and inter-token latency (ITL) are measured client-side per streamed chunk; RSS is the
server's whole process tree before and after the load.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil


def tree_rss(pid: int) -> int:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    a = ap.parse_args()

    from openai import OpenAI

    from infinitevl_vllm.checkpoint import make_checkpoint
    from infinitevl_vllm.tools.demo import free_port
    from infinitevl_vllm.tools.workloads import image_data_url as image_url  # the same synthetic images as the tests

    ckpt = make_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "tiny", seed=0)
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("infinitevl-vllm")), "serve", str(ckpt), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "infinitevl", "--max-model-len", "4096",
           "--max-num-seqs", "32", "--limit-mm-per-prompt", '{"image": 2}']
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 900:
                    raise SystemExit("server did not start") from None
                time.sleep(1)
        startup = time.time() - t0
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        client.chat.completions.create(model="infinitevl", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        rss_before = tree_rss(proc.pid)

        def one(i: int) -> dict:
            content = [{"type": "image_url", "image_url": {"url": image_url(seed=i)}}] if i % 3 == 0 else []
            content.append({"type": "text", "text": "word " * (5 + 53 * (i % 9))})
            start = time.perf_counter()
            stamps = []
            try:
                stream = client.chat.completions.create(
                    model="infinitevl", messages=[{"role": "user", "content": content}], stream=True,
                    max_tokens=16 + 8 * (i % 6), temperature=0, extra_body={"ignore_eos": True})
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        stamps.append(time.perf_counter())
            except Exception as e:
                return {"error": f"{type(e).__name__}: {e}"}
            return {"ttft": stamps[0] - start if stamps else None,
                    "itl": [b - a for a, b in zip(stamps, stamps[1:])], "chunks": len(stamps)}

        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.concurrency) as pool:
            results = list(pool.map(one, range(a.requests)))
        wall = time.perf_counter() - t0
        rss_after = tree_rss(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)

    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    doc = {
        "checkpoint": "tiny (random weights)", "machine": {"cpus": psutil.cpu_count()},
        "requests": a.requests, "concurrency": a.concurrency, "server_startup_s": round(startup, 1),
        "requests_per_s": round(len(ok) / wall, 3), "wall_s": round(wall, 2),
        "ttft_s": {"p50": round(statistics.median(ttft), 4), "p99": round(percentile(ttft, 99), 4)},
        "itl_s": {"p50": round(statistics.median(itl), 4), "p99": round(percentile(itl, 99), 4)},
        "errors": len(results) - len(ok),
        "error_examples": [r["error"] for r in results if "error" in r][:3],
        "rss_bytes": {"before": rss_before, "after": rss_after,
                      "growth_pct": round(100 * (rss_after / rss_before - 1), 2)},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
