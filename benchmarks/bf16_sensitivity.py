"""How much bf16 rounding moves the prompt log-probs of the tiny InfiniteVL checkpoint and of its Qwen2.5-VL
twin, as plain float32 models on the CPU, without any serving code: the yardstick behind the GPU suite's bf16
parity bar (tests/gpu/test_bf16.py: our bf16 engine's error at most 1.5x the twin's).

Both checkpoints are the GPU suite's (``make_checkpoint(..., "tiny", seed=1)``; ours with a 16-token window,
the twin with ``arch="qwen2_5_vl"``), on the suite's parity prompts (4 texts of 5 to 800 words and an image
question, same seeds). For each model, the mean |log-prob - float32 log-prob| over every prompt position when:

- ``bf16_model``: the whole model runs in bf16 (ours: the reference model; the twin: transformers);
- ``embeddings_rounded``: only the input embeddings are rounded to bf16, the rest float32;
- ``per_sublayer``: a relative Gaussian error of 2^-9 (bf16's rounding) is added to one sublayer's output
  (attention or linear-attention mixer, or MLP), one at a time, texts only.

And ``greedy_flips``, the yardstick behind the suite's bf16 batch-invariance bar: on its 32 prompts (4 probes
and 28 fillers), 16 greedy tokens of the bf16 model, then again with every decoder product summed in another
order (float32 products of the same bf16 operands, rounded once: the smallest change a different kernel
makes): how many continuations change, and by how much the changed token had led its runner-up.

Writes benchmarks/results/bf16_sensitivity.json. About 10 minutes on 2 cores.

    python benchmarks/bf16_sensitivity.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from infinitevl_vllm.checkpoint import load_reference, make_checkpoint
from infinitevl_vllm.reference import MultimodalInputs
from infinitevl_vllm.tools.workloads import (
    batch_invariance_questions,
    chat_prompt,
    hf_prompt_logprobs,
    parity_questions,
)

BF16_RELATIVE = 2.0**-9
GREEDY_TOKENS = 16


class Side:
    """One model (ours or the twin) with a way to get its prompt log-probs in float32 or bf16."""

    def __init__(self, name: str, ckpt: Path):
        self.name, self.ckpt = name, ckpt
        self.processor = AutoProcessor.from_pretrained(ckpt)
        self.prompts = [(chat_prompt(self.processor, text, n_images=len(images)), images)
                        for text, images in parity_questions()]
        self.f32 = self.load(torch.float32)

    def load(self, dtype: torch.dtype):
        if self.name == "ours":
            return load_reference(self.ckpt, dtype=dtype)
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(self.ckpt, dtype=dtype).eval()

    def decoder_layers(self, model) -> list[torch.nn.Module]:
        return list(model.model.layers if self.name == "ours" else model.model.language_model.layers)

    def embeddings(self, model) -> torch.nn.Module:
        return model.model.embed_tokens if self.name == "ours" else model.model.language_model.embed_tokens

    def logprobs(self, model, with_images: bool = True) -> torch.Tensor:
        out = []
        for prompt, images in self.prompts:
            if images and not with_images:
                continue
            if self.name == "ours":
                batch = self.processor(text=[prompt], return_tensors="pt", **({"images": images} if images else {}))
                with torch.no_grad():
                    out.append(model.prompt_logprobs(MultimodalInputs.from_processor(batch)).double())
            else:
                out.append(hf_prompt_logprobs(model, self.processor, prompt, images)[1])
        return torch.cat(out)

    def greedy(self, model, text: str, images: list) -> tuple[list[int], list[float]]:
        """GREEDY_TOKENS greedy tokens (EOS ignored) and how far each led its runner-up, in nats."""
        batch = self.processor(text=[chat_prompt(self.processor, text, n_images=len(images))], return_tensors="pt",
                               **({"images": images} if images else {}))
        tokens, leads = [], []
        with torch.no_grad():
            if self.name == "ours":
                logits, state = model.prefill(MultimodalInputs.from_processor(batch))
                last = logits[-1]
            else:
                batch = batch.to(dtype=model.dtype)
                last = model(**batch, use_cache=False).logits[0, -1]
            while True:
                top = torch.log_softmax(last.double(), -1).topk(2)
                tokens.append(int(top.indices[0]))
                leads.append(float(top.values[0] - top.values[1]))
                if len(tokens) == GREEDY_TOKENS:
                    return tokens, leads
                if self.name == "ours":
                    last = model.step(tokens[-1], state)
                else:  # the whole sequence again: no cache to keep apart from the product under study
                    ids = batch["input_ids"]
                    for key, per_token in list(batch.items()):  # the ids, the mask, the token types
                        if key != "input_ids" and per_token.shape == ids.shape:
                            new = per_token[:, -1:] if key == "attention_mask" else torch.zeros_like(per_token[:, -1:])
                            batch[key] = torch.cat([per_token, new], 1)
                    batch["input_ids"] = torch.cat([ids, torch.tensor([[tokens[-1]]])], 1)
                    last = model(**batch, use_cache=False).logits[0, -1]


def float32_products(layers: list[torch.nn.Module]) -> list:
    """Hooks that recompute every linear layer's output as a float32 product of its bf16 operands, rounded once:
    the same values summed in another order."""

    def hook(module, inputs, output):
        bias = None if module.bias is None else module.bias.float()
        return torch.nn.functional.linear(inputs[0].float(), module.weight.float(), bias).to(output.dtype)

    return [m.register_forward_hook(hook) for layer in layers for m in layer.modules()
            if isinstance(m, torch.nn.Linear)]


def greedy_flips(side: Side) -> dict:
    probes, fillers = batch_invariance_questions()
    model = side.load(torch.bfloat16)
    runs = [side.greedy(model, text, images) for text, images in probes + fillers]
    again = [side.greedy(model, text, images)[0] for text, images in probes]  # the same order: no change
    handles = float32_products(side.decoder_layers(model))
    reordered = [side.greedy(model, text, images)[0] for text, images in probes + fillers]
    for h in handles:
        h.remove()
    rows = []
    for (tokens, leads), other in zip(runs, reordered):
        first = next((i for i, (a, b) in enumerate(zip(tokens, other)) if a != b), None)
        rows.append({"first_difference": first, "lead_nats": None if first is None else leads[first]})
    all_leads = [lead for _, leads in runs for lead in leads]
    return {
        "prompts": len(rows), "tokens": GREEDY_TOKENS,
        "changed": sum(r["first_difference"] is not None for r in rows),
        "probes_changed": sum(r["first_difference"] is not None for r in rows[:len(probes)]),
        "repeat_changed": sum(a != tokens for a, (tokens, _) in zip(again, runs)),
        "tokens_tied": sum(lead == 0 for lead in all_leads) / len(all_leads),  # bf16 logits equal: any change flips
        "per_prompt": rows,
    }


def hooked(module: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor]):
    """A forward hook that replaces the module's output (or its first element) by change(output)."""

    def hook(_, __, output):
        if isinstance(output, tuple):
            return (change(output[0]), *output[1:])
        return change(output)

    return module.register_forward_hook(hook)


