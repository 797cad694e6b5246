#!/usr/bin/env bash
# CIFAR-10 ResNet benchmark (run by hand, not in the test suite).
#
# From the shipped PyTorch ResNet-20 (../shared/models/resnet20-cifar10.npz),
# two runs with the same schedule and seed:
#   reference:  the float model fine-tuned for the prune + quantize steps
#               (--config.reference_only=true): the fair baseline;
#   compressed: DNS pruning + 5-bit focused quantization + model.fqz.
# and a table of: accuracy as imported, reference accuracy, compressed
# accuracy, compression ratio (file on disk) and wall time.
#
# Usage:
#   benchmarks/bench_cifar_resnet.sh [OUT_DIR] [--config.key=value ...]
# The default schedule is configs/cifar10_resnet.py's (3 DNS epochs, INQ
# 4 x 1 + 2 epochs: about 9 epochs, sized for 2 CPU cores). A shortened
# schedule, in steps (each given length replaces the config's length in epochs), e.g.:
#   benchmarks/bench_cifar_resnet.sh /tmp/bench --config.prune.steps=100 \
#       --config.quant.steps_per_step=16 --config.quant.final_steps=40
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-workdir/bench_cifar_resnet}"
shift || true
COMMON=(--config=configs/cifar10_resnet.py
        --config.init_from=../shared/models/resnet20-cifar10.npz
        --config.dataset.data_dir=../shared/data
        --config.dense.epochs=0 --config.quant.bits=5 --config.progress_bar=false "$@")

mkdir -p "$OUT"
echo "machine: $(nproc) cores, $(uname -srm); $(date -Is)" | tee "$OUT/machine.txt"
echo "overrides: ${COMMON[*]}" | tee -a "$OUT/machine.txt"
one_run() {
  local run=$1 extra=() start
  [[ $run == reference ]] && extra=(--config.reference_only=true)
  start=$(date +%s)
  python train.py --workdir="$OUT/$run" "${COMMON[@]}" "${extra[@]}" > "$OUT/$run.log" 2>&1
  echo "$run: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/machine.txt"
}
# PARALLEL=1: both runs at once (each gets about half the cores: the wall times
# then say little about one run alone on an idle machine; the step logs' images/s do).
if [[ ${PARALLEL:-0} == 1 ]]; then
  one_run reference & one_run compressed & wait
else
  one_run reference
  one_run compressed
fi

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
ref = json.load(open(f"{out}/reference/report.json"))
cmp = json.load(open(f"{out}/compressed/report.json"))
walls = dict(l.strip().split(": ", 1) for l in open(f"{out}/machine.txt") if " s wall" in l)
rows = [
    ("dense accuracy as imported", f"{100 * cmp['dense']['accuracy']:.2f}%"),
    ("reference (float fine-tuned, same steps)", f"{100 * ref['compressed']['accuracy']:.2f}%"),
    ("compressed (pruned + 5-bit FQ)", f"{100 * cmp['compressed']['accuracy']:.2f}%"),
    ("accuracy loss vs reference", f"{100 * (ref['compressed']['accuracy'] - cmp['compressed']['accuracy']):.2f} points"),
    ("sparsity", f"{cmp['pruned']['sparsity']:.4f}"),
    ("artifact bytes (model.fqz)", f"{cmp['compressed']['artifact_bytes']:,}"),
    ("float32 bytes", f"{cmp['dense']['float32_bytes']:,}"),
    ("compression ratio", f"{cmp['compressed']['compression_ratio']:.2f}x"),
    ("paper-style ratio (kernels only)", f"{cmp['compressed']['paper_style_compression_ratio']:.2f}x"),
    ("steps prune / quantize", f"{cmp['stages']['prune']['steps']} / {cmp['stages']['quantize']['steps']}"),
    ("wall time reference / compressed", f"{walls.get('reference', '?')} / {walls.get('compressed', '?')}"),
]
table = "\n".join(f"| {k} | {v} |" for k, v in rows)
print("| quantity | value |\n|---|---|\n" + table)
open(f"{out}/summary.md", "w").write("| quantity | value |\n|---|---|\n" + table + "\n")
PY
