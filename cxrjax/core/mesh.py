"""Device mesh, shardings and global batches.

One code path for 1 CPU, 8 GPUs or many hosts: the mesh has a `data` axis and an
optional `fsdp` axis. Batches are split over both axes (ZeRO-3 style); parameters
are replicated over `data` and, when `fsdp > 1`, their largest divisible dimension
is split over `fsdp`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cxrjax.core.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


def create_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """Builds a (data, fsdp) mesh over all devices (of every process).

  `data=-1` takes whatever `fsdp` leaves. Axis types are Auto so that jit infers
  the shardings of intermediates (jax's Explicit default breaks unsharded inputs).
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ConfigError(f"mesh.fsdp={fsdp} must be >= 1 and divide the {n} devices")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ConfigError(f"mesh data={data} x fsdp={fsdp} != {n} devices")
  return jax.make_mesh((data, fsdp), ("data", "fsdp"),
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_devices(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def param_sharding(shape: tuple[int, ...], mesh: Mesh, min_size: int = 2**16) -> NamedSharding:
  """FSDP rule for one parameter: split its largest dimension divisible by the fsdp size."""
  f = mesh.shape["fsdp"]
  if f == 1 or math.prod(shape) < min_size:
    return replicated(mesh)
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % f == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def tree_shardings(abstract_tree: Any, mesh: Mesh, min_size: int = 2**16) -> Any:
  """Shardings for a pytree of arrays/ShapeDtypeStructs (scalars replicated)."""
  return jax.tree.map(lambda x: param_sharding(tuple(x.shape), mesh, min_size), abstract_tree)


def process_slice(global_batch_size: int) -> slice:
  """Rows of the global batch that this process loads.

  Processes own contiguous, equal blocks in process order, which is also the
  order `make_array_from_process_local_data` assembles them in.
  """
  count, index = jax.process_count(), jax.process_index()
  if global_batch_size % count:
    raise ConfigError(f"global batch {global_batch_size} is not divisible by {count} processes")
  per = global_batch_size // count
  return slice(index * per, (index + 1) * per)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local rows into one global array per key."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  n = batch_devices(mesh)
  if global_batch_size % n:
    raise ConfigError(f"{what}={global_batch_size} must be divisible by the {n} devices of the mesh")