def measure(side: Side) -> dict:
    base = side.logprobs(side.f32)
    result = {"prompt_positions": int(base.numel())}
    result["bf16_model"] = float((side.logprobs(side.load(torch.bfloat16)) - base).abs().mean())
    handle = hooked(side.embeddings(side.f32), lambda t: t.bfloat16().to(t.dtype))
    result["embeddings_rounded"] = float((side.logprobs(side.f32) - base).abs().mean())
    handle.remove()
    texts_base, gen = side.logprobs(side.f32, with_images=False), torch.Generator().manual_seed(0)

    def noise(t: torch.Tensor) -> torch.Tensor:
        return t + t * BF16_RELATIVE * torch.randn(t.shape, generator=gen, dtype=t.dtype)

    rows = []
    for i, layer in enumerate(side.decoder_layers(side.f32)):
        for part in ("self_attn", "mlp"):
            handle = hooked(getattr(layer, part), noise)
            moved = float((side.logprobs(side.f32, with_images=False) - texts_base).abs().mean())
            handle.remove()
            kind = part if side.name == "twin" or part == "mlp" else ("swa" if layer.is_swa else "gdn")
            rows.append({"layer": i, "sublayer": kind, "mean_abs": moved})
    result["per_sublayer"] = rows
    result["greedy_flips"] = greedy_flips(side)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bf16_sensitivity.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ours = make_checkpoint(Path(tmp) / "ours", "tiny", seed=1, sliding_window=16)
        twin = make_checkpoint(Path(tmp) / "twin", "tiny", seed=1, arch="qwen2_5_vl")
        results = {name: measure(Side(name, ckpt)) for name, ckpt in (("ours", ours), ("twin", twin))}
    ratios = {k: results["ours"][k] / results["twin"][k] for k in ("bf16_model", "embeddings_rounded")}
    record = {"results": results, "ratio_ours_over_twin": ratios,
              "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for name, r in results.items():
        rows = r["per_sublayer"]
        print(f"{name}: bf16 model {r['bf16_model']:.4f}, embeddings rounded {r['embeddings_rounded']:.4f};",
              "per sublayer:", " ".join(f"{x['layer']}{x['sublayer'][0]}={x['mean_abs']:.4f}" for x in rows))
        flips = r["greedy_flips"]
        print(f"{name}: summing the products in another order changed {flips['changed']} of {flips['prompts']}",
              f"greedy continuations ({flips['probes_changed']} of the 4 probes); {flips['repeat_changed']} of the",
              f"probes changed on a plain repeat; {flips['tokens_tied']:.1%} of greedy tokens tied with the runner-up",
              "in bf16")
    print("ratios ours/twin:", {k: round(v, 2) for k, v in ratios.items()}, "->", args.out)


if __name__ == "__main__":
    main()
