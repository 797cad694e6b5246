"""What the processes of a run must agree on: preemption, and values process 0 decides.

On one process these are plain values and a SIGTERM flag; on several
(`jax.distributed`), collectives over all processes and JAX's preemption
service.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


def sync_processes(name: str) -> None:
  """Waits until every process reaches this point (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


class Preempted(Exception):
  """The run saved a checkpoint after SIGTERM and stopped; the same command resumes it."""

  EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, run again

  def __init__(self, global_step: int):
    self.global_step = global_step
    super().__init__(
      f"preempted: checkpoint {global_step} saved; run the same command again to resume"
    )


class PreemptionWatch:
  """Whether a SIGTERM arrived, as a decision every process takes at the same step.

  One process: a SIGTERM handler (installed while the watch is entered, in the
  main thread) sets a flag. Several: JAX's preemption service (it catches
  SIGTERM itself) answers `reached_preemption_sync_point(step)` alike on all.
  """

  def __init__(self):
    self.distributed = jax.process_count() > 1
    self.requested = False
    self._previous = None

  def _handler(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def __enter__(self) -> PreemptionWatch:
    if not self.distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, global_step: int) -> bool:
    """Called after every update with the run's global step; True: save and stop now."""
    if self.distributed:
      from jax.experimental import multihost_utils

      try:
        return multihost_utils.reached_preemption_sync_point(global_step)
      except RuntimeError:  # jax_enable_preemption_service is off: no preemption notices
        return False
    return self.requested


def broadcast_int(value: int) -> int:
  """Process 0's `value` on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def all_true(flag: bool) -> bool:
  """Whether `flag` holds on every process."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))
