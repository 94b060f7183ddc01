"""Feed a live stream into a session and ask about it as it goes (the `/v1/sessions` routes).

    infinitevl-vllm serve CHECKPOINT --host 127.0.0.1 --port 8000
    .venv/bin/python examples/live_session.py [FRAMES_DIR] [--ask-every 8] [--question "What happened?"]

Frames are the images of FRAMES_DIR in name order (a video split into frames, or a camera's snapshots);
without it, 24 generated frames of a square moving across the picture. The session is deleted at the end.
"""

import argparse
import base64
import io
import json
import sys
import urllib.request
from pathlib import Path


def call(method: str, url: str, key: str, body: dict | None = None):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=600) as r:
        text = r.read()
        return json.loads(text) if text else None


def frames_from(directory: str | None, count: int):
    """Data URLs of the frames, one at a time (a live source never has them all at once)."""
    from PIL import Image

    if directory:
        for path in sorted(p for p in Path(directory).iterdir() if p.is_file()):
            with Image.open(path) as im:
                yield to_data_url(im.convert("RGB"))
        return
    for k in range(count):
        im = Image.new("RGB", (448, 448), (20, 20, 60))
        x = 16 + k * (448 - 96) // max(1, count - 1)
        im.paste((230, 40, 40), (x, 176, x + 80, 256))
        yield to_data_url(im)


def to_data_url(im) -> str:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("frames_dir", nargs="?", help="a folder of frames (default: generated frames)")
    ap.add_argument("--frames", type=int, default=24, help="how many frames to generate without a folder")
    ap.add_argument("--batch", type=int, default=8, help="frames per append (up to 8 are one engine request)")
    ap.add_argument("--ask-every", type=int, default=8, help="ask after every this many frames")
    ap.add_argument("--question", default="What happened so far?")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="EMPTY")
    a = ap.parse_args()
    sessions = a.base_url.rstrip("/") + "/sessions"
    sid = call("POST", sessions, a.api_key, {"system": "You watch a live video stream."})["id"]
    print(f"session {sid}")
    try:
        batch, seen, asked = [], 0, 0
        for url in frames_from(a.frames_dir, a.frames):
            batch.append(url)
            if len(batch) < a.batch:
                continue
            seen = call("POST", f"{sessions}/{sid}/frames", a.api_key, {"frames": batch})["frames"]
            batch = []
            if seen // a.ask_every > asked:
                asked = seen // a.ask_every
                answer = call("POST", f"{sessions}/{sid}/chat", a.api_key, {
                    "messages": [{"role": "user", "content": a.question}], "max_tokens": a.max_tokens,
                    "temperature": 0})
                print(f"after {seen} frames: {answer['choices'][0]['message']['content']!r}", flush=True)
        if batch:
            seen = call("POST", f"{sessions}/{sid}/frames", a.api_key, {"frames": batch})["frames"]
        info = call("GET", f"{sessions}/{sid}", a.api_key)
        print(f"{info['frames']} frames, {info['tokens']} tokens, state {info['state_bytes'] / 2**20:.1f} MiB")
    finally:
        call("DELETE", f"{sessions}/{sid}", a.api_key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
