"""train.py as 2 processes on localhost (`jax.distributed`, CPU, 2 devices each).

One 2-process run goes straight through; another is preempted (SIGTERM to
process 1 only: JAX's preemption service makes both save at the same step
and exit with 75) and resumed. The resumed run's model.fqz equals the
uninterrupted one byte for byte, and its accuracy is within 1 point of a
1-process run on as many devices.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What compiles cheaply: 48 dense updates of batch 64 (checkpoints every 8;
# ids are global steps: 8, ..., 40, then 48 at the dense end), one-shot
# magnitude pruning to 50% (no fine-tuning), and model.fqz of the pruned
# float weights. (Focused quantization is left out: compiling its
# initialisation costs more than the rest of this test together.)
ARGS = (
  "--config.dense.steps=48",
  "--config.prune.method=magnitude",
  "--config.prune.steps=0",
  "--config.prune.sparsity=0.5",
  "--config.prune.rules=()",
  "--config.quant.enabled=false",
  "--config.quant.epochs_per_step=0",
  "--config.checkpoint_every_steps=8",
  "--config.max_checkpoints=20",
  "--config.progress_bar=false",
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(
  workdir: Path, cache: Path, *, devices: int, process: tuple[int, int, int] | None = None
):
  """train.py in a subprocess; `process` = (port, num_processes, process_id) for jax.distributed."""
  env = {
    k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "FQ_JAX_DIST"))
  }
  env.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    FQ_JAX_COMPILATION_CACHE=os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    PYTHONUNBUFFERED="1",
  )
  cmd = [sys.executable, "train.py", f"--workdir={workdir}", *ARGS]
  if process is not None:
    port, n, i = process
    cmd += [f"--coordinator=localhost:{port}", f"--num_processes={n}", f"--process_id={i}"]
  return subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _start_pair(workdir: Path, cache: Path) -> list[subprocess.Popen]:
  port = _free_port()
  return [_start(workdir, cache, devices=2, process=(port, 2, i)) for i in range(2)]


def _finish(procs: list[subprocess.Popen], returncode: int = 0, timeout: float = 900) -> list[str]:
  outs = []
  deadline = time.monotonic() + timeout
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
      outs.append(out)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for i, (proc, out) in enumerate(zip(procs, outs)):
    assert proc.returncode == returncode, f"process {i}:\n{out[-3000:]}"
  return outs


def _wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 600) -> None:
  deadline = time.monotonic() + timeout
  while not path.is_dir():
    if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
      for p in procs:
        p.kill()
      pytest.fail(f"no {path} (a process ended or {timeout} s passed)")
    time.sleep(0.02)


def _accuracy(workdir: Path) -> float:
  return json.loads((workdir / "report.json").read_text())["compressed"]["accuracy"]


@pytest.mark.slow
def test_two_processes_preempted_and_resumed_match_an_uninterrupted_run(tmp_path):
  cache = tmp_path / "jax_cache"
  straight, resumed, single = tmp_path / "straight", tmp_path / "resumed", tmp_path / "single"

  outs = _finish(_start_pair(straight, cache))
  assert all("== digits_cnn on digits" in out for out in outs)

  # Preemption: SIGTERM reaches process 1 only; both save the same step and exit with 75.
  procs = _start_pair(resumed, cache)
  _wait_for(resumed / "checkpoints" / "8", procs)
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish(procs, returncode=75)
  steps = {int(re.search(r"^preempted: checkpoint (\d+) saved", o, re.M).group(1)) for o in outs}
  assert len(steps) == 1, outs
  (saved,) = steps
  assert 8 < saved < 48 and (resumed / "checkpoints" / str(saved)).is_dir()
  assert not (resumed / "report.json").exists()

  outs = _finish(_start_pair(resumed, cache))
  for out in outs:
    assert f"resumed from checkpoint {saved}: stage dense, step {saved}" in out
  assert (resumed / "model.fqz").read_bytes() == (straight / "model.fqz").read_bytes()
  a = json.loads((straight / "report.json").read_text())
  b = json.loads((resumed / "report.json").read_text())
  a.pop("seconds"), b.pop("seconds")
  assert a == b

  # The same job on one process with as many devices (4).
  _finish([_start(single, cache, devices=4)])
  assert abs(_accuracy(resumed) - _accuracy(single)) <= 0.01


def test_unreachable_remote_workdir_is_one_config_line(monkeypatch):
  """A gs:// workdir goes through etils.epath: without a backend it is a one-line error."""
  from fq_jax.pipeline import configuration

  for module in ("gcsfs", "tensorflow"):  # no Cloud Storage backend: deterministic, offline
    monkeypatch.setitem(sys.modules, module, None)
  with pytest.raises(configuration.ConfigError) as e:
    configuration.check_workdir("gs://fq-jax-no-such-bucket/run")
  assert str(e.value).startswith("workdir: cannot write to gs://fq-jax-no-such-bucket/run: ")
  assert "\n" not in str(e.value)
