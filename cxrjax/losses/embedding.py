"""Embedding-regression losses of CXR-FMKD (spec prior_and_fmkd.md B.3), as free functions.

Every loss compares a student output ``pred`` (B, D) with the teacher embedding ``target``
(B, D) and returns a scalar mean over the batch, as the seed's PyTorch modules do:

  mse       mean over B*D of (pred - target)^2                      (nn.MSELoss)
  mae       mean over B*D of |pred - target|                        (nn.L1Loss)
  huber     mean over B*D of huber_delta(pred - target), delta = 1  (nn.HuberLoss)
  cosine    1 - mean_b cos(pred_b, target_b)                        (1 - F.cosine_similarity)
  mse_cosine          alpha * mse / mse_scale + (1 - alpha) * cosine / cos_scale
                      (alpha = 0.5 and unit scales: the seed's "MSE&CS naive"; alpha in 0.5..0.9
                      with scales 0.07545425 / 0.008772321: its "MSE&CS weighted")
  mse_cosine_learned  exp(-s1) mse + s1 + exp(-s2) cosine + s2, with s = (s1, s2) trained by the
                      same optimiser from 0 (uncertainty weighting; the seed's "MSE&CS learned")
"""
from __future__ import annotations

import jax.numpy as jnp

KINDS = ("mse", "mae", "huber", "cosine", "mse_cosine", "mse_cosine_learned")
# The seed's "final-plateau train losses" that normalise the weighted MSE&CS mix (B.3).
SEED_MSE_SCALE = 0.07545425
SEED_COS_SCALE = 0.008772321


def mse(pred, target):
  """Mean squared error over all B*D entries."""
  return jnp.mean(jnp.square(pred - target))


def mae(pred, target):
  """Mean absolute error over all B*D entries."""
  return jnp.mean(jnp.abs(pred - target))


def huber(pred, target, delta: float = 1.0):
  """torch HuberLoss: 0.5 r^2 where |r| <= delta, else delta (|r| - delta / 2); mean."""
  r = jnp.abs(pred - target)
  quad = jnp.minimum(r, delta)
  return jnp.mean(0.5 * quad ** 2 + delta * (r - quad))


def cosine_similarity(a, b, eps: float = 1e-8):
  """Row-wise cosine (B, D), (B, D) -> (B,), each norm clamped at eps like torch >= 1.12."""
  # sqrt(max(|a|^2, eps^2)) == max(|a|, eps) but keeps a finite gradient at a zero row.
  na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1), eps * eps))
  nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=-1), eps * eps))
  return jnp.sum(a * b, axis=-1) / (na * nb)


def cosine(pred, target, eps: float = 1e-8):
  """1 - mean_b cos(pred_b, target_b): 0 for parallel rows, 2 for opposite ones."""
  return 1.0 - jnp.mean(cosine_similarity(pred, target, eps))


def mse_cosine(pred, target, alpha: float = 0.5, mse_scale: float = 1.0, cos_scale: float = 1.0):
  """alpha * mse / mse_scale + (1 - alpha) * cosine / cos_scale."""
  return alpha * mse(pred, target) / mse_scale + (1.0 - alpha) * cosine(pred, target) / cos_scale


def mse_cosine_learned(pred, target, log_vars):
  """Uncertainty-weighted mix: exp(-s1) mse + s1 + exp(-s2) cosine + s2; log_vars = (s1, s2)."""
  s1, s2 = log_vars[0], log_vars[1]
  return jnp.exp(-s1) * mse(pred, target) + s1 + jnp.exp(-s2) * cosine(pred, target) + s2


def embedding_loss(kind: str, pred, target, *, alpha: float = 0.5, mse_scale: float = 1.0,
                   cos_scale: float = 1.0, huber_delta: float = 1.0, log_vars=None):
  """(loss, terms) of loss `kind` (one of KINDS); terms always hold the plain mse and cosine
  for logging, so runs with different losses can be compared on the same numbers."""
  terms = {"mse": mse(pred, target), "cosine": cosine(pred, target)}
  if kind == "mse":
    loss = terms["mse"]
  elif kind == "mae":
    loss = terms["mae"] = mae(pred, target)
  elif kind == "huber":
    loss = terms["huber"] = huber(pred, target, huber_delta)
  elif kind == "cosine":
    loss = terms["cosine"]
  elif kind == "mse_cosine":
    loss = alpha * terms["mse"] / mse_scale + (1 - alpha) * terms["cosine"] / cos_scale
  elif kind == "mse_cosine_learned":
    if log_vars is None:
      raise ValueError("mse_cosine_learned needs log_vars (2,)")
    loss = mse_cosine_learned(pred, target, log_vars)
    terms["s_mse"], terms["s_cosine"] = log_vars[0], log_vars[1]
  else:
    raise ValueError(f"unknown embedding loss {kind!r}; choose one of {KINDS}")
  return loss, terms
