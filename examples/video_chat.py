"""Ask about a video: an mp4 as a data URL (vLLM decodes and samples its frames).

    .venv/bin/python examples/video_chat.py VIDEO.mp4 [--base-url http://127.0.0.1:8000/v1]

Start the server with `--limit-mm-per-prompt '{"image": 4, "video": 1}'` to accept videos.
"""

import argparse
import base64

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("video")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="EMPTY")
    a = ap.parse_args()
    with open(a.video, "rb") as f:
        url = "data:video/mp4;base64," + base64.b64encode(f.read()).decode()
    client = OpenAI(base_url=a.base_url, api_key=a.api_key)
    model = client.models.list().data[0].id
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}},
            {"type": "text", "text": "What happens in this video?"},
        ]}],
        max_tokens=64,
    )
    print(resp.choices[0].message.content)


if __name__ == "__main__":
    main()
