"""GMCD's prediction losses and regulariser (spec gmcd.md §2.3, §3.2), as free functions.

  nll            stage 1 and 2 classification: mean −log p_y, from log-probabilities (F.nll_loss)
  kd_kl          stage-2 logit KD at temperature T (``distiller_zoo/KD.DistillKL``)
  prediction_kd  stage-1 self-distillation from the EMA model (``CL_utils/KD_losses.pred_KD_loss``)
  l1_penalty     stage-1 L1 on the omic (tabular) branch's parameters (``utils.regularize_MM_omic``)
Teacher inputs are constants (gradient stopped), as the seed detaches them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KD_T = 1.0
LAMBDA_REG = 3e-4


def nll(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean over the batch of −log_probs[b, labels[b]]: log_probs (B, C), labels (B,) int."""
  picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=1)
  return -jnp.mean(picked)


def kd_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = KD_T) -> jax.Array:
  """(T²/B) Σ_b Σ_c p_t (log p_t − log p_s) with p = softmax(logits / T); logits (B, C).

  Both take raw logits (pre-softmax), as the seed's DistillKL does. The sum runs over the whole
  batch, then it is divided by B.
  """
  log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s))
  return kl * temperature ** 2 / student_logits.shape[0]


def prediction_kd(log_probs: jax.Array, teacher_log_probs: jax.Array) -> jax.Array:
  """KL(p_ema ‖ p_online) at T = 1, from log-probabilities (..., B, C): Σ exp(t)(t − s) / B.

  Leading axes are summed, so the three stage-1 heads stacked as (3, B, C) (fused, path, omic) give
  the seed's sum of per-head batch means. The EMA side is the constant target.
  """
  t = jax.lax.stop_gradient(teacher_log_probs)
  return jnp.sum(jnp.exp(t) * (t - log_probs)) / log_probs.shape[-2]


def l1_penalty(params) -> jax.Array:
  """Σ |w| over every leaf of a parameter tree (weights and biases alike).

  Stage 1 passes the omic branch's subtree and adds ``LAMBDA_REG`` (3e-4) times this, once. The
  seed's function adds 3e-4 · Σ|w|, but in the released code it raises (``model.module.__hasattr__``);
  this is the intended form.
  """
  leaves = jax.tree_util.tree_leaves(params)
  return sum((jnp.sum(jnp.abs(w)) for w in leaves), jnp.zeros((), jnp.float32))
