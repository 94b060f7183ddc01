"""The model inside vLLM: the hybrid decoder, attention over the SWA rings, the ring's KV-cache spec and slot
pool, what one sequence's state costs, and the per-request data of a step."""
