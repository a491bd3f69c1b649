"""The train state the loop threads through its jitted, donated step."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

NO_FAULT = -1


@flax.struct.dataclass
class TrainState:
  """Everything one stage carries from step to step; checkpointed whole.

  params: the trainable parameters, a dict of top-level groups (e.g. {'generator': ...,
    'discriminator': ...}, or a model's own top-level modules).
  opt_state: {update name: optax state} — one optimizer per `Update` of the task.
  collections: non-gradient state a model or task declares, {name: tree}: Flax 'batch_stats',
    memory banks, usage counters, running loss weights. The task's losses return new values
    in aux['state']; a collection they do not return is carried over unchanged.
  ema_params: exponential moving average of params, or None.
  ema_for_eval: whether `eval_params` (what evaluation and later stages use) is the EMA copy
    (static: not saved, set by the loop from its `ema` argument).
  bad_step / bad_term: the first step whose loss terms or gradient norm were non-finite (NO_FAULT
    until then) and which term (index into the loop's term names).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any = None
  collections: Any = flax.struct.field(default_factory=dict)
  bad_step: jax.Array = None
  bad_term: jax.Array = None
  ema_for_eval: bool = flax.struct.field(pytree_node=False, default=True)

  @classmethod
  def create(cls, *, params, opt_state, rng, use_ema: bool, collections=None,
             ema_for_eval: bool = True) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=rng,
               ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
               collections=dict(collections or {}), bad_step=jnp.full((), NO_FAULT, jnp.int32),
               bad_term=jnp.full((), NO_FAULT, jnp.int32), ema_for_eval=ema_for_eval)

  @property
  def eval_params(self):
    """The parameters evaluation and later stages use: the EMA copy when kept and chosen."""
    return self.ema_params if self.ema_params is not None and self.ema_for_eval else self.params

  def variables(self) -> dict:
    """{'params': eval_params, **collections}: what a Flax model's `apply` takes."""
    return {"params": self.eval_params, **self.collections}
