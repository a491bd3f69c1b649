"""Checkpointable, deterministic batch iterators over in-memory arrays.

The stream of global row indices is the concatenation of per-epoch permutations
(each drawn from (seed, epoch)), cut into consecutive global batches; a batch may
straddle two epochs, so every step has the same shape. Each process takes its
contiguous block of each global batch, so 1 process and N processes see the same
global batch at every step. The state is one integer, the batches served.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from cxrjax.core.mesh import process_slice


class ShuffledBatches:
  """Infinite iterator of dicts of local numpy batches. Implements the loop's BatchIterator."""

  def __init__(self, arrays: Mapping[str, np.ndarray], global_batch_size: int, *, seed: int,
               shuffle: bool = True):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"arrays differ in length: {lengths}")
    self.arrays = dict(arrays)
    self.num_rows = next(iter(lengths.values()))
    if self.num_rows == 0:
      raise ValueError("cannot iterate over zero rows")
    self.global_batch_size = global_batch_size
    self.seed, self.shuffle = seed, shuffle
    self._local = process_slice(global_batch_size)
    self.position = 0
    self._perm_cache: dict[int, np.ndarray] = {}

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if epoch not in self._perm_cache:
      if len(self._perm_cache) > 4:
        self._perm_cache.clear()
      self._perm_cache[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
                                 if self.shuffle else np.arange(self.num_rows))
    return self._perm_cache[epoch]

  def global_indices(self, batch: int) -> np.ndarray:
    """Row indices of global batch number `batch`: (global_batch_size,) int64."""
    flat = np.arange(batch * self.global_batch_size, (batch + 1) * self.global_batch_size)
    epochs, offsets = np.divmod(flat, self.num_rows)
    out = np.empty_like(flat)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._epoch_order(int(e))[offsets[sel]]
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = self.global_indices(self.position)[self._local]
    self.position += 1
    return {k: v[rows] for k, v in self.arrays.items()}

  def get_state(self) -> dict:
    return {"position": self.position, "seed": self.seed, "num_rows": self.num_rows,
            "global_batch_size": self.global_batch_size}

  def set_state(self, state: dict) -> None:
    for key in ("seed", "num_rows", "global_batch_size"):
      if state.get(key) != getattr(self, key):
        raise ValueError(f"iterator state was saved with {key}={state.get(key)}, "
                         f"this run has {getattr(self, key)}")
    self.position = int(state["position"])

