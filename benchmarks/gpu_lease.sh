#!/usr/bin/env bash
# One lease's GPU work on a lent H200 (docs/gpu.md, "Running it on a lent H200"): the served bench alone on the
# host, then the GPU suite on the same machine, every file in RESULTS_DIR (outside the working tree, which each
# call of the device tool copies over). Start it detached after `. /tmp/x/env.sh`, then poll RESULTS_DIR/status:
#
#   setsid nohup bash benchmarks/gpu_lease.sh /tmp/res > /dev/null 2>&1 < /dev/null & disown
set -uo pipefail
results=${1:-/tmp/res}
mkdir -p "$results"
echo "bench running" > "$results/status"
bash benchmarks/gpu_vllm_h200.sh "$results" > "$results/gpu_vllm_h200.log" 2>&1
echo "bench rc=$?" > "$results/status"
echo "tests running" >> "$results/status"
INFINITEVL_GPU_CHECKS="$results/gpu_vllm_checks.json" make test-gpu > "$results/gpu_tests.out" 2>&1
echo "tests rc=$?" >> "$results/status"
echo "done" >> "$results/status"
