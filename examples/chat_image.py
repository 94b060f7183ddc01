"""Chat about an image through the OpenAI API of `infinitevl-vllm serve`.

    infinitevl-vllm serve demo-checkpoint --host 127.0.0.1 --port 8000 --served-model-name infinitevl
    .venv/bin/python examples/chat_image.py [IMAGE] [--base-url http://127.0.0.1:8000/v1]
"""

import argparse
import base64
import mimetypes

from openai import OpenAI


def data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", nargs="?", help="an image file (default: a generated red square)")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="EMPTY")
    a = ap.parse_args()
    if a.image:
        url = data_url(a.image)
    else:
        from infinitevl_vllm.tools.demo import demo_image_data_url

        url = demo_image_data_url()
    client = OpenAI(base_url=a.base_url, api_key=a.api_key)
    model = client.models.list().data[0].id
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is in this picture?"},
        ]}],
        max_tokens=64,
    )
    print(resp.choices[0].message.content)


if __name__ == "__main__":
    main()
