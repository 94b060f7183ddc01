"""End-to-end demo: a checkpoint, vLLM's OpenAI server on it, one image question through the
official ``openai`` client, then the server stopped.

With no arguments it makes the tiny demo checkpoint (random weights, so the answer is
gibberish, but every part of the path is the real one).  Point --checkpoint at released
weights for a real answer.
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..serving.serve import serve_command

DEMO_CHECKPOINT = Path("demo-checkpoint")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_image_data_url() -> str:
    """A small synthetic picture (a red square on a blue background) as a PNG data URL."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (224, 224), (30, 60, 200))
    ImageDraw.Draw(img).rectangle((56, 56, 168, 168), fill=(220, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float, log: Path) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"server exited with code {proc.returncode}; last log lines:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        print(f"\r[demo] waiting for the server ({time.time() - start:.0f}s)", end="", flush=True)
        time.sleep(2)
    raise TimeoutError(f"server not healthy after {timeout:.0f}s (log: {log})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infinitevl-vllm demo", description=__doc__)
    p.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT,
                   help="checkpoint directory (default: ./demo-checkpoint, made if missing)")
    p.add_argument("--question", default="What is in this picture?")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server to start")
    a = p.parse_args(argv)

    if not (a.checkpoint / "config.json").exists():
        from ..checkpoint import make_checkpoint

        print(f"[demo] making the tiny demo checkpoint in {a.checkpoint}/ (random weights)")
        make_checkpoint(a.checkpoint, "tiny", seed=0)
    port = free_port()
    log = Path(f"/tmp/infinitevl-demo-server-{port}.log")
    cmd = serve_command(str(a.checkpoint), ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096",
                                            "--served-model-name", "infinitevl", "--limit-mm-per-prompt",
                                            '{"image": 2}'])
    print(f"[demo] starting vLLM's OpenAI server on 127.0.0.1:{port} (log: {log})")
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, port, a.timeout, log)
        print("\n[demo] server is up; asking through the openai client")
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        resp = client.chat.completions.create(
            model="infinitevl",
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": demo_image_data_url()}},
                {"type": "text", "text": a.question},
            ]}],
            max_tokens=a.max_tokens,
            temperature=0,
        )
        print(f"[demo] question: {a.question}")
        print(f"[demo] answer:   {resp.choices[0].message.content!r}")
        print(f"[demo] usage:    {resp.usage.prompt_tokens} prompt + {resp.usage.completion_tokens} completion tokens")
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("[demo] server stopped")


if __name__ == "__main__":
    sys.exit(main())
