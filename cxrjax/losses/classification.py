"""Binary cross-entropies as free functions over arrays."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_sigmoid_bce(logits, targets, pos_weight=None):
  """Mean BCE-with-logits over entries whose target is finite (NaN = unlabelled).

  logits, targets: same shape (..., C). Returns a scalar; 0 when nothing is labelled.
  pos_weight: optional (C,) weights of the positive term, as torch's
  BCEWithLogitsLoss(pos_weight): -(w y log s + (1 - y) log(1 - s)), e.g. n_neg / n_pos per class.
  """
  mask = jnp.isfinite(targets)
  y = jnp.where(mask, targets, 0.0)
  if pos_weight is None:
    per = optax.sigmoid_binary_cross_entropy(logits, y)
  else:
    per = -(pos_weight * y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits))
  return jnp.sum(jnp.where(mask, per, 0.0)) / jnp.maximum(mask.sum(), 1)


def soft_bce_from_logits(logits, target, mask=None):
  """PyTorch `BCELoss(sigmoid(logits), target)`: logs clamped at >= -100, mean over entries.

  logits, target: same shape; target in [0, 1] (soft targets allowed). Computed from
  logits with log-sigmoid for stable gradients; values equal the probability form.
  mask: optional bool array, entries left out of the mean.
  """
  log_p = jnp.maximum(jax.nn.log_sigmoid(logits), -100.0)
  log_1mp = jnp.maximum(jax.nn.log_sigmoid(-logits), -100.0)
  per = -(target * log_p + (1 - target) * log_1mp)
  if mask is None:
    return jnp.mean(per)
  return jnp.sum(jnp.where(mask, per, 0.0)) / jnp.maximum(mask.sum(), 1)
