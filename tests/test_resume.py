"""A run killed with SIGKILL, or preempted with SIGTERM, and restarted ends with exactly the
report of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Small digits schedule: 2 dense epochs (42 steps), 1 prune epoch (21, DNS),
# INQ steps of half an epoch (4 x 10 + 10 final = 50 updates, mixtures
# refitted after 10 and 30); a checkpoint every 8 updates and at every stage end.
ARGS = (
  "--config.dense.epochs=2",
  "--config.prune.epochs=1",
  "--config.quant.epochs_per_step=0.5",
  "--config.quant.final_epochs=0.5",
  "--config.checkpoint_every_steps=8",
  "--config.progress_bar=false",
)


def _env(cache: Path) -> dict[str, str]:
  # A shared persistent compilation cache: the restarted runs reuse the
  # executables compiled by the first run instead of compiling again.
  return {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    # The session cache of tests/conftest.py when there is one (shared with the other
    # digits runs of the suite), else this test's own.
    "FQ_JAX_COMPILATION_CACHE": os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "PYTHONUNBUFFERED": "1",  # log lines as they happen (the SIGTERM test waits for one)
  }


def _start(workdir: Path, cache: Path) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "train.py", f"--workdir={workdir}", *ARGS],
    cwd=REPO,
    env=_env(cache),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(proc: subprocess.Popen, timeout: float = 900, returncode: int = 0) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == returncode, out[-3000:]
  return out


def _terminate_after_line(proc: subprocess.Popen, prefix: str, timeout: float = 600) -> str:
  """Sends SIGTERM once the run prints a line starting with `prefix`; returns the whole output."""
  lines = []
  deadline = time.monotonic() + timeout
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(prefix):
      proc.send_signal(signal.SIGTERM)
      break
    assert time.monotonic() < deadline, "".join(lines)[-2000:]
  return "".join(lines) + _finish(proc, returncode=75)  # 75: preempted, resume to continue


def _kill_after_checkpoint(
  workdir: Path, cache: Path, checkpoint: int, timeout: float = 600
) -> None:
  """Starts a run and SIGKILLs it as soon as checkpoint `checkpoint` is complete."""
  proc = _start(workdir, cache)
  target = workdir / "checkpoints" / str(checkpoint)
  deadline = time.monotonic() + timeout
  while not target.is_dir():
    if proc.poll() is not None:
      pytest.fail(f"run ended before checkpoint {checkpoint}: {proc.stdout.read()[-2000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"no checkpoint {checkpoint} after {timeout} s")
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  proc.stdout.close()


def _read_events(folder: Path) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of every scalar in the folder's TensorBoard event files.

  The files are TFRecords (length, CRC, an `Event` protobuf, CRC), parsed here
  without TensorBoard's reader.
  """
  import struct

  from tensorboardX.proto import event_pb2

  out: dict[str, dict[int, float]] = {}
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def _check_tensorboard_matches_metrics(workdir: Path) -> None:
  """Every measurement of metrics.csv is a scalar `<stage>/<split>/<column>` at its global step."""
  import csv

  events = _read_events(workdir)
  rows = list(csv.DictReader((workdir / "metrics.csv").open()))
  checked = 0
  for row in rows:
    for column in ("loss", "accuracy", "learning_rate", "quantized_fraction", "sparsity"):
      if row[column]:
        tag = f"{row['stage']}/{row['split']}/{column}"
        assert events[tag][int(row["global_step"])] == pytest.approx(float(row[column]), rel=1e-5)
        checked += 1
  assert checked >= 2 * len(rows)
  assert any(tag.endswith("/train_step/images_per_second") for tag in events)


def _comparable(path: Path) -> dict:
  report = json.loads(path.read_text())
  report.pop("seconds")
  return report


@pytest.mark.slow(250)
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
  cache = tmp_path / "jax_cache"
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  out = _finish(_start(straight, cache))
  # Step-level lines with loss, images/s and ETA although stdout is a pipe (log_every=20).
  assert re.search(
    r"^dense step 20/42: loss \d+\.\d+, accuracy [\d.]+, [\d.]+ images/s, ETA \d+:\d\d:\d\d "
    r"\(training, 20/113 steps done\)$",
    out,
    re.M,
  ), out[:3000]
  _check_tensorboard_matches_metrics(straight)

  # Checkpoint ids are global steps (42 dense + 21 prune + 50 quantize updates):
  # dense 8-40 (every 8), 42 = dense end; prune 50, 58, 63 = prune end;
  # quantize 71-111, 113 = quantize end. Kill inside quantization (FQ state
  # restored mid INQ schedule, after a refit).
  _kill_after_checkpoint(resumed, cache, 87)
  # Preempt the restarted run: it saves where it is and exits with 75.
  out = _terminate_after_line(_start(resumed, cache), "resumed from checkpoint")
  assert "resumed from checkpoint 87: stage quantize, step 24" in out
  saved = int(re.search(r"^preempted: checkpoint (\d+) saved", out, re.M).group(1))
  assert 87 < saved < 113 and (resumed / "checkpoints" / str(saved)).is_dir()
  out = _finish(_start(resumed, cache))
  assert f"resumed from checkpoint {saved}: stage quantize, step {saved - 63}" in out

  a, b = _comparable(straight / "report.json"), _comparable(resumed / "report.json")
  assert a["compressed"]["accuracy"] == b["compressed"]["accuracy"]
  assert a["compressed"]["artifact_bytes"] == b["compressed"]["artifact_bytes"]
  assert a["layers"] == b["layers"]
  assert a == b
  if (straight / "model.fqz").exists():
    assert (straight / "model.fqz").read_bytes() == (resumed / "model.fqz").read_bytes()
  # The metrics file holds each row once, as if the run had not been interrupted.
  rows_a = [r.split(",")[:4] for r in (straight / "metrics.csv").read_text().splitlines()]
  rows_b = [r.split(",")[:4] for r in (resumed / "metrics.csv").read_text().splitlines()]
  assert rows_a == rows_b


