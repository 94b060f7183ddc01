"""The seam between our code and vLLM: the version guard, that every patch in vllm_patches.py is installed
and matters (the unpatched original, reachable as ``__wrapped__``, behaves the way the patch exists to
change), and the source checks of scripts/check_seam.py. No engine starts here; the patches whose effect
needs an engine are covered by the tests named in ENGINE_TESTS."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infinitevl_vllm import vllm_patches
from infinitevl_vllm.plugin import register

ROOT = Path(__file__).resolve().parents[1]

# patch -> the engine-level tests that fail without it
ENGINE_TESTS = {
    "log_state_pool": ["tests/test_serving.py::test_state_pool_in_startup_log_and_metrics"],
    "slot_gauges_in_metrics": ["tests/test_serving.py::test_state_pool_in_startup_log_and_metrics"],
    "skip_session_frames_in_mm_cache":
        ["tests/test_sessions.py::test_frames_stay_out_of_vllms_multimodal_processor_cache"],
    "session_hooks_in_model_runner":
        ["tests/test_sessions.py::test_frames_one_by_one_then_ask_equals_one_request_with_everything"],
    "steady_decode_reuses_step_inputs":
        ["tests/test_vllm_model.py::test_steady_decode_steps_reuse_the_last_steps_inputs_and_equal_the_reference"],
}


def _targets():
    """patch -> the (owner, attribute) pairs it replaces."""
    import vllm.config.model as model_config
    from vllm.multimodal.cache.base import BaseMultiModalCache
    from vllm.multimodal.media.connector import MediaConnector
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return {
        "lift_max_model_len": [(model_config, "_get_and_verify_max_len")],
        "log_state_pool": [(EngineCore, "_initialize_kv_caches")],
        "slot_gauges_in_metrics": [(PrometheusStatLogger, "record")],
        "skip_session_frames_in_mm_cache": [(BaseMultiModalCache, "cache_if_fits")],
        "session_hooks_in_model_runner": [(GPUModelRunner, "_update_states"), (GPUModelRunner, "execute_model")],
        "steady_decode_reuses_step_inputs": [(GPUModelRunner, "_prepare_inputs"),
                                             (GPUModelRunner, "_build_attention_metadata"),
                                             (GPUModelRunner, "_dummy_run")],
        "refuse_remote_media": [(MediaConnector, "_assert_url_in_allowed_media_domains")],
        "refuse_file_urls": [(MediaConnector, "_load_file_url")],
        "refuse_decompression_bombs": [(ImageMediaIO, "load_bytes")],
    }


def test_version_guard_names_the_version():
    vllm_patches.check_vllm_version("0.32.0")
    vllm_patches.check_vllm_version("0.32.3")
    for other in ("0.33.0", "0.31.2", "1.0.0"):
        with pytest.raises(vllm_patches.VLLMVersionError, match=rf"vLLM 0\.32\.x only.*has vLLM {other}"):
            vllm_patches.check_vllm_version(other)


def test_a_missing_target_fails_clearly():
    class Owner:
        pass

    with pytest.raises(vllm_patches.VLLMVersionError, match="lift_max_model_len.*has no .*Owner.gone"):
        vllm_patches._replace(Owner, "gone", "lift_max_model_len", lambda f: f)


def test_every_patch_has_a_reason_a_function_and_is_installed():
    register()
    vllm_patches.harden_media()
    targets = _targets()
    assert set(targets) == set(vllm_patches.PATCHES)
    for name, reason in vllm_patches.PATCHES.items():
        assert callable(getattr(vllm_patches, name)) and reason and "\n" not in reason
        for owner, attr in targets[name]:
            assert getattr(owner, attr)._infinitevl == name, (name, attr)
    for name, tests in ENGINE_TESTS.items():
        assert name in vllm_patches.PATCHES
        for t in tests:
            path, _, func = t.partition("::")
            assert (ROOT / path).exists() and f"def {func}(" in (ROOT / path).read_text(), t
    vllm_patches.apply()  # idempotent: a second call wraps nothing twice
    for name, pairs in targets.items():
        for owner, attr in pairs:
            assert getattr(getattr(owner, attr).__wrapped__, "_infinitevl", None) is None, name


def test_lift_max_model_len(tiny_ckpt):
    from vllm.config import ModelConfig

    register()
    assert ModelConfig(model=str(tiny_ckpt), max_model_len=2_000_000).max_model_len == 2_000_000
    import vllm.config.model as model_config

    original = model_config._get_and_verify_max_len.__wrapped__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_config, "_get_and_verify_max_len", original)
        with pytest.raises(Exception, match="max_position_embeddings|max_model_len"):
            ModelConfig(model=str(tiny_ckpt), max_model_len=2_000_000)


def test_session_frames_skip_the_mm_cache():
    from vllm.multimodal.cache.base import BaseMultiModalCache

    from infinitevl_vllm.serving.session_protocol import FRAME_UUID_PREFIX

    register()

    class Cache:
        def __init__(self):
            self.keys = []

        def put_if_fits(self, key, value):
            self.keys.append(key)
            return True

    cache, frame = Cache(), FRAME_UUID_PREFIX + "abc"
    assert BaseMultiModalCache.cache_if_fits(None, cache, frame, 1) is False
    assert BaseMultiModalCache.cache_if_fits(None, cache, "image-hash", 1) is True
    assert cache.keys == ["image-hash"]
    assert BaseMultiModalCache.cache_if_fits.__wrapped__(None, cache, frame, 1) is True  # unpatched: cached


def test_media_hardening_differs_from_the_originals(tmp_path):
    from PIL import Image
    from vllm.multimodal.media.connector import MediaConnector
    from vllm.multimodal.media.image import ImageMediaIO

    vllm_patches.harden_media()
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    url = f"file://{tmp_path}/a.png"
    conn = MediaConnector()
    with pytest.raises(ValueError, match="--allowed-local-media-path"):
        conn.load_from_url(url, ImageMediaIO())
    from urllib.parse import urlparse

    with pytest.raises(ValueError, match="remote media URLs are not fetched"):  # patched: no allow-list, refused
        conn._assert_url_in_allowed_media_domains(urlparse("http://example.org/x.png"))
    assert MediaConnector._assert_url_in_allowed_media_domains.__wrapped__(conn, urlparse("http://example.org/x.png")) \
        is None  # unpatched: every host allowed
    with pytest.raises(RuntimeError, match="Cannot load local files"):  # unpatched: a 500 in vLLM's server
        MediaConnector._load_file_url.__wrapped__(conn, urlparse(url), ImageMediaIO())
    bomb = Image.new("L", (1, 1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", 0)  # every image is a bomb now
        import io

        buf = io.BytesIO()
        bomb.resize((64, 64)).save(buf, "PNG")
        with pytest.raises(ValueError, match="Failed to load image"):
            ImageMediaIO().load_bytes(buf.getvalue())
        with pytest.raises(Image.DecompressionBombError):  # unpatched: not a ValueError, a 500 in vLLM's server
            ImageMediaIO.load_bytes.__wrapped__(ImageMediaIO(), buf.getvalue())


def test_hardening_is_not_installed_by_the_plugin_alone(tmp_path):
    """Another model served from this environment keeps stock vLLM: register() installs no media patch."""
    code = textwrap.dedent(f"""
        from PIL import Image
        from vllm.multimodal.media.connector import MediaConnector
        from vllm.multimodal.media.image import ImageMediaIO
        from infinitevl_vllm import vllm_patches
        from infinitevl_vllm.plugin import register
        register()
        assert not vllm_patches.is_patched(MediaConnector, "_load_file_url")
        assert not vllm_patches.is_patched(MediaConnector, "_assert_url_in_allowed_media_domains")
        assert not vllm_patches.is_patched(ImageMediaIO, "load_bytes")
        Image.new("RGB", (8, 8)).save("{tmp_path}/a.png")
        try:
            MediaConnector().load_from_url("file://{tmp_path}/a.png", ImageMediaIO())
        except RuntimeError as e:
            assert "Cannot load local files" in str(e), e
        else:
            raise AssertionError("stock vLLM refuses file:// without --allowed-local-media-path")
        print("stock")
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != vllm_patches.HARDEN_MEDIA_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "stock" in out.stdout, out.stderr[-3000:]


