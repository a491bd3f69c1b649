"""Exponential moving average of parameters with ema-pytorch's warm-up semantics.

The prior's seed builds `ema_pytorch.EMA` with library defaults (spec A.3): beta
0.9999, update_after_step 100, update_every 10, inv_gamma 1, power 2/3. With the
update-call index k (0 for the call after the first optimizer step):
  k == 0                 -> copy the parameters
  k % update_every != 0  -> keep the EMA
  k <= update_after_step -> copy the parameters
  otherwise              -> d = clip(1 - (1 + (k - after)/inv_gamma)^-power, min_value, beta),
                            ema = d * ema + (1 - d) * params
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

COPY, KEEP = 0, 1


def ema_decay(k, *, beta=0.9999, update_after_step=100, update_every=10, inv_gamma=1.0,
              power=2 / 3, min_value=0.0):
  """Returns (mode, decay) for update-call index k: mode is COPY, KEEP, or 2 (= lerp with decay)."""
  k = jnp.asarray(k)
  epoch = jnp.maximum(k - update_after_step, 0).astype(jnp.float32)
  decay = 1.0 - (1.0 + epoch / inv_gamma) ** (-power)
  decay = jnp.clip(decay, min_value, beta)
  mode = jnp.where(k == 0, COPY,
                   jnp.where(k % update_every != 0, KEEP,
                             jnp.where(k <= update_after_step, COPY, 2)))
  return mode, decay


def ema_update(ema_params, params, k, **decay_kwargs):
  """One EMA update call; copies and keeps are exact (no arithmetic on the weights).

  lax.switch runs only the selected branch, so the 9 of 10 steps that keep the EMA
  cost no pass over the weights.
  """
  mode, decay = ema_decay(k, **decay_kwargs)

  def lerp(operands):
    e_tree, p_tree = operands
    return jax.tree.map(lambda e, p: decay.astype(e.dtype) * e + (1 - decay).astype(e.dtype) * p,
                        e_tree, p_tree)

  return jax.lax.switch(mode, (lambda ops: ops[1], lambda ops: ops[0], lerp), (ema_params, params))
