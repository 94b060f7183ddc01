"""Shared fixtures: checkpoints are made once per test session (they take seconds)."""

from __future__ import annotations

import os

import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A window this small makes "prompts several times longer than the window" cheap.
SMALL_WINDOW = 16


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from infinitevl_vllm.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def small_window_ckpt(tmp_path_factory):
    from infinitevl_vllm.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny_w16"), "tiny", seed=1, sliding_window=SMALL_WINDOW)


@pytest.fixture(scope="module")
def image_server():
    """A 127.0.0.1 HTTP server that answers every GET with a small PNG: (its image URL, the paths asked for)."""
    import http.server
    import io
    import threading

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "PNG")
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(buf.getvalue())

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/x.png", hits
    srv.shutdown()
    srv.server_close()



# Triton's interpreter tests run in a process of their own (tests/test_triton_interpreter.py): once vLLM is
# imported into a process, kernels run under TRITON_INTERPRET=1 there no longer resolve their helpers.
collect_ignore = ["triton"]
