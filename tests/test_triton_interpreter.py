"""The Triton kernels, checked on CPU through Triton's interpreter, in a fresh
process (TRITON_INTERPRET=1 must be set before Triton compiles anything, and vLLM, which other tests
import, changes what the interpreter sees)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "triton")],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
