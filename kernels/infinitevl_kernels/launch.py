"""Programmatic dependent launch (Hopper and later) for the decode step's kernels.

At batch 1 a decode step is ~300 short kernels, and each would otherwise start only after the one
before it has finished and flushed. Launched with ``launch_pdl``, a kernel may start while its
predecessor runs. Each of ours then keeps one rule: before ``gdc_wait`` it reads nothing the kernel launched
right before it may write, and right after the wait it lets the next kernel launch
(``gdc_launch_dependents``). A kernel therefore starts early only once its predecessor has passed its own
wait, so everything launched before that predecessor has finished. Before its wait a kernel may read weights,
its own recurrent state, the step's metadata (slots, positions, page tables) and the outputs of any kernel but
the last one. The one thing a caller must not do is write such an input in the kernel right before the one
that reads it.
"""

from __future__ import annotations

import functools

import torch

# None: wherever the GPU has it. Benchmarks set False to time the same kernels without it.
PROGRAMMATIC_LAUNCH: bool | None = None


def dependent_launch(device: torch.device) -> bool:
    if device.type != "cuda" or PROGRAMMATIC_LAUNCH is False:
        return False
    return _has_dependent_launch(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _has_dependent_launch(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9
