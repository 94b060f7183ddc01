"""Self-check of the kernel-study decoder (kernel_study_decoder.py): it reproduces the reference model
through chunked prefill, then decode. Not part of the test suite (nothing serves this decoder).

Runs on CPU through TRITON_INTERPRET=1 with the tiny preset and a window of 8, so that the ring wraps and
chunks cross the window edge (~20-50 s):

    python benchmarks/kernel_study_check.py
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from kernel_study_decoder import DecoderDims, InfiniteVLDecoderGPU  # noqa: E402

from infinitevl_vllm.checkpoint import preset_config  # noqa: E402
from infinitevl_vllm.config import InfiniteVLConfig  # noqa: E402
from infinitevl_vllm.reference import InfiniteVLReference, MultimodalInputs  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_decoder_matches_reference_across_chunks_and_decodes():
    raw = preset_config("tiny", sliding_window=8)
    raw.pop("model_type"), raw.pop("architectures")
    cfg = InfiniteVLConfig(**raw)
    torch.manual_seed(0)
    ref = InfiniteVLReference(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                p.uniform_(0.0, 1.0)
    dims = DecoderDims.from_config(cfg.text_config)
    ours = InfiniteVLDecoderGPU(dims, num_slots=3, device="cpu", dtype=torch.float32, ring_block_size=3)  # wraps
    ours.load_reference_state(ref.state_dict())
    ids = torch.randint(0, 1000, (13,))
    logits_ref, state = ref.prefill(MultimodalInputs(input_ids=ids))
    slot = torch.tensor([1])
    outs = []
    for s, e in [(0, 8), (8, 9), (9, 13)]:  # the 1-token chunk takes the fused matvec path
        pos = torch.arange(s, e).expand(3, -1)
        hid = ours.prefill(ours.embed[ids[s:e]], pos, torch.tensor([0, e - s]), torch.tensor([s]), slot, e - s)
        outs.append(ours.logits(hid))
    assert rel(torch.cat(outs), logits_ref) < 2e-3
    tok = int(logits_ref[-1].argmax())
    for t in range(13, 17):
        want = ref.step(tok, state)
        got = ours.decode(torch.tensor([tok]), torch.full((3, 1), t), torch.tensor([t]), slot)[0]
        assert rel(got, want) < 2e-3
        tok = int(want.argmax())


if __name__ == "__main__":
    check_decoder_matches_reference_across_chunks_and_decodes()
    print("kernel_study_check: the kernel-study decoder matches the reference model (prefill chunks and decodes)")
    sys.exit(0)
