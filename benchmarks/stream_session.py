"""A live stream through one session: N frames (448 x 448, each one distinct) appended to one
``StreamSession`` of an in-process engine (tiny checkpoint, the release's 8192-token window), with the
process tree's RSS, the frames/s and the latency of one question recorded along the stream.

    .venv/bin/python benchmarks/stream_session.py [--frames 10000] [--every 250] \\
        [--out benchmarks/results/stream_session.json]

Frames go in appends of --batch frames (one vLLM request each). RSS is the whole process tree's (the
engine runs in this process). At every point the same question is asked (greedy, 16 tokens, on a
fork: the stream is not changed by it), so the record shows what a client waits for an answer after
that many frames. Writes the JSON after every point (a run cut short keeps its numbers) and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from infinitevl_vllm.tools.workloads import run_stream


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = doc["points"]
    x = [p["frames"] for p in pts]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, scale, label, color in (
            (axes[0], "rss_bytes", 2**-30, "RSS of the process (GiB)", "tab:blue"),
            (axes[1], "frames_per_s", 1, "frames appended per second", "tab:green"),
            (axes[2], "ask_seconds", 1, "seconds to answer (16 tokens)", "tab:orange")):
        y = [p[key] * scale for p in pts]
        ax.plot(x, y, "o-", ms=3, color=color)
        ax.set_ylim(0, max(y) * 1.3)
        ax.set_xlabel("frames in the session (256 tokens each)")
        ax.set_ylabel(label)
    axes[0].set_title("Memory along the stream")
    axes[1].set_title("Append rate")
    axes[2].set_title("Asking a question after N frames")
    fig.suptitle(f"One streaming session, InfiniteVL tiny on vLLM CPU ({doc['machine']['cpus']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=10000)
    p.add_argument("--every", type=int, default=250, help="record a point every this many frames")
    p.add_argument("--batch", type=int, default=8, help="frames per append")
    p.add_argument("--checkpoint", default=None, help="default: a fresh tiny checkpoint")
    p.add_argument("--seconds", type=float, default=None, help="stop after the first point past this time")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/stream_session.json"))
    a = p.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    from infinitevl_vllm.checkpoint import make_checkpoint

    ckpt = a.checkpoint or make_checkpoint(tempfile.mkdtemp(prefix="stream_ckpt_"), "tiny", seed=0)
    llm = LLM(model=str(ckpt), enforce_eager=True, dtype="float32", max_model_len=4096, max_num_seqs=2,
              limit_mm_per_prompt={"image": a.batch, "video": 0}, enable_prefix_caching=False, seed=0)
    def write(result: dict) -> None:
        """Written after every point, so a run cut short still leaves its numbers."""
        pts = result["points"]
        tenth = max(q["rss_bytes"] for q in pts[: max(1, len(pts) // 10)])
        doc = {
            "what": "one streaming session: frames appended in order, RSS and frames/s along the stream",
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "model": "tiny InfiniteVL checkpoint (seeded random weights), window 8192, float32, CPU, in-process",
            "frames_requested": a.frames, "batch": a.batch, "complete": "final_frames" in result,
            "rss_max_over_first_tenth": round(max(q["rss_bytes"] for q in pts) / tenth, 4),
            **result,
        }
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
        plot(doc, a.out.with_suffix(".png"))

    result = run_stream(llm, a.frames, a.every, a.batch, on_point=lambda pts: write({"points": pts}),
                        seconds=a.seconds)
    write(result)
    print(f"{result['final_frames']} frames; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
