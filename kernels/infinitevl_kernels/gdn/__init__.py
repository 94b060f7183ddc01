"""Gated DeltaNet: the torch reference (reference.py), its batch over a slot pool (batch.py, the CPU serving
path) and the Triton kernels for that batch (triton_batch.py)."""
