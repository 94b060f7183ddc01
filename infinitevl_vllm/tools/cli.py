"""The ``infinitevl-vllm`` command.

    infinitevl-vllm make-checkpoint --preset tiny --out DIR [--seed N] [--sliding-window W] [--arch qwen2_5_vl]
    infinitevl-vllm serve CKPT [--max-sessions N] [any `vllm serve` argument ...]
    infinitevl-vllm caption --model CKPT --images DIR|GLOB|MANIFEST.jsonl --out OUT.jsonl [...]
    infinitevl-vllm bench --models CKPT [CKPT ...] --workload decode-vs-context,throughput,streaming --out R.json
    infinitevl-vllm demo [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import sys


def _make_checkpoint(argv: list[str]) -> int:
    from ..checkpoint import ARCHES, PRESETS, TWIN_PRESETS, make_checkpoint

    p = argparse.ArgumentParser(prog="infinitevl-vllm make-checkpoint",
                                description="Write a checkpoint in the released format with seeded random weights.")
    p.add_argument("--arch", choices=ARCHES, default="infinitevl",
                   help="qwen2_5_vl: a Qwen2.5-VL Transformer twin of the same size, for `bench` comparisons")
    p.add_argument("--preset", default="tiny",
                   help=f"infinitevl: {', '.join(PRESETS)}; qwen2_5_vl: {', '.join(TWIN_PRESETS)}")
    p.add_argument("--out", required=True, help="directory to write (created if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sliding-window", type=int, default=8192, help="SWA window in tokens (the release uses 8192)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weight dtype (default: the preset's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    presets = PRESETS if a.arch == "infinitevl" else TWIN_PRESETS
    if a.preset not in presets:
        p.error(f"--preset {a.preset!r} is not a {a.arch} preset; choose one of {', '.join(presets)}")
    out = make_checkpoint(a.out, a.preset, seed=a.seed, sliding_window=a.sliding_window, dtype=a.dtype,
                          progress=not a.quiet, arch=a.arch)
    print(f"wrote {a.arch} {a.preset} checkpoint to {out}")
    return 0


def _serve(argv: list[str]) -> int:
    from ..serving.serve import main as serve_main

    return serve_main(argv)


def _caption(argv: list[str]) -> int:
    from pathlib import Path

    from .captioning import DEFAULT_PROMPT, CaptionConfig, run_caption_job, run_on_ray

    p = argparse.ArgumentParser(
        prog="infinitevl-vllm caption",
        description="Caption images offline into a JSONL file: streaming, resumable, crash-safe.",
        epilog="Rerun with the same --out to resume: ids already written are skipped.")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--images", required=True, help="a directory, a glob pattern (quote it) or a .jsonl manifest "
                                                   'of {"id", "path"} lines')
    p.add_argument("--out", required=True, type=Path, help="JSONL output (appended to, never overwritten)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="requests in flight in the engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--dtype", default="auto", help="as vLLM's --dtype (auto, bfloat16, float32, ...)")
    p.add_argument("--enforce-eager", action="store_true", help="as vLLM's: no torch.compile (faster start)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ray", action="store_true", help="spread the work over Ray workers (RAY_ADDRESS or local)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers, one engine each (with --ray)")
    a = p.parse_args(argv)
    for name in ("max_tokens", "batch_size", "workers", "max_model_len"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.temperature < 0:
        p.error("--temperature must be >= 0")
    cfg = CaptionConfig(model=a.model, images=a.images, out=a.out, prompt=a.prompt, max_tokens=a.max_tokens,
                        batch_size=a.batch_size, seed=a.seed, temperature=a.temperature, quiet=a.quiet,
                        max_model_len=a.max_model_len, dtype=a.dtype, enforce_eager=a.enforce_eager)
    from ..checkpoint import validate_checkpoint

    validate_checkpoint(a.model)
    counts = run_on_ray(cfg, a.workers) if a.ray else run_caption_job(cfg)
    print(f"captioned {counts['captioned']}, errors {counts['errors']} -> {a.out}")
    return 0


def _bench(argv: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main(argv)


def _demo(argv: list[str]) -> int:
    from .demo import main as demo_main

    return demo_main(argv)


COMMANDS = {"make-checkpoint": _make_checkpoint, "serve": _serve, "caption": _caption, "bench": _bench,
            "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    try:
        return COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one clear line for user errors such as a broken checkpoint
        from ..checkpoint import CheckpointError

        if isinstance(e, CheckpointError):
            print(f"infinitevl-vllm {argv[0]}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
