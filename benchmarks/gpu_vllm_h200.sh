#!/usr/bin/env bash
# The served-performance run on one H200 (benchmarks/results/gpu_vllm_h200.json): InfiniteVL-4B against vLLM's
# own Qwen2.5-VL-3B, random bf16 weights of the real shapes, both through the same vLLM engine with its defaults
# (torch.compile + CUDA graphs), one model at a time.
#
#   bash benchmarks/gpu_vllm_h200.sh [RESULTS_DIR]     # checkpoints go to $CKPT_DIR (default /tmp/ckpt)
#
# The KV budget is 6 GiB for each model. It keeps InfiniteVL's largest batch at 128K (about 50 sequences, each
# prompt prefilled in full) inside one device lease; Qwen's largest batch at 128K is then one sequence. Both
# models' steps are then about half weights, half state, so the throughput ratio is close to the one a whole
# H200 gives (see docs/gpu.md).
set -euo pipefail
results=${1:-benchmarks/results}
ckpt=${CKPT_DIR:-/tmp/ckpt}
py=${PYTHON:-python3}

ckpt_once() {  # ckpt_once <dir> <make-checkpoint args...>: once per machine
    [ -f "$ckpt/$1/config.json" ] || $py -m infinitevl_vllm make-checkpoint --out "$ckpt/$1" --quiet "${@:2}"
}
ckpt_once infinitevl-4b --preset 4b &
ckpt_once qwen2_5_vl-3b --arch qwen2_5_vl --preset 3b &
wait

$py -m infinitevl_vllm bench --models "$ckpt/qwen2_5_vl-3b" "$ckpt/infinitevl-4b" \
    --workload decode-vs-context,throughput,session --contexts 4k,32k,128k,1m --throughput-contexts 32k,128k \
    --batch max --gen-tokens 64 --kv-cache-gib 6 --dtype bfloat16 --profile-context 16k \
    --out "$results/gpu_vllm_h200.json" --plot "$results/gpu_vllm_h200.png" \
    --note "benchmarks/gpu_vllm_h200.sh: KV budget 6 GiB per model; 2,000-frame session"
