#!/usr/bin/env bash
# CIFAR-10 ResNet-20 and ResNet-56 on one GPU: the default (long) schedule of
# configs/cifar10_resnet_long.py, compressed and its fair reference, for each depth.
# Run by hand on a GPU machine (not in the test suite); sized for < 8 minutes on
# one H200 by running the four jobs at once (ResNets at batch 128 leave the GPU
# mostly idle between small kernels, so they interleave well).
#
#   benchmarks/gpu_cifar.sh [OUT_DIR] [--config.key=value ...]
#
# Runs, from the shipped PyTorch checkpoints (../shared/models/resnet{20,56}-cifar10.npz),
# with dense.epochs=0 and everything else the config's default (DNS to
# prune.sparsity, INQ 25/50/75/87.5/100% with refits, final fine-tuning, model.fqz):
#   r20 / r20_ref / r56 / r56_ref   (*_ref: --config.reference_only=true, the float
#                                     model fine-tuned for the same number of steps)
# and writes OUT_DIR/summary.md: accuracy as imported, reference, compressed, loss
# against the reference, sparsity requested/reached, file ratio and wall time per run.
#
# Config keys used (docs/pipeline.md):
#   --config, --config.init_from, --config.model.depth, --config.dense.epochs,
#   --config.reference_only, --config.progress_bar, and prune.sparsity (read from the
#   config or an override, for the summary). The schedule itself is the config's:
#   prune.epochs, quant.epochs_per_step, quant.final_epochs.
#
# Environment:
#   FQ_JAX_SHARED  shared folder (default ../shared relative to the repo root)
#   DEPTHS         depths to run (default "20 56")
#   PARALLEL       1 (default): all runs at once; 0: one after another
#   MEM_FRACTION   GPU memory fraction per process when parallel (default 0.2)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-workdir/gpu_cifar}"
shift || true
export FQ_JAX_SHARED="${FQ_JAX_SHARED:-$(cd .. && pwd)/shared}"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
DEPTHS="${DEPTHS:-20 56}"
PARALLEL="${PARALLEL:-1}"
if [[ $PARALLEL == 1 ]]; then
  # Several processes share the GPU: no 75% preallocation each.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${MEM_FRACTION:-0.2}"
fi

mkdir -p "$OUT"
{
  echo "machine: $(nproc) cores, $(uname -srm); $(date -Is)"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -c "import jax; print('jax', jax.__version__, jax.devices())"
  echo "shared: $FQ_JAX_SHARED; depths: $DEPTHS; parallel: $PARALLEL; overrides: $*"
} | tee "$OUT/machine.txt"

# Decode CIFAR-10 into the cache once, before the runs start (they would wait on its lock).
python -c "from fq_jax.data.cifar10 import load_cifar10_uint8; load_cifar10_uint8()"

run() {  # run NAME DEPTH [extra overrides...]
  local name=$1 depth=$2
  shift 2
  local start
  start=$(date +%s)
  python train.py --workdir="$OUT/$name" --config=configs/cifar10_resnet_long.py \
    --config.init_from="$FQ_JAX_SHARED/models/resnet${depth}-cifar10.npz" \
    --config.model.depth="$depth" --config.dense.epochs=0 --config.progress_bar=false \
    "$@" > "$OUT/$name.log" 2>&1
  echo "$name: $(($(date +%s) - start)) s wall" | tee -a "$OUT/walls.txt"
}

: > "$OUT/walls.txt"
# Stop the background runs too if this script is interrupted.
trap 'kill $(jobs -p) 2>/dev/null || true' INT TERM
t0=$(date +%s)
pids=()
for d in $DEPTHS; do
  for ref in false true; do
    name="r$d"
    [[ $ref == true ]] && name="r${d}_ref"
    if [[ $PARALLEL == 1 ]]; then
      run "$name" "$d" --config.reference_only="$ref" "$@" &
      pids+=($!)
    else
      run "$name" "$d" --config.reference_only="$ref" "$@"
    fi
  done
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
echo "total: $(($(date +%s) - t0)) s wall" | tee -a "$OUT/walls.txt"
[[ $status == 0 ]] || { echo "a run failed: see $OUT/*.log" >&2; exit 1; }

python - "$OUT" "$DEPTHS" "$@" <<'PY'
import json, sys
from configs import cifar10_resnet
out, depths, overrides = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
requested = cifar10_resnet.get_config().prune.sparsity
for o in overrides:
  if o.startswith("--config.prune.sparsity="):
    requested = float(o.split("=", 1)[1])
walls = dict(l.strip().split(": ", 1) for l in open(f"{out}/walls.txt"))
lines = [
  "| model | as imported | reference | compressed | loss (points) | sparsity requested / reached"
  " | file ratio | wall compressed / reference |",
  "|---|---|---|---|---|---|---|---|",
]
for d in depths:
  cmp = json.load(open(f"{out}/r{d}/report.json"))
  ref = json.load(open(f"{out}/r{d}_ref/report.json"))
  c_acc, r_acc = cmp["compressed"]["accuracy"], ref["compressed"]["accuracy"]
  lines.append(
    f"| ResNet-{d} | {100 * cmp['dense']['accuracy']:.2f}% | {100 * r_acc:.2f}% | "
    f"{100 * c_acc:.2f}% | {100 * (r_acc - c_acc):.2f} | {requested} / "
    f"{cmp['pruned']['sparsity']:.4f} | {cmp['compressed']['compression_ratio']:.2f}x | "
    f"{walls.get(f'r{d}', '?')} / {walls.get(f'r{d}_ref', '?')} |"
  )
lines.append(f"\ntotal wall: {walls.get('total', '?')}")
text = "\n".join(lines)
print(text)
open(f"{out}/summary.md", "w").write(text + "\n")
PY
