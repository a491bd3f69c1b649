"""Batched, sharded inference over host arrays, identical on every process."""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from cxrjax.core import mesh as mesh_lib


@functools.lru_cache(maxsize=64)
def _compiled(fn: Callable, mesh) -> Callable:
  """One jit per (function, mesh): evaluation inside training reuses the compiled program."""
  return jax.jit(fn, in_shardings=(mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)),
                 out_shardings=mesh_lib.batch_sharding(mesh))


def sharded_map(fn: Callable[[dict, Any], jax.Array], arrays: Mapping[str, np.ndarray], mesh, *,
                batch_size: int, params: Any = None) -> np.ndarray:
  """Applies fn(batch_dict, params) over rows of `arrays`; returns the stacked numpy output.

  fn should be a long-lived function (not a fresh lambda per call) so its compiled
  program is reused; `params` is passed replicated. Every process passes the same full
  arrays; each loads only its block of every global batch. Rows are zero-padded up to a
  whole batch and the padding dropped. `batch_size` is rounded up to a multiple of the
  mesh's batch devices.
  """
  n_dev = mesh_lib.batch_devices(mesh)
  batch_size = -(-batch_size // n_dev) * n_dev
  n = len(next(iter(arrays.values())))
  jitted = _compiled(fn, mesh)
  local = mesh_lib.process_slice(batch_size)
  outputs = []
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    batch = {}
    for k, v in arrays.items():
      chunk = np.asarray(v[start:stop])
      if stop - start < batch_size:
        pad = np.zeros((batch_size - (stop - start),) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      batch[k] = chunk[local]
    out = jitted(mesh_lib.global_batch(batch, mesh), params)
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    outputs.append(np.asarray(jax.device_get(out))[: stop - start])
  return np.concatenate(outputs)


def predict_batches(fn: Callable[[dict, Any], jax.Array], batches, mesh, *, params: Any = None,
                    keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Applies fn(batch_dict, params) to every global batch of a stream of local batches.

  batches: an iterable of this process's local blocks (each process iterates its own stream,
  e.g. a data.pipeline.StudyPipeline in eval mode; all yield the same number of batches).
  Fields named in `keep` are gathered on the host and not passed to fn; the others are.
  Returns {'out': stacked outputs of the global batches, **{k: the global batch's field k}
  for k in keep}, identical on every process (allgathered), in stream order; padding rows stay
  (filter them with a kept '_mask').
  """
  jitted = _compiled(fn, mesh)
  outs: dict[str, list] = {"out": [], **{k: [] for k in keep}}
  for local in batches:
    inputs = {k: v for k, v in local.items() if k not in keep}
    out = jitted(mesh_lib.global_batch(inputs, mesh), params)
    kept = {k: np.asarray(local[k]) for k in keep}
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
      kept = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in kept.items()}
    outs["out"].append(np.asarray(jax.device_get(out)))
    for k, v in kept.items():
      outs[k].append(v)
  return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in outs.items()}
