"""GKM, GMCD's gradient-guided knowledge modulation (spec gmcd.md §3.5; the seed's
``train_test_path_multi_distill_v2.momentum_AEKD_loss`` with ``--assign_weights True --CE_grads``).

Every step takes L losses, the L − 1 already-scaled distillation terms followed by the student's CE
(α KL(T1), α KL(T2), β DSCD₁, β DSCD₂, CE in GMCD), and their gradients with respect to the student
feature f_s (B, F). Each gradient is flattened over the whole batch to length B·F, as the seed's
``torch.stack(grads).view(L, -1)`` does, so there is one cosine per pair of losses and not one per
sample. From these:
  C_ij = cos(g_i, g_j)            (L, L); 0/0 for a zero gradient gives NaN, which is "no agreement"
  s_i  = Σ_j 1[C_ij > 0.1]        agreement with every other term, KD-KD pairs included
  ŝ    = s at the first step, then 0.5 ŝ + 0.5 s  (momentum state, reset per fold)
  L_KD = Σ_{i < L-1} ŝ_i L_i      ŝ is a constant and the CE weight ŝ_{L-1} is discarded
With ``threshold=None`` (the seed's ``grads_thresh="False"``), s_i = Σ_j C_ij and L_KD is multiplied
by L − 1.

``loss_gradients`` gets all L gradients from ONE ``jax.vjp`` of a function of the feature, with the
pullback vmapped over the L unit cotangents. This replaces the seed's five ``backward(retain_graph)``
passes through the whole network.

State (``init_state``), a dict kept in a non-gradient collection:
  scale  (L,)  ŝ, the running weights
  steps  ()    int32, updates so far (0 = the next update copies s)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

THRESHOLD = 0.1
MOMENTUM = 0.5
NUM_LOSSES = 5


def loss_gradients(loss_fn, feature: jax.Array, *args, has_aux: bool = False):
  """Values and per-loss gradients of ``loss_fn(feature, *args) -> (L,)`` with respect to feature.

  Returns ``(losses (L,), grads (L, *feature.shape))``, plus ``aux`` last when has_aux (then
  loss_fn returns ``(losses, aux)``). ``losses`` stays differentiable with respect to everything
  loss_fn closes over (and ``args``), so an outer ``jax.grad`` of the weighted total still trains
  the heads. The gradients are for weighting only: ``gkm_loss`` stops their gradient.
  """
  out = jax.vjp(lambda f: loss_fn(f, *args), feature, has_aux=has_aux)
  losses, pullback = out[0], out[1]
  basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
  (grads,) = jax.vmap(pullback)(basis)
  return (losses, grads, out[2]) if has_aux else (losses, grads)


def gradient_cosines(grads: jax.Array) -> jax.Array:
  """(L, ...) per-loss gradients -> (L, L) cosines, each gradient flattened whole (over the batch)."""
  g = grads.reshape(grads.shape[0], -1)
  norm = jnp.linalg.norm(g, axis=1, keepdims=True)
  # As in the seed, a zero gradient gives 0/0 = NaN and fails every comparison.
  return (g @ g.T) / (norm @ norm.T)


def agreement_scale(grads: jax.Array, threshold=THRESHOLD) -> jax.Array:
  """(L,) row sums s_i of 1[C_ij > threshold]. With threshold None, the row sums of C, where a NaN
  (zero gradient) counts as 0 instead of poisoning the weights."""
  cos = gradient_cosines(grads)
  if threshold is None:
    return jnp.sum(jnp.where(jnp.isnan(cos), 0.0, cos), axis=1)
  return jnp.sum((cos > threshold).astype(grads.dtype), axis=1)


def init_state(num_losses: int = NUM_LOSSES, dtype=jnp.float32):
  """Fresh GKM state: no weights yet (the first update copies s)."""
  return {"scale": jnp.zeros((num_losses,), dtype), "steps": jnp.zeros((), jnp.int32)}


def update_scale(state, scale: jax.Array, momentum: float = MOMENTUM):
  """ŝ ← s on the first update, then m ŝ + (1 − m) s. Returns the new state."""
  scale = jax.lax.stop_gradient(scale).astype(state["scale"].dtype)
  mixed = momentum * state["scale"] + (1.0 - momentum) * scale
  return {"scale": jnp.where(state["steps"] == 0, scale, mixed), "steps": state["steps"] + 1}


def gkm_loss(losses: jax.Array, grads: jax.Array, state, *, threshold=THRESHOLD,
             momentum: float = MOMENTUM):
  """The modulated distillation loss. Returns ``(kd_loss, new_state, terms)``.

  losses: (L,) with the CE term LAST (it votes but is not weighted here; the caller adds it with
  weight 1). grads: (L, B, F), e.g. from ``loss_gradients``. kd_loss = Σ_{i<L-1} ŝ_i losses_i, with ŝ
  after this step's update, times (L − 1) when threshold is None.
  terms: ``gkm_w<i>`` for each distillation weight.
  """
  new_state = update_scale(state, agreement_scale(jax.lax.stop_gradient(grads), threshold), momentum)
  weights = jax.lax.stop_gradient(new_state["scale"][:-1])
  kd = jnp.sum(weights * losses[:-1])
  if threshold is None:
    kd = kd * (losses.shape[0] - 1)
  terms = {f"gkm_w{i}": weights[i] for i in range(weights.shape[0])}
  return kd, new_state, terms
