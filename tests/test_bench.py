"""`infinitevl-vllm bench` and the Qwen2.5-VL twin checkpoints it compares against."""

from __future__ import annotations

import json

import psutil
import pytest

from infinitevl_vllm.checkpoint import CheckpointError, load_config, make_checkpoint, twin_config
from infinitevl_vllm.tools.bench import (
    LARGEST_BATCH,
    BenchError,
    BenchSpec,
    check_spec,
    floor_ms,
    goals,
    parse_batches,
    parse_list,
    parse_tokens,
    throughput_batches,
)
from infinitevl_vllm.tools.byte_floor import StepBytes, language_weight_elements
from infinitevl_vllm.tools.cli import main as cli


@pytest.fixture(scope="module")
def twin_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen2_5_vl") / "qwen2_5_vl-tiny", "tiny", seed=0,
                           arch="qwen2_5_vl")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# -- byte floors ----------------------------------------------------------------------------------
def test_a_decode_step_reads_the_language_weights_once(tiny_ckpt, twin_ckpt):
    """From the safetensors headers: every parameter but the vision tower's, the tied head counted once;
    the same count as the models' own parameters (ours: the reference model; the twin: transformers)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from infinitevl_vllm.checkpoint import load_reference

    ours = load_reference(tiny_ckpt)
    assert language_weight_elements(tiny_ckpt) == sum(
        p.numel() for n, p in ours.named_parameters() if not n.startswith("visual."))
    twin = Qwen2_5_VLForConditionalGeneration.from_pretrained(twin_ckpt, dtype=torch.float32)
    assert twin.config.tie_word_embeddings
    assert language_weight_elements(twin_ckpt) == sum(
        p.numel() for n, p in twin.named_parameters() if ".visual." not in f".{n}")  # tied: listed once


def test_infinitevl_floor_stops_growing_at_the_window_a_transformers_never_does():
    ours = StepBytes(weights=1000, per_sequence=300, per_context_token=2, context_cap=64)
    twin = StepBytes(weights=1000, per_sequence=4, per_context_token=4, context_cap=None)
    assert ours.at(1, 10) == 1000 + 300 + 20
    assert ours.at(1, 64) == ours.at(1, 10**6) == 1000 + 300 + 128
    assert ours.at(8, 10**6) - ours.at(1, 10**6) == 7 * (300 + 128)
    assert twin.at(1, 10**6) == 1000 + 4 + 4 * 10**6


# -- the twin checkpoint --------------------------------------------------------------------------
def test_twin_is_a_standard_qwen2_5_vl_checkpoint_of_our_size(twin_ckpt, tiny_ckpt):
    from safetensors import safe_open

    cfg = json.loads((twin_ckpt / "config.json").read_text())
    ours = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"] and cfg["model_type"] == "qwen2_5_vl"
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_key_value_heads", "vocab_size",
                "vision_config", "max_position_embeddings"):
        assert cfg[key] == ours[key], key
    # vLLM's Qwen2 attention uses hidden / heads as head_dim: the twin's heads are as wide as ours.
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == ours["head_dim"]
    names = set(json.loads((twin_ckpt / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.7.self_attn.q_proj.bias" in names and "visual.merger.mlp.2.weight" in names
    assert not any("conv1d" in n or "A_log" in n for n in names)  # no Gated DeltaNet in a Transformer
    with safe_open(twin_ckpt / "model-00001-of-00001.safetensors", "pt") as f:
        assert tuple(f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()) == (2 * 64, 128)
    for name in ("tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (twin_ckpt / name).read_text() == (tiny_ckpt / name).read_text(), name


def test_twin_3b_is_qwen2_5_vl_3b():
    cfg = twin_config("3b")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"]) == (2048, 36, 16, 2, 11008)
    assert cfg["vision_config"]["depth"] == 32 and cfg["vision_config"]["out_hidden_size"] == 2048
    assert cfg["rope_scaling"]["mrope_section"] == [16, 24, 24] and cfg["tie_word_embeddings"] is True


def test_twin_presets_are_checked(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="unknown qwen2_5_vl preset '4b'"):
        twin_config("4b")
    with pytest.raises(SystemExit):
        cli(["make-checkpoint", "--arch", "qwen2_5_vl", "--preset", "4b", "--out", str(tmp_path)])
    assert "not a qwen2_5_vl preset; choose one of tiny, small, 3b" in capsys.readouterr().err


# -- arguments ---------------------------------------------------------------------------------------
def test_token_counts_read_as_users_write_them():
    assert parse_list("256,1k,32K,1m") == [256, 1024, 32768, 1048576]
    assert parse_batches("4,max,1") == [4, LARGEST_BATCH, 1]
    assert throughput_batches([4, LARGEST_BATCH, 1]) == [1, 4, LARGEST_BATCH]  # batch 1 says what fits
    with pytest.raises(BenchError, match="not a token count: 'lots'"):
        parse_tokens("lots")
    with pytest.raises(BenchError, match="at least 1"):
        parse_tokens("0")


def test_unknown_workload_is_one_line(tiny_ckpt, tmp_path, capsys):
    assert cli(["bench", "--models", str(tiny_ckpt), "--workload", "decode-vs-contxt", "--out",
                str(tmp_path / "r.json")]) == 2
    assert one_error_line(capsys) == ("infinitevl-vllm bench: unknown workload 'decode-vs-contxt'; choose from "
                                      "decode-vs-context, throughput, streaming, session")
    assert not (tmp_path / "r.json").exists()


def test_missing_checkpoint_is_one_line(tiny_ckpt, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli(["bench", "--models", str(tiny_ckpt), str(missing), "--workload", "throughput", "--out",
                str(tmp_path / "r.json")]) == 2
    assert one_error_line(capsys) == f"infinitevl-vllm bench: checkpoint {missing} does not exist"


def test_a_transformer_skips_contexts_beyond_its_positions_and_refuses_when_none_fit(tiny_ckpt, twin_ckpt, tmp_path,
                                                                                      capsys):
    spec = BenchSpec(models=[str(tiny_ckpt), str(twin_ckpt)], workloads=["decode-vs-context"],
                     contexts=[1024, 131072, 204800], kv_cache_gib=64)
    ours, twin = check_spec(spec)
    assert (ours.contexts, ours.skipped_contexts) == ([1024, 131072, 204800], [])
    # "128K" is the longest prompt its 128,000 positions hold with 32 tokens to generate (and 16 spare)
    assert (twin.contexts, twin.skipped_contexts) == ([1024, 128000 - 32 - 16], [204800])
    assert cli(["bench", "--models", str(tiny_ckpt), str(twin_ckpt), "--workload", "decode-vs-context",
                "--contexts", "200k,300k", "--kv-cache-gib", "64", "--out", str(tmp_path / "r.json")]) == 2
    assert one_error_line(capsys).endswith("a 204800-token prompt plus 32 generated tokens exceeds its "
                                           "max_position_embeddings (128000)")


def _model(kind: str, dvc: list[tuple[int, float, float]], tput: list[tuple[int, float]]) -> dict:
    """A bench result entry: decode-vs-context rows (context, itl p50 ms, ttft s), largest-batch throughput
    rows (context, decode tokens/s); floors of 1 ms a step whatever the context (1 MB at 1 GB/s)."""
    return {"kind": kind, "step_bytes": {"weights": 10**6, "per_sequence": 0, "per_context_token": 0,
                                         "context_cap": None},
            "copy_bandwidth": {"bytes_per_s": 1e9},
            "raw": {"decode-vs-context": [{"context": c, "itl_ms_p50": i, "ttft_s": t} for c, i, t in dvc],
                    "throughput": [{"context": c, "batch": 1, "largest_that_fits": False, "decode_tokens_per_s": 1.0}
                                   for c, _ in tput]
                    + [{"context": c, "batch": 9, "largest_that_fits": True, "decode_tokens_per_s": x}
                       for c, x in tput]}}


def test_goal_figures_compare_infinitevl_with_the_transformer_at_the_named_lengths():
    ours = _model("infinitevl", [(4096, 1.2, 0.1), (32768, 1.2, 0.5), (131072, 1.3, 2.0), (1048576, 1.4, 16.0)],
                  [(32768, 900.0), (131072, 800.0)])
    twin = _model("transformer", [(4096, 1.0, 0.1), (127000, 2.6, 5.0)], [(32768, 100.0), (127000, 20.0)])
    g = goals([ours, twin])
    assert g["itl_bs1_over_floor_max"] == 1.4  # the 1M row, over a 1 ms floor
    assert g["itl_ratio_1m_4k"] == round(1.4 / 1.2, 3)
    assert g["itl_speedup_vs_qwen_128k"] == 2.0  # the twin's 127,000-token row stands for its 128K
    assert g["prefill_speedup_128k"] == 2.5
    assert (g["tput_ratio_32k"], g["tput_ratio_128k"]) == (9.0, 40.0)  # largest-batch rows only
    assert g["qwen_itl_bs1_over_floor_128k"] == 2.6 and g["session_fps"] is None
    twin["step_bytes"] = None  # a Transformer whose KV layout the harness does not know: no floor
    assert goals([ours, twin])["qwen_itl_bs1_over_floor_128k"] is None
    assert floor_ms(twin, 1, 127000) is None
    alone = goals([ours])  # no Transformer in the run: its comparisons are None, ours still computed
    assert alone["itl_speedup_vs_qwen_128k"] is None and alone["itl_ratio_1m_4k"] is not None


def test_context_beyond_the_kv_budget_is_refused_before_any_engine_starts(twin_ckpt):
    spec = BenchSpec(models=[str(twin_ckpt)], workloads=["decode-vs-context"], contexts=[32768], kv_cache_gib=0.125)
    with pytest.raises(BenchError, match=r"qwen2_5_vl-tiny: one 32816-token sequence needs 0.25 GiB of KV cache, "
                                         r"more than --kv-cache-gib 0.125"):
        check_spec(spec)


def test_broken_infinitevl_checkpoint_is_named(tiny_ckpt, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    (broken / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(BenchError, match="shard missing"):
        check_spec(BenchSpec(models=[str(broken)], workloads=["throughput"]))


# -- the decode-step profile -------------------------------------------------------------------------
def test_a_profile_counts_kernels_and_gpu_time_per_step_from_the_trace(tmp_path):
    """Only GPU kernels count (not the CPU ops and runtime calls beside them), only the named trace, and steps
    are the runner's step ranges on the GPU in the trace (with async scheduling the client's step() calls
    while the profiler ran are not the steps it recorded)."""
    import gzip

    from infinitevl_vllm.tools.bench import kernel_profile

    def trace(name: str, events: list[dict]) -> None:
        with gzip.open(tmp_path / f"{name}_dp0_pp0_tp0.123.pt.trace.json.gz", "wt") as f:
            json.dump({"traceEvents": events}, f)

    steps = 5
    events = []
    for i in range(steps):  # a step: 3 GEMMs of 100 us, one recurrent kernel of 50 us, one graph launch
        span = {"name": "execute_context_0(0)_generation_1(1)", "dur": 400.0 + 10 * i}
        events += [{"cat": "user_annotation", **span}, {"cat": "gpu_user_annotation", **span}]
        events += [{"cat": "kernel", "name": "gemm_bf16", "dur": 100.0} for _ in range(3)]
        events += [{"cat": "kernel", "name": "gdn_recurrent", "dur": 50.0},
                   {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "dur": 20.0},
                   {"cat": "cpu_op", "name": "aten::mm", "dur": 400.0}]
    trace("decode-b1-c16384", events)
    trace("decode-b64-c16384", [{"cat": "kernel", "name": "other", "dur": 1.0}])

    prof = kernel_profile(tmp_path, "decode-b1-c16384")
    assert prof["steps"] == steps and prof["step_gpu_span_ms_median"] == 0.42
    assert prof["kernels_per_step"] == 4 and prof["gpu_busy_ms_per_step"] == 0.35
    assert [(k["name"], k["calls_per_step"], k["ms_per_step"], k["share"]) for k in prof["top_kernels"]] == [
        ("gemm_bf16", 3, 0.3, round(300 / 350, 4)), ("gdn_recurrent", 1, 0.05, round(50 / 350, 4))]
    with pytest.raises(BenchError, match="no profiler trace named decode-b9"):
        kernel_profile(tmp_path, "decode-b9")
    with pytest.raises(BenchError, match="has no execute_context step"):
        kernel_profile(tmp_path, "decode-b64-c16384")


def test_the_summary_sets_a_session_appends_wall_time_beside_its_gpu_time():
    """Is an append waiting on the GPU or on the host? Two model steps an append, 3 ms of kernels each,
    against 100 ms of wall time: host-bound."""
    from infinitevl_vllm.tools.bench import SESSION_PROFILE, summarize

    m = {"name": "ours", "kind": "infinitevl", "startup_s": 1.0, "copy_bandwidth": {"bytes_per_s": 1e9},
         "raw": {"profile": {
             "decode-b1-c16384": {"steps": 5, "step_gpu_span_ms_median": 3.6, "gpu_busy_ms_per_step": 3.5,
                                  "kernels_per_step": 800.0},
             SESSION_PROFILE: {"appends": 5, "append_ms": [90.0, 100.0, 120.0, 100.0, 110.0], "steps": 10,
                               "step_gpu_span_ms_median": 4.0, "gpu_busy_ms_per_step": 3.0,
                               "kernels_per_step": 900.0}}}}
    s = summarize([m])["ours"]
    assert s["session_profile"] == {"append_ms_median": 100.0, "steps_per_append": 2.0,
                                    "gpu_busy_ms_per_append": 6.0}
    assert list(s["decode_profile"]) == ["decode-b1-c16384"]


def test_a_session_stream_is_sent_in_appends_cut_where_a_question_is_due():
    from infinitevl_vllm.tools.bench import session_append_sizes, session_questions_at

    assert session_questions_at(2000) == [1, 1000, 2000]
    sizes = session_append_sizes(2000, 8, [1, 1000, 2000])
    assert sum(sizes) == 2000 and max(sizes) == 8 and sizes[0] == 1
    ends = {sum(sizes[:i + 1]) for i in range(len(sizes))}
    assert {1, 1000, 2000} <= ends and len(sizes) == 1 + 125 + 125  # 1, then 1..1000 and 1000..2000 in eights
    assert session_append_sizes(3, 1, [1, 2, 3]) == [1, 1, 1]
    assert session_append_sizes(5, 8, [1, 3, 5]) == [1, 2, 2]


def test_profiling_is_refused_without_a_gpu(tiny_ckpt, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    with pytest.raises(BenchError, match="--profile-context needs a CUDA GPU"):
        check_spec(BenchSpec(models=[str(tiny_ckpt)], workloads=["decode-vs-context"], profile_context=16384))


def test_a_batch_that_cannot_decode_together_gets_no_decode_rate(twin_ckpt, tmp_path):
    """Three 4K-token sequences in a budget that holds two: they never all decode at once, so there is no
    steady rate of three to report (rather than a rate of two called three)."""
    from infinitevl_vllm.tools.bench import run_bench

    spec = BenchSpec(models=[str(twin_ckpt)], workloads=["throughput"], batches=[3], throughput_contexts=[4096],
                     gen_tokens=4, kv_cache_gib=0.035)
    result = run_bench(spec, tmp_path / "r.json", quiet=True)
    (row,) = result["models"][0]["raw"]["throughput"]
    assert row["batch"] == 3 and row["max_running"] < 3 and row["decode_tokens_per_s"] is None
    assert row["all_concurrent"] is False
    assert result["summary"]["qwen2_5_vl-tiny"]["throughput"]["4096"]["decode_tokens_per_s"] == {"3": None}


@pytest.mark.parametrize("signal_name, status", [("terminate", 143), ("kill", -9)])
def test_a_killed_worker_leaves_no_process_behind_and_its_measurements_in_the_result(tiny_ckpt, tmp_path,
                                                                                     signal_name, status):
    """SIGTERM or SIGKILL on a model's worker while its engine runs: the worker stops its engine core on the way
    out (SIGTERM) or the harness does (SIGKILL); the harness names the failure and keeps what was measured."""
    import subprocess
    import sys
    import time

    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "infinitevl_vllm", "bench", "--models", str(tiny_ckpt),
                             "--workload", "decode-vs-context", "--contexts", ",".join(["64"] * 12),
                             "--gen-tokens", "200", "--quiet", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = out.with_suffix(f".{tiny_ckpt.name}.partial.json")
    deadline = time.time() + 240
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert partial.exists(), "the engine never measured anything"
    (worker,) = [p for p in psutil.Process(proc.pid).children() if "--worker" in p.cmdline()]
    engine = worker.children(recursive=True)
    assert engine
    getattr(worker, signal_name)()
    assert proc.wait(timeout=120) == 2
    assert f"the engine run failed (exit {status})" in proc.stderr.read()
    gone, alive = psutil.wait_procs(engine, timeout=30)
    assert alive == [], [p.pid for p in alive]
    (model,) = json.loads(out.read_text())["models"]
    assert model["complete"] is False and model["raw"]["decode-vs-context"]


# -- a small run of every workload ------------------------------------------------------------------
def test_small_run_of_every_workload_writes_every_result_and_names_the_model_that_failed(tiny_ckpt, twin_ckpt,
                                                                                          tmp_path):
    """One engine per model runs all the workloads; every engine is gone afterwards. A model whose engine
    fails (here: a truncated weight shard, found only when vLLM loads it) is named, and the models measured
    before it stay in the result file."""
    import shutil

    from infinitevl_vllm.tools.bench import run_bench

    broken = tmp_path / "broken-twin"
    shutil.copytree(twin_ckpt, broken)
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    spec = BenchSpec(models=[str(tiny_ckpt), str(twin_ckpt), str(broken)],
                     workloads=["decode-vs-context", "throughput", "streaming", "session"],
                     contexts=[64, 300], batches=[1, 2, LARGEST_BATCH], throughput_contexts=[100], frames=2,
                     gen_tokens=4, kv_cache_gib=0.5, max_batch=3, session_frames=5, session_append_frames=2)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    with pytest.raises(BenchError, match=r"broken-twin: the engine run failed .* \(what was measured is in .*r.json\)"):
        run_bench(spec, out, png, note="test", quiet=True)

    assert psutil.Process().children(recursive=True) == []
    result = json.loads(out.read_text())
    assert result["machine"]["cpus"] >= 1 and result["versions"]["transformers"]
    assert result["settings"]["contexts"] == [64, 300] and result["note"] == "test"
    ours, twin, failed = result["models"]
    assert result["complete"] is False and ours["complete"] and twin["complete"] and not failed["complete"]
    assert failed["raw"] == {} and result["summary"]["broken-twin"]["error"] == failed["error"]
    assert not list(tmp_path.glob("*.partial.json"))  # each model's running record went into the result
    assert (ours["kind"], twin["kind"]) == ("infinitevl", "transformer")
    assert twin["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    for m in (ours, twin):
        dvc, tp, st = m["raw"]["decode-vs-context"], m["raw"]["throughput"], m["raw"]["streaming"]
        assert [r["context"] for r in dvc] == [64, 300]
        assert [r["prompt_tokens"] for r in dvc] == [64, 300]
        for r in dvc + tp + st:
            assert 0 < r["ttft_s"] < r["wall_s"] and 0 < r["itl_ms_p50"] <= r["itl_ms_p90"]
            assert r["peak_rss_bytes"] > 2**30 and 0 < r["kv_cache_used_bytes"] <= 0.5 * 2**30
        # the worker extension answers (the CPU runner has no async outputs to time: no steps)
        assert all(r["core_waits"] == {"steps": 0} for r in dvc)
        # InfiniteVL's decode steps after the first reuse the step before's inputs (model/steady_decode.py)
        assert [r.get("steady_decode_steps") for r in dvc] == ([2, 2] if m is ours else [None, None])
        assert all(len(r["itls_ms"]) == r["output_tokens"] - 1 for r in dvc)
        for r in dvc + st:  # one request, 4 tokens: 3 gaps stamped by the engine core
            assert r["output_tokens"] == 4 * r["requests"]
            assert r["decode_tokens_per_s"] == pytest.approx(1e3 / r["itl_ms_mean"])
        # the largest batch that fits is far above --max-batch 3 for both, so it runs 3; all decode together
        # for 4 steps at least (the first ones start while the others prefill) and are then aborted
        assert [(r["batch"], r["largest_that_fits"], r["all_concurrent"], r["preempted"]) for r in tp] == [
            (1, False, True, 0), (2, False, True, 0), (3, True, True, 0)]
        for r in tp:  # (aborted after the timed steps: without that each would decode its ~65K-token room)
            assert 4 * r["batch"] <= r["output_tokens"] < 64 * r["batch"]
            assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["itl_ms_mean"])
        assert [r["frames"] for r in st] == [1, 2]
        assert st[1]["prompt_tokens"] > st[0]["prompt_tokens"] + 256  # a 448x448 frame is 256 visual tokens
        s = result["summary"][m["name"]]
        assert set(s["decode_vs_context"]) == {"64", "300"}
        assert s["throughput"]["100"]["largest_batch_that_fits"] == int(1 / tp[0]["kv_cache_usage_peak"] + 1e-9) > 2
    # the Transformer keeps every token's KV; its use grows with the prompt
    assert twin["raw"]["decode-vs-context"][1]["kv_cache_used_bytes"] > twin["raw"]["decode-vs-context"][0][
        "kv_cache_used_bytes"]
    # floors: what a step moves, at the bandwidth each worker measured (CPU here: eager engines)
    import torch

    cfg = load_config(tiny_ckpt).text_config
    itemsize = getattr(torch, ours["engine"]["dtype"]).itemsize  # vLLM's CPU backend serves it in bf16
    kv_token = len(cfg.swa_layers) * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize
    assert ours["step_bytes"]["context_cap"] == cfg.attention_window
    assert ours["step_bytes"]["per_context_token"] == kv_token
    assert twin["step_bytes"]["context_cap"] is None
    assert twin["step_bytes"]["per_context_token"] == twin["kv_bytes_per_token"]
    for m in (ours, twin):
        assert m["engine"]["enforce_eager"] is True and m["copy_bandwidth"]["bytes_per_s"] > 1e8
        rows = result["summary"][m["name"]]["decode_vs_context"]
        assert all(0 < r["floor_ms"] and r["itl_p50_over_floor"] > 1 for r in rows.values())
    # the live session (InfiniteVL's feature; the Transformer has none): 5 frames in appends of 1, 2 and 2 (two a
    # time, cut where a question is due), questions at 1, 3 and 5
    session = ours["raw"]["session"]
    assert "session" not in twin["raw"]
    assert session["frames"] == 5 and session["appends"] == 3 and session["frames_per_append"] == 2
    assert ours["engine"]["images_per_request"] >= 2  # so an append is one request
    assert session["fps"] > 0 and session["append_ms_p50"] > 0 and session["prepare_ms_p50"] > 0
    assert [q["frames"] for q in session["questions"]] == [1, 3, 5]
    assert all(q["output_tokens"] == 4 and q["answer_s"] > 0 for q in session["questions"])
    assert session["questions"][2]["tokens"] == session["questions"][0]["tokens"] + 4 * 256  # 256 a frame
    assert result["summary"]["session_fps"] == round(session["fps"], 2)
    # and, on a session of its own first, one append of one frame (one per 100 frames streamed, at least one)
    single = ours["raw"]["session_single_frame_appends"]
    assert single["appends"] == 1 and single["fps"] > 0
    assert result["summary"][ours["name"]]["session_single_frame_appends"]["fps"] == round(single["fps"], 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_core_waits_of_a_step_are_its_input_prep_wait_and_its_output_wait(monkeypatch):
    """What the bench reads to tell a host-bound step from a GPU-bound one: each output the core takes closes a
    step, with the input-prep waits and the runner's host parts since the previous output beside it, and the
    time since that output (tools/core_waits.py)."""
    import time
    from contextlib import contextmanager
    from types import SimpleNamespace

    from vllm.v1.worker import gpu_model_runner

    from infinitevl_vllm.tools.core_waits import CoreWaits

    class Output:  # stands for vLLM's AsyncGPUModelRunnerOutput
        def get_output(self):
            time.sleep(0.02)
            return "tokens"

    @contextmanager
    def synchronize_input_prep():
        time.sleep(0.01)
        yield

    def sample_tokens(grammar):
        time.sleep(0.005)
        return grammar

    monkeypatch.setattr(gpu_model_runner, "AsyncGPUModelRunnerOutput", Output)
    runner = SimpleNamespace(synchronize_input_prep=synchronize_input_prep, sample_tokens=sample_tokens)
    worker = SimpleNamespace(model_runner=runner)
    assert CoreWaits.infinitevl_waits_start(worker)
    for prep_waits in (2, 0):
        for _ in range(prep_waits):
            with worker.model_runner.synchronize_input_prep():
                pass
        assert worker.model_runner.sample_tokens("none") == "none"
        assert Output().get_output() == "tokens"
    first, second = CoreWaits.infinitevl_waits_read(worker)
    assert 0.02 <= first["input_wait"] < 0.03 and second["input_wait"] == 0.0
    assert all(0.02 <= s["output_wait"] < 0.03 and 0.005 <= s["sample_tokens"] < 0.015 for s in (first, second))
    assert "execute_model" not in first  # only the parts the runner has
    assert first["period"] == 0.0 and 0.025 <= second["period"] < 0.04  # sampling + the output wait
    assert CoreWaits.infinitevl_waits_start(worker) and CoreWaits.infinitevl_waits_read(worker) == []
    # vLLM's V2 runner has no input-prep wait: its steps are timed by their output wait and parts alone
    v2 = SimpleNamespace(model_runner=SimpleNamespace(prepare_inputs=lambda: None))
    assert CoreWaits.infinitevl_waits_start(v2)
    v2.model_runner.prepare_inputs()
    Output().get_output()
    (step,) = CoreWaits.infinitevl_waits_read(v2)
    assert step["input_wait"] == 0.0 and 0.02 <= step["output_wait"] and "prepare_inputs" in step
    assert not CoreWaits.infinitevl_waits_start(SimpleNamespace())  # no model runner: nothing to time


def test_a_result_names_its_commit_and_whether_tracked_files_differ_from_it(tmp_path):
    """A lent GPU machine runs a copy of the working tree over a clone of an earlier commit: the record must say
    that the commit alone does not name the code that ran."""
    import subprocess

    from infinitevl_vllm.tools.bench import source_revision

    assert source_revision(tmp_path) == {"commit": None, "tracked_files_modified": None}  # not a checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "model.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "model.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert source_revision(tmp_path) == {"commit": head, "tracked_files_modified": False}
    (tmp_path / "model.py").write_text("a = 2\n")
    assert source_revision(tmp_path) == {"commit": head, "tracked_files_modified": True}
