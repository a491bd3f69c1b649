"""VQ-GAN training losses and codebook statistics (spec raygen_and_raddiffusion.md §C.3), as pure
functions over arrays.

taming's generator objective (``VQLPIPSWithDiscriminator``, UniXGen's weights):
  nll   = mean|x - x_hat| + 1.0 * perceptual_distance(F(x), F(x_hat))
  g     = generator_adversarial_loss(D(x_hat))
  lam   = adaptive_weight(d nll / d W_last, d g / d W_last) * 0.8        (W_last: VQGAN.LAST_LAYER)
  total = nll + lam * adopt_weight(step, 30001) * g + 1.0 * codebook_loss
and the discriminator's hinge_d_loss(D(x), D(sg[x_hat])) * adopt_weight(step, 30001).
MaskGIT adds ``codebook_entropy_loss`` (weight 0.1, temperature 0.01) to spread code usage.

The perceptual network is not here: taming uses LPIPS-VGG; the system supplies feature maps (from
a DenseNet) and ``perceptual_distance`` applies LPIPS's comparison to them, with uniform channel
weights instead of LPIPS's learned ones.

Shapes: logits any shape (PatchGAN: (B, H', W', 1)); feature maps (B, H, W, C); distances
(..., n_embed); indices any shape of ints in [0, n_embed).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from cxrjax.models.vqgan import quantizer_loss

Array = jax.Array

# taming's VectorQuantizer2 loss, computed by the model (aux['codebook_loss']); re-exported here
# so that every VQ-GAN loss has one home.
codebook_loss = quantizer_loss


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """Discriminator hinge loss 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))), a scalar."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adversarial_loss(logits_fake: Array) -> Array:
  """The generator's adversarial term -mean(D(x_hat)), a scalar."""
  return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad, g_grad, max_weight: float = 1e4, eps: float = 1e-4) -> Array:
  """taming's balance of the adversarial term: ||nll_grad|| / (||g_grad|| + eps), clamped to
  [0, max_weight], gradient stopped. The grads are of the reconstruction loss and of the
  adversarial loss with respect to the decoder's last kernel (arrays or pytrees; the norm is the
  global L2 norm). Multiply by disc_weight (0.8 in UniXGen) yourself."""
  def norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree_util.tree_leaves(tree)))
  weight = jnp.clip(norm(nll_grad) / (norm(g_grad) + eps), 0.0, max_weight)
  return jax.lax.stop_gradient(weight)


def adopt_weight(step, start: int, weight: float = 1.0, before: float = 0.0) -> Array:
  """`weight` from step `start` on, `before` earlier (taming's disc_factor gate; step may be
  traced)."""
  return jnp.where(jnp.asarray(step) >= start, weight, before)


def codebook_entropy_loss(distances: Array, temperature: float = 0.01,
                          kind: str = "softmax") -> Array:
  """MaskGIT's entropy loss: mean per-position entropy of the code assignment minus the entropy of
  the assignment averaged over all positions, a scalar. Minimising it makes each position pick one
  code confidently while the batch uses many codes.

  distances: (..., n_embed) squared distances (VectorQuantizer's aux['distances']); the
  assignment is softmax(-distances / temperature). kind='argmax' uses the one-hot argmin with the
  softmax's gradient (straight through) for both entropies, as MaskGIT's option does. Ranges from
  -log(n_embed) (confident and uniform over codes) to 0 (one code, or no confidence).
  """
  logits = -distances.reshape(-1, distances.shape[-1]).astype(jnp.float32) / temperature
  probs = jax.nn.softmax(logits, axis=-1)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  if kind == "argmax":
    onehot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=probs.dtype)
    probs = probs - jax.lax.stop_gradient(probs - onehot)
  elif kind != "softmax":
    raise ValueError(f"entropy loss kind {kind!r}: expected 'softmax' or 'argmax'")
  avg = jnp.mean(probs, axis=0)
  # MaskGIT's 1e-5 keeps log finite (and its gradient bounded) for codes nobody uses.
  avg_entropy = -jnp.sum(avg * jnp.log(avg + 1e-5))
  sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
  return sample_entropy - avg_entropy


def codebook_usage(indices: Array, n_embed: int) -> Array:
  """How often each code occurs in `indices` (any shape): (n_embed,) int32 counts."""
  return jnp.bincount(indices.reshape(-1), length=n_embed).astype(jnp.int32)


def perplexity(counts: Array) -> Array:
  """exp(entropy) of the code frequencies (n_embed,) -> scalar: the effective number of codes in
  use, from 1 (one code) to n_embed (uniform)."""
  p = counts.astype(jnp.float32) / jnp.maximum(jnp.sum(counts), 1)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def dead_codes(counts: Array) -> Array:
  """Number of codes never used in `counts` (n_embed,): an int32 scalar."""
  return jnp.sum(counts == 0).astype(jnp.int32)


def _unit(x: Array, eps: float) -> Array:
  # LPIPS's normalize_tensor: x / (||x||_channels + eps); eps outside the root, as LPIPS has it.
  x = x.astype(jnp.float32)
  return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)


def perceptual_distance(feats_a: Sequence[Array], feats_b: Sequence[Array],
                        weights: Sequence[Array] | None = None, eps: float = 1e-10,
                        reduce: bool = True) -> Array:
  """LPIPS's comparison of two lists of NHWC feature maps (layer by layer, same shapes).

  Per layer: unit-normalise each pixel's feature vector over channels, take the squared
  difference, weight the channels (LPIPS's 1x1 'lin' layer; all ones when `weights` is None, else
  one (C,) array per layer) and sum them, average over space. Summed over layers. Returns the mean
  over the batch (a scalar) or, with reduce=False, (B,).
  """
  if len(feats_a) != len(feats_b) or not feats_a:
    raise ValueError(f"perceptual_distance needs two equally long, non-empty lists of feature "
                     f"maps, got {len(feats_a)} and {len(feats_b)}")
  total = 0.0
  for i, (a, b) in enumerate(zip(feats_a, feats_b)):
    if a.shape != b.shape or a.ndim != 4:
      raise ValueError(f"feature map {i}: shapes {tuple(a.shape)} and {tuple(b.shape)} must be "
                       f"equal (B, H, W, C)")
    d = jnp.square(_unit(a, eps) - _unit(b, eps))
    w = jnp.ones(a.shape[-1], jnp.float32) if weights is None else weights[i]
    total = total + jnp.mean(jnp.sum(d * w, axis=-1), axis=(1, 2))
  return jnp.mean(total) if reduce else total
