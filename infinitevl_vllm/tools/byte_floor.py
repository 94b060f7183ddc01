"""The least memory traffic a decode step needs, and the time it takes at the machine's measured copy
bandwidth: the yardstick for ``bench``'s inter-token latencies (a decode step at small batch is bound by what
it reads, not by arithmetic).

A step reads every language-model weight once (the vision tower is idle while decoding; a tied LM head is
the embedding matrix, read once) and, per sequence, the state it needs:

- InfiniteVL: each GDN layer's conv and recurrent state, read and written; each SWA layer's keys and values
  of min(context, window) tokens read, one token's written;
- a Transformer: every attention layer's keys and values of the whole context read, one token's written.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class StepBytes:
    """Bytes one decode step moves: `at(batch, context)`."""

    weights: int
    per_sequence: int  # state every sequence reads and writes whatever its length
    per_context_token: int  # read for each token of context ...
    context_cap: int | None  # ... up to this many (InfiniteVL's window); None: the whole context

    def at(self, batch: int, context: int) -> int:
        tokens = context if self.context_cap is None else min(context, self.context_cap)
        return self.weights + batch * (self.per_sequence + self.per_context_token * tokens)


def language_weight_elements(ckpt: str | Path) -> int:
    """Elements of the weights a decode step reads, from the safetensors headers (no tensor is loaded):
    every tensor but the vision tower's; with a tied head the embedding matrix counts once (as the head),
    with an untied one the head counts and the embedding (a lookup of one row a sequence) does not."""
    from ..checkpoint import tensor_shapes

    shapes = {k: shape for k, (_, shape) in tensor_shapes(ckpt).items()}
    names = [k for k in shapes if "visual" not in k.split(".")]
    if any(k.endswith("lm_head.weight") for k in names):
        names = [k for k in names if not k.endswith("embed_tokens.weight")]
    return sum(math.prod(shapes[k]) for k in names)


def engine_step_bytes(vllm_config, ckpt: str | Path, transformer_kv_bytes_per_token: int | None) -> StepBytes:
    """The model an engine serves, at the dtypes it serves with (weights in the model dtype; InfiniteVL's
    states in the dtypes the plugin sizes its slots with)."""
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateDtypeCalculator
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    from ..config import InfiniteVLConfig
    from ..model.state_size import gdn_state_bytes, swa_state_bytes

    model, cache = vllm_config.model_config, vllm_config.cache_config
    weights = language_weight_elements(ckpt) * model.dtype.itemsize
    if not isinstance(model.hf_config, InfiniteVLConfig):
        if transformer_kv_bytes_per_token is None:
            raise ValueError(f"{ckpt}: no KV layout known for {type(model.hf_config).__name__}")
        return StepBytes(weights, transformer_kv_bytes_per_token, transformer_kv_bytes_per_token, None)
    cfg = model.hf_config.text_config
    conv_dtype, ssm_dtype = MambaStateDtypeCalculator.gated_delta_net_state_dtype(
        model.dtype, cache.mamba_cache_dtype, cache.mamba_ssm_cache_dtype)
    kv_token = len(cfg.swa_layers) * swa_state_bytes(cfg, kv_cache_dtype_str_to_dtype(cache.cache_dtype, model), 1)
    gdn = len(cfg.gdn_layers) * gdn_state_bytes(cfg, conv_dtype, ssm_dtype)
    return StepBytes(weights, 2 * gdn + kv_token, kv_token, cfg.attention_window)


def copy_bandwidth(device: str = "cuda", gib: float = 1.0, repeats: int = 20) -> dict:
    """Measured device-memory copy bandwidth (bytes read + written per second): a tensor copied onto
    another `repeats` times, after one warm-up copy; timed with CUDA events on a GPU, the wall clock on CPU."""
    import torch

    n = int(gib * 2**30) // 4
    src, dst = torch.ones(n, dtype=torch.float32, device=device), torch.empty(n, dtype=torch.float32, device=device)
    dst.copy_(src)
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        del src, dst
        torch.cuda.empty_cache()  # the buffers go back to the device, not to this process's cache
    else:
        t0 = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
    return {"device": device, "buffer_bytes": 4 * n, "repeats": repeats,
            "bytes_per_s": 2 * 4 * n * repeats / seconds}