@pytest.mark.parametrize("method", ["dns", "magnitude"])
def test_checkpoints_restore_every_position_exactly(tmp_path, method):
  """Mid-stage states of dense training and pruning come back bit for bit."""
  import jax
  import numpy as np

  sys.path.insert(0, str(REPO))
  from configs import digits
  from fq_jax.pipeline import train_lib

  config = digits.get_config()
  config.prune.method = method
  config.async_checkpointing = False
  ctx = train_lib.make_context(config, str(tmp_path), log=lambda s: None)
  runner = train_lib.Runner(ctx)
  runner.restore_or_start()
  params = runner.carry["params"]
  masks = train_lib.initial_masks(ctx, params)
  plans = {"dense": train_lib.dense_plan(ctx), "prune": train_lib.prune_plan(ctx, masks)}
  for stage, plan in plans.items():
    opt_state = plan.tx.init(params)
    if stage == "prune" and method == "dns":
      opt_state = opt_state._replace(masks=masks)
    runner.carry["opt_state"] = opt_state
    runner.save(stage, 5)
    runner.ckpt.wait()
    global_step = runner.global_step(stage, 5)
    assert runner.ckpt.latest() == global_step  # checkpoint ids are global steps
    position = {"stage": stage, "step": 5, "global_step": global_step}
    assert runner.ckpt.meta(global_step)["position"] == position
    restored = runner.ckpt.restore(runner.ckpt.latest(), train_lib.abstract_carry(ctx, stage, 5))
    saved = {k: runner.carry[k] for k in restored}
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
      assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  runner.ckpt.close()


def test_changed_config_does_not_resume(tmp_path):
  workdir = tmp_path / "w"
  (workdir / "checkpoints").mkdir(parents=True)
  # A workdir whose newest checkpoint was written with other settings.
  import jax.numpy as jnp

  sys.path.insert(0, str(REPO))
  from configs import digits
  from fq_jax.pipeline import ConfigError, checkpoint, configuration, train_lib

  config = digits.get_config()
  saved = configuration.config_json(config)
  saved["prune"]["sparsity"] = 0.5
  ckpt = checkpoint.Checkpoints(str(workdir / "checkpoints"), async_save=False)
  ckpt.save(
    1, {"params": {"w": jnp.zeros(2)}}, {"position": {"stage": "prune", "step": 0}, "config": saved}
  )
  ckpt.close()
  with pytest.raises(ConfigError, match="^workdir: .*prune.sparsity"):
    train_lib.run(config, str(workdir), log=lambda s: None)


@pytest.mark.slow(70)
def test_damaged_newest_checkpoints_fall_back_to_the_newest_intact_one(tmp_path):
  """Garbled bytes, a missing meta/ or state/ and an empty stray folder: each is set aside."""
  import shutil

  sys.path.insert(0, str(REPO))
  from configs import digits
  from fq_jax.pipeline import checkpoint, train_lib

  config = digits.get_config()
  config.dense.epochs, config.dense.steps = None, 3
  config.prune.epochs, config.prune.steps = None, 3
  config.quant.epochs_per_step = 0.0  # post-training quantization: no FQ steps to compile
  config.prune.rules = ()
  config.checkpoint_every_steps = 1
  config.max_checkpoints = 10
  config.async_checkpointing = False
  config.progress_bar = False
  straight = tmp_path / "straight"
  first = train_lib.run(config, str(straight), log=lambda s: None)
  first_ckpt = checkpoint.Checkpoints(str(straight / "checkpoints"), async_save=False)
  # Checkpoint ids are global steps: dense 1, dense 2, prune 0 (3), prune 1 (4), prune 2 (5),
  # quantize 0 (6); evaluate 0 is also global step 6 (no quantize updates), so 6 stays.
  ckpts = straight / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == list(range(1, 7))
  positions = {s: first_ckpt.meta(s)["position"] for s in range(1, 7)}
  assert positions[3] == {"stage": "prune", "step": 0, "global_step": 3}
  assert positions[6] == {"stage": "quantize", "step": 0, "global_step": 6}
  first_ckpt.close()
  damaged = tmp_path / "damaged"
  shutil.copytree(straight, damaged)
  (damaged / "report.json").unlink()
  (damaged / "model.fqz").unlink()
  c = damaged / "checkpoints"
  (c / "99").mkdir()  # an empty stray folder
  for f in (c / "6").rglob("*"):  # 64 garbled bytes at the start of every file
    if f.is_file():
      with open(f, "r+b") as fh:
        fh.write(os.urandom(64))
  shutil.rmtree(c / "5" / "meta")
  shutil.rmtree(c / "4" / "state")
  lines = []
  second = train_lib.run(config, str(damaged), log=lines.append)
  text = "\n".join(lines)
  for step, why in ((99, "no meta/ folder"), (5, "no meta/ folder"), (4, "no state/ folder")):
    assert f"warning: checkpoint {step} is damaged ({why})" in text, text
  assert "warning: checkpoint 6 is damaged (" in text
  assert "resumed from checkpoint 3: stage prune, step 0" in text
  assert sorted(p.name.split("-")[0] for p in (damaged / "damaged_checkpoints").iterdir()) == [
    "4",
    "5",
    "6",
    "99",
  ]
  # Resumed from prune step 0, the run ends exactly where the uninterrupted one did.
  first.pop("seconds"), second.pop("seconds")
  assert json.loads(json.dumps(first)) == json.loads(json.dumps(second))
  assert (straight / "model.fqz").read_bytes() == (damaged / "model.fqz").read_bytes()
