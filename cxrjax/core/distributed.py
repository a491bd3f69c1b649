"""Multi-process start-up: explicit flags, or SLURM / Open MPI detected from the environment."""
from __future__ import annotations

import os

import jax
from absl import logging

_CLUSTER_ENV = {
    "slurm": ("SLURM_JOB_ID", "SLURM_NTASKS"),
    "ompi": ("OMPI_COMM_WORLD_SIZE",),
}


def detected_cluster() -> str | None:
  """Name of the cluster environment jax can auto-configure from, if any with > 1 task."""
  if all(k in os.environ for k in _CLUSTER_ENV["slurm"]) and int(os.environ["SLURM_NTASKS"]) > 1:
    return "slurm"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "ompi"
  return None


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, local_device_count: int | None = None,
                     timeout_s: int = 300) -> bool:
  """Calls `jax.distributed.initialize` when asked to or when a cluster is detected.

  On CPU the cross-process collectives need gloo, and `local_device_count`
  simulates several devices per process (both only for the CPU backend).
  Returns whether the run is multi-process.
  """
  explicit = coordinator_address is not None and (num_processes or 1) > 1
  cluster = None if explicit else detected_cluster()
  if not explicit and cluster is None:
    if local_device_count:
      jax.config.update("jax_num_cpu_devices", local_device_count)
    return False
  if local_device_count:
    jax.config.update("jax_num_cpu_devices", local_device_count)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
  else:
    jax.distributed.initialize(initialization_timeout=timeout_s)
  logging.info("jax.distributed: process %d of %d (%s), %d local devices", jax.process_index(),
               jax.process_count(), cluster or "flags", jax.local_device_count())
  return True
