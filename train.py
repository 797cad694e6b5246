"""Focused compression end to end: dense -> prune -> quantize -> evaluate -> encode -> report.

    python train.py                                   # configs/digits.py into workdir/digits
    python train.py --config=configs/cifar10_resnet.py --workdir=/tmp/r20 \
        --config.init_from=../shared/models/resnet20-cifar10.npz --config.quant.bits=5

Rerunning the same command resumes from the newest intact checkpoint in
--workdir. The whole config is checked before the first step: a bad setting
stops with a one-line `error: <key>: ...`. A stage length given on the
command line in one unit replaces the config file's length in the other
(`--config.prune.steps=100` clears the file's `prune.epochs`); docs/pipeline.md
lists every key.

Multi-host: start the same command on every host with
--coordinator=HOST:PORT --num_processes=N --process_id=I (I = 0..N-1; the
coordinator is process 0's address), or pass --distributed (or set
FQ_JAX_DISTRIBUTED=1) to let jax.distributed.initialize() find the cluster
itself (SLURM, Cloud TPU, JAX_COORDINATOR_ADDRESS, ...). Only process 0 writes
report.json, metrics.csv, TensorBoard events and model.fqz; all write the
Orbax checkpoints together.

Preemption: SIGTERM makes every process save a checkpoint at the same step
and exit with code 75 (EX_TEMPFAIL: run the same command again to resume).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(_HERE, "configs", "digits.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output folder (default: workdir/<config name>).")
flags.DEFINE_bool(
  "distributed", None, "Call jax.distributed.initialize() (default: $FQ_JAX_DISTRIBUTED)."
)
flags.DEFINE_string(
  "coordinator", None, "Multi-host: process 0's HOST:PORT (with --num_processes, --process_id)."
)
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0..num_processes-1.")
flags.DEFINE_string(
  "jax_cache_dir",
  os.environ.get("FQ_JAX_COMPILATION_CACHE", ""),
  "Persistent compilation cache folder ('' disables).",
)


def _define_config_flag():
  # Defining the flag already applies --config.* overrides to the default
  # config, so a bad override fails here: report it in one line.
  try:
    config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "Path to a configs/*.py file.", lock_config=True
    )
  except Exception as e:  # noqa: BLE001 - any override error becomes one line
    from fq_jax.pipeline.configuration import parse_override_error

    sys.exit(f"error: {parse_override_error(sys.argv, e)}")


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - absl prints a usage hint and a second line otherwise
    from fq_jax.pipeline.configuration import parse_override_error

    sys.exit(f"error: {parse_override_error(argv, e)}")


def _apply_length_overrides(config, overrides) -> None:
  """A length (or DNS target) given on the command line in one form clears the file's other."""
  from fq_jax.pipeline.configuration import LENGTH_KEYS

  for section, pairs in LENGTH_KEYS.items():
    for epochs_key, steps_key in pairs:
      given = {k for k in (epochs_key, steps_key) if f"{section}.{k}" in overrides}
      if len(given) == 1:
        other = steps_key if epochs_key in given else epochs_key
        config[section][other] = None
  # Likewise DNS's two targets: --config.prune.sensitivity=A alone clears the file's sparsity.
  given = {k for k in ("sparsity", "sensitivity") if f"prune.{k}" in overrides}
  if len(given) == 1:
    config.prune["sensitivity" if "sparsity" in given else "sparsity"] = None


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    # Orbax logs every save at INFO; keep the console to progress and results.
    logging.set_verbosity(logging.WARNING)
  # Imported here so that flag errors come out before JAX starts.
  import jax

  from fq_jax.pipeline import ConfigError, sharding, train_lib
  from fq_jax.pipeline.processes import Preempted

  if FLAGS.coordinator or FLAGS.num_processes is not None or FLAGS.process_id is not None:
    given = (FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    if None in given:
      sys.exit("error: --coordinator, --num_processes and --process_id go together")
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  else:
    sharding.initialize_distributed(FLAGS.distributed)
  if FLAGS.jax_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.jax_cache_dir)
  config_path = config_flags.get_config_filename(FLAGS["config"])
  try:
    config = FLAGS.config
    config.get("model")  # a file that failed to load raises here
  except Exception as e:  # noqa: BLE001
    reason = "file not found" if not os.path.isfile(config_path) else str(e).splitlines()[0]
    sys.exit(f"error: config: cannot load {config_path}: {reason}")
  _apply_length_overrides(config, config_flags.get_override_values(FLAGS["config"]))
  workdir = FLAGS.workdir
  if not workdir:
    name = os.path.splitext(os.path.basename(config_path))[0]
    workdir = os.path.join("workdir", name)
  try:
    train_lib.run(config, workdir)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")
  except Preempted as e:
    print(e, flush=True)
    sys.exit(Preempted.EXIT_CODE)


if __name__ == "__main__":
  _define_config_flag()
  app.run(main, flags_parser=_parse_flags)
