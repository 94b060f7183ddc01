"""The `infinitevl-vllm` command and what it runs besides serving: demo, captioning, bench, and the workloads the
benchmarks and tests share."""
