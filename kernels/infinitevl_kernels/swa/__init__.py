"""Sliding-window attention: the torch reference (reference.py), the paged KV ring in torch (ring.py, the CPU
serving path) and the Triton kernels on that ring (triton_ring.py)."""
