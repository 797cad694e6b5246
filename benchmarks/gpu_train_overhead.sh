#!/usr/bin/env bash
# Issue 10, item 3 on a GPU: the pipeline's own plain / DNS / FQ steps on ResNet-50,
# bf16 compute, batch 256 per device, timed alternately; writes JSON next to the log.
# Usage (repository root, on the GPU machine): bash benchmarks/gpu_train_overhead.sh OUTDIR
# Targets: "fq": {"ratio" <= 1.10 (moonshot 1.03), "hlo_conditionals": 0}; images/s reported.
set -euo pipefail
out="${1:-/tmp/gpu_overhead}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
devices=$(python -c "import jax; print(jax.device_count())")
python benchmarks/bench_train_overhead.py --model resnet50 --dtype bfloat16 \
  --batch $((256 * devices)) --rounds 30 --json "$out/resnet50_bf16.json" | tee "$out/resnet50_bf16.txt"
python benchmarks/bench_train_overhead.py --model cifar_resnet --depth 20 --batch 128 \
  --rounds 30 --json "$out/resnet20.json" | tee "$out/resnet20.txt"
