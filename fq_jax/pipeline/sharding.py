"""Data parallelism with `jax.sharding`: one mesh axis, 'data', over all devices.

Parameters and optimizer state (masks and focused-quantization state
included) are replicated; every batch is split along its leading axis over
the 'data' axis. Under `jax.jit` the program keeps its global semantics, so
XLA inserts the gradient all-reduce and batch-norm statistics are those of the
whole global batch, exactly as on one device.

Multi-host: call `initialize_distributed()` before anything else touches the
devices; each host then loads only its slice of every global batch (see
`host_slice`) and `put_batch` assembles the global array from the local
pieces.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
DISTRIBUTED_ENV = "FQ_JAX_DISTRIBUTED"


def initialize_distributed(enabled: bool | None = None) -> bool:
  """Calls `jax.distributed.initialize()` when asked to.

  Args:
    enabled: True/False, or None to follow the environment variable
      FQ_JAX_DISTRIBUTED ("1"/"true" enables). The cluster itself is found
      by JAX's auto-detection (SLURM, Cloud TPU, ...) or its JAX_COORDINATOR_*
      variables.

  Returns:
    Whether it initialized.
  """
  if enabled is None:
    enabled = os.environ.get(DISTRIBUTED_ENV, "").lower() in ("1", "true", "yes")
  if enabled:
    jax.distributed.initialize()
  return bool(enabled)


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of parameters and optimizer state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: the leading axis split over the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, key: str = "batch_size") -> None:
  """Raises ValueError unless the global batch splits evenly over devices and hosts."""
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise ValueError(
      f"{key}: {global_batch} is not divisible by the {n} devices ({jax.process_count()} hosts)"
    )


def host_slice(global_batch: int) -> slice:
  """This host's rows of a global batch (in-memory datasets read the global batch)."""
  per_host = global_batch // jax.process_count()
  start = jax.process_index() * per_host
  return slice(start, start + per_host)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded along the batch axis."""
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


def put_replicated(tree: Any, mesh: Mesh, *, copy: bool = False) -> Any:
  """Places a pytree (same values on every host) replicated on the mesh.

  Args:
    tree: arrays (numpy or jax).
    mesh: the mesh.
    copy: always make new buffers. A train step donates its state; copying
      first means no array the caller still holds (an input already in place
      would otherwise be passed through as is) can be invalidated.
  """
  sharding = replicated(mesh)
  if copy:
    # Through host memory: device_put(..., may_alias=False) may still reuse
    # the source buffer as one of the replicas.
    tree = jax.tree.map(_host_copy, tree)
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def _host_copy(x) -> np.ndarray:
  if isinstance(x, jax.Array):
    x = x.addressable_data(0)  # replicated: every shard holds the whole array
  return np.array(x, copy=True)
