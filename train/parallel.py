"""Data parallelism over every device of every host.

A 1-D mesh named 'data', the batch sharded along it, parameters and
optimizer state replicated, one `jax.jit`-compiled step (XLA inserts the
gradient all-reduce). This is the `jax.sharding` replacement of `pmap`, and
runs unchanged on one CPU, several devices, or several hosts.
"""

from __future__ import annotations

import itertools
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train import config_checks


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` when asked to, before devices are used."""
  mode = config_checks.distributed_mode(config)
  if mode is False:
    return
  explicit = bool(config.coordinator_address)
  if mode == 'auto' and not explicit and not any(
      variable in os.environ for variable in (
          'SLURM_JOB_ID', 'JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES',
          'OMPI_COMM_WORLD_SIZE')):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if explicit:
    if config.num_processes < 1:
      raise config_checks.ConfigError(f'config.num_processes={config.num_processes}: must '
                        'be >= 1 with a coordinator_address')
    if not 0 <= config.process_id < config.num_processes:
      raise config_checks.ConfigError(f'config.process_id={config.process_id}: must be in '
                        f'[0, {config.num_processes}) with a '
                        'coordinator_address')
    kwargs = dict(coordinator_address=config.coordinator_address,
                  num_processes=config.num_processes,
                  process_id=config.process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as error:  # E.g. no coordinator given or detected.
    raise config_checks.ConfigError(
        f'config.distributed={config.distributed!r}: {error} (off a managed '
        'cluster, set coordinator_address, num_processes and process_id)'
    ) from error


_barriers_passed = itertools.count()


def wait_for_all_processes(name: str, timeout_seconds: int = 3600) -> None:
  """A barrier of all processes, through the jax.distributed coordination
  service (a no-op with one process). Every process must call the same
  barriers in the same order; a counter makes each key unique, so `name`
  may repeat.

  Unlike `multihost_utils.sync_global_devices`, it runs no device
  collective: on CPU, that one's gloo rendezvous gives up after 30 s, less
  than preparing a dataset can take.
  """
  ocp.multihost.get_barrier_sync_fn()(key=f'{name} #{next(_barriers_passed)}',
                                      timeout_ms=timeout_seconds * 1000)


class DataParallel:
  """A 1-D device mesh: batches sharded along 'data', state replicated."""

  def __init__(self):
    self.mesh = Mesh(np.array(jax.devices()), ('data',))
    self.batch = NamedSharding(self.mesh, PartitionSpec('data'))
    # `(stack, batch, ...)` arrays of `batching.stacked_batches`.
    self.stacked_batch = NamedSharding(self.mesh, PartitionSpec(None, 'data'))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())

  def global_batch(self, local_batch: dict[str, np.ndarray]):
    """This process's rows -> one global array per field, sharded."""
    return _global_arrays(self.batch, local_batch)

  def global_stacked_batch(self, local_stack: dict[str, np.ndarray]):
    """`global_batch` of stacked batches: this process's rows of each."""
    return _global_arrays(self.stacked_batch, local_stack)

  def replicate(self, host_array: np.ndarray) -> jax.Array:
    """The same host array on every process -> replicated global array."""
    return jax.make_array_from_process_local_data(self.replicated, host_array)


def _global_arrays(sharding: NamedSharding,
                   local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  return {name: jax.make_array_from_process_local_data(sharding, value)
          for name, value in local.items()}
