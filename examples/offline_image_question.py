"""Ask one image question offline with vLLM's own `LLM` class (no server).

    .venv/bin/python examples/offline_image_question.py CKPT [IMAGE]

CKPT is a checkpoint directory in the released format (make one with
`infinitevl-vllm make-checkpoint --preset tiny --out demo-checkpoint`). The plugin that
registers InfiniteVL is loaded by vLLM itself: no trust_remote_code, no imports of ours.
"""

import sys


def main() -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    ckpt = sys.argv[1]
    image = Image.open(sys.argv[2]).convert("RGB") if len(sys.argv) > 2 else Image.new("RGB", (224, 224), "red")
    llm = LLM(model=ckpt, max_model_len=4096, limit_mm_per_prompt={"image": 1})
    messages = [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": image},
        {"type": "text", "text": "What is in this picture?"},
    ]}]
    out = llm.chat(messages, SamplingParams(max_tokens=64, temperature=0))
    print(out[0].outputs[0].text)


if __name__ == "__main__":  # vLLM spawns engine processes: keep the guard
    main()
