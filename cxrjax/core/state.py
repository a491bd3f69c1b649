"""The train state: everything a step reads and writes, as one pytree of global arrays."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

NO_FAULT = -1


@flax.struct.dataclass
class TrainState:
  """step: () int32, the number of optimizer steps taken.
  rng: (2,) uint32 base key; each step folds in its own step number.
  ema_params: same tree as params, or None when EMA is off.
  batch_stats: Flax 'batch_stats' collection, or None for models without batch norm.
  bad_step / bad_term: () int32, NO_FAULT until a step produced a non-finite loss term
    (index into the sorted term names; len(names) means the gradient norm).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any = None
  batch_stats: Any = None
  bad_step: jax.Array = None
  bad_term: jax.Array = None

  @classmethod
  def create(cls, *, params, tx, rng, use_ema: bool, batch_stats=None) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
               ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
               batch_stats=batch_stats, bad_step=jnp.full((), NO_FAULT, jnp.int32),
               bad_term=jnp.full((), NO_FAULT, jnp.int32))

  @property
  def eval_params(self):
    """The parameters evaluation should use: EMA when kept, else the raw ones."""
    return self.ema_params if self.ema_params is not None else self.params
