"""RayGen's masked-token training objective (spec raygen_and_raddiffusion.md C.6, C.11).

Shapes: B images, N tokens, C codebook entries, T text tokens, E text width.

Per sample: r ~ U(0, 1), p = cos(pi r / 2), n = max(1, round(N p)) positions masked uniformly
without replacement; masked ids become the mask id; the loss is cross-entropy over the masked
positions, averaged over all masked tokens of the batch (torch ``cross_entropy(ignore_index=-1)``
with mean reduction), so samples with many masked tokens weigh more. No label smoothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cxrjax.models.maskgit import null_condition

Array = jax.Array


def mask_counts_from_ratio(r: Array, seq_len: int) -> Array:
  """n = max(1, round(seq_len * cos(pi r / 2))): r (B,) float in [0, 1) -> (B,) int32.

  float32 as the seed (its torch tensors are float32); round is half-to-even as torch.round.
  """
  p = jnp.cos(r.astype(jnp.float32) * (jnp.pi * 0.5))
  return jnp.maximum(jnp.round(seq_len * p), 1).astype(jnp.int32)


def sample_cosine_mask(key: Array, batch: int, seq_len: int) -> tuple[Array, Array]:
  """(mask (B, N) bool, r (B,) float32): exactly ``mask_counts_from_ratio(r, N)`` True per row.

  r is drawn from ``split(key)[0]``, the position noise from ``split(key)[1]``. Like the seed, one
  argsort of uniform noise gives a uniformly random permutation and a position is masked when
  its entry is < n: exactly n positions, uniformly chosen (ranking the noise, i.e. a second
  argsort, would give the inverse permutation, equally uniform, for twice the sorting).
  """
  key_r, key_pos = jax.random.split(key)
  r = jax.random.uniform(key_r, (batch,), jnp.float32)
  n = mask_counts_from_ratio(r, seq_len)
  perm = jnp.argsort(jax.random.uniform(key_pos, (batch, seq_len), jnp.float32), axis=-1)
  return perm < n[:, None], r


def cosine_mask(key: Array, batch: int, seq_len: int) -> Array:
  """RayGen's training mask (C.6): (B, N) bool, True = masked. See ``sample_cosine_mask``."""
  return sample_cosine_mask(key, batch, seq_len)[0]


def mask_inputs(ids: Array, mask: Array, mask_id: int) -> Array:
  """ids (B, N) int with masked positions (mask (B, N) bool True) set to ``mask_id``."""
  return jnp.where(mask, jnp.asarray(mask_id, ids.dtype), ids)


def masked_token_loss(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
  """(loss, accuracy), float32 scalars, over the masked positions of the whole batch.

  logits: (B, N, C) float; targets: (B, N) int in [0, C) (values at unmasked positions are
  ignored); mask: (B, N) bool, True where the loss applies.
  loss = sum of CE over masked tokens / number of masked tokens in the batch; accuracy = the
  fraction of masked tokens whose argmax is the target. Both are 0 when nothing is masked.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe = jnp.clip(targets, 0, logits.shape[-1] - 1).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  count = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
  loss = jnp.sum(jnp.where(mask, nll, 0.0)) / count
  hits = jnp.where(mask, jnp.argmax(logits, axis=-1) == safe, False)
  return loss, jnp.sum(hits).astype(jnp.float32) / count


def drop_text(key: Array, text: Array, text_mask: Array | None, rate: float) -> tuple[Array, Array]:
  """Classifier-free-guidance training: each sample's text is replaced, with probability
  ``rate``, by the null condition (models.maskgit.null_condition: zeros and an all-False mask).

  text: (B, T, E) float; text_mask: (B, T) bool or None (all real) -> (text, text_mask (B, T)).
  Zeros with an empty mask, rather than a learned null embedding, because the null needs no
  parameter, is exactly what decoding passes as the unconditional input, and with
  ``text_key_padding`` makes the cross-attention read nothing. RayGen itself trains without it
  (rate 0 returns the inputs, the mask made explicit).
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"text drop rate must be in [0, 1], got {rate}")
  if text_mask is None:
    text_mask = jnp.ones(text.shape[:2], bool)
  if rate == 0.0:
    return text, text_mask
  drop = jax.random.bernoulli(key, rate, (text.shape[0],))
  null_text, null_mask = null_condition(text, text_mask)
  return (jnp.where(drop[:, None, None], null_text, text),
          jnp.where(drop[:, None], null_mask, text_mask.astype(bool)))
