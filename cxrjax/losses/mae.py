"""Masked-image-modelling targets and losses (spec D.5, D.6.6): patchify, per-patch pixel
normalisation (``norm_pix_loss``) and the masked MSE, as HF ``ViTMAEForPreTraining`` computes them.

Pure functions on ``jax.numpy`` arrays. Shapes: images ``(..., H, W, C)`` (channels last), patches
``(..., L, P)`` with ``L = (H / p) * (W / p)`` in row-major patch order and ``P = p * p * C``, each
patch flattened as ``(p_row, p_col, C)``; a patch mask ``(..., L)`` is 1 where a patch was removed
(HF's convention). Leading dims are free: ``(N,)`` images or ``(B, V)`` studies of views.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

NORM_PIX_EPS = 1e-6


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """``(..., H, W, C) -> (..., L, p*p*C)``; H and W must be multiples of ``patch``."""
  *lead, H, W, C = images.shape
  if H % patch or W % patch:
    raise ValueError(f"image {H}x{W} is not a whole number of {patch}x{patch} patches")
  gh, gw = H // patch, W // patch
  x = images.reshape(*lead, gh, patch, gw, patch, C)
  n = len(lead)
  # (..., gh, p, gw, p, C) -> (..., gh, gw, p_row, p_col, C): HF's permute(0, 2, 4, 3, 5, 1) of NCHW.
  x = jnp.moveaxis(x, n + 2, n + 1)
  return x.reshape(*lead, gh * gw, patch * patch * C)


def unpatchify(patches: jax.Array, patch: int, height: int, width: int) -> jax.Array:
  """Inverse of :func:`patchify`: ``(..., L, p*p*C) -> (..., height, width, C)``."""
  *lead, L, P = patches.shape
  gh, gw = height // patch, width // patch
  if gh * gw != L or P % (patch * patch):
    raise ValueError(f"{L} patches of {P} values do not tile a {height}x{width} image "
                     f"with {patch}x{patch} patches")
  C = P // (patch * patch)
  n = len(lead)
  x = patches.reshape(*lead, gh, gw, patch, patch, C)
  x = jnp.moveaxis(x, n + 1, n + 2)  # (..., gh, p_row, gw, p_col, C)
  return x.reshape(*lead, gh * patch, gw * patch, C)


def normalize_patches(patches: jax.Array, eps: float = NORM_PIX_EPS):
  """Per-patch standardisation: returns ``(normalized (..., L, P), mean (..., L, 1), var (..., L, 1))``.

  ``var`` is the UNBIASED variance (torch's ``Tensor.var`` default, which HF's ``norm_pix_loss``
  and the seed's ``norm_patches`` use); ``normalized = (x - mean) / sqrt(var + eps)``.
  """
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.var(patches, axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps), mean, var


def denormalize(normalized: jax.Array, mean: jax.Array, var: jax.Array,
                eps: float = NORM_PIX_EPS) -> jax.Array:
  """Inverse of :func:`normalize_patches`: ``mean + normalized * sqrt(var + eps)``."""
  return mean + normalized * jnp.sqrt(var + eps)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array,
               weights: Optional[jax.Array] = None) -> jax.Array:
  """MSE over each patch's values, then the mean over masked patches of the whole batch.

  ``pred, target: (..., L, P)``, ``mask: (..., L)`` (1 = removed, the patches that count),
  ``weights: (...)`` per image (0 for a padded, absent view; default 1). Returns the scalar
  ``sum(w * mask * l) / sum(w * mask)`` with ``l = mean_P (pred - target)^2``: patches are pooled
  over all images, so an image's weight in the loss is its number of masked patches (as in HF and
  the seed), not 1 / number of images. A batch with no counted patch gives 0, not NaN.
  """
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  m = mask.astype(jnp.float32)
  if weights is not None:
    m = m * weights.astype(jnp.float32)[..., None]
  # where, not a product: a padded view's loss may be anything (even inf), and 0 * inf is NaN.
  num = jnp.sum(jnp.where(m > 0, m * per_patch, 0.0))
  den = jnp.sum(m)
  return num / jnp.maximum(den, 1e-12)


def mae_loss(pred: jax.Array, images: jax.Array, mask: jax.Array, patch: int, *,
             norm_pix: bool = True, weights: Optional[jax.Array] = None) -> jax.Array:
  """HF ``ViTMAEForPreTraining``'s loss: patchify ``images (..., H, W, C)``, normalise each patch
  when ``norm_pix``, then :func:`masked_mse` against ``pred (..., L, p*p*C)`` over ``mask (..., L)``.

  The target never carries a gradient. (The seed's diffusion scheme normalises its already
  normalised target once more, D.6.6; that is ``normalize_patches`` applied twice by the caller.)
  """
  target = patchify(images, patch)
  if norm_pix:
    target = normalize_patches(target)[0]
  return masked_mse(pred, jax.lax.stop_gradient(target), mask, weights)
