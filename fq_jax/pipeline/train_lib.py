"""The focused-compression pipeline: dense -> prune -> quantize -> evaluate -> encode -> report.

`run(config, workdir)` executes every stage the config asks for and returns
the report (also written to `workdir/report.json`); docs/pipeline.md lists
every config key by stage. The pieces, each in its own module:

* `context`: the validated config, model, data source, mesh and compression
  rules (`make_context`), and evaluation.
* `plans`: what each stage trains (`StagePlan`: length, optimizer, forward,
  schedule) and the stage lengths in steps and epochs.
* `runner`: the loop (`Runner`): stages in order, checkpoints, resumption.
* `artifact`: `model.fqz` through the codec, report.json and the summary.

Stages:

* dense: train from scratch for `dense.epochs` (or `dense.steps`), or load
  `init_from` (a flat `.npz` of Flax variables keyed like "params/conv1/kernel";
  or PyTorch weights through the importers: a CIFAR ResNet `.npz`, or a
  torchvision ResNet-18/50 or MobileNet-V2 `.pth` / `.npz` of its state-dict keys),
  then more dense training if any.
* prune: `prune.method` "dns" fine-tunes under `fq.dns_pruning` (masks move
  towards `prune.sparsity` with DNS hysteresis) and freezes the result with
  `fq.apply_masks`; "magnitude" prunes once with `fq.magnitude_masks` and
  fine-tunes with the pruned weights held at 0; "none" skips the stage.
* quantize: `fq.focused_quantization` with the INQ schedule (fractions
  `quant.inq_fractions`, `quant.epochs_per_step` per step, the last step
  `quant.final_epochs`); zero length is post-training quantization.
* evaluate: top-1 (and top-5 beyond 10 classes) test accuracy of the
  quantized model, batch norm with the statistics updated during fine-tuning.
* encode: `workdir/model.fqz` with the codec; the reported sizes are the file's.
* report: `workdir/report.json`, a summary and the per-layer table.

With `reference_only=True` the prune and quantize stages fine-tune the float
model for the same number of steps with the same learning-rate schedules
(no masks, no quantization): the fair reference for the compressed accuracy.
"""

from fq_jax.pipeline.artifact import summary
from fq_jax.pipeline.context import (
  Context,
  abstract_variables,
  evaluate,
  forward_variables,
  initial_variables,
  make_context,
)
from fq_jax.pipeline.plans import (
  StagePlan,
  dense_plan,
  final_masks,
  initial_masks,
  plan_for,
  prune_plan,
  quant_plan,
  stage_lengths,
)
from fq_jax.pipeline.runner import EPOCH_OFFSET, Runner, RunRecord, abstract_carry, run

__all__ = [
  "EPOCH_OFFSET",
  "Context",
  "RunRecord",
  "Runner",
  "StagePlan",
  "abstract_carry",
  "abstract_variables",
  "dense_plan",
  "evaluate",
  "final_masks",
  "forward_variables",
  "initial_masks",
  "initial_variables",
  "make_context",
  "plan_for",
  "prune_plan",
  "quant_plan",
  "run",
  "stage_lengths",
  "summary",
]
