"""Serving: `infinitevl-vllm serve` and streaming sessions (the session protocol, the session manager, the
worker side of a session's state, the /v1/sessions routes)."""