def test_check_seam_passes_here_and_finds_violations(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_seam.py"), str(ROOT)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout
    pkg = tmp_path / "infinitevl_vllm"
    pkg.mkdir()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "vllm_patches.py").write_text("")
    (pkg / "a.py").write_text("from vllm.v1.worker.gpu_worker import Worker\nWorker.x = 1\nsetattr(Worker, 'y', 2)\n"
                              "def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from .a import f\n")
    (pkg / "ring_attention.py").write_text("from .sessions_worker import offsets\n")
    other = "bench" + "marks"  # spelled apart: this file must not look like an import of benchmarks/ itself
    (tmp_path / "tests" / "t.py").write_text(f"import sys\nsys.path.insert(0, '{other}')\n")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_seam.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    for finding in ("a.py:2: assigns an attribute", "a.py:3: setattr()", "import cycle: infinitevl_vllm.a",
                    "ring_attention.py imports the sessions feature", "tests/t.py imports from benchmarks/"):
        assert finding in out.stdout, out.stdout


def test_session_hooks_leave_other_models_alone():
    """A client may put any extra_args on a request to another model: the runner hook ignores it there."""
    from types import SimpleNamespace

    from infinitevl_vllm.serving import sessions_worker
    from infinitevl_vllm.serving.session_protocol import EXTRA_ARGS_KEY

    req = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={EXTRA_ARGS_KEY: {"id": "s", "op": "append"}}),
                          num_computed_tokens=0, prompt_token_ids=[1, 2])
    class Runner:  # another model's runner: its model has no step_requests
        requests = {"r": req}

        def get_model(self):
            return SimpleNamespace()

    runner = Runner()
    step = SimpleNamespace(num_scheduled_tokens={"r": 2}, finished_req_ids=set())
    sessions_worker.before_step(runner, step)
    sessions_worker.after_step(runner)
    assert sessions_worker.store_of(runner, create=False) is None
