#!/usr/bin/env bash
# Distillation and the gradual DNS sparsity ramp on ResNet-20 at the issue-15
# budget of 300 fine-tuning steps (run by hand, not in the test suite).
#
# From the shipped ResNet-20 (../shared/models/resnet20-cifar10.npz), no dense
# training, 70% DNS pruning for 100 steps, then 5-bit FQ over 200 steps (INQ
# steps of 40: 4 x 40 + 40), full 10,000-image test split, same seed and data
# order in every run:
#   baseline:  as above;
#   distill:   + distill.weight=0.5, distill.temperature=4;
#   ramp:      + prune.ramp_fraction=0.5 (cubic ramp over the first 50 steps);
#   both:      distill + ramp.
# Each run's train.log holds the tqdm rates (s/it, smoothed) and metrics.csv
# the seconds per stage (compilation included).
#
# Usage: [SHARED=/work/shared] benchmarks/bench_distill_ramp.sh [OUT_DIR] [RUN ...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-workdir/bench_distill_ramp}"
shift || true
RUNS=("$@")
SHARED="${SHARED:-../shared}"  # models/ and data/ (docs: /work/shared/DATA.md)
[[ ${#RUNS[@]} -eq 0 ]] && RUNS=(baseline distill ramp both)
COMMON=(--config=configs/cifar10_resnet.py
        --config.init_from="$SHARED/models/resnet20-cifar10.npz"
        --config.dataset.data_dir="$SHARED/data"
        --config.dense.epochs=0 --config.prune.steps=100
        --config.quant.steps_per_step=40 --config.quant.final_steps=40
        --config.distill.weight=0.0 --config.prune.ramp_fraction=0.0)
DISTILL=(--config.distill.weight=0.5 --config.distill.temperature=4.0)
RAMP=(--config.prune.ramp_fraction=0.5)

mkdir -p "$OUT"
echo "machine: $(nproc) cores, $(uname -srm), load $(cut -d' ' -f1-3 /proc/loadavg); $(date -Is)" \
  | tee -a "$OUT/machine.txt"
for run in "${RUNS[@]}"; do
  case $run in
    baseline) extra=() ;;
    distill) extra=("${DISTILL[@]}") ;;
    ramp) extra=("${RAMP[@]}") ;;
    both) extra=("${DISTILL[@]}" "${RAMP[@]}") ;;
    *) echo "unknown run $run"; exit 2 ;;
  esac
  start=$(date +%s)
  python train.py --workdir="$OUT/$run" "${COMMON[@]}" "${extra[@]}" > "$OUT/$run.log" 2>&1
  echo "$run: $(( $(date +%s) - start )) s wall, load $(cut -d' ' -f1-3 /proc/loadavg)" \
    | tee -a "$OUT/machine.txt"
done

python - "$OUT" "${RUNS[@]}" <<'PY'
import csv, json, os, re, sys
out, runs = sys.argv[1], sys.argv[2:]
print("| run | pruned acc | final acc | file ratio | paper-style ratio | prune ms/step | quant ms/step |")
print("|---|---|---|---|---|---|---|")
for run in runs:
  path = os.path.join(out, run, "report.json")
  if not os.path.exists(path):
    print(f"| {run} | not measured |")
    continue
  r = json.load(open(path))
  log = open(os.path.join(out, f"{run}.log")).read()
  def rate(stage):  # tqdm's last smoothed rate of the stage
    m = re.findall(stage + r" 1/1:.*?([0-9.]+)(s/it|it/s)", log)
    if not m:
      return "?"
    v, unit = float(m[-1][0]), m[-1][1]
    return f"{1000 * (v if unit == 's/it' else 1 / v):.0f}"
  c = r["compressed"]
  print(f"| {run} | {r['pruned']['accuracy']:.4f} | {c['accuracy']:.4f} | "
        f"{c['compression_ratio']:.2f}x | {c['paper_style_compression_ratio']:.2f}x | "
        f"{rate('prune')} | {rate('quantize')} |")
PY
